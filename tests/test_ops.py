"""status, replay, prune and send-test against real PostgreSQL and a real aiohttp receiver.

Queue states are set up by inserting event/delivery rows directly; time is injected (`now=`)
instead of slept.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bridge import ops
from bridge.errors import BridgeError
from tests.support.campaign import self_signed_cert, server_ssl
from tests.support.config import SECRET
from tests.support.receiver import (
    Receiver,
    delay,
    in_thread,
    json_answer,
    redirect,
    text_answer,
)
from tests.support.server import Db

CLI = str(Path(sys.executable).parent / "qlm-bridge")
NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
A = "http://127.0.0.1:9/a"
B = "http://127.0.0.1:9/b"


# --- helpers ---------------------------------------------------------------------------------


def add_event(db: Db, event_type: str = "license_created", *, age: float = 0.0,
              fanned_out: bool = True) -> tuple[int, uuid.UUID]:
    kind = "license" if event_type.startswith("license_") else "customer"
    row = db.query(
        "INSERT INTO qlm_bridge.event (event_type, kind, source_table, op, row_data, created_at,"
        " fanned_out) VALUES (%s, %s, 'public.x', 'INSERT', '{\"activation_key\": \"K\"}', %s, %s)"
        " RETURNING id, event_id",
        (event_type, kind, NOW - timedelta(seconds=age), fanned_out))
    return row[0][0], row[0][1]


def add_delivery(db: Db, event: int, url: str, state: str = "pending", *, attempts: int = 0,
                 locked_for: float | None = None, updated_ago: float = 0.0) -> int:
    locked_until = NOW + timedelta(seconds=locked_for) if locked_for is not None else None
    return int(db.scalar(
        "INSERT INTO qlm_bridge.delivery (event_id, url, state, attempts, locked_by,"
        " locked_until, next_attempt_at, last_status, updated_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (event, url, state, attempts, "d1" if locked_until else None, locked_until,
         NOW + timedelta(hours=1), 500 if state == "failed" else None,
         NOW - timedelta(seconds=updated_ago))))


def add_log(db: Db, age: float) -> None:
    db.execute(
        "INSERT INTO qlm_bridge.attempt_log (event_id, event_type, url, attempt, started_at,"
        " duration_ms, http_status)"
        " VALUES (gen_random_uuid(), 'license_created', %s, 1, %s, 1, 200)",
        (A, NOW - timedelta(seconds=age)))


def delivery(db: Db, delivery_id: int) -> tuple[Any, ...]:
    return db.query("SELECT state, attempts, locked_by, locked_until, next_attempt_at"
                    " FROM qlm_bridge.delivery WHERE id = %s", (delivery_id,))[0]


def write_config(tmp_path: Path, db: Db, extra: str = "") -> Path:
    path = tmp_path / "bridge.yaml"
    path.write_text(f"database:\n  dsn: {json.dumps(db.dsn)}\n{extra}", encoding="utf-8")
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QLM_", "PG"))}
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=60, env=env)


def hooks(*events: tuple[str, list[str]], **more: Any) -> dict[str, Any]:
    return {"events": dict(events), **more}


# --- status ----------------------------------------------------------------------------------


def test_status_counts_per_url_and_type(db: Db) -> None:
    e1, _ = add_event(db, "license_created", age=300)
    e2, _ = add_event(db, "license_created", age=100)
    e3, _ = add_event(db, "customer_created", age=50)
    add_delivery(db, e1, A, "pending", attempts=1, locked_for=30)   # in flight
    add_delivery(db, e1, B, "pending", attempts=2)                  # retrying
    add_delivery(db, e2, A, "pending")                              # new
    add_delivery(db, e2, B, "failed", attempts=3)
    add_delivery(db, e3, A, "delivered", attempts=1)
    add_delivery(db, e3, B, "skipped")
    add_event(db, "license_deleted", age=900, fanned_out=False)
    db.execute("INSERT INTO qlm_bridge.daemon (id, hostname, pid, started_at, heartbeat_at,"
               " config_hash) VALUES ('d-live', 'h1', 11, %s, %s, 'abc'),"
               " ('d-dead', 'h2', 22, %s, %s, NULL)",
               (NOW - timedelta(hours=1), NOW - timedelta(seconds=2),
                NOW - timedelta(days=1), NOW - timedelta(hours=2)))

    report = ops.status(db.dsn, db.config(), now=NOW)

    counts = {(r.url, r.event_type): tuple(getattr(r, c) for c in ops.COUNTS)
              for r in report.deliveries}
    #                                     pend fly retry fail skip done
    assert counts == {(A, "customer_created"): (0, 0, 0, 0, 0, 1),
                      (A, "license_created"): (2, 1, 0, 0, 0, 0),
                      (B, "customer_created"): (0, 0, 0, 0, 1, 0),
                      (B, "license_created"): (1, 0, 1, 1, 0, 0)}
    assert report.totals() == {"pending": 3, "in_flight": 1, "retrying": 1, "failed": 1,
                               "skipped": 1, "delivered": 1}
    assert report.unfanned_events == 1
    assert report.oldest_pending_age == pytest.approx(900)  # the event not fanned out yet
    assert [(d.id, d.stale) for d in report.daemons] == [("d-live", False), ("d-dead", True)]
    assert report.daemons[0].heartbeat_age == pytest.approx(2)

    text = ops.format_status(report)
    assert "IN-FLIGHT" in text and "RETRYING" in text and "oldest pending: 15m00s" in text
    assert "d-dead" in text and "(stale)" in text
    json.dumps(report.to_json())  # serialisable


def test_status_of_an_empty_queue(db: Db) -> None:
    report = ops.status(db.dsn, db.config(), now=NOW)
    assert report.deliveries == () and report.oldest_pending_age is None
    assert "no deliveries recorded yet" in ops.format_status(report)
    assert "daemons: none seen" in ops.format_status(report)


def test_status_cli_json_and_table(db: Db, tmp_path: Path) -> None:
    e1, _ = add_event(db)
    add_delivery(db, e1, A, "failed", attempts=3)
    add_delivery(db, e1, B, "delivered", attempts=1)
    path = write_config(tmp_path, db)

    result = run_cli("status", "--json", "--config", str(path))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["totals"]["failed"] == 1 and data["totals"]["delivered"] == 1
    assert {(r["url"], r["failed"]) for r in data["deliveries"]} == {(A, 1), (B, 0)}
    assert data["unfanned_events"] == 0 and data["daemons"] == []

    result = run_cli("status", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert A in result.stdout and "TOTAL" in result.stdout


def test_status_on_a_database_without_the_bridge(empty_db: Db, tmp_path: Path) -> None:
    with pytest.raises(BridgeError, match="not installed"):
        ops.status(empty_db.dsn, empty_db.config())
    result = run_cli("status", "--config", str(write_config(tmp_path, empty_db)))
    assert result.returncode == 1
    assert "qlm-bridge install" in result.stderr and "Traceback" not in result.stderr


# --- replay ----------------------------------------------------------------------------------


@dataclass
class Queue:
    """One delivery in each state for two events, two URLs and two types."""

    ids: dict[str, int] = field(default_factory=dict)
    events: dict[str, uuid.UUID] = field(default_factory=dict)


@pytest.fixture
def queue(db: Db) -> Queue:
    q = Queue()
    e1, q.events["e1"] = add_event(db, "license_created")
    e2, q.events["e2"] = add_event(db, "customer_created")
    q.ids["e1A_failed_old"] = add_delivery(db, e1, A, "failed", attempts=3, updated_ago=7200)
    q.ids["e1B_delivered"] = add_delivery(db, e1, B, "delivered", attempts=1)
    q.ids["e2A_skipped"] = add_delivery(db, e2, A, "skipped")
    q.ids["e2B_failed_new"] = add_delivery(db, e2, B, "failed", attempts=3, updated_ago=60)
    e3, q.events["e3"] = add_event(db, "license_created")
    q.ids["e3A_pending"] = add_delivery(db, e3, A, "pending", attempts=1, locked_for=30)
    return q


def requeued(db: Db, q: Queue) -> set[str]:
    return {name for name, i in q.ids.items()
            if delivery(db, i)[:4] == ("pending", 0, None, None)}


def test_replay_by_event_id_resets_the_delivery(db: Db, queue: Queue) -> None:
    result = ops.replay(db.dsn, db.config(),
                        ops.ReplayFilter(event_ids=(queue.events["e1"],)), now=NOW)
    assert (result.requeued, result.created, result.queued) == (1, 0, 1)
    assert delivery(db, queue.ids["e1A_failed_old"]) == ("pending", 0, None, None, NOW)
    assert requeued(db, queue) == {"e1A_failed_old"}
    assert delivery(db, queue.ids["e1B_delivered"])[0] == "delivered"
    assert delivery(db, queue.ids["e3A_pending"])[:3] == ("pending", 1, "d1")  # untouched


def test_replay_by_url_type_and_time(db: Db, queue: Queue) -> None:
    cfg = db.config()
    assert ops.replay(db.dsn, cfg, ops.ReplayFilter(urls=(B,)), now=NOW).queued == 1
    assert requeued(db, queue) == {"e2B_failed_new"}
    assert ops.replay(db.dsn, cfg, ops.ReplayFilter(event_types=("customer_created",)),
                      now=NOW).queued == 1
    assert requeued(db, queue) == {"e2B_failed_new", "e2A_skipped"}
    since = NOW - timedelta(hours=3)
    assert ops.replay(db.dsn, cfg, ops.ReplayFilter(since=since), now=NOW).queued == 1
    assert requeued(db, queue) == {"e2B_failed_new", "e2A_skipped", "e1A_failed_old"}


def test_replay_failed_since_skips_older_failures(db: Db, queue: Queue) -> None:
    since = ops.parse_since("1h", now=NOW)
    assert ops.replay(db.dsn, db.config(), ops.ReplayFilter(since=since), now=NOW).queued == 2
    assert requeued(db, queue) == {"e2B_failed_new", "e2A_skipped"}  # not the 2 h old failure


def test_replay_all_states_includes_delivered(db: Db, queue: Queue) -> None:
    result = ops.replay(db.dsn, db.config(),
                        ops.ReplayFilter(event_types=("license_created",), all_states=True),
                        now=NOW)
    assert result.queued == 2
    assert requeued(db, queue) == {"e1A_failed_old", "e1B_delivered"}


def test_replay_works_in_batches(db: Db) -> None:
    ids = []
    for _ in range(7):
        event, _ = add_event(db)
        ids.append(add_delivery(db, event, A, "failed", attempts=3))
    seen: list[int] = []
    result = ops.replay(db.dsn, db.config(), ops.ReplayFilter(urls=(A,)), now=NOW,
                        progress=seen.append, batch_size=3)
    assert result.queued == 7 and seen == [3, 3, 1]
    assert all(delivery(db, i)[0] == "pending" for i in ids)


def test_replay_event_id_fans_out_to_urls_configured_now(db: Db) -> None:
    event, event_id = add_event(db, "license_activated")
    old = add_delivery(db, event, A, "delivered", attempts=1)
    cfg = db.config(webhooks=hooks(("license_activated", [A, B]), ("license_created", [A])))
    missing = uuid.uuid4()
    result = ops.replay(db.dsn, cfg, ops.ReplayFilter(event_ids=(event_id, missing)), now=NOW)
    assert (result.requeued, result.created) == (0, 1)
    assert result.unknown_event_ids == (missing,)
    rows = db.query("SELECT url, state, attempts FROM qlm_bridge.delivery WHERE event_id = %s"
                    " ORDER BY url", (event,))
    assert rows == [(A, "delivered", 1), (B, "pending", 0)]
    assert delivery(db, old)[0] == "delivered"
    # again: nothing new to create
    assert ops.replay(db.dsn, cfg, ops.ReplayFilter(event_ids=(event_id,)), now=NOW).queued == 0


def test_replay_cli(db: Db, queue: Queue, tmp_path: Path) -> None:
    path = write_config(tmp_path, db)
    result = run_cli("replay", "--config", str(path))
    assert result.returncode == 2 and "say what to replay" in result.stderr
    result = run_cli("replay", "--config", str(path), "--failed-since", "yesterday-ish")
    assert result.returncode == 2 and "--failed-since" in result.stderr
    result = run_cli("replay", "--config", str(path), "--event-type", "license_exploded")
    assert result.returncode == 2 and "unknown event type" in result.stderr
    result = run_cli("replay", "--config", str(path), "--event-id", str(queue.events["e2"]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "queued 2 deliveries"
    result = run_cli("replay", "--config", str(path), "--all")
    assert result.returncode == 0 and result.stdout.strip() == "queued 1 delivery"


# --- prune -----------------------------------------------------------------------------------

DAY = 86400.0


def test_prune_deletes_only_settled_old_events_and_old_logs(db: Db) -> None:
    cfg = db.config(retention={"delivered_days": 7, "log_days": 30, "batch_size": 2})
    doomed, kept = [], []
    for state_a, state_b in (("delivered", "delivered"), ("delivered", "skipped"),
                             ("skipped", None)):
        event, _ = add_event(db, age=8 * DAY)
        add_delivery(db, event, A, state_a)
        if state_b:
            add_delivery(db, event, B, state_b)
        doomed.append(event)
    doomed.append(add_event(db, age=9 * DAY)[0])                   # no subscriber
    for state in ("failed", "pending"):
        event, _ = add_event(db, age=8 * DAY)
        add_delivery(db, event, A, "delivered")
        add_delivery(db, event, B, state)
        kept.append(event)
    kept.append(add_event(db, age=10 * DAY, fanned_out=False)[0])  # not fanned out yet
    recent, _ = add_event(db, age=6 * DAY)
    add_delivery(db, recent, A, "delivered")
    kept.append(recent)
    for age in (31, 40, 45, 29, 1):
        add_log(db, age * DAY)

    seen: list[ops.PruneProgress] = []
    assert ops.prune_once(db.dsn, cfg, now=NOW, progress=seen.append) == (4, 3)
    left = {r[0] for r in db.query("SELECT id FROM qlm_bridge.event")}
    assert left == set(kept)
    assert db.scalar("SELECT count(*) FROM qlm_bridge.delivery WHERE event_id = ANY(%s)",
                     (doomed,)) == 0
    assert db.scalar("SELECT count(*) FROM qlm_bridge.attempt_log") == 2
    assert len(seen) >= 4 and seen[-1] == ops.PruneProgress(4, 3)  # batches of 2
    assert ops.prune_once(db.dsn, cfg, now=NOW) == (0, 0)


def test_prune_older_than_overrides_retention(db: Db) -> None:
    event, _ = add_event(db, age=2 * DAY)
    add_delivery(db, event, A, "delivered")
    add_log(db, 2 * DAY)
    cfg = db.config()
    assert ops.prune_once(db.dsn, cfg, now=NOW) == (0, 0)
    assert ops.prune_once(db.dsn, cfg, now=NOW, older_than=DAY, logs_older_than=DAY) == (1, 1)


def test_prune_walks_events_in_capture_order(db: Db) -> None:
    """Prune walks the primary key up to the first event captured after the cutoff (there is
    no index on created_at): an old event written after it (its transaction began before the
    cutoff and wrote late) waits for a later run; the events before it go now."""
    cfg = db.config(retention={"batch_size": 2})
    old = [add_event(db, age=9 * DAY)[0] for _ in range(3)]
    recent, _ = add_event(db, age=DAY)
    late, _ = add_event(db, age=8 * DAY)
    assert ops.prune_once(db.dsn, cfg, now=NOW) == (3, 0)
    assert {r[0] for r in db.query("SELECT id FROM qlm_bridge.event")} == {recent, late}
    assert not set(old) & {r[0] for r in db.query("SELECT id FROM qlm_bridge.event")}
    # once the recent one is old too (or gone), the late one goes
    assert ops.prune_once(db.dsn, cfg, now=NOW + timedelta(days=7)) == (2, 0)
    assert db.scalar("SELECT count(*) FROM qlm_bridge.event") == 0
    assert db.query("SELECT indexname FROM pg_indexes WHERE indexname = 'event_created_idx'") == []


def test_prune_skips_locked_rows_instead_of_waiting(db: Db) -> None:
    cfg = db.config(retention={"batch_size": 10})
    busy, _ = add_event(db, age=30 * DAY)
    free, _ = add_event(db, age=30 * DAY)
    with psycopg.connect(db.dsn) as holder, psycopg.connect(db.dsn, autocommit=True) as conn:
        holder.execute("SELECT 1 FROM qlm_bridge.event WHERE id = %s FOR UPDATE", (busy,))
        conn.execute("SET lock_timeout = '3s'")  # a wait would fail the test, not hang it
        assert ops.prune_once(conn, cfg, now=NOW) == (1, 0)
        holder.rollback()
    left = {r[0] for r in db.query("SELECT id FROM qlm_bridge.event")}
    assert busy in left and free not in left  # pruned past the locked row, which waits its turn
    assert left == {busy}


def test_prune_cli(db: Db, tmp_path: Path) -> None:
    event, _ = add_event(db, age=0)
    add_delivery(db, event, A, "delivered")
    db.execute("UPDATE qlm_bridge.event SET created_at = now() - interval '3 hours'")
    path = write_config(tmp_path, db)
    assert run_cli("prune", "--config", str(path)).stdout.strip() == \
        "pruned 0 events and 0 log rows"
    result = run_cli("prune", "--config", str(path), "--older-than", "2h")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "pruned 1 event and 0 log rows"
    assert run_cli("prune", "--config", str(path), "--older-than", "soon").returncode == 2


def test_durations() -> None:
    assert ops.parse_duration("90s") == 90
    assert ops.parse_duration("2h") == 7200
    assert ops.parse_duration("1h30m") == 5400
    assert ops.parse_duration("1.5d") == 1.5 * DAY
    assert ops.parse_duration("1w") == 7 * DAY
    for bad in ("", "5", "h", "2x", "-1h", "1h 2", "2h!"):
        with pytest.raises(ValueError):
            ops.parse_duration(bad)
    assert ops.parse_since("2h", now=NOW) == NOW - timedelta(hours=2)
    assert ops.parse_since("2030-06-01T10:00:00Z") == NOW - timedelta(hours=2)
    assert ops.parse_since("2030-06-01T10:00:00").tzinfo is not None
    with pytest.raises(ValueError, match="neither an ISO time"):
        ops.parse_since("last tuesday")


# --- send-test against a real receiver --------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rx = Receiver(behaviours={"/ok": json_answer({"received": True, "pad": "x" * 2000}),
                              "/fail": text_answer("receiver exploded", 500),
                              "/slow": delay(5)})
    with in_thread(rx):
        rx.behaviours["/redirect"] = redirect(rx.url("/ok"), 302)
        yield rx


def test_send_test_signs_and_reports(db: Db, receiver: Receiver) -> None:
    cfg = db.config()
    [result] = ops.send_test([receiver.url("/ok")], "license_activated", cfg)
    assert result.ok and result.status == 200 and result.latency_ms > 0
    assert json.loads(result.response)["received"] is True
    [got] = receiver.received
    path, hdrs, body = got.path, got.headers, got.body
    assert path == "/ok"
    assert hdrs["X-QLM-Signature"] == hashlib.sha256(body + SECRET.encode()).hexdigest()
    assert hdrs["X-QLM-Event"] == "license_activated" and hdrs["X-QLM-Test"] == "1"
    payload = json.loads(body)
    assert payload["EventType"] == "license_activated"
    assert payload["EventId"] == hdrs["X-QLM-Event-Id"] == result.event_id
    assert payload["LicenseInfo"]["ActivationKey"].startswith("TEST-")
    text = ops.format_send_result(result)
    assert "HTTP 200 OK" in text and "(truncated)" in text


def test_send_test_failures(db: Db, receiver: Receiver) -> None:
    cfg = db.config(webhooks={"timeout": 0.3})
    fail, redirect, slow = ops.send_test(
        [receiver.url("/fail"), receiver.url("/redirect"), receiver.url("/slow")],
        "customer_created", cfg)
    assert (fail.ok, fail.status, fail.response) == (False, 500, "receiver exploded")
    assert (redirect.ok, redirect.status) == (False, 302)
    assert redirect.location == receiver.url("/ok")
    assert "not followed" in ops.format_send_result(redirect)
    assert slow.status is None and "timeout after 0.3 s" in (slow.error or "")
    # no /ok: a followed redirect would arrive there (as a GET)
    assert [(r.method, r.path) for r in receiver.received] == [
        ("POST", "/fail"), ("POST", "/redirect"), ("POST", "/slow")]
    assert json.loads(receiver.received[0].body)["CustomerInfo"]["FullName"] == "Test Customer"


def test_send_test_connection_refused(db: Db) -> None:
    [result] = ops.send_test(["http://127.0.0.1:1/hook"], "license_created", db.config())
    assert not result.ok and result.status is None
    assert "ClientConnectorError" in (result.error or "")


def test_send_test_honours_block_private_addresses(db: Db, receiver: Receiver) -> None:
    """send-test goes through the daemon's HTTP client, guard included."""
    cfg = db.config(webhooks={"block_private_addresses": True})
    [result] = ops.send_test([receiver.url("/ok")], "license_created", cfg)
    assert result.status is None and "blocked" in (result.error or "")
    assert receiver.received == []


def test_send_test_verifies_tls_and_honours_ca_bundle(db: Db, tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)

    async def run() -> tuple[ops.SendResult, ops.SendResult, int]:
        tls = await Receiver(ssl_context=server_ssl(cert, key)).start()
        try:
            [refused] = await asyncio.to_thread(ops.send_test, [tls.url("/t")],
                                                "license_created", db.config())
            [trusted] = await asyncio.to_thread(
                ops.send_test, [tls.url("/t")], "license_created",
                db.config(webhooks={"ca_bundle": str(cert)}))
        finally:
            await tls.stop()
        return refused, trusted, tls.counts["/t"]

    refused, trusted, reached = asyncio.run(run())
    assert refused.status is None and "CERTIFICATE_VERIFY_FAILED" in (refused.error or "")
    assert trusted.ok and reached == 1


def test_send_test_cli(db: Db, receiver: Receiver, tmp_path: Path) -> None:
    path = write_config(tmp_path, db, f"""\
webhooks:
  secret_key: {SECRET}
  timeout: 2
  events:
    license_released: "{receiver.url('/ok')};{receiver.url('/fail')}"
""")
    result = run_cli("send-test", "--config", str(path), receiver.url("/ok"))
    assert result.returncode == 0, result.stderr
    assert "HTTP 200 OK" in result.stdout and "Traceback" not in result.stderr
    result = run_cli("send-test", "--config", str(path), "--event", "license_released")
    assert result.returncode == 1
    assert "HTTP 200" in result.stdout and "HTTP 500" in result.stdout
    released = json.loads(receiver.received[-1].body)
    assert released["Previous"]["ComputerID"] == "TEST-COMPUTER"
    assert run_cli("send-test", "--config", str(path), "ftp//nope").returncode == 2
    assert run_cli("send-test", "--config", str(path), "--event", "customer_deleted"
                   ).returncode == 2  # nothing configured for it
    assert run_cli("send-test", "--config", str(path)).returncode == 2
    assert len(receiver.received) == 3


def test_send_test_cli_says_when_unsigned(db: Db, receiver: Receiver, tmp_path: Path) -> None:
    path = write_config(tmp_path, db, "webhooks: {timeout: 2}\n")
    result = run_cli("send-test", "--config", str(path), receiver.url("/ok"))
    assert result.returncode == 0, result.stderr
    assert f"note: no secret_key for {receiver.url('/ok')}; unsigned" in result.stderr
    assert "X-QLM-Signature" not in receiver.received[-1].headers

