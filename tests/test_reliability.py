"""The reliability campaign. Every case has a bounded form that CI runs every time, and a full
form marked `@pytest.mark.slow`, which runs only with QLM_BRIDGE_SLOW=1 (see conftest.py). The
longest runs: scripts/reliability.py. Figures: RELIABILITY.md."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import pytest

from bridge import install
from bridge.embedded import EmbeddedPostgres
from bridge.errors import BridgeError
from tests.support.campaign import (
    campaign_config,
    crash_storm,
    database_faults,
    event_ids,
    insert_licenses,
    receiver_down,
    receiver_faults,
    soak,
)
from tests.support.config import base_config
from tests.support.daemon import DaemonProcess
from tests.support.receiver import Receiver
from tests.support.server import ROOT, Db, query


def test_crash_storm_loses_nothing(db: Db, tmp_path: Path) -> None:
    """3 SIGKILLs over 1,000 events (4 URLs each)."""
    fig = asyncio.run(crash_storm(db.dsn, tmp_path, events=1000, kills=3, alive=(0.3, 1.0)))
    assert fig["events"] == 1000
    assert fig["lost"] == 0
    assert fig["stuck"] == 0
    assert fig["duplicates"] <= fig["kills"] * fig["duplicate_bound_per_kill"]


@pytest.mark.slow
def test_crash_storm_full(db: Db, tmp_path: Path) -> None:
    fig = asyncio.run(crash_storm(db.dsn, tmp_path, events=5000, kills=10))
    assert fig["lost"] == 0
    assert fig["duplicates"] <= fig["kills"] * fig["duplicate_bound_per_kill"]


def test_database_connection_terminations_lose_nothing(db: Db, tmp_path: Path) -> None:
    """3 rounds of killing every daemon connection while events flow."""
    fig = asyncio.run(database_faults(db.dsn, tmp_path, terminations=3, gap=0.3))
    assert fig["connections_terminated"] >= 3
    assert fig["daemon_survived"]
    assert fig["lost"] == 0


@pytest.fixture
def own_server() -> object:
    """A server this test may restart (never the shared one)."""
    with EmbeddedPostgres() as pg:
        yield pg


def _install_on(pg: EmbeddedPostgres) -> str:
    with __import__("psycopg").connect(pg.dsn("postgres"), autocommit=True) as conn:
        conn.execute(b"CREATE DATABASE faults")
    dsn = pg.dsn("faults")
    install.install(base_config(dsn), sample_schema=True)
    return dsn


def test_database_server_restart_loses_nothing(own_server: EmbeddedPostgres,
                                               tmp_path: Path) -> None:
    dsn = _install_on(own_server)
    fig = asyncio.run(database_faults(dsn, tmp_path, terminations=0, restart=own_server.restart,
                                      restarts=1))
    assert fig["restarts"] == 1
    assert fig["daemon_survived"]
    assert fig["lost"] == 0


@pytest.mark.slow
def test_database_faults_full(own_server: EmbeddedPostgres, tmp_path: Path) -> None:
    dsn = _install_on(own_server)
    fig = asyncio.run(database_faults(dsn, tmp_path, terminations=10,
                                      restart=own_server.restart, restarts=3))
    assert fig["lost"] == 0 and fig["daemon_survived"]


def test_receiver_faults_follow_the_policy(db: Db, tmp_path: Path) -> None:
    fig = asyncio.run(receiver_faults(db.dsn, tmp_path, good_events=20, spread=3))
    cases = fig["cases"]
    assert cases["301_elsewhere"]["followed"] == 0  # nothing but POSTs to the configured paths
    for name in ("500", "429_retry_after", "301_elsewhere", "no_answer", "connection_reset",
                 "tls_untrusted", "slow_endless_body"):
        assert cases[name]["attempts"] == cases[name]["policy_attempts"], (name, cases[name])
        assert cases[name]["state"] == "failed", (name, cases[name])
    assert cases["100mb_body"]["state"] == "delivered"
    assert cases["429_retry_after"]["min_gap_s"] >= 1.9  # Retry-After: 2 honoured
    assert "certificate" in str(cases["tls_untrusted"]["last"]).lower()
    assert fig["good_delivered"] == fig["good_expected"]  # other URLs unaffected
    assert fig["max_stored_response_body"] <= 4096 + 20
    # the 100 MB body is never buffered: the daemon's peak RSS (VmHWM) grows far less
    assert fig["rss_mb_peak"] - fig["rss_mb_baseline"] < 40, fig


def test_receiver_down_then_back(db: Db, tmp_path: Path) -> None:
    """A 5 s receiver outage, retried every 0.5 s."""
    fig = asyncio.run(receiver_down(db.dsn, tmp_path, down=5, retry_interval=0.5, events=10))
    assert fig["lost"] == 0
    assert fig["attempts_min"] >= 5  # it kept retrying through the outage


@pytest.mark.slow
def test_receiver_down_30s(db: Db, tmp_path: Path) -> None:
    fig = asyncio.run(receiver_down(db.dsn, tmp_path, down=30, retry_interval=1.0))
    assert fig["lost"] == 0


def test_soak_short(db: Db, tmp_path: Path) -> None:
    """10 s at 25 events/s to a flaky and a healthy URL, with scheduled prune."""
    fig = asyncio.run(soak(db.dsn, tmp_path, seconds=10, rate=25, prune_interval=1,
                           sample_every=1))
    assert fig["lost"] == 0
    assert fig["unexplained_errors"] == []
    assert fig["db_conns_max"] <= 5 + 1  # pool (4) + LISTEN


@pytest.mark.slow
def test_soak_10_minutes(db: Db, tmp_path: Path) -> None:
    fig = asyncio.run(soak(db.dsn, tmp_path, seconds=600, sample_every=10))
    assert fig["lost"] == 0
    assert fig["unexplained_errors"] == []


# --- bad operations ------------------------------------------------------------------------------


def _settled(dsn: str) -> bool:
    return not query(dsn, "SELECT 1 FROM qlm_bridge.delivery WHERE state = 'pending' UNION ALL "
                          "SELECT 1 FROM qlm_bridge.event WHERE NOT fanned_out LIMIT 1")


def test_config_reload_during_a_burst_loses_nothing(db: Db, tmp_path: Path) -> None:
    async def run() -> tuple[set[str], set[str], set[str], str]:
        rx = await Receiver().start()
        cfg = campaign_config(db.dsn, webhooks={"events": {"license_created": [rx.url("/a")]}})
        d = DaemonProcess(tmp_path, cfg).start()
        try:
            await d.wait_ready(db.dsn)
            await asyncio.to_thread(insert_licenses, db.dsn, "R", 0, 1500)
            await rx.wait_for(lambda: len(rx.unique("/a")) > 100, 20, "the burst to start")
            cfg["webhooks"] = {**cfg["webhooks"], "timeout": 1.5,
                               "events": {"license_created": [rx.url("/a"), rx.url("/b")]}}
            d.write_config(cfg)
            d.signal(signal.SIGHUP)
            await rx.wait_for(lambda: "config reloaded" in d.log(), 10, "the reload")
            await asyncio.to_thread(insert_licenses, db.dsn, "after", 0, 50)
            await rx.wait_for(lambda: _settled(db.dsn), 30, "the burst to drain")
            after = {r[0] for r in query(
                db.dsn, "SELECT event_id::text FROM qlm_bridge.event "
                        "WHERE row_data->>'activation_key' LIKE 'after%'")}
            assert await d.terminate() == 0
        finally:
            d.kill()
            await rx.stop()
        return rx.unique("/a"), rx.unique("/b"), after, d.log()

    a, b, after, log = asyncio.run(run())
    every = event_ids(db.dsn)
    assert len(every) == 1550 and every <= a  # nothing lost on the old URL
    assert after <= b  # events captured after the reload reach the new URL
    assert "Traceback" not in log


def test_uninstall_while_the_daemon_runs(db: Db, tmp_path: Path) -> None:
    async def run() -> tuple[set[str], str, bool]:
        rx = await Receiver().start()
        cfg = campaign_config(db.dsn, webhooks={"events": {"license_created": [rx.url("/a")]}})
        d = DaemonProcess(tmp_path, cfg).start()
        try:
            await d.wait_ready(db.dsn)
            await asyncio.to_thread(insert_licenses, db.dsn, "U", 0, 300)
            await asyncio.to_thread(install.uninstall, db.config())  # keeps the data
            await asyncio.to_thread(insert_licenses, db.dsn, "late", 0, 10)  # not captured
            await rx.wait_for(lambda: _settled(db.dsn), 30, "what was captured to drain")
            await asyncio.to_thread(install.uninstall, db.config(), True)  # drops the schema
            await d.wait_log("is gone", occurrences=2)  # says so, and keeps saying so
            alive = d.alive
            await d.terminate()
        finally:
            d.kill()
            await rx.stop()
        return rx.unique("/a"), d.log(), alive

    delivered, log, alive = asyncio.run(run())
    assert len(delivered) == 300  # everything captured before the uninstall is delivered
    assert alive  # the daemon waits for a reinstall instead of dying
    assert "Traceback" not in log
    gone = [line for line in log.splitlines() if "is gone" in line]
    assert "the bridge schema 'qlm_bridge' is gone" in gone[0], gone  # names what is missing


def test_install_by_a_role_without_create_rights(empty_db: Db) -> None:
    role = f"qlmb_weak_{uuid.uuid4().hex[:8]}"
    empty_db.execute((ROOT / "sql" / "sample_schema.sql").read_text())
    empty_db.execute(f"CREATE ROLE {role} LOGIN")
    empty_db.execute(f"REVOKE CREATE ON DATABASE {empty_db.name} FROM PUBLIC")
    try:
        dsn = empty_db.dsn.replace("postgres@", f"{role}@", 1)
        with pytest.raises(BridgeError) as err:
            install.install(base_config(dsn))
        message = str(err.value)
        assert "privilege" in message or "permission denied" in message, message
        assert empty_db.scalar("SELECT count(*) FROM pg_namespace "
                               "WHERE nspname = 'qlm_bridge'") == 0
        assert empty_db.scalar("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal") == 0
    finally:
        empty_db.execute(f"DROP OWNED BY {role}")
        empty_db.execute(f"DROP ROLE {role}")


def test_two_daemons_with_different_configs(db: Db, tmp_path: Path) -> None:
    """README: a daemon started with other subscriptions than a running one refuses to start
    (exit 2) and names the running daemon; the running one keeps delivering."""
    async def run() -> tuple[int, str, int, set[str], list[str]]:
        rx = await Receiver().start()
        first = DaemonProcess(tmp_path, campaign_config(
            db.dsn, webhooks={"events": {"license_created": [rx.url("/a")]}}), name="a").start()
        second = DaemonProcess(tmp_path, campaign_config(
            db.dsn, webhooks={"events": {"license_created": [rx.url("/b")]}}), name="b")
        try:
            await first.wait_ready(db.dsn)
            code = await second.start().wait(timeout=30)
            await asyncio.to_thread(insert_licenses, db.dsn, "T", 0, 200)
            await rx.wait_for(lambda: _settled(db.dsn), 20, "settle")
            assert await first.terminate() == 0
        finally:
            first.kill()
            second.kill()
            await rx.stop()
        return code, second.log(), first.pid, rx.unique("/a"), [r.path for r in rx.on("/b")]

    code, log, first_pid, got_a, got_b = asyncio.run(run())
    assert code == 2, log
    assert "webhooks.events/enabled differ" in log and f"pid {first_pid}" in log, log
    assert "Traceback" not in log
    assert got_a == event_ids(db.dsn) and got_b == []
