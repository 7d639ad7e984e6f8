"""One site: a license database and the services that deliver its events.

`Site` wires the services together (store, listener, producer, executor, completer,
maintenance) and runs their lifecycle: connect and check the schema, register, run, reload,
shut down gracefully. It holds no delivery logic of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass

import asyncpg

from bridge.clock import Clock, SystemClock
from bridge.config import Config
from bridge.connect import create_pool, unreachable
from bridge.dispatch import Dispatcher, close_quietly
from bridge.engine.completer import Completer
from bridge.engine.executor import Executor, describe
from bridge.engine.flag import Flag
from bridge.engine.gate import NotifyGate
from bridge.engine.maintenance import Maintenance
from bridge.engine.policy import Policies
from bridge.engine.producer import Producer
from bridge.engine.slots import Slots
from bridge.errors import BridgeError, ConfigError
from bridge.install import SCHEMA_VERSION
from bridge.listener import Listener, backoff
from bridge.observe import SiteMetrics
from bridge.store import CONNECTION_ERRORS, Store

log = logging.getLogger("bridge.daemon")

DB_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)
# At start these do not heal by waiting: say so and exit instead of retrying for ever.
FATAL_AT_START: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,  # bad user or password
    asyncpg.exceptions.InvalidCatalogNameError,  # no such database
)
# Seconds a pool connection may sit unused before it is closed. Short: an idle site's periodic
# statements (heartbeat, probe, poll) now and then overlap and open a second connection, which
# must not stay (P8: 5 s kept 3 connections per idle site; with 2 s, 2). A busy pool uses every
# connection far more often than this, so it does not reconnect.
IDLE_CONNECTION_LIFETIME = 2.0
# Bound on the database calls made while shutting down (the database may be gone).
SHUTDOWN_DB_TIMEOUT = 5.0


@dataclass
class Wiring:
    """What a site's services share; rebuilt parts (config, policies, dispatcher) are swapped
    here on reload, and the services read them through small getters."""

    config: Config
    policies: Policies
    dispatcher: Dispatcher | None = None


class Site:
    def __init__(self, name: str, config: Config, daemon_id: str, metrics: SiteMetrics,
                 clock: Clock | None = None) -> None:
        self.name = name
        self.id = daemon_id
        self.metrics = metrics
        self.clock = clock or SystemClock()
        self.w = Wiring(config, Policies(config.webhooks))
        self.wake = Flag()
        self.ready = asyncio.Event()
        self.stopping = False
        self.pool: asyncpg.Pool | None = None
        self.store: Store | None = None
        self.listener: Listener | None = None
        self.producer: Producer | None = None
        self.completer: Completer | None = None
        self.problem: str | None = None  # why the site is not running, for /readyz

    @property
    def config(self) -> Config:
        return self.w.config

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if self.pool is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.pool.close(), 5)

    async def _run(self) -> None:
        cfg = self.config
        self.pool = await create_pool(
            cfg.database, max_size=4, reset=_no_reset,
            # an idle site keeps one pool connection (heartbeats) besides the listener
            idle_lifetime=IDLE_CONNECTION_LIFETIME)
        self.store = store = Store(self.pool, cfg.database.schema_name, self.id)
        if not await self._check_schema():
            log.info("daemon %s stopped before the database was reachable", self.id)
            return
        await self._register()
        clashes = await self.apply_db_config(cfg)
        if clashes:
            with contextlib.suppress(*DB_ERRORS):
                await store.daemon_gone()
            raise ConfigError("webhooks.field_names: " + "; ".join(clashes))
        await self._init_endpoints()  # the last database step of the start: nothing to undo
        self.w.dispatcher = Dispatcher(cfg.webhooks)
        await self.w.dispatcher.start()
        slots = Slots(lambda url: self.w.policies(url).concurrency,
                      lambda: self.w.config.webhooks.prefetch,
                      lambda: self.w.config.webhooks.max_concurrency, self.clock)
        executor = Executor(self._dispatcher, lambda url: self.w.policies(url), self.metrics)
        self.completer = Completer(store, lambda url: self.w.policies(url), self.metrics,
                                   self.clock, self._recorded, cfg.daemon.reconnect_max_delay)
        self.producer = producer = Producer(
            store, lambda: self.w.config, lambda: self.w.policies, slots,
            NotifyGate(cfg.daemon.poll_interval, self.clock), executor, self.completer,
            self.metrics, self.clock, self.wake)
        maintenance = Maintenance(store, self.pool, lambda: self.w.config, producer)
        self.listener = Listener(
            cfg.database, self.wake, probe_pool=self.pool,
            keepalive=cfg.daemon.heartbeat_interval,
            reconnect_max_delay=cfg.daemon.reconnect_max_delay)
        self.listener.start()
        with contextlib.suppress(*DB_ERRORS):
            await maintenance.refresh_urls()
        if not producer.urls:
            producer.urls = list(dict.fromkeys(u for _, u in cfg.webhooks.subscriptions()))
        background = [asyncio.create_task(self.completer.run(), name="completer"),
                      asyncio.create_task(maintenance.run(), name="maintenance")]
        log.info("daemon %s started (schema %s, %d subscription(s), webhooks %s)", self.id,
                 cfg.database.schema_name, len(cfg.webhooks.subscriptions()),
                 "enabled" if cfg.webhooks.enabled else "DISABLED")
        self.problem = None
        self.ready.set()
        try:
            await self._loop(producer)
        finally:
            await self._shutdown(background)

    def _dispatcher(self) -> Dispatcher:
        assert self.w.dispatcher is not None
        return self.w.dispatcher

    def _recorded(self, batch: list, changes: list) -> None:  # type: ignore[type-arg]
        assert self.producer is not None
        self.producer.on_recorded(batch, changes)

    async def _loop(self, producer: Producer) -> None:
        failures = 0
        while not self.stopping:
            try:
                found = await producer.pass_once()
                failures = 0
                if not found and not self.stopping:
                    await producer.idle()
            except Exception as exc:  # never die of one bad pass: back off and look again
                self.metrics.db_errors.inc()
                delay = backoff(failures, base=0.05, cap=self.config.daemon.reconnect_max_delay)
                failures += 1
                producer.gate.unknown()  # re-assert the NOTIFY flag once back
                producer.poll_due = True
                self._log_loop_error(exc, delay)
                await self.sleep_unless_stopping(delay)

    def _log_loop_error(self, exc: BaseException, delay: float) -> None:
        if isinstance(exc, asyncpg.UndefinedTableError | asyncpg.UndefinedFunctionError):
            log.error("the bridge schema %r is gone (uninstalled with --drop-data?): "
                      "reinstall it or stop this daemon; retrying in %.2f s",
                      self.config.database.schema_name, delay)
        elif isinstance(exc, CONNECTION_ERRORS):
            log.warning("%s; retrying in %.2f s", unreachable(self.config.database, exc), delay)
        elif isinstance(exc, DB_ERRORS):
            log.warning("database error (%s); retrying in %.2f s", describe(exc), delay)
        else:
            log.exception("unexpected error; retrying in %.2f s", delay)

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        if self.producer is not None:
            self.producer.stop()

    async def sleep_unless_stopping(self, delay: float) -> bool:
        """Sleep; True if a stop was requested meanwhile."""
        if self.stopping:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), delay)
        return self.stopping

    async def _check_schema(self) -> bool:
        """Wait for the database and check the bridge schema; False if stopped meanwhile."""
        assert self.store is not None
        failures = 0
        while True:
            try:
                version = await self.store.pool.fetchval(self.store.q["schema_version"])
                return self._schema_matches(version)
            except asyncpg.ClientConfigurationError as exc:
                raise BridgeError(f"database.dsn: {exc}") from None
            except FATAL_AT_START as exc:
                raise BridgeError(f"cannot connect to the database: {describe(exc)}") from None
            except asyncpg.UndefinedTableError:
                raise BridgeError(
                    f"the bridge schema {self.config.database.schema_name!r} is not installed "
                    "in this database; run: qlm-bridge install --config FILE") from None
            except DB_ERRORS as exc:
                delay = backoff(failures, base=0.2, cap=self.config.daemon.reconnect_max_delay)
                failures += 1
                self.problem = unreachable(self.config.database, exc)
                log.warning("%s; retrying in %.1f s", self.problem, delay)
                if await self.sleep_unless_stopping(delay):
                    return False

    def _schema_matches(self, version: int | None) -> bool:
        """A schema older than this release needs `install` (an upgrade in place) first; one
        that is newer was installed by a later release, whose daemon should run instead."""
        name = self.config.database.schema_name
        if version is None or version < SCHEMA_VERSION:
            raise BridgeError(
                f"the bridge schema {name!r} is at version {version}; this release needs "
                f"version {SCHEMA_VERSION}: run qlm-bridge install --config FILE (it upgrades "
                "in place and keeps every delivery and the log)")
        if version > SCHEMA_VERSION:
            log.warning("the bridge schema %r is at version %d, newer than this release's %d: "
                        "run the daemon of the release that installed it", name, version,
                        SCHEMA_VERSION)
        return True

    async def _register(self) -> None:
        """First heartbeat, then refuse to run beside a live daemon that fans out differently
        (an event fanned out by one would never reach the URLs only the other has)."""
        assert self.store is not None
        cfg = self.config
        mine = cfg.subscriptions_fingerprint()
        await self.store.heartbeat(socket.gethostname(), os.getpid(), mine,
                                   cfg.daemon.heartbeat_interval)
        others = await self.store.conflicting_daemons(mine, 3 * cfg.daemon.heartbeat_interval)
        if others:
            with contextlib.suppress(*DB_ERRORS):
                await self.store.daemon_gone()
            raise ConfigError(
                "webhooks.events/enabled differ from those of the running daemon(s) "
                + ", ".join(others) + " on the same bridge schema; every daemon must fan out "
                "alike (also per-key ordering, capture keys and endpoint rate limits and "
                "breakers): stop them first, or edit every config and send SIGHUP to each daemon")

    async def apply_db_config(self, config: Config) -> list[str]:
        """Write the license_modified switch and the field-name overrides of `config`;
        returns the field-name clashes that kept them from being written."""
        assert self.store is not None
        tables = {"license": config.capture.licenses.qualified(),
                  "customer": config.capture.customers.qualified()}
        try:
            clashes = await self.store.apply_config(
                config.capture_modified(), dict(config.webhooks.field_names), tables)
            await self.store.load_fields()
            return clashes
        except DB_ERRORS as exc:
            log.warning("could not apply capture settings (%s); will retry on reload",
                        describe(exc))
            return []

    async def _init_endpoints(self) -> None:
        assert self.store is not None
        shared = self.w.policies.shared()
        if shared:
            await self.store.endpoints_init([p.url for p in shared], [p.burst for p in shared])

    # --- reload ------------------------------------------------------------------------------

    async def reload(self, new: Config) -> bool:
        """Apply a re-read config; False (and the running config kept) if it cannot be."""
        old = self.config
        if new.database != old.database:
            log.warning("database.* changes need a restart; applying the rest")
            new = new.model_copy(update={"database": old.database})
        if self.store is None:
            self.w.config, self.w.policies = new, Policies(new.webhooks)
            return True
        clashes = await self.apply_db_config(new)
        if clashes:
            log.error("reload failed, keeping the running config: webhooks.field_names: %s",
                      "; ".join(clashes))
            return False
        old_policies = self.w.policies
        self.w.config, self.w.policies = new, Policies(new.webhooks)
        if new.webhooks != old.webhooks and self.w.dispatcher is not None:
            fresh = Dispatcher(new.webhooks)
            await fresh.start()
            stale, self.w.dispatcher = self.w.dispatcher, fresh
            # close the old client once its longest request can have ended
            longest = max((old_policies(u).timeout for _, u in old.webhooks.subscriptions()),
                          default=old.webhooks.timeout)
            asyncio.get_running_loop().call_later(
                longest + 1, lambda: asyncio.ensure_future(close_quietly(stale)))
        with contextlib.suppress(*DB_ERRORS):
            await self._init_endpoints()
        if self.producer is not None:
            configured = list(dict.fromkeys(u for _, u in new.webhooks.subscriptions()))
            self.producer.urls = configured + [u for u in self.producer.urls
                                               if u not in set(configured)]
            self.producer.more.update(self.producer.urls)
        if new.subscriptions_fingerprint() != old.subscriptions_fingerprint():
            others: list[str] = []
            with contextlib.suppress(*DB_ERRORS):
                others = await self.store.conflicting_daemons(
                    new.subscriptions_fingerprint(), 3 * new.daemon.heartbeat_interval)
            if others:
                log.warning("webhooks.events changed here but not yet on %s: reload them too",
                            ", ".join(others))
        self.wake.set()
        log.info("config reloaded (%d subscription(s), webhooks %s)",
                 len(new.webhooks.subscriptions()),
                 "enabled" if new.webhooks.enabled else "DISABLED")
        return True

    # --- health ------------------------------------------------------------------------------

    async def readiness(self) -> tuple[bool, str]:
        ok, detail = await self._readiness()
        self.metrics.site_ready.set(1 if ok else 0)
        return ok, detail

    async def _readiness(self) -> tuple[bool, str]:
        if self.problem is not None and not self.ready.is_set():
            return False, self.problem
        if self.store is None or not self.ready.is_set():
            return False, "starting: database not reached yet"
        try:
            await asyncio.wait_for(self.store.pool.fetchval("SELECT 1"), 2)
        except DB_ERRORS as exc:  # TimeoutError included
            return False, f"database unreachable: {describe(exc)}"
        if self.listener is None:
            return False, "LISTEN connection down"
        listening, detail = self.listener.notifications_ok
        return listening, f"database reachable, {detail}" if listening else detail

    async def refresh_gauges(self) -> None:
        if self.store is None:
            return
        self.metrics.listener_connected.set(
            1 if self.listener is not None and self.listener.connected else 0)
        self.metrics.notifications_arrive.set(
            1 if self.listener is not None and self.listener.notifications_ok[0] else 0)
        row = await asyncio.wait_for(self.store.pool.fetchrow(self.store.q["queue_stats"]), 2)
        if row is not None:
            self.metrics.queue_depth.set(row["pending"])
            self.metrics.oldest_pending.set(row["oldest"])

    # --- shutdown ----------------------------------------------------------------------------

    async def _shutdown(self, background: list[asyncio.Task[None]]) -> None:
        assert self.store is not None and self.producer is not None
        assert self.completer is not None
        producer, cfg = self.producer, self.config
        producer.stop()
        unsent = producer.slots.drop_queues()
        running = set(producer.tasks)
        if running:
            await asyncio.wait(running, timeout=cfg.daemon.shutdown_timeout)
        for task in list(producer.tasks):
            task.cancel()
        if producer.tasks:
            await asyncio.wait(set(producer.tasks), timeout=2)
        # let the completer record what finished (including a batch being written)
        await self.completer.flush(SHUTDOWN_DB_TIMEOUT)
        # still held now and not recorded: give back (their lease would expire anyway)
        unrecorded = {(r.claimed.id, r.claimed.attempt) for r in self.completer.unrecorded()}
        unfinished = [(c.id, c.attempt) for c in unsent]
        unfinished += [key for key in producer.slots.held if key not in unrecorded]
        for task in background:
            task.cancel()
        try:
            await asyncio.wait_for(self._leave(sorted(set(unfinished))), SHUTDOWN_DB_TIMEOUT)
        except Exception as exc:  # TimeoutError included
            log.warning("could not sign off cleanly (%s); leases expire by themselves",
                        describe(exc))
        if self.listener is not None:
            await self.listener.stop()
        if self.w.dispatcher is not None:
            await close_quietly(self.w.dispatcher)
        log.info("daemon %s stopped", self.id)

    async def _leave(self, unfinished: list[tuple[int, int]]) -> None:
        assert self.store is not None
        if unfinished:
            await self.store.release(unfinished)
        if not await self.store.other_daemons_alive(3 * self.config.daemon.heartbeat_interval):
            await self.store.set_sleeping(False)  # nobody listens: writers skip NOTIFY
        await self.store.daemon_gone()


async def _no_reset(_: asyncpg.Connection) -> None:
    """Pool connections keep no session state (no LISTEN, no SET, no advisory locks: the
    listener has its own connection), so asyncpg's reset round trip on every release is
    skipped."""
