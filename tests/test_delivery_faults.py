"""Issue 3 (Deliver), faults: SIGKILL mid-stream, terminated connections, SIGHUP reload, SIGTERM,
a missing schema and an unreachable database at start. Real subprocesses where signals matter."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

from tests.support.config import config_data
from tests.support.daemon import DaemonProcess, running, wait_until
from tests.support.net import free_port
from tests.support.receiver import Receiver, delay
from tests.support.server import Db, states


def event_ids(db: Db) -> set[str]:
    return {r[0] for r in db.query("SELECT event_id::text FROM qlm_bridge.event")}


async def _sigkill(db: Db, tmp_path: Path) -> None:
    rx = await Receiver(behaviours={"/hook": delay(0.02)}).start()
    n, concurrency = 300, 8
    cfg = config_data(
        db.dsn, webhooks={"events": {"customer_created": rx.url()}, "timeout": 1,
                          "max_concurrency": concurrency, "per_url_concurrency": concurrency},
        daemon={"lease": 3, "poll_interval": 0.3})
    first = DaemonProcess(tmp_path, cfg, name="first").start()
    try:
        await first.wait_log("started")
        db.execute(f"INSERT INTO customers (full_name) "
                   f"SELECT 'c' || g FROM generate_series(1, {n}) g")
        await rx.wait_for(lambda: len(rx.received) >= n // 2)
        first.signal(signal.SIGKILL)
        assert await first.wait() == -signal.SIGKILL
        at_kill = len(rx.received)
        assert at_kill < n, "the burst finished before the kill; nothing was tested"
        second = DaemonProcess(tmp_path, cfg, name="second").start()
        try:
            await wait_until(lambda: states(db) == {"delivered": n}, timeout=30,
                             what="all delivered after the restart")
            second.signal(signal.SIGTERM)
            assert await second.wait() == 0
        finally:
            second.kill()
    finally:
        first.kill()
        await rx.stop()
    seen = Counter(r.headers["X-QLM-Event-Id"] for r in rx.received)
    assert set(seen) == event_ids(db)  # nothing lost
    duplicates = len(rx.received) - n
    print(f"\nSIGKILL at {at_kill}/{n} received: {duplicates} duplicate(s) "
          f"(bound: max_concurrency = {concurrency})")
    assert duplicates <= concurrency


def test_sigkill_mid_stream_loses_nothing(db: Db, tmp_path: Path) -> None:
    asyncio.run(_sigkill(db, tmp_path))


async def _terminate(db: Db) -> None:
    rx = await Receiver(behaviours={"/hook": delay(0.01)}).start()
    n = 300
    # a long poll: after the kill only the reconnects (and NOTIFY) can bring the daemon back
    cfg = db.config(webhooks={"events": {"customer_created": rx.url()}, "max_concurrency": 8},
                    daemon={"poll_interval": 30})
    async with running(cfg) as d:
        listener = d._listener
        assert listener is not None
        await wait_until(lambda: listener.connected, what="listener connected")
        db.execute(f"INSERT INTO customers (full_name) "
                   f"SELECT 'c' || g FROM generate_series(1, {n}) g")
        await rx.wait_for(lambda: len(rx.received) >= n // 3)
        killed = db.scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name LIKE 'qlm-bridge%%' AND datname = current_database()")
        assert killed >= 2  # the pool's connection(s) and the listener
        await wait_until(lambda: states(db) == {"delivered": n}, timeout=30,
                         what="all delivered after the kill")
        await wait_until(lambda: listener.reconnects > 0 and listener.connected,
                         what="listener reconnected")
        # idle again: writers notify, and the new LISTEN hears them
        await wait_until(lambda: db.scalar("SELECT sleeping FROM qlm_bridge.runtime") is True,
                         what="daemon idle")
        heard = listener.notifications
        db.execute("INSERT INTO customers (full_name) VALUES ('after the kill')")
        await wait_until(lambda: states(db) == {"delivered": n + 1}, timeout=10,
                         what="new event delivered (poll is 30 s: only NOTIFY is this quick)")
        assert listener.notifications > heard
    await rx.stop()
    seen = Counter(r.headers["X-QLM-Event-Id"] for r in rx.received)
    assert set(seen) == event_ids(db)
    print(f"\npg_terminate_backend: {killed} connection(s) killed, "
          f"{len(rx.received) - (n + 1)} duplicate(s)")


def test_terminated_connections_resume_by_themselves(db: Db) -> None:
    asyncio.run(_terminate(db))


async def _sighup(db: Db, tmp_path: Path) -> None:
    rx = await Receiver().start()
    a, b = rx.url("/a"), rx.url("/b")
    data = config_data(db.dsn, webhooks={"events": {"license_created": a}})
    proc = DaemonProcess(tmp_path, data).start()
    try:
        await proc.wait_log("started")
        db.execute("INSERT INTO license_keys (activation_key) VALUES ('L1')")
        await rx.wait_for(lambda: len(rx.on("/a")) == 1)

        data["webhooks"]["events"] = {"license_created": f"{a};{b}"}
        proc.write_config(data)
        proc.signal(signal.SIGHUP)
        await proc.wait_log("config reloaded")
        db.execute("INSERT INTO license_keys (activation_key) VALUES ('L2')")
        await rx.wait_for(lambda: len(rx.on("/a")) == 2 and len(rx.on("/b")) == 1)
        assert b'"L2"' in rx.on("/b")[0].body  # fanned out after the reload only

        data["webhooks"]["max_retries"] = -1
        proc.write_config(data)
        proc.signal(signal.SIGHUP)
        await proc.wait_log("reload failed, keeping the running config")
        assert "webhooks.max_retries" in proc.log()
        db.execute("INSERT INTO license_keys (activation_key) VALUES ('L3')")
        await rx.wait_for(lambda: len(rx.on("/a")) == 3 and len(rx.on("/b")) == 2)

        proc.write_config("webhooks: [unclosed\n")
        proc.signal(signal.SIGHUP)
        await proc.wait_log("reload failed", occurrences=2)
        db.execute("INSERT INTO license_keys (activation_key) VALUES ('L4')")
        await rx.wait_for(lambda: len(rx.on("/a")) == 4 and len(rx.on("/b")) == 3)

        proc.signal(signal.SIGTERM)
        assert await proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        await rx.stop()
    assert "Traceback" not in proc.log()
    assert "test-secret" not in proc.log()
    assert proc.count("stopped") >= 1
    assert states(db) == {"delivered": 7}
    assert db.scalar("SELECT count(*) FROM qlm_bridge.daemon") == 0  # signed off


def test_sighup_reload_valid_and_invalid(db: Db, tmp_path: Path) -> None:
    asyncio.run(_sighup(db, tmp_path))


async def _sigterm_drains(db: Db, tmp_path: Path) -> None:
    rx = await Receiver(behaviours={"/hook": delay(0.5)}).start()
    cfg = config_data(
        db.dsn, webhooks={"events": {"customer_created": rx.url()}},
        daemon={"shutdown_timeout": 5})
    proc = DaemonProcess(tmp_path, cfg).start()
    try:
        await proc.wait_log("started")
        db.execute("INSERT INTO customers (full_name) SELECT 'c' || g FROM generate_series(1, 3) g")
        await rx.wait_for(lambda: len(rx.received) == 3)
        proc.signal(signal.SIGTERM)  # three requests in flight
        assert await proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        await rx.stop()
    assert states(db) == {"delivered": 3}  # drained: finished and recorded, not abandoned
    assert db.scalar("SELECT count(*) FROM qlm_bridge.attempt_log") == 3


def test_sigterm_drains_in_flight_and_exits_0(db: Db, tmp_path: Path) -> None:
    asyncio.run(_sigterm_drains(db, tmp_path))


async def _no_schema(db: Db, tmp_path: Path) -> None:
    cfg = config_data(db.dsn)
    proc = DaemonProcess(tmp_path, cfg).start()
    try:
        assert await proc.wait() == 1
    finally:
        proc.kill()
    assert "not installed" in proc.log() and "qlm-bridge install" in proc.log()
    assert "Traceback" not in proc.log()


def test_missing_schema_exits_1_with_a_clear_message(empty_db: Db, tmp_path: Path) -> None:
    asyncio.run(_no_schema(empty_db, tmp_path))


async def _unreachable(tmp_path: Path) -> None:
    dsn = f"postgresql://bridge:pw-s3cret@127.0.0.1:{free_port()}/qlm"
    cfg = config_data(
        dsn, database={"dsn": dsn, "connect_timeout": 1})
    proc = DaemonProcess(tmp_path, cfg).start()
    try:
        await proc.wait_log("database not reachable", occurrences=2)  # it retries
        proc.signal(signal.SIGTERM)
        assert await proc.wait(timeout=15) == 0
    finally:
        proc.kill()
    assert "retrying" in proc.log()
    # it says what it waits for: host, port, database, user and the key (issue 9, item 5)
    port = dsn.rsplit(":", 1)[1].split("/")[0]
    assert (f"database not reachable at 127.0.0.1:{port} database 'qlm' as 'bridge' "
            "(database.dsn; ") in proc.log()
    assert "stopped before the database was reachable" in proc.log()
    assert "pw-s3cret" not in proc.log() and "Traceback" not in proc.log()


def test_unreachable_database_at_start_retries_until_sigterm(tmp_path: Path) -> None:
    asyncio.run(_unreachable(tmp_path))


async def _refused_registration(db: Db, tmp_path: Path) -> None:
    db.execute("CREATE FUNCTION qlm_bridge.refuse() RETURNS trigger LANGUAGE plpgsql AS "
               "$$BEGIN RAISE EXCEPTION 'registration refused by the test'; END$$")
    db.execute("CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON qlm_bridge.daemon "
               "FOR EACH ROW EXECUTE FUNCTION qlm_bridge.refuse()")
    rx = await Receiver().start()
    proc = DaemonProcess(tmp_path, config_data(
        db.dsn, webhooks={"events": {"customer_created": rx.url()}})).start()
    try:
        await proc.wait_log("registration refused by the test", occurrences=2)  # it retries
        db.execute("DROP TRIGGER refuse ON qlm_bridge.daemon")
        await proc.wait_ready(db.dsn)
        db.execute("INSERT INTO customers (full_name) VALUES ('after the refusal')")
        await rx.wait_for(lambda: len(rx.received) == 1)
        proc.signal(signal.SIGTERM)
        assert await proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        await rx.stop()
    assert "database error while starting" in proc.log() and "Traceback" not in proc.log()


def test_a_database_error_while_registering_is_retried(db: Db, tmp_path: Path) -> None:
    asyncio.run(_refused_registration(db, tmp_path))


async def _old_schema(db: Db, tmp_path: Path) -> None:
    db.execute("DELETE FROM qlm_bridge.version WHERE version = "
               "(SELECT max(version) FROM qlm_bridge.version)")  # as an earlier release left it
    proc = DaemonProcess(tmp_path, config_data(db.dsn)).start()
    try:
        assert await proc.wait() == 1
    finally:
        proc.kill()
    assert "qlm-bridge install" in proc.log() and "upgrades in place" in proc.log()
    assert "Traceback" not in proc.log()


def test_a_schema_older_than_the_release_exits_1_asking_for_install(db: Db,
                                                                    tmp_path: Path) -> None:
    asyncio.run(_old_schema(db, tmp_path))
