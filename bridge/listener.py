"""The wake-up source: a dedicated LISTEN connection with reconnect (exponential back-off and
jitter, termination detection, a periodic liveness query for half-open connections).

NOTIFY is a hint, polling is the guarantee: `wake` is set on every notification and after every
(re)connect, since notifications sent while disconnected are lost for good; the daemon also polls
on a jittered timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

import asyncpg

from bridge.store import CONNECTION_ERRORS

log = logging.getLogger("bridge.listener")


def backoff(attempt: int, base: float = 0.1, cap: float = 10.0) -> float:
    """Full-jitter exponential back-off: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * 2 ** attempt))


class Listener:
    def __init__(self, dsn: str, channel: str, wake: asyncio.Event, *,
                 keepalive: float = 5.0, reconnect_max_delay: float = 10.0,
                 connect_timeout: float = 10.0) -> None:
        self.dsn = dsn
        self.channel = channel
        self.wake = wake
        self.keepalive = keepalive
        self.reconnect_max_delay = reconnect_max_delay
        self.connect_timeout = connect_timeout
        self.connected = False
        self.reconnects = 0
        self.notifications = 0
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close()

    def _on_notify(self, *_: Any) -> None:
        self.notifications += 1
        self.wake.set()

    def _on_terminate(self, *_: Any) -> None:
        self._lost.set()

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout,
                                     server_settings={"application_name": "qlm-bridge listener"})
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
                self.connected = True
                if failures or self.reconnects:
                    log.info("listener connected (LISTEN %s)", self.channel)
                failures = 0
                self.wake.set()  # poll once: notifications sent while away are gone
                await self._watch()
            except asyncio.CancelledError:
                raise
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                delay = backoff(failures, cap=self.reconnect_max_delay)
                failures += 1
                log.warning("listener connection lost (%s); reconnecting in %.2f s",
                            type(exc).__name__, delay)
                await self._close()
                self.reconnects += 1
                await asyncio.sleep(delay)
                continue
            # _watch returned: the connection terminated
            delay = backoff(failures, cap=self.reconnect_max_delay)
            failures += 1
            log.warning("listener connection terminated; reconnecting in %.2f s", delay)
            await self._close()
            self.reconnects += 1
            await asyncio.sleep(delay)

    async def _watch(self) -> None:
        """Return when the connection is lost; a cheap query notices half-open connections."""
        assert self._conn is not None
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), self.keepalive)
                return
            except TimeoutError:
                pass
            await self._conn.fetchval("SELECT 1", timeout=self.keepalive)
