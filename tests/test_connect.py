"""bridge.connect and the listener's notification probe, against real PostgreSQL (no pooler:
these run on every server the suite runs on; tests/test_pgbouncer.py adds a real PgBouncer)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

import asyncpg
import psycopg
import pytest

from bridge import connect
from bridge.config import DatabaseConfig
from bridge.engine.flag import Flag
from bridge.errors import DatabaseUnavailable
from bridge.listener import PROBE_PREFIX, Listener
from tests.support.config import base_config
from tests.support.server import Db


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _until(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# --- messages ------------------------------------------------------------------------------


def test_unreachable_names_host_port_database_user_and_key_never_the_password() -> None:
    db = DatabaseConfig(dsn="postgresql://bridge:pw-s3cret@db.example:6432/lic",
                        listen_dsn="host=direct.example port=5433 dbname=lic user=listener "
                                   "password=listen-s3cret")
    refused = ConnectionRefusedError(111, "Connect call failed")
    query = connect.unreachable(db, refused)
    assert query.startswith("database not reachable at db.example:6432 database 'lic' as "
                            "'bridge' (database.dsn; ConnectionRefusedError")
    listen = connect.unreachable(db, refused, listen=True)
    assert "direct.example:5433 database 'lic' as 'listener' (database.listen_dsn;" in listen
    assert "s3cret" not in query + listen
    # without a listen_dsn of its own, the LISTEN connection is database.dsn's
    plain = DatabaseConfig(dsn="postgresql://bridge@db.example:6432/lic")
    assert "(database.dsn;" in connect.unreachable(plain, refused, listen=True)


def test_psycopg_connect_names_the_target_and_turns_preparing_off(db: Db) -> None:
    dsn = f"postgresql://bridge:pw-s3cret@127.0.0.1:{_closed_port()}/lic"
    with pytest.raises(DatabaseUnavailable) as err:
        connect.psycopg_connect(DatabaseConfig(dsn=dsn, connect_timeout=1))
    assert f"127.0.0.1:{dsn.rsplit(':', 1)[1].split('/')[0]} database 'lic' as 'bridge'" \
        in str(err.value)
    assert "s3cret" not in str(err.value)
    with connect.psycopg_connect(DatabaseConfig(dsn=db.dsn)) as conn:
        assert conn.prepare_threshold == 5  # psycopg's default
    with connect.psycopg_connect(DatabaseConfig(dsn=db.dsn, prepared_statements=False)) as conn:
        assert conn.prepare_threshold is None
        for _ in range(10):  # never prepared, however often it runs
            conn.execute("SELECT %s::int", (1,))
        assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)


def test_a_lost_prepared_statement_is_named_with_the_setting_and_the_hint(db: Db) -> None:
    with psycopg.connect(db.dsn, autocommit=True) as conn, \
            pytest.raises(psycopg.errors.InvalidSqlStatementName) as err:
        conn.execute("EXECUTE no_such_statement")
    cfg = DatabaseConfig(dsn=db.dsn)
    assert connect.is_prepared_statement_lost(err.value)
    text = connect.describe_error(err.value, cfg)
    assert "database.prepared_statements: false" in text and "no_such_statement" in text

    async def asyncpg_error() -> asyncpg.PostgresError:
        conn = await asyncpg.connect(db.dsn)
        try:
            await conn.execute("EXECUTE no_such_statement")
        except asyncpg.PostgresError as exc:
            return exc
        finally:
            await conn.close()
        raise AssertionError("EXECUTE of a missing statement succeeded")

    exc = asyncio.run(asyncpg_error())
    message = connect.prepared_statement_message(exc, "somewhere")
    assert "`database.prepared_statements: false`" in message
    assert "HINT: NOTE: pgbouncer" in message and "\n" not in message  # the hint, on one line


# --- the pool switches itself off prepared statements --------------------------------------


async def _pool_loses_a_statement(db: Db) -> None:
    pool = await connect.create_pool(DatabaseConfig(dsn=db.dsn), max_size=1)
    query = "SELECT $1::int + 1"
    try:
        assert await pool.fetchval(query, 1) == 2  # prepared and cached
        await pool.execute("DEALLOCATE ALL")  # what a pooler's next server looks like
        with pytest.raises(asyncpg.exceptions.InvalidSQLStatementNameError):
            await pool.fetchval(query, 1)
        # the retry runs on a fresh connection without a statement cache ...
        assert await pool.fetchval(query, 2) == 3
        assert await pool.fetchval("SELECT count(*) FROM pg_prepared_statements") == 0
        # ... so losing statements again costs nothing
        await pool.execute("DEALLOCATE ALL")
        assert await pool.fetchval(query, 3) == 4
    finally:
        await pool.close()


def test_pool_goes_on_without_prepared_statements_after_losing_one(
        db: Db, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bridge.connect"):
        asyncio.run(_pool_loses_a_statement(db))
    told = [r.getMessage() for r in caplog.records if r.name == "bridge.connect"]
    assert len(told) == 1, told
    assert "Set `database.prepared_statements: false`" in told[0]
    assert "going on without prepared statements" in told[0]


async def _no_prepared_statements(db: Db) -> None:
    pool = await connect.create_pool(DatabaseConfig(dsn=db.dsn, prepared_statements=False),
                                     max_size=1)
    try:
        for i in range(5):
            assert await pool.fetchval("SELECT $1::int", i) == i
        assert await pool.fetchval("SELECT count(*) FROM pg_prepared_statements") == 0
    finally:
        await pool.close()


def test_pool_without_prepared_statements(db: Db) -> None:
    asyncio.run(_no_prepared_statements(db))


# --- the listener's probe ------------------------------------------------------------------


async def _probe(db: Db, listen_db: Db | None) -> tuple[bool, str]:
    data: dict[str, object] = {"dsn": db.dsn}
    if listen_db is not None:
        data["listen_dsn"] = listen_db.dsn
    cfg = DatabaseConfig.model_validate(data)
    pool = await connect.create_pool(cfg, max_size=2)
    wake = Flag()
    listener = Listener(cfg, wake, probe_pool=pool, keepalive=0.1, probe_timeout=0.3)
    assert listener.notifications_ok == (False, "LISTEN connection down")
    listener.start()
    try:
        await _until(lambda: listener._probes >= 3, "two probes to finish")
        state = listener.notifications_ok
        assert listener.notifications == 0  # probes never count as wake-ups
        if listen_db is None:  # a writer's NOTIFY still wakes the daemon
            wake.clear()
            await pool.execute("SELECT pg_notify($1, '')", cfg.channel)
            await asyncio.wait_for(wake.wait(), 10)
            assert listener.notifications == 1
            # another daemon's probe on the same channel does not
            wake.clear()
            await pool.execute("SELECT pg_notify($1, $2)", cfg.channel, PROBE_PREFIX + "other:1")
            sent = listener._probes  # probe sent+1 went out after it, so came back after it
            await _until(lambda: listener._probes >= sent + 2, "the next probe to come back")
            assert not wake.is_set() and listener.notifications == 1
        return state
    finally:
        await listener.stop()
        await pool.close()


def test_probe_comes_back_on_a_direct_connection(db: Db) -> None:
    ok, detail = asyncio.run(_probe(db, None))
    assert ok and detail == "LISTEN active, notifications arrive"


def test_probe_that_never_comes_back_says_which_key_to_set(
        db: Db, empty_db: Db, caplog: pytest.LogCaptureFixture) -> None:
    """LISTEN on another database than the one the probe is sent to: the same silence as
    behind a transaction-mode pooler (notifications are per database)."""
    with caplog.at_level(logging.INFO, logger="bridge.listener"):
        ok, detail = asyncio.run(_probe(db, empty_db))
    assert not ok
    assert "notifications do not arrive" in detail and "database.listen_dsn" in detail
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, [r.getMessage() for r in warned]  # one, not one per probe
    text = warned[0].getMessage()
    assert "database.listen_dsn" in text and f"database '{empty_db.name}'" in text
    assert "polling" in text


def test_base_config_has_no_listen_dsn(db: Db) -> None:
    cfg = base_config(db.dsn).database
    assert cfg.listen_dsn is None and cfg.listen_target == db.dsn and cfg.prepared_statements
