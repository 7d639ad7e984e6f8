"""The wake-up source: a dedicated LISTEN connection on `database.listen_dsn` with reconnect
(exponential back-off and jitter, termination detection, a periodic liveness query for
half-open connections), and a probe that proves notifications arrive.

NOTIFY is a hint, polling is the guarantee: `wake` is set on every notification and after every
(re)connect, since notifications sent while disconnected are lost for good; the daemon also polls
on a jittered timer.

A LISTEN connection can be up and still hear nothing: behind a transaction-mode pooler the
server session that ran LISTEN goes back to the pooler's pool, and notifications for it are
dropped. So each keep-alive also sends a probe notification through the query pool (the path a
writer's NOTIFY takes) and waits a few seconds for it on the LISTEN connection;
`notifications_ok` says whether it came back, and why not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from typing import Any

import asyncpg

from bridge import sql
from bridge.config import DatabaseConfig, describe_dsn
from bridge.connect import connect, exc_line, unreachable
from bridge.engine.flag import Flag
from bridge.store import CONNECTION_ERRORS

log = logging.getLogger("bridge.listener")

PROBE_PREFIX = "qlm-bridge probe "
PROBE_TIMEOUT = 3.0  # seconds a probe notification may take to come back
_DB_ERRORS = (*CONNECTION_ERRORS, asyncpg.PostgresError)


def backoff(attempt: int, base: float = 0.1, cap: float = 10.0) -> float:
    """Full-jitter exponential back-off: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * 2 ** attempt))


class Listener:
    def __init__(self, db: DatabaseConfig, wake: Flag, *,
                 probe_pool: asyncpg.Pool | None = None, keepalive: float = 5.0,
                 reconnect_max_delay: float = 10.0,
                 probe_timeout: float = PROBE_TIMEOUT) -> None:
        self.db = db
        self.channel = db.channel
        self.wake = wake
        self.probe_pool = probe_pool  # None: no probe, a live connection counts as working
        self.keepalive = keepalive
        self.reconnect_max_delay = reconnect_max_delay
        self.probe_timeout = probe_timeout
        self.connected = False
        self.reconnects = 0
        self.notifications = 0
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._token = secrets.token_hex(6)
        self._probes = 0
        self._expect: str | None = None
        self._echo = asyncio.Event()
        self._state = (False, "checking that notifications arrive")
        self._warned = False  # one warning per stretch of failed probes

    # --- what the daemon asks --------------------------------------------------------------

    @property
    def notifications_ok(self) -> tuple[bool, str]:
        """Whether notifications reach the LISTEN connection, and a reason for /readyz."""
        if not self.connected:
            return False, "LISTEN connection down"
        if self.probe_pool is None:
            return True, "LISTEN active"
        return self._state

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close()

    # --- the connection --------------------------------------------------------------------

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload.startswith(PROBE_PREFIX):  # a probe (ours or another daemon's): no wake-up
            if payload == self._expect:
                self._echo.set()
            return
        self.notifications += 1
        self.wake.set()

    def _on_terminate(self, *_: Any) -> None:
        self._lost.set()

    async def _connect(self) -> None:
        conn = await connect(self.db, listen=True, application_name="qlm-bridge listener")
        conn.add_termination_listener(self._on_terminate)
        await conn.add_listener(self.channel, self._on_notify)
        self._conn = conn

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        self.connected = False
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 2)
            except Exception:
                conn.terminate()

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                self._lost.clear()
                await self._connect()
                self._state = (False, "checking that notifications arrive")
                self.connected = True
                if failures or self.reconnects:
                    log.info("listener connected (LISTEN %s)", self.channel)
                failures = 0
                self.wake.set()  # poll once: notifications sent while away are gone
                await self._watch()
                reason = "the connection terminated"
            except asyncio.CancelledError:
                raise
            except _DB_ERRORS as exc:
                reason = unreachable(self.db, exc, listen=True)
            delay = backoff(failures, cap=self.reconnect_max_delay)
            failures += 1
            log.warning("LISTEN connection lost: %s; reconnecting in %.2f s", reason, delay)
            await self._close()
            self.reconnects += 1
            await asyncio.sleep(delay)

    async def _watch(self) -> None:
        """Probe, then every `keepalive` seconds check the connection (a cheap query notices
        half-open ones) and probe again; return when the connection is lost."""
        assert self._conn is not None
        while True:
            await self._probe()
            if await self._wait_for(self._lost, self.keepalive):
                return
            # no arguments: the simple query protocol, no prepared statement
            await self._conn.execute("SELECT 1", timeout=self.keepalive)

    async def _wait_for(self, event: asyncio.Event, timeout: float) -> bool:
        """Wait for `event` or a lost connection; True if the connection was lost."""
        waiters = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._lost.wait())}
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        return self._lost.is_set()

    # --- the probe -------------------------------------------------------------------------

    async def _probe(self) -> None:
        """NOTIFY through the query pool; record whether it came back here in time."""
        if self.probe_pool is None:
            return
        self._probes += 1
        payload = f"{PROBE_PREFIX}{self._token}:{self._probes}"
        self._expect = payload
        self._echo.clear()
        try:
            await self.probe_pool.execute(sql.blocks("listener.sql")["probe"], self.channel,
                                          payload, timeout=self.probe_timeout)
        except _DB_ERRORS as exc:  # the database itself is the problem: readiness says so
            self._state = (False, "could not send a probe notification through database.dsn "
                                  f"({exc_line(exc)})")
            return
        lost = await self._wait_for(self._echo, self.probe_timeout)
        if self._echo.is_set():
            self._arrived()
        elif not lost:  # a lost connection is _watch's to handle
            self._missing()

    def _arrived(self) -> None:
        if self._warned:
            log.info("notifications arrive on the LISTEN connection again")
        self._warned = False
        self._state = (True, "LISTEN active, notifications arrive")

    def _missing(self) -> None:
        key = "database.listen_dsn" if self.db.listen_dsn else "database.listen_dsn (unset: " \
            "the LISTEN connection uses database.dsn)"
        self._state = (False, f"notifications do not arrive: a probe NOTIFY was not back on "
                              f"the LISTEN connection within {self.probe_timeout:g} s; set "
                              "database.listen_dsn to a direct or session-mode connection. "
                              "Delivering by polling meanwhile")
        if not self._warned:
            self._warned = True
            log.warning(
                "notifications do not arrive: a probe NOTIFY sent through the query pool was "
                "not back on the LISTEN connection at %s within %g s. A connection pooler in "
                "transaction mode (e.g. PgBouncer pool_mode = transaction) drops them; point "
                "%s at a direct or session-mode connection. Delivery goes on by polling "
                "(daemon.poll_interval) meanwhile",
                describe_dsn(self.db.listen_target), self.probe_timeout, key)
