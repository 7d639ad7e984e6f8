"""Issue 16: the bridge behind a real PgBouncer in transaction mode (Debian's package in CI).

A real daemon process and a real receiver in each scenario:
1. queries through the pooler, LISTEN direct, `prepared_statements: false`: every event
   delivered once, woken by NOTIFY (the poll interval is a minute), no warning or error logged;
   install, status, replay (it re-queues; the poll sends it) and prune work through the pooler;
2. LISTEN through the pooler too: /readyz answers 503 naming `database.listen_dsn`, one warning
   says so, and every event is still delivered, by polling;
3. `prepared_statements: true` through the pooler: the lost prepared statements are named with
   the setting to change, and nothing is delivered twice.

PgBouncer runs with `server_round_robin = 1` and a few server connections opened up front, so a
client's consecutive transactions land on different servers: a lost prepared statement shows
at once, not by chance.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import pgbouncer
from tests.support.config import config_data
from tests.support.daemon import DaemonProcess
from tests.support.receiver import Receiver
from tests.support.server import Db, Server

CLI = str(Path(sys.executable).parent / "qlm-bridge")
HOOK = "/hook"
# Longer than any wait below: events that arrive in time were not found by the poll.
SLOW_POLL = 60.0  # the daemon polls after 48-72 s (jitter)
NOTIFY_WAIT = 40.0


@pytest.fixture(scope="module")
def bouncer(pg_server: Server) -> Iterator[pgbouncer.PgBouncer]:
    if pgbouncer.binary() is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("pgbouncer is not installed, and CI needs these tests: install it "
                        "(apt-get install pgbouncer; .ci/run does)")
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    with pgbouncer.running(pg_server.admin_dsn, "transaction") as running:
        yield running


# --- helpers ---------------------------------------------------------------------------------


def _config(tmp_path: Path, dsn: str, rx: Receiver, port: int,
            daemon: dict[str, Any] | None = None, **database: Any) -> dict[str, Any]:
    data = config_data(dsn, database=database, daemon=daemon or {},
                       webhooks={"events": {"customer_created": [rx.url(HOOK)]}},
                       observe={"listen": f"127.0.0.1:{port}"},
                       retention={"batch_size": 10})
    return data


async def _insert(db: Db, count: int, start: int = 0) -> None:
    """Single-row inserts, one transaction each, about 100 a second."""
    for i in range(start, start + count):
        await asyncio.to_thread(db.execute, f"INSERT INTO customers (full_name) VALUES ('c{i}')")
        await asyncio.sleep(0.01)


def _event_ids(rx: Receiver) -> Counter[str]:
    return Counter(r.headers["X-QLM-Event-Id"] for r in rx.on(HOOK))


def _warnings(d: DaemonProcess) -> list[str]:
    return [line for line in d.log().splitlines() if " WARNING " in line or " ERROR " in line
            or "Traceback" in line]


async def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QLM_", "PG"))}
    return await asyncio.to_thread(subprocess.run, [CLI, *args], capture_output=True, text=True,
                                   timeout=60, env=env)


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


class Probe:
    """Reads the daemon's /readyz and /metrics."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session, self.base = session, f"http://127.0.0.1:{port}"
        self.ready: tuple[int, dict[str, Any]] = (0, {})

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        try:
            async with self.session.get(self.base + "/readyz") as resp:
                self.ready = (resp.status, await resp.json())
        except aiohttp.ClientConnectionError:  # not serving yet
            self.ready = (0, {})
        return self.ready

    async def gauge(self, name: str) -> float | None:
        async with self.session.get(self.base + "/metrics") as resp:
            text = await resp.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    return sample.value
        return None


def _attempts_per_delivery(db: Db) -> Counter[int]:
    """How many deliveries had 1, 2, ... attempts logged."""
    return Counter(n for (n,) in db.query(
        "SELECT count(*) FROM qlm_bridge.attempt_log GROUP BY event_id, url"))


# --- 1. LISTEN direct, no prepared statements --------------------------------------------------


async def _direct_listen(db: Db, bouncer: pgbouncer.PgBouncer, tmp_path: Path) -> None:
    rx = await Receiver().start()
    port = pgbouncer.free_port()
    path = _config(tmp_path, bouncer.dsn(db.name), rx, port, {"poll_interval": SLOW_POLL},
                   listen_dsn=db.dsn, prepared_statements=False)
    bouncer.warm(db.name)
    d = DaemonProcess(tmp_path, path).start()
    try:
        async with aiohttp.ClientSession() as session:
            probe = Probe(session, port)

            async def ready() -> bool:
                return (await probe.readyz())[0] == 200

            await _until(ready, "/readyz to answer 200", 30)
            assert "notifications arrive" in probe.ready[1]["detail"]
            assert await probe.gauge("qlm_bridge_notifications_arrive") == 1

            await _insert(db, 200)
            await rx.wait_for(lambda: len(rx.on(HOOK)) == 200, NOTIFY_WAIT)
            # the daemon is idle now: one more event can only reach it by NOTIFY
            await asyncio.sleep(0.5)
            await _insert(db, 1, start=200)
            await rx.wait_for(lambda: len(rx.on(HOOK)) == 201, NOTIFY_WAIT)
            assert set(_event_ids(rx).values()) == {1}

            # the operator's commands through the pooler
            cfg = str(d.config_path)
            done = await _cli("install", "--config", cfg)
            assert done.returncode == 0, done.stderr
            status = await _cli("status", "--json", "--config", cfg)
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["totals"]["delivered"] == 201
            again = next(iter(_event_ids(rx)))
            replay = await _cli("replay", "--event-id", again, "--all-states", "--config", cfg)
            assert replay.returncode == 0, replay.stderr
            assert "queued 1 delivery" in replay.stdout
            assert db.query("SELECT d.state, d.attempts FROM qlm_bridge.delivery d JOIN "
                            "qlm_bridge.event e ON e.id = d.event_id WHERE e.event_id = %s",
                            (again,)) == [("pending", 0)]
        d.signal(signal.SIGTERM)
        assert await d.wait() == 0, d.log()
    finally:
        d.kill()
        await rx.stop()
    # prune: batches of 10 rows, the same statement more often than psycopg needs to start
    # preparing it
    settled = db.scalar("SELECT count(*) FROM qlm_bridge.event e WHERE NOT EXISTS (SELECT 1 "
                        "FROM qlm_bridge.delivery d WHERE d.event_id = e.id "
                        "AND d.state <> 'delivered')")
    logged = db.scalar("SELECT count(*) FROM qlm_bridge.attempt_log")
    assert settled >= 200 and logged >= 201
    pruned = await _cli("prune", "--older-than", "0s", "--logs-older-than", "0s",
                        "--config", str(d.config_path))
    assert pruned.returncode == 0, pruned.stderr
    assert f"pruned {settled} events and {logged} log rows" in pruned.stdout
    assert _warnings(d) == [], d.log()
    assert "prepared statement" not in bouncer.log()


def test_queries_through_the_pooler_listen_direct(db: Db, bouncer: pgbouncer.PgBouncer,
                                                  tmp_path: Path) -> None:
    asyncio.run(_direct_listen(db, bouncer, tmp_path))


# --- 2. LISTEN through the transaction pooler ---------------------------------------------------


async def _listen_through_pooler(db: Db, bouncer: pgbouncer.PgBouncer, tmp_path: Path) -> None:
    rx = await Receiver().start()
    port = pgbouncer.free_port()
    path = _config(tmp_path, bouncer.dsn(db.name), rx, port, prepared_statements=False)
    d = DaemonProcess(tmp_path, path).start()
    try:
        async with aiohttp.ClientSession() as session:
            probe = Probe(session, port)

            async def not_ready() -> bool:
                code, body = await probe.readyz()
                return code == 503 and "notifications do not arrive" in body.get("detail", "")

            await _until(not_ready, "/readyz to answer 503", 30)
            detail = probe.ready[1]["detail"]
            assert "database.listen_dsn" in detail and probe.ready[1]["ready"] is False
            assert await probe.gauge("qlm_bridge_notifications_arrive") == 0
            assert await probe.gauge("qlm_bridge_listener_connected") == 1

            await _insert(db, 50)
            await rx.wait_for(lambda: len(rx.on(HOOK)) == 50, 60)  # by polling
            assert set(_event_ids(rx).values()) == {1}
            assert await not_ready()  # still: the probes keep failing
        d.signal(signal.SIGTERM)
        assert await d.wait() == 0, d.log()
    finally:
        d.kill()
        await rx.stop()
    told = [line for line in _warnings(d) if "database.listen_dsn" in line]
    assert len(told) == 1, d.log()  # one warning, not one per probe
    assert "notifications do not arrive" in told[0] and "transaction" in told[0]
    assert _warnings(d) == told, d.log()
    assert _attempts_per_delivery(db) == {1: 50}


def test_listen_through_the_transaction_pooler_is_not_ready(
        db: Db, bouncer: pgbouncer.PgBouncer, tmp_path: Path) -> None:
    asyncio.run(_listen_through_pooler(db, bouncer, tmp_path))


# --- 3. prepared statements through the transaction pooler --------------------------------------


async def _prepared_statements(db: Db, bouncer: pgbouncer.PgBouncer, tmp_path: Path) -> None:
    rx = await Receiver().start()
    port = pgbouncer.free_port()
    path = _config(tmp_path, bouncer.dsn(db.name), rx, port, listen_dsn=db.dsn)
    bouncer.warm(db.name)
    d = DaemonProcess(tmp_path, path).start()
    try:
        await d.wait_log("database.prepared_statements: false", timeout=30)
        await _insert(db, 100)
        await rx.wait_for(lambda: len(rx.on(HOOK)) == 100, 60)

        async def settled() -> bool:
            return db.scalar("SELECT count(*) FROM qlm_bridge.delivery "
                             "WHERE state <> 'delivered'") == 0

        await _until(settled, "every delivery to be recorded", 30)
        d.signal(signal.SIGTERM)
        assert await d.wait() == 0, d.log()
    finally:
        d.kill()
        await rx.stop()
    told = [line for line in d.log().splitlines() if "database.prepared_statements: false" in line]
    assert len(told) == 1, d.log()  # said once; the pool went on without them
    assert "HINT:" in told[0] and "pgbouncer" in told[0]
    assert set(_event_ids(rx).values()) == {1}, "an event was delivered twice"
    assert _attempts_per_delivery(db) == {1: 100}

    # the same setting through psycopg: prune repeats one statement until psycopg prepares it
    db.execute("INSERT INTO customers (full_name) SELECT 'x' || i FROM generate_series(1, 80) i")
    db.execute("UPDATE qlm_bridge.event SET fanned_out = true")
    pruned = await _cli("prune", "--older-than", "0s", "--config", str(d.config_path))
    assert pruned.returncode == 1, pruned.stdout + pruned.stderr
    assert "database.prepared_statements: false" in pruned.stderr
    assert "Traceback" not in pruned.stderr


def test_prepared_statements_through_the_transaction_pooler(
        db: Db, bouncer: pgbouncer.PgBouncer, tmp_path: Path) -> None:
    asyncio.run(_prepared_statements(db, bouncer, tmp_path))
