"""Issue 3 (Deliver): the wire contract, retries, the switch, per-URL limits, several daemons and
the poll fallback, end to end against real PostgreSQL and real aiohttp receivers on 127.0.0.1.

No timing assertions: gaps between attempts are read from the attempt log (data)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import random
from collections import Counter
from datetime import datetime
from typing import Any

import pytest
from aiohttp import web

from bridge import __version__
from bridge.retry import RetryPolicy
from bridge.verify import verify_standard_webhook
from tests.support.daemon import running, wait_until
from tests.support.receiver import Receiver, black_hole, fail_first, status
from tests.support.server import Db, states

SECRET = b"test-secret"


def log_rows(db: Db, url: str) -> list[tuple[Any, ...]]:
    return db.query("SELECT attempt, started_at, http_status, error FROM qlm_bridge.attempt_log "
                    "WHERE url = %s ORDER BY attempt", (url,))


def gaps(rows: list[tuple[Any, ...]]) -> list[float]:
    started = [r[1] for r in rows]
    return [(b - a).total_seconds() for a, b in itertools.pairwise(started)]


QLM_SEVEN = ("customer_created", "customer_modified", "license_created", "license_activated",
             "license_released", "license_deleted", "customer_deleted")


def _seven_changes(db: Db) -> None:
    db.execute("INSERT INTO customers (full_name, email, privacy_policy_consent) "
                "VALUES ('Ann Lee', 'ann@a.example', true)")
    db.execute("UPDATE customers SET email = 'ann@b.example' WHERE customer_id = 1")
    db.execute("INSERT INTO license_keys (activation_key, customer_id, product_id, product_name, "
               "num_licenses, available_licenses, comment) "
               "VALUES ('K-1', 1, 7, 'Pro', 3, 3, 'first')")
    db.execute("UPDATE license_keys SET computer_id = 'PC-1', computer_name = 'desk', "
               "activation_count = 1, available_licenses = 2, activation_date = now() "
               "WHERE activation_key = 'K-1'")
    db.execute("UPDATE license_keys SET computer_id = NULL, available_licenses = 3 "
               "WHERE activation_key = 'K-1'")
    db.execute("DELETE FROM license_keys WHERE activation_key = 'K-1'")
    db.execute("DELETE FROM customers WHERE customer_id = 1")


async def _seven(db: Db) -> None:
    rx = await Receiver(behaviours={"/flaky": fail_first(1)}).start()
    events: dict[str, Any] = {e: rx.url("/hook") for e in QLM_SEVEN}
    events["customer_created"] = [rx.url("/hook"), rx.url("/flaky")]
    cfg = db.config(webhooks={"events": events, "retry_interval": 0.05,
                              "field_names": {"license": {"comment": "Note"}}})
    async with running(cfg):
        _seven_changes(db)
        await rx.wait_for(lambda: len(rx.on("/hook")) == 7 and len(rx.on("/flaky")) == 2)
    await rx.stop()

    by_type: dict[str, Any] = {}
    for r in rx.on("/hook"):
        h = r.headers
        assert h["Content-Type"] == "application/json"
        assert h["User-Agent"] == f"qlm-webhook-bridge/{__version__}"
        assert h["X-QLM-Signature"] == hashlib.sha256(r.body + SECRET).hexdigest()
        body = json.loads(r.body.decode("utf-8"))
        assert h["X-QLM-Event"] == body["EventType"]
        assert h["X-QLM-Event-Id"] == body["EventId"]
        assert body["Timestamp"].endswith("Z")
        datetime.fromisoformat(body["Timestamp"])
        by_type[body["EventType"]] = body
    assert sorted(by_type) == sorted(QLM_SEVEN)
    ids = [b["EventId"] for b in by_type.values()]
    assert len(set(ids)) == 7

    for name in QLM_SEVEN:
        body = by_type[name]
        info_key = "LicenseInfo" if name.startswith("license_") else "CustomerInfo"
        other = "CustomerInfo" if info_key == "LicenseInfo" else "LicenseInfo"
        assert info_key in body and other not in body, name
        assert set(body) <= {"EventType", "EventId", "Timestamp", info_key, "Previous"}

    created = by_type["license_created"]["LicenseInfo"]
    assert created["ActivationKey"] == "K-1"
    assert created["NumLicenses"] == 3 and type(created["NumLicenses"]) is int
    assert created["AvailableLicenses"] == 3 and created["ActivationCount"] == 0
    assert created["CustomerID"] == 1 and created["ProductID"] == 7
    assert created["ProductName"] == "Pro"
    assert created["ComputerID"] is None
    assert created["Note"] == "first" and "Comment" not in created  # field_names override
    datetime.fromisoformat(created["CreationDate"])
    assert "Previous" not in by_type["license_created"]

    activated = by_type["license_activated"]
    assert activated["LicenseInfo"]["ComputerID"] == "PC-1"
    assert activated["LicenseInfo"]["ActivationCount"] == 1
    datetime.fromisoformat(activated["LicenseInfo"]["ActivationDate"])
    assert activated["Previous"]["ComputerID"] is None

    released = by_type["license_released"]
    assert released["LicenseInfo"]["ComputerID"] is None
    assert released["Previous"]["ComputerID"] == "PC-1"
    assert released["Previous"]["AvailableLicenses"] == 2
    assert by_type["license_deleted"]["LicenseInfo"]["ActivationKey"] == "K-1"

    customer = by_type["customer_created"]["CustomerInfo"]
    assert customer["CustomerID"] == 1 and customer["FullName"] == "Ann Lee"
    assert customer["Email"] == "ann@a.example"
    assert customer["PrivacyConsent"] is True and customer["Phone"] is None
    modified = by_type["customer_modified"]
    assert modified["CustomerInfo"]["Email"] == "ann@b.example"
    assert modified["Previous"] == {"Email": "ann@a.example"}
    assert by_type["customer_deleted"]["CustomerInfo"]["FullName"] == "Ann Lee"

    # a retried delivery carries the same id and the same bytes
    first, second = rx.on("/flaky")
    assert first.body == second.body
    assert first.headers["X-QLM-Event-Id"] == second.headers["X-QLM-Event-Id"] \
        == by_type["customer_created"]["EventId"]
    assert states(db) == {"delivered": 8}


def test_seven_qlm_events_wire_contract(db: Db) -> None:
    asyncio.run(_seven(db))


async def _unsigned(db: Db) -> None:
    rx = await Receiver().start()
    cfg = db.config(webhooks={"secret_key": None, "events": {"customer_created": rx.url()}})
    async with running(cfg):
        db.execute("INSERT INTO customers (full_name) VALUES ('Bo')")
        await rx.wait_for(lambda: len(rx.received) == 1)
    await rx.stop()
    assert "X-QLM-Signature" not in rx.received[0].headers
    assert json.loads(rx.received[0].body)["CustomerInfo"]["FullName"] == "Bo"


def test_no_signature_without_secret(db: Db) -> None:
    asyncio.run(_unsigned(db))


# --- retries -----------------------------------------------------------------------------------


async def _fail_twice(db: Db) -> None:
    rx = await Receiver(behaviours={"/hook": fail_first(2)}).start()
    url = rx.url()
    cfg = db.config(webhooks={"events": {"customer_created": url}, "retry_interval": 0.1,
                              "max_retries": 5})
    async with running(cfg):
        db.execute("INSERT INTO customers (full_name) VALUES ('Cy')")
        await wait_until(lambda: states(db) == {"delivered": 1}, what="delivered")
    await rx.stop()
    assert len(rx.received) == 3
    rows = log_rows(db, url)
    assert [(r[0], r[2]) for r in rows] == [(1, 500), (2, 500), (3, 200)]
    assert db.scalar("SELECT attempts FROM qlm_bridge.delivery") == 3


def test_fail_twice_then_succeed(db: Db) -> None:
    asyncio.run(_fail_twice(db))


async def _always_failing(db: Db) -> None:
    rx = await Receiver(behaviours={"/hook": status(500)}).start()
    url = rx.url()
    interval = 0.3
    cfg = db.config(webhooks={"events": {"customer_created": url}, "retry_interval": interval,
                              "max_retries": 2})
    async with running(cfg):
        db.execute("INSERT INTO customers (full_name) VALUES ('Di')")
        await wait_until(lambda: states(db) == {"failed": 1}, what="failed")
        await asyncio.sleep(2 * interval)  # room for a (wrong) extra attempt
    await rx.stop()
    assert len(rx.received) == 3  # 1 + max_retries
    rows = log_rows(db, url)
    assert [r[0] for r in rows] == [1, 2, 3]
    assert all(r[2] == 500 and r[3] == "HTTP 500" for r in rows)
    assert all(g >= interval - 0.001 for g in gaps(rows)), gaps(rows)
    row = db.query("SELECT attempts, last_status, locked_by FROM qlm_bridge.delivery")
    assert row == [(3, 500, None)]


def test_always_failing_gives_up_after_max_retries(db: Db) -> None:
    asyncio.run(_always_failing(db))


async def _redirect(db: Db) -> None:
    rx = await Receiver().start()
    rx.behaviours["/hook"] = status(302, Location=rx.url("/elsewhere"))
    url = rx.url()
    cfg = db.config(webhooks={"events": {"customer_created": url}, "retry_interval": 0.05,
                              "max_retries": 1})
    async with running(cfg):
        db.execute("INSERT INTO customers (full_name) VALUES ('Ed')")
        await wait_until(lambda: bool(states(db)) and "pending" not in states(db), what="settled")
    await rx.stop()
    assert rx.anything_but({"/hook"}) == []  # a followed 302 would arrive as a GET /elsewhere
    assert states(db) == {"failed": 1}
    rows = log_rows(db, url)
    assert len(rows) == 2
    assert all(r[2] == 302 and "redirect not followed" in r[3] for r in rows)


def test_redirect_is_a_failure_and_not_followed(db: Db) -> None:
    asyncio.run(_redirect(db))


async def _retry_after(db: Db) -> None:
    async def busy_then_ok(_: web.Request, count: int) -> web.StreamResponse:
        if count == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(text="ok")

    rx = await Receiver(behaviours={"/hook": busy_then_ok}).start()
    url = rx.url()
    cfg = db.config(webhooks={"events": {"customer_created": url}, "retry_interval": 0.05,
                              "max_retries": 3})
    async with running(cfg):
        db.execute("INSERT INTO customers (full_name) VALUES ('Flo')")
        # the log row and the delivery update are one statement: read the schedule it set
        await wait_until(lambda: len(log_rows(db, url)) >= 1, what="first attempt")
        pushed = db.scalar(
            "SELECT extract(epoch FROM d.next_attempt_at - l.started_at) "
            "FROM qlm_bridge.delivery d JOIN qlm_bridge.attempt_log l ON l.delivery_id = d.id "
            "WHERE l.attempt = 1 AND d.attempts = 1")
        await wait_until(lambda: states(db) == {"delivered": 1}, what="delivered")
    await rx.stop()
    assert pushed is None or float(pushed) >= 1.0  # None: already retried (checked below)
    rows = log_rows(db, url)
    assert [(r[0], r[2]) for r in rows] == [(1, 429), (2, 200)]
    assert gaps(rows)[0] >= 1.0


def test_retry_after_on_429_is_honoured(db: Db) -> None:
    asyncio.run(_retry_after(db))


async def _exponential(db: Db) -> None:
    rx = await Receiver(behaviours={"/hook": status(503)}).start()
    url = rx.url()
    base = 0.1
    cfg = db.config(webhooks={"events": {"customer_created": url}, "retry_interval": base,
                              "max_retries": 4, "retry_policy": "exponential"})
    async with running(cfg):
        db.execute("INSERT INTO customers (full_name) VALUES ('Gus')")
        await wait_until(lambda: states(db) == {"failed": 1}, what="failed")
    await rx.stop()
    rows = log_rows(db, url)
    assert len(rows) == 5
    g = gaps(rows)
    # equal jitter: the k-th wait is in [base * 2**k / 2, base * 2**k]
    assert all(g[k] >= base * 2 ** k / 2 - 0.001 for k in range(4)), g
    assert g[3] > g[0] and g[2] > g[0], g


def test_exponential_backoff_grows(db: Db) -> None:
    asyncio.run(_exponential(db))


def test_retry_policy_bounds() -> None:
    fixed = RetryPolicy("fixed", 60, 5, 3600)
    assert [fixed.next_delay(n) for n in range(1, 7)] == [60] * 5 + [None]
    assert fixed.next_delay(1, retry_after=120) == 120
    assert fixed.next_delay(1, retry_after=10**6) == 3600  # capped
    assert RetryPolicy("fixed", 60, 0, 3600).next_delay(1) is None
    exp = RetryPolicy("exponential", 1, 20, 30)
    rng = random.Random(7)
    for n in range(1, 21):
        d = exp.next_delay(n, rng=rng)
        assert d is not None
        cap = min(30, 2 ** (n - 1))
        assert cap / 2 <= d <= cap


# --- the switch, per-URL limits, several daemons, the poll fallback ------------------------------


async def _disabled(db: Db) -> None:
    rx = await Receiver().start()
    events = {"customer_created": rx.url()}
    async with running(db.config(webhooks={"enabled": False, "events": events})):
        db.execute("INSERT INTO customers (full_name) SELECT 'c' || g FROM generate_series(1, 5) g")
        await wait_until(lambda: db.scalar("SELECT count(*) FROM qlm_bridge.event "
                                           "WHERE NOT fanned_out") == 0, what="fan-out")
        await asyncio.sleep(0.3)
    assert rx.received == []
    assert states(db) == {"skipped": 5}
    assert db.scalar("SELECT count(*) FROM qlm_bridge.attempt_log") == 0

    async with running(db.config(webhooks={"events": events})):  # re-enabled
        db.execute("INSERT INTO customers (full_name) VALUES ('after')")
        await rx.wait_for(lambda: len(rx.received) >= 1)
        await asyncio.sleep(0.5)  # room for a (wrong) flood of the skipped ones
    await rx.stop()
    assert len(rx.received) == 1
    assert json.loads(rx.received[0].body)["CustomerInfo"]["FullName"] == "after"
    assert states(db) == {"skipped": 5, "delivered": 1}


def test_disabled_sends_nothing_and_is_not_flooded_later(db: Db) -> None:
    asyncio.run(_disabled(db))


async def _black_hole(db: Db) -> None:
    rx = await Receiver(behaviours={"/hole": black_hole()}).start()
    hole, healthy = rx.url("/hole"), rx.url("/ok")
    n = 40
    cfg = db.config(webhooks={"events": {"customer_created": [hole, healthy]},
                              "max_concurrency": 4, "per_url_concurrency": 2, "timeout": 10},
                    daemon={"lease": 20, "shutdown_timeout": 0.2})
    async with running(cfg):
        db.execute(f"INSERT INTO customers (full_name) "
                   f"SELECT 'c' || g FROM generate_series(1, {n}) g")
        await rx.wait_for(lambda: len(rx.on("/ok")) == n)
        await wait_until(lambda: db.scalar(
            "SELECT count(*) FROM qlm_bridge.delivery WHERE url = %s AND state = 'delivered'",
            (healthy,)) == n, what="healthy deliveries acknowledged")
        stuck = len(rx.on("/hole"))
    await rx.stop()
    assert 1 <= stuck <= 2  # the black hole holds its per-URL slots and no more
    assert db.scalar("SELECT count(*) FROM qlm_bridge.delivery WHERE url = %s "
                     "AND state = 'pending'", (hole,)) == n


def test_black_hole_does_not_starve_a_healthy_endpoint(db: Db) -> None:
    asyncio.run(_black_hole(db))


async def _two_daemons(db: Db) -> None:
    rx = await Receiver().start()
    n = 1000
    cfg = db.config(webhooks={"events": {"customer_created": [rx.url("/a"), rx.url("/b")]}})
    async with running(cfg) as d1, running(cfg) as d2:
        assert d1.id != d2.id
        db.execute(f"INSERT INTO customers (full_name) "
                   f"SELECT 'c' || g FROM generate_series(1, {n}) g")
        await rx.wait_for(lambda: len(rx.received) >= 2 * n, timeout=60)
        await wait_until(lambda: states(db) == {"delivered": 2 * n}, what="all acknowledged")
        await asyncio.sleep(0.3)  # room for (wrong) duplicates
    await rx.stop()
    seen = Counter((r.path, r.headers["X-QLM-Event-Id"]) for r in rx.received)
    assert len(seen) == 2 * n
    assert max(seen.values()) == 1, [k for k, v in seen.items() if v > 1][:5]
    ids = {r[0] for r in db.query("SELECT event_id::text FROM qlm_bridge.event")}
    assert {k[1] for k in seen} == ids
    assert db.scalar("SELECT count(*) FROM qlm_bridge.attempt_log") == 2 * n
    # both daemons took part (else this test would not test anything)
    assert db.scalar("SELECT count(DISTINCT daemon_id) FROM qlm_bridge.attempt_log") == 2


def test_two_daemons_deliver_each_exactly_once(db: Db) -> None:
    asyncio.run(_two_daemons(db))


@pytest.fixture
def deaf_db(db: Db) -> Db:
    """Writers never NOTIFY: runtime.sleeping is pinned to false."""
    db.execute("""
        CREATE FUNCTION public.pin_awake() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN NEW.sleeping := false; RETURN NEW; END $$;
        CREATE TRIGGER pin_awake BEFORE UPDATE ON qlm_bridge.runtime
            FOR EACH ROW EXECUTE FUNCTION public.pin_awake();
        UPDATE qlm_bridge.runtime SET sleeping = false;
    """)
    return db


async def _lost_notify(db: Db) -> None:
    rx = await Receiver().start()
    cfg = db.config(webhooks={"events": {"customer_created": rx.url()}},
                    daemon={"poll_interval": 0.3})
    async with running(cfg) as d:
        for i in range(3):
            db.execute("INSERT INTO customers (full_name) VALUES (%s)", (f"n{i}",))
            await rx.wait_for(lambda i=i: len(rx.received) == i + 1)  # type: ignore[misc]
        assert d._listener is not None
        notified = d._listener.notifications
    await rx.stop()
    assert notified == 0  # so the poll delivered them
    assert states(db) == {"delivered": 3}


def test_lost_notify_is_covered_by_the_poll(deaf_db: Db) -> None:
    asyncio.run(_lost_notify(deaf_db))


async def _cut_short(db: Db) -> None:
    rx = await Receiver(behaviours={"/slow": black_hole()}).start()
    cfg = db.config(webhooks={"events": {"customer_created": [rx.url("/slow")]}, "timeout": 5},
                    daemon={"shutdown_timeout": 0.2, "lease": 20})
    async with running(cfg):
        db.execute("INSERT INTO customers (full_name) VALUES ('slow')")
        await rx.wait_for(lambda: len(rx.received) == 1)
    await rx.stop()


def test_a_request_cut_short_by_shutdown_is_logged_and_due_again(db: Db) -> None:
    asyncio.run(_cut_short(db))
    row = db.query("SELECT state, attempts, locked_by, next_attempt_at <= now() "
                   "FROM qlm_bridge.delivery")
    assert row == [("pending", 1, None, True)]
    log = db.query("SELECT attempt, http_status, error FROM qlm_bridge.attempt_log")
    assert log == [(1, None, "cancelled: the daemon was shutting down")]


async def _leftover(db: Db) -> None:
    rx = await Receiver().start()
    db.execute("INSERT INTO qlm_bridge.event (event_type, kind, source_table, op, row_data, "
               "fanned_out) VALUES ('customer_created', 'customer', 'public.customers', "
               "'INSERT', '{\"customer_id\": 7}', true)")
    db.execute("INSERT INTO qlm_bridge.delivery (event_id, url) "
               "SELECT id, %s FROM qlm_bridge.event", (rx.url("/removed"),))
    cfg = db.config(webhooks={"events": {"customer_created": [rx.url("/current")]}})
    async with running(cfg):
        await rx.wait_for(lambda: len(rx.on("/removed")) == 1)
    await rx.stop()


def test_deliveries_to_a_url_removed_from_the_config_still_go_out(db: Db) -> None:
    """What was fanned out before a URL left the config is still delivered (at least once)."""
    asyncio.run(_leftover(db))
    assert states(db) == {"delivered": 1}


async def _standard(db: Db) -> None:
    rx = await Receiver().start()
    cfg = db.config(webhooks={"events": {"customer_created": [rx.url()]},
                              "secret_key": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                              "standard_webhooks": True})
    async with running(cfg):
        db.execute("INSERT INTO customers (full_name) VALUES ('sw')")
        await rx.wait_for(lambda: len(rx.received) == 1)
    await rx.stop()
    r = rx.received[0]
    # an independent computation of the Standard Webhooks signature
    key = base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    msg_id, stamp = r.headers["webhook-id"], r.headers["webhook-timestamp"]
    signed = f"{msg_id}.{stamp}.".encode() + r.body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert r.headers["webhook-signature"] == expected
    assert msg_id == r.headers["X-QLM-Event-Id"]
    assert verify_standard_webhook(r.body, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", r.headers)
    assert not verify_standard_webhook(r.body + b" ", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                                       r.headers)
    assert not verify_standard_webhook(r.body, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                                       r.headers, now=int(stamp) + 301)
    assert r.headers["X-QLM-Signature"] == hashlib.sha256(
        r.body + b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").hexdigest()


def test_standard_webhooks_signature_when_enabled(db: Db) -> None:
    asyncio.run(_standard(db))
