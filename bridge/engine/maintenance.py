"""Maintenance: the periodic jobs of one site, each a `run_once()` on its own interval.

- heartbeat: this daemon's row in `daemon`, then reaping: a daemon that missed three
  heartbeats is marked gone and its claimed deliveries are released at once (take-over in
  seconds, not after the lease);
- URL refresh: the URLs that still have pending deliveries (also ones no longer configured);
- field refresh: the payload field map (an install run meanwhile may have recorded new column
  names or types; a column no one knew is looked up at once, when a claimed row has it);
- prune: settled events and old log rows, in bounded batches (through the daemon's pool).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable

import asyncpg

from bridge import ops
from bridge.config import Config
from bridge.engine.executor import describe
from bridge.engine.producer import Producer
from bridge.store import Store

log = logging.getLogger("bridge.daemon")

URL_REFRESH = 30.0  # seconds between reads of the URLs with leftover deliveries


class Maintenance:
    def __init__(self, store: Store, pool: asyncpg.Pool, config: Callable[[], Config],
                 producer: Producer) -> None:
        self.store = store
        self.pool = pool
        self.config = config
        self.producer = producer
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self._heartbeat_failing = False

    def jobs(self) -> list[tuple[str, Callable[[], float], Callable[[], Awaitable[None]]]]:
        """(name, interval, run_once) of every periodic job."""
        return [
            ("heartbeat", lambda: self.config().daemon.heartbeat_interval, self.heartbeat),
            ("url-refresh", lambda: URL_REFRESH, self.refresh_urls),
            # an install run meanwhile may have recorded new column types or names
            ("field-refresh", lambda: URL_REFRESH, self.store.load_fields),
            ("prune", lambda: self.config().retention.prune_interval, self.prune),
        ]

    async def run(self) -> None:
        await asyncio.gather(*(self._every(name, interval, job)
                               for name, interval, job in self.jobs()))

    async def _every(self, name: str, interval: Callable[[], float],
                     job: Callable[[], Awaitable[None]]) -> None:
        # half an interval out of step with the listener's keep-alive (same interval), so an
        # idle site's heartbeat and probe share one pool connection instead of keeping two
        await asyncio.sleep(interval() / 2)
        while True:
            seconds = interval()
            if seconds <= 0:  # switched off (retention.prune_interval: 0); look again later
                await asyncio.sleep(60)
                continue
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception as exc:  # a job must never take the daemon down
                log.warning("%s failed: %s", name, describe(exc))

    async def heartbeat(self) -> None:
        cfg = self.config()
        try:
            was_gone = await self.store.heartbeat(self.hostname, self.pid,
                                                  cfg.subscriptions_fingerprint(),
                                                  cfg.daemon.heartbeat_interval)
        except Exception as exc:
            if not self._heartbeat_failing:
                log.warning("heartbeat failed (%s): other daemons will count this one gone "
                            "after three missed beats and take over its deliveries",
                            describe(exc))
            self._heartbeat_failing = True
            return
        if self._heartbeat_failing:
            log.info("heartbeat recorded again")
        self._heartbeat_failing = False
        if was_gone:
            # others ended this daemon's leases: what is queued here may be theirs now
            dropped = self.producer.slots.drop_queues()
            log.warning("this daemon had been marked gone by another (no heartbeat for three "
                        "intervals); dropped %d queued delivery(ies) without sending them",
                        len(dropped))
            self.producer.wake.set()
        await self.reap()

    async def reap(self) -> None:
        for r in await self.store.reap_daemons():
            log.warning("daemon %s (host %s, pid %s) is gone: no heartbeat for %.1f s; "
                        "released %d delivery(ies) it held", r["id"], r["hostname"], r["pid"],
                        r["silent"], r["released"])
            self.producer.wake.set()

    async def refresh_urls(self) -> None:
        cfg = self.config()
        configured = list(dict.fromkeys(u for _, u in cfg.webhooks.subscriptions()))
        leftover = await self.store.pending_urls()
        self.producer.urls = configured + [u for u in leftover if u not in set(configured)]

    async def prune(self) -> None:
        events, logs = await ops.prune_pool(self.pool, self.config())
        if events or logs:
            log.info("pruned %d event(s) and %d log row(s)", events, logs)
