"""README promises that had no test (issue 14): each test here fails when its promise breaks.

Through the public surface only: a real daemon (`qlm-bridge run` as a process, or a
`bridge.daemon.Daemon` in this loop), real PostgreSQL, real receivers, the CLI. Times are asserted
only where the promise is about time (Retry-After, a lease, "within about one poll"), and then
with bounds far from what a broken daemon would show."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp import web

from tests.support.config import config_data
from tests.support.daemon import DaemonProcess, running
from tests.support.receiver import InFlight, Receiver, redirect, status
from tests.support.server import Db, states


def _insert_licenses(db: Db, prefix: str, count: int) -> None:
    db.execute("INSERT INTO license_keys (activation_key) "
               "SELECT %s || g FROM generate_series(1, %s::int) g", (prefix, count))


def _state_by_url(db: Db) -> dict[str, str]:
    return dict(db.query("SELECT url, state FROM qlm_bridge.delivery"))


def _event_ids(db: Db) -> set[str]:
    return {r[0] for r in db.query("SELECT event_id::text FROM qlm_bridge.event "
                                   "WHERE event_type = 'license_created'")}


# --- max_concurrency ---------------------------------------------------------------------------


def test_max_concurrency_caps_requests_in_flight_across_all_urls(db: Db) -> None:
    """README: requests sent and not yet recorded never exceed webhooks.max_concurrency. Four
    URLs with room for 8 each: only the global cap of 3 holds the daemon back."""
    cap, paths, events = 3, ["/u0", "/u1", "/u2", "/u3"], 20

    async def run() -> tuple[int, dict[str, set[str]]]:
        probe = InFlight()
        rx = await Receiver(behaviours={p: probe.behaviour(0.1) for p in paths}).start()
        cfg = db.config(webhooks={"events": {"license_created": [rx.url(p) for p in paths]},
                                  "max_concurrency": cap, "per_url_concurrency": 8})
        try:
            async with running(cfg):
                _insert_licenses(db, "MC", events)
                await rx.wait_for(lambda: all(len(rx.unique(p)) == events for p in paths), 60,
                                  "every delivery")
        finally:
            await rx.stop()
        return probe.peak, {p: rx.unique(p) for p in paths}

    peak, got = asyncio.run(run())
    assert peak == cap  # reached, never exceeded
    assert all(ids == _event_ids(db) for ids in got.values())


# --- what counts as delivered ------------------------------------------------------------------


def test_any_2xx_is_delivered_and_3xx_is_a_failure(db: Db) -> None:
    codes = {"/201": status(201), "/202": status(202), "/204": status(204),
             "/304": status(304), "/307": redirect("/elsewhere", 307)}

    async def run() -> Receiver:
        rx = await Receiver(behaviours=dict(codes)).start()
        cfg = db.config(webhooks={"events": {"customer_created": [rx.url(p) for p in codes]},
                                  "max_retries": 1, "retry_interval": 0.05})
        try:
            async with running(cfg):
                db.execute("INSERT INTO customers (full_name) VALUES ('Two Hundred')")
                await rx.wait_for(lambda: bool(states(db)) and "pending" not in states(db),
                                  20, "every delivery to settle")
        finally:
            await rx.stop()
        return rx

    rx = asyncio.run(run())
    by_url = _state_by_url(db)
    for path in ("/201", "/202", "/204"):
        assert by_url[rx.url(path)] == "delivered", path
        assert len(rx.on(path)) == 1, path  # no retry after a 2xx
    for path in ("/304", "/307"):
        assert by_url[rx.url(path)] == "failed", path
        assert len(rx.on(path)) == 2, path  # the first attempt and max_retries=1 retry
    assert rx.anything_but(set(codes)) == []  # the 307 was not followed


# --- Retry-After on 503, as an HTTP date -------------------------------------------------------


def test_retry_after_on_503_as_an_http_date_is_honoured(db: Db) -> None:
    """The first answer is 503 with `Retry-After: <HTTP date 3 s ahead>` (whole seconds, so the
    wait is 2-3 s); without it the retry would come after retry_interval (0.1 s)."""
    async def busy_then_ok(_: web.Request, count: int) -> web.StreamResponse:
        if count == 1:
            when = datetime.now(UTC) + timedelta(seconds=3)
            return web.Response(status=503, headers={"Retry-After": format_datetime(when, True)})
        return web.Response(text="ok")

    async def run() -> list[float]:
        rx = await Receiver(behaviours={"/hook": busy_then_ok}).start()
        cfg = db.config(webhooks={"events": {"customer_created": rx.url()},
                                  "retry_interval": 0.1, "max_retries": 3})
        try:
            async with running(cfg):
                db.execute("INSERT INTO customers (full_name) VALUES ('Busy')")
                await rx.wait_for(lambda: states(db) == {"delivered": 1}, 20, "delivered")
        finally:
            await rx.stop()
        return [r.at for r in rx.on("/hook")]

    arrivals = asyncio.run(run())
    assert len(arrivals) == 2
    assert arrivals[1] - arrivals[0] >= 1.5, arrivals  # the date was honoured


# --- leases ------------------------------------------------------------------------------------


def test_a_lease_is_not_taken_before_it_expires(db: Db, tmp_path: Path) -> None:
    """Two live daemons: whichever claims the delivery holds its lease while the receiver takes
    3 s to answer; the other, polling every 0.5 s, must not send it meanwhile. (A daemon that
    stops heartbeating is reaped sooner: tests/test_takeover.py.)"""
    async def slow_first(_: web.Request, count: int) -> web.StreamResponse:
        if count == 1:
            await asyncio.sleep(3)
        return web.Response(text="ok")

    async def run() -> int:
        rx = await Receiver(behaviours={"/hook": slow_first}).start()
        cfg = config_data(db.dsn, webhooks={"events": {"license_created": rx.url()},
                                            "timeout": 4},
                          daemon={"lease": 5})
        daemons = [DaemonProcess(tmp_path, cfg, name=n).start() for n in ("a", "b")]
        try:
            for d in daemons:
                await d.wait_ready(db.dsn)
            _insert_licenses(db, "LEASE", 1)
            await rx.wait_for(lambda: states(db) == {"delivered": 1}, 20, "the delivery")
            for d in daemons:
                assert await d.terminate() == 0
        finally:
            for d in daemons:
                d.kill()
            await rx.stop()
        return len(rx.on("/hook"))

    assert asyncio.run(run()) == 1  # sent once: the other daemon left the lease alone


# --- NOTIFY: stale snapshots and the last poll -------------------------------------------------


@contextmanager
def _listening(db: Db) -> Iterator[psycopg.Connection[Any]]:
    """A connection that LISTENs on the bridge's channel (the schema name)."""
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("LISTEN qlm_bridge")
        yield conn


def _notified(conn: psycopg.Connection[Any], within: float, pid: int | None = None) -> bool:
    """Did a NOTIFY arrive within `within` seconds (from backend `pid`, when given)?"""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        if any(pid in (None, n.pid) for n in conn.notifies(timeout=left, stop_after=1)):
            return True
    return False


def _drain(conn: psycopg.Connection[Any]) -> None:
    while _notified(conn, 0.05):  # what earlier writes sent
        pass


def _probe(db: Db, conn: psycopg.Connection[Any], within: float) -> bool:
    """Write a probe row (a customer; nobody subscribes): did it NOTIFY?"""
    with psycopg.connect(db.dsn, autocommit=True) as probe:
        probe.execute("INSERT INTO customers (full_name) VALUES ('probe')")
        pid = probe.info.backend_pid
    return _notified(conn, within, pid)


def _until_writers_notify(db: Db, conn: psycopg.Connection[Any], timeout: float = 20) -> None:
    """Probe until a write NOTIFYs: the daemon has gone idle and switched NOTIFY back on."""
    _drain(conn)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _probe(db, conn, 0.3):
            return
    raise AssertionError(f"writers were not asked to NOTIFY within {timeout:g} s")


# What a capture trigger reads to decide whether to NOTIFY (sql/capture_v1.sql). Read inside
# the writer's own transaction, it says what that writer's trigger saw: the tests use it only
# to set their scene (a writer that skipped NOTIFY), never to assert the daemon's behaviour.
WRITERS_NOTIFY = ("SELECT r.sleeping AND (r.sleeping_until IS NULL OR r.sleeping_until > now()) "
                  "FROM qlm_bridge.runtime r WHERE r.id = 1")


async def _while_writers_skip_notify(writer: psycopg.Connection[Any], statement: str,
                                     timeout: float = 20) -> None:
    """Run `statement` in `writer`'s transaction at a moment when its trigger skips NOTIFY
    (the daemon is draining a backlog); roll back and try again until it does."""
    def skipping() -> bool:
        row = writer.execute(WRITERS_NOTIFY.encode()).fetchone()
        return row is not None and row[0] is False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # off before and after the statement (each its own snapshot under READ COMMITTED):
        # the trigger, in between, read it off too, unless it flipped twice in a millisecond
        if skipping():
            writer.execute(statement.encode())
            if skipping():
                return
        writer.rollback()
        await asyncio.sleep(0.005)
    raise AssertionError(f"writers never skipped NOTIFY within {timeout:g} s of a burst")


BURST = 1500


async def _across_the_switch(db: Db, tmp_path: Path, daemon: dict[str, float],
                             writer: psycopg.Connection[Any], while_busy: str,
                             after_switch: str | None, within: float) -> set[str]:
    """`writer` runs `while_busy` while the daemon drains a burst with NOTIFY off, then (after
    the daemon has gone idle and switched NOTIFY on) `after_switch`, and commits without a
    NOTIFY. Its event must arrive within `within` seconds. Returns the event ids received."""
    rx = await Receiver().start()
    cfg = config_data(db.dsn, webhooks={"events": {"license_created": rx.url()},
                                        "per_url_concurrency": 4}, daemon=daemon)
    d = DaemonProcess(tmp_path, cfg).start()
    try:
        await d.wait_ready(db.dsn)
        _insert_licenses(db, "BURST", BURST)  # a backlog: writers skip NOTIFY while it drains
        await _while_writers_skip_notify(writer, while_busy)
        await rx.wait_for(lambda: len(rx.on("/hook")) >= BURST, 30, "the burst")
        with _listening(db) as listener:
            await asyncio.to_thread(_until_writers_notify, db, listener)
            if after_switch is not None:
                writer.execute(after_switch.encode())
            pid = writer.info.backend_pid
            writer.commit()
            assert not await asyncio.to_thread(_notified, listener, 0.5, pid), \
                "the writer NOTIFYed: it did not miss the switch, nothing was tested"
        await rx.wait_for(lambda: len(rx.unique("/hook")) == BURST + 1, within,
                          f"the writer's event within {within:g} s")
        assert await d.terminate() == 0
    finally:
        d.kill()
        await rx.stop()
    return rx.unique("/hook")


@pytest.mark.parametrize("isolation", [psycopg.IsolationLevel.REPEATABLE_READ,
                                       psycopg.IsolationLevel.SERIALIZABLE])
def test_repeatable_read_and_serializable_writers_get_their_events(
        db: Db, tmp_path: Path, isolation: psycopg.IsolationLevel) -> None:
    """README: such a writer reads the NOTIFY flag from its snapshot, which may be stale; its
    event may wait for the next poll (about poll_interval, 1 s here), never longer. Its snapshot
    is taken while the daemon is busy, its row written after the daemon went idle."""
    with psycopg.connect(db.dsn) as writer:
        writer.isolation_level = isolation
        got = asyncio.run(_across_the_switch(
            db, tmp_path, {"poll_interval": 1.0}, writer,
            while_busy="SELECT count(*) FROM license_keys",
            after_switch="INSERT INTO license_keys (activation_key) VALUES ('STALE')",
            within=6))
    assert got == _event_ids(db)


def test_a_writer_that_missed_the_notify_switch_is_polled_for_at_once(
        db: Db, tmp_path: Path) -> None:
    """README: when a daemon goes idle it turns NOTIFY back on and polls once more after every
    writer that might have missed the switch has finished. The writer here inserts while the
    daemon is busy (no NOTIFY), and commits after the switch. The regular poll is 30 s away
    (24 s at the least, with jitter), so an arrival within 8 s is that last poll's doing."""
    with psycopg.connect(db.dsn) as writer:
        got = asyncio.run(_across_the_switch(
            db, tmp_path, {"poll_interval": 30, "lease": 60}, writer,
            while_busy="INSERT INTO license_keys (activation_key) VALUES ('MISSED')",
            after_switch=None, within=8))
    assert got == _event_ids(db)


# --- replay ------------------------------------------------------------------------------------


def test_replay_redelivers_through_a_running_daemon(db: Db, tmp_path: Path) -> None:
    async def run() -> tuple[list[str], int, str]:
        rx = await Receiver(behaviours={"/hook": status(500)}).start()
        cfg = config_data(db.dsn, webhooks={"events": {"license_created": rx.url()},
                                            "max_retries": 0})
        d = DaemonProcess(tmp_path, cfg).start()
        try:
            await d.wait_ready(db.dsn)
            _insert_licenses(db, "REPLAY", 1)
            await rx.wait_for(lambda: states(db) == {"failed": 1}, 20, "the delivery to fail")
            rx.behaviours["/hook"] = status(200)
            replay = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "bridge", "replay", "--all",
                                 "--config", str(d.config_path)],
                capture_output=True, text=True, timeout=60, check=False)
            await rx.wait_for(lambda: states(db) == {"delivered": 1}, 20, "the replayed delivery")
            assert await d.terminate() == 0
        finally:
            d.kill()
            await rx.stop()
        return [r.event_id for r in rx.on("/hook")], replay.returncode, replay.stdout

    sent, code, out = asyncio.run(run())
    assert code == 0, out
    assert len(sent) == 2 and sent[0] == sent[1]  # the same event, sent again
    assert [e for e in sent if e] == [next(iter(_event_ids(db)))] * 2


# --- X-QLM-Timestamp ---------------------------------------------------------------------------


def test_x_qlm_timestamp_is_the_capture_time(db: Db) -> None:
    """The writer's transaction lasts a second, so the capture time (inside it) and the send
    time (after its commit) are far apart; the header must be the former, and match the body."""
    def write() -> tuple[datetime, datetime]:
        with psycopg.connect(db.dsn) as conn:
            started = conn.execute("SELECT now()").fetchone()
            conn.execute("INSERT INTO license_keys (activation_key) VALUES ('TS')")
            time.sleep(1)
            before_commit = conn.execute("SELECT clock_timestamp()").fetchone()
        assert started is not None and before_commit is not None
        return started[0], before_commit[0]

    async def run() -> tuple[datetime, datetime, dict[str, str], bytes]:
        rx = await Receiver().start()
        try:
            async with running(db.config(webhooks={"events": {"license_created": rx.url()}})):
                started, before_commit = await asyncio.to_thread(write)
                await rx.wait_for(lambda: len(rx.on("/hook")) == 1, 20, "the delivery")
        finally:
            await rx.stop()
        [got] = rx.on("/hook")
        return started, before_commit, got.headers, got.body

    started, before_commit, headers, body = asyncio.run(run())
    stamp = headers["X-QLM-Timestamp"]
    captured = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert stamp.endswith("Z") and captured.tzinfo is not None  # UTC, ISO-8601
    assert started <= captured <= before_commit, (started, captured, before_commit)
    assert f'"Timestamp":"{stamp}"'.encode() in body.replace(b": ", b":")
