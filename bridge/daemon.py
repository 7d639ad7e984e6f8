"""The delivery daemon: wake-up -> fan out -> claim -> deliver -> acknowledge.

- Wake-ups come from the listener (NOTIFY) and a jittered poll timer; retries wake it when due.
- It claims only what it can start at once (global and per-URL free slots), so a lease never
  ticks for a request that is merely queued, and a black-holed URL cannot starve the others.
- Finished attempts are acknowledged in batches by one acker task (group commit: while one ack
  is in flight the next batch gathers); a slot is freed only once its attempt is acknowledged,
  so what a SIGKILL can duplicate is bounded by `webhooks.max_concurrency`.
- While it drains it tells writers to skip NOTIFY (runtime.sleeping = false); before it sleeps
  it sets the flag and polls once more after every writer that could have missed it has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import signal
import socket
import time
from collections import Counter
from datetime import UTC, datetime

import asyncpg

from bridge import config as config_mod
from bridge import payload
from bridge.config import Config
from bridge.dispatch import Dispatcher, Outcome, close_quietly
from bridge.errors import BridgeError
from bridge.listener import Listener, backoff
from bridge.observe import Metrics, serve, setup_logging
from bridge.retry import RetryPolicy
from bridge.store import CONNECTION_ERRORS, Claimed, Result, Store, asyncpg_dsn

log = logging.getLogger("bridge.daemon")

DB_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)
# At start these do not heal by waiting: say so and exit instead of retrying for ever.
FATAL_AT_START: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,  # bad user or password
    asyncpg.exceptions.InvalidCatalogNameError,  # no such database
)
# How long a daemon whose slots are all taken waits for one to free before it goes idle.
BUSY_WAIT = 0.05
# Bound on the database calls made while shutting down (the database may be gone).
SHUTDOWN_DB_TIMEOUT = 5.0


def _jitter(seconds: float) -> float:
    return seconds * random.uniform(0.8, 1.2)


def _snapshot_has_writers(snapshot: str) -> bool:
    """A pg_snapshot's text is xmin:xmax:xip,xip,...; writers were in progress if xip is set."""
    parts = snapshot.split(":")
    return len(parts) == 3 and parts[2] != ""


class Daemon:
    def __init__(self, config: Config, config_path: str | None = None, *,
                 daemon_id: str | None = None, metrics: Metrics | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.id = daemon_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.metrics = metrics or Metrics()
        self.policy = RetryPolicy.from_config(config.webhooks)
        self.stopping = False
        self.ready = asyncio.Event()  # set once connected and listening
        self._stopped = asyncio.Event()
        self._wake = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._ack_wake = asyncio.Event()
        # claimed, not yet acknowledged; keyed by (delivery id, attempt): a lease that expired
        # while an ack was delayed can hand the same row to this daemon again
        self._in_flight: dict[tuple[int, int], Claimed] = {}
        self._per_url: Counter[str] = Counter()
        self._acks: list[Result] = []
        self._acking: list[Result] = []  # the batch being written
        self._tasks: set[asyncio.Task[None]] = set()
        self._reloads: set[asyncio.Future[None]] = set()
        self._sleeping_flag = False
        self._snapshot: str | None = None
        self._next_retry: float | None = None
        self._fan_out_due = True
        self._poll_due = True
        self._last_fan_out = 0.0
        self._claim_short = False  # the last claim took less than it asked for
        self._freed = 0  # attempts acknowledged (slots freed) so far
        self._freed_at_claim = 0
        self._last_claim = 0.0
        self._pool: asyncpg.Pool | None = None
        self._store: Store | None = None
        self._dispatcher: Dispatcher | None = None
        self._listener: Listener | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self, install_signals: bool = False) -> None:
        if install_signals:
            self._install_signals()  # before connecting: SIGTERM must stop a daemon still waiting
        try:
            await self._run()
        finally:
            if install_signals:
                self._remove_signals()
            if self._pool is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._pool.close(), 5)
            self._stopped.set()

    async def _run(self) -> None:
        cfg = self.config
        self._pool = await asyncpg.create_pool(
            asyncpg_dsn(cfg.database.dsn), min_size=0, max_size=4,
            timeout=cfg.database.connect_timeout,
            server_settings={"application_name": "qlm-bridge"})
        self._store = Store(self._pool, cfg.database.schema_name, self.id)
        if not await self._check_schema():
            log.info("daemon %s stopped before the database was reachable", self.id)
            return
        self._dispatcher = Dispatcher(cfg.webhooks)
        await self._dispatcher.start()
        self._listener = Listener(
            asyncpg_dsn(cfg.database.dsn), cfg.database.channel, self._wake,
            keepalive=cfg.daemon.heartbeat_interval,
            reconnect_max_delay=cfg.daemon.reconnect_max_delay,
            connect_timeout=cfg.database.connect_timeout)
        self._listener.start()
        runner = None
        address = cfg.observe.address()
        if address is not None:
            runner = await serve(address[0], address[1], self.metrics, self._readiness,
                                 self._refresh_gauges)
        await self._apply_db_config()
        background = [asyncio.create_task(self._acker(), name="acker"),
                      asyncio.create_task(self._heartbeat(), name="heartbeat")]
        log.info("daemon %s started (schema %s, %d subscription(s), webhooks %s)", self.id,
                 cfg.database.schema_name, len(cfg.webhooks.subscriptions()),
                 "enabled" if cfg.webhooks.enabled else "DISABLED")
        self.ready.set()
        try:
            await self._main_loop()
        finally:
            await self._shutdown(background)
            if runner is not None:
                await runner.cleanup()

    def stop(self) -> None:
        """Ask for a graceful stop (idempotent; safe from a signal handler)."""
        if not self.stopping:
            log.info("stopping: finishing in-flight deliveries (at most %g s)",
                     self.config.daemon.shutdown_timeout)
        self.stopping = True
        self._wake.set()
        self._slot_free.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_soon)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    def _reload_soon(self) -> None:
        future = asyncio.ensure_future(self.reload())  # keep a reference until it is done
        self._reloads.add(future)
        future.add_done_callback(self._reloads.discard)

    async def _check_schema(self) -> bool:
        """Wait for the database and check the bridge schema; False if stopped meanwhile."""
        assert self._store is not None
        failures = 0
        while True:
            try:
                await self._store.pool.fetchval(self._store.q["schema_version"])
                return True
            except asyncpg.ClientConfigurationError as exc:
                raise BridgeError(f"database.dsn: {exc}") from None
            except FATAL_AT_START as exc:
                raise BridgeError(f"cannot connect to the database: {_describe(exc)}") from None
            except asyncpg.UndefinedTableError:
                raise BridgeError(
                    f"the bridge schema {self.config.database.schema_name!r} is not installed "
                    "in this database; run: qlm-bridge install --config FILE") from None
            except DB_ERRORS as exc:
                delay = backoff(failures, base=0.2, cap=self.config.daemon.reconnect_max_delay)
                failures += 1
                log.warning("database not reachable (%s); retrying in %.1f s",
                            _describe(exc), delay)
                if await self._sleep_unless_stopping(delay):
                    return False

    async def _apply_db_config(self) -> None:
        assert self._store is not None
        try:
            await self._store.apply_config(self.config.capture_modified(),
                                           dict(self.config.webhooks.field_names))
        except DB_ERRORS as exc:
            log.warning("could not apply capture settings (%s); will retry on reload",
                        _describe(exc))

    async def reload(self) -> None:
        """SIGHUP: re-read the config file; an invalid edit keeps the running config."""
        if self.config_path is None:
            log.warning("reload requested but the daemon has no config file")
            return
        try:
            new = config_mod.load(self.config_path)
        except BridgeError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            return
        old = self.config
        if (new.database.dsn, new.database.schema_name) != (old.database.dsn,
                                                              old.database.schema_name):
            log.warning("database.dsn/schema changes need a restart; applying the rest")
            new = new.model_copy(update={"database": old.database})
        self.config = new
        self.policy = RetryPolicy.from_config(new.webhooks)
        if new.webhooks != old.webhooks and self._dispatcher is not None:
            fresh = Dispatcher(new.webhooks)
            await fresh.start()
            stale, self._dispatcher = self._dispatcher, fresh
            delay = old.webhooks.timeout + 1
            asyncio.get_running_loop().call_later(
                delay, lambda: asyncio.ensure_future(close_quietly(stale)))
        await self._apply_db_config()
        self._wake.set()
        log.info("config reloaded (%d subscription(s), webhooks %s)",
                 len(new.webhooks.subscriptions()),
                 "enabled" if new.webhooks.enabled else "DISABLED")

    # --- the loop ----------------------------------------------------------------------------

    async def _main_loop(self) -> None:
        failures = 0
        while not self.stopping:
            try:
                progressed = await self._cycle()
                failures = 0
                if not progressed and not self.stopping:
                    await self._idle()
            except Exception as exc:  # never die of one bad pass: back off and look again
                self.metrics.db_errors.inc()
                delay = backoff(failures, base=0.05, cap=self.config.daemon.reconnect_max_delay)
                failures += 1
                self._sleeping_flag = False  # re-assert the flag once back
                if isinstance(exc, DB_ERRORS):
                    log.warning("database error (%s); retrying in %.2f s", _describe(exc), delay)
                else:
                    log.exception("unexpected error; retrying in %.2f s", delay)
                await self._sleep_unless_stopping(delay)

    async def _cycle(self) -> bool:
        """One pass: fan out new events, claim what can start now, start it."""
        assert self._store is not None
        cfg = self.config
        woken = self._wake.is_set() or self._poll_due
        self._wake.clear()
        self._poll_due = False
        # Fan out when there may be new events: woken (NOTIFY, poll, reconnect, reload, the
        # "poll once more" of the idle path), the last claim could not fill the free slots,
        # the last fan-out was a full batch, or a poll interval went by. While a backlog keeps
        # every slot busy, the round trip is saved.
        fanned, skipped = 0, True
        now = time.monotonic()
        if (woken or self._fan_out_due or not cfg.webhooks.enabled
                or now - self._last_fan_out >= cfg.daemon.poll_interval):
            skipped, self._fan_out_due, self._last_fan_out = False, False, now
            fanned = await self._store.fan_out(cfg.daemon.batch_size,
                                               cfg.webhooks.subscriptions(), cfg.webhooks.enabled)
            self._fan_out_due = fanned >= cfg.daemon.batch_size
        if fanned:
            self.metrics.fanned_out.inc(fanned)
        if not cfg.webhooks.enabled:
            return fanned > 0
        free = cfg.webhooks.max_concurrency - len(self._in_flight)
        if free <= 0:
            self._slot_free.clear()
            await self._wait_any((self._slot_free,), cfg.daemon.poll_interval)
            return True
        if not (woken or fanned) and self._claim_pointless(now):
            return False
        saturated, caps = self._url_slots()
        limit = min(free, cfg.daemon.batch_size)
        claimed = await self._store.claim(limit, cfg.daemon.lease, saturated, caps,
                                          cfg.webhooks.per_url_concurrency)
        self._claim_short = len(claimed) < limit
        self._freed_at_claim, self._last_claim = self._freed, now
        if self._next_retry is not None and now >= self._next_retry:
            self._next_retry = None
        if self._claim_short:
            self._fan_out_due = True
        for c in claimed:
            self._start(c)
        if claimed and self._sleeping_flag:
            self._sleeping_flag = False
            await self._store.set_sleeping(False)  # draining: writers may skip NOTIFY
        # a skipped fan-out counts as progress: the next pass fans out before going idle
        return fanned > 0 or bool(claimed) or (skipped and self._fan_out_due)

    def _claim_pointless(self, now: float) -> bool:
        """The last claim found less than it could take and nothing changed since (no new
        deliveries, no freed slot, no retry due, less than a poll interval ago): claiming
        again would only rescan the queue. (With a URL at its limit the claim skips that
        URL's rows one by one, so this keeps a long backlog from costing a scan per pass.)"""
        return (self._claim_short and self._freed == self._freed_at_claim
                and (self._next_retry is None or now < self._next_retry)
                and now - self._last_claim < self.config.daemon.poll_interval)

    def _url_slots(self) -> tuple[list[str], dict[str, int]]:
        limit = self.config.webhooks.per_url_concurrency
        saturated = [u for u, n in self._per_url.items() if n >= limit]
        caps = {u: limit - n for u, n in self._per_url.items() if 0 < n < limit}
        return saturated, caps

    async def _idle(self) -> None:
        """Nothing to do: make sure writers will notify, then wait for a reason to look again."""
        assert self._store is not None
        if self._in_flight and not self._sleeping_flag:
            # Busy, only out of free slots: a finishing request frees one soon. Waiting for it
            # a moment saves flipping runtime.sleeping (two commits and a snapshot) per slot;
            # a slow or black-holed endpoint falls through to the real idle path.
            woke = await self._wait_any((self._wake, self._slot_free), BUSY_WAIT)
            self._slot_free.clear()
            if woke:
                return
        self._poll_due = True  # whatever ends this wait, the next pass fans out and claims
        if not self._sleeping_flag:
            await self._store.set_sleeping(True)
            self._sleeping_flag = True
            snapshot = await self._store.current_snapshot()
            self._snapshot = snapshot if _snapshot_has_writers(snapshot) else None
            return  # poll once more: a writer may have committed before the flag was set
        if self._snapshot is not None and await self._store.snapshot_settled(self._snapshot):
            self._snapshot = None
            return  # every writer that might have skipped NOTIFY has ended: poll once more
        timeout = _jitter(self.config.daemon.poll_interval)
        now = time.monotonic()
        if self._next_retry is not None:
            timeout = min(timeout, max(0.0, self._next_retry - now))
        if self._snapshot is not None:
            timeout = min(timeout, 0.01)
        woke = await self._wait_any((self._wake, self._slot_free), timeout)
        self._slot_free.clear()
        if not woke and self._snapshot is None:
            self._sleeping_flag = False  # on each poll, re-assert the flag (cheap no-op UPDATE)

    async def _wait_any(self, events: tuple[asyncio.Event, ...], timeout: float) -> bool:
        if any(e.is_set() for e in events):
            return True
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            done, _ = await asyncio.wait(waiters, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        return bool(done)

    async def _sleep_unless_stopping(self, delay: float) -> bool:
        """Sleep; True if a stop was requested meanwhile."""
        if self.stopping:
            return True
        await self._wait_any((self._wake,), delay)
        return self.stopping

    # --- delivering --------------------------------------------------------------------------

    def _start(self, c: Claimed) -> None:
        self._in_flight[(c.id, c.attempt)] = c
        self._per_url[c.url] += 1
        self.metrics.in_flight.set(len(self._in_flight))
        task = asyncio.create_task(self._deliver(c))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, c: Claimed) -> None:
        assert self._dispatcher is not None
        cfg = self.config.webhooks
        body = payload.body(c.event)
        headers = payload.headers(c.event, body, cfg.secret_key)
        started = datetime.now(UTC)
        try:
            out = await self._dispatcher.post(c.url, body, headers)
        except Exception as exc:  # a bug or an odd URL must not leak the slot
            log.exception("unexpected error delivering to %s", c.url)
            out = Outcome(False, None, f"internal error: {_describe(exc)}", None,
                          (datetime.now(UTC) - started).total_seconds() * 1000)
        if out.ok:
            state, retry_in = "delivered", None
        else:
            retry_in = self.policy.next_delay(c.attempt, out.retry_after)
            state = "failed" if retry_in is None else "pending"
        self._record(c, out, state, retry_in)
        self._acks.append(Result(c, state, retry_in, out.status, out.error, started,
                                 out.duration_ms, out.response_body))
        self._ack_wake.set()

    def _record(self, c: Claimed, out: Outcome, state: str, retry_in: float | None) -> None:
        m, ev, url = self.metrics, c.event.event_type, c.url
        m.attempts.labels(ev, url, "success" if out.ok else "failure").inc()
        m.latency.labels(url).observe(out.duration_ms / 1000)
        fields = {"event_id": c.event.event_id, "event_type": ev, "url": url,
                  "attempt": c.attempt, "status": out.status if out.status is not None else "-",
                  "duration_ms": round(out.duration_ms, 1)}
        if out.ok:
            m.delivered.labels(ev, url).inc()
            m.end_to_end.observe(max(0.0, (datetime.now(UTC) - c.event.created_at)
                                     .total_seconds()))
            log.info("delivered", extra={"fields": fields})
        elif state == "pending":
            m.retried.labels(ev, url).inc()
            log.warning("attempt failed: %s; retry in %.1f s", out.error, retry_in or 0,
                        extra={"fields": fields})
        else:
            m.failed.labels(ev, url).inc()
            log.error("delivery failed for good after %d attempt(s): %s", c.attempt, out.error,
                      extra={"fields": fields})

    async def _acker(self) -> None:
        """Acknowledge finished attempts in batches; free their slots once recorded."""
        assert self._store is not None
        failures = 0
        while True:
            await self._ack_wake.wait()
            self._ack_wake.clear()
            while self._acks:
                batch, self._acks = self._acks, []
                self._acking = batch
                try:
                    await self._store.ack(batch)
                    failures = 0
                except Exception as exc:  # the acker must outlive any error, or slots leak
                    self._acks[:0] = batch
                    self.metrics.db_errors.inc()
                    delay = backoff(failures, base=0.05,
                                    cap=self.config.daemon.reconnect_max_delay)
                    failures += 1
                    log.warning("could not record %d result(s) (%s); retrying in %.2f s",
                                len(batch), _describe(exc), delay)
                    await asyncio.sleep(delay)
                    continue
                finally:
                    self._acking = []
                self._finish(batch)

    def _finish(self, batch: list[Result]) -> None:
        now = time.monotonic()
        for r in batch:
            c = r.claimed
            if self._in_flight.pop((c.id, c.attempt), None) is not None:
                self._per_url[c.url] -= 1
                if self._per_url[c.url] <= 0:
                    del self._per_url[c.url]
            if r.retry_in is not None:
                due = now + r.retry_in + 0.005
                self._next_retry = due if self._next_retry is None else min(self._next_retry,
                                                                            due)
        self._freed += len(batch)
        self.metrics.in_flight.set(len(self._in_flight))
        self._slot_free.set()

    # --- housekeeping ------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        assert self._store is not None
        hostname, pid = socket.gethostname(), os.getpid()
        last_prune = time.monotonic()
        while True:
            try:
                await self._store.heartbeat(hostname, pid, self.config.fingerprint())
            except Exception as exc:
                log.debug("heartbeat failed: %s", _describe(exc))
            interval = self.config.retention.prune_interval
            if interval and time.monotonic() - last_prune >= interval:
                last_prune = time.monotonic()
                await self._prune()
            await asyncio.sleep(self.config.daemon.heartbeat_interval)

    async def _prune(self) -> None:
        try:
            from bridge import ops
        except ImportError:
            return
        try:
            events, logs = await asyncio.to_thread(ops.prune_once, self.config.database.dsn,
                                                   self.config)
            if events or logs:
                log.info("pruned %d event(s) and %d log row(s)", events, logs)
        except Exception as exc:  # prune is best effort; the next run catches up
            log.warning("scheduled prune failed: %s", _describe(exc))

    async def _readiness(self) -> tuple[bool, str]:
        assert self._store is not None
        listening = self._listener is not None and self._listener.connected
        try:
            await asyncio.wait_for(self._store.pool.fetchval("SELECT 1"), 2)
        except DB_ERRORS as exc:  # TimeoutError included
            return False, f"database unreachable: {_describe(exc)}"
        if not listening:
            return False, "LISTEN connection down"
        return True, "database reachable, LISTEN active"

    async def _refresh_gauges(self) -> None:
        assert self._store is not None
        self.metrics.listener_connected.set(
            1 if self._listener is not None and self._listener.connected else 0)
        row = await asyncio.wait_for(self._store.pool.fetchrow(self._store.q["queue_stats"]), 2)
        if row is not None:
            self.metrics.queue_depth.set(row["pending"])
            self.metrics.oldest_pending.set(row["oldest"])

    async def _shutdown(self, background: list[asyncio.Task[None]]) -> None:
        assert self._store is not None
        pending = set(self._tasks)
        if pending:
            await asyncio.wait(pending, timeout=self.config.daemon.shutdown_timeout)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2)
        # let the acker flush what finished (including a batch already being written)
        self._ack_wake.set()
        deadline = time.monotonic() + SHUTDOWN_DB_TIMEOUT
        while (self._acks or self._acking) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        # still in flight now: cancelled attempts (give them back) or unrecorded ones (their
        # lease expires and they are delivered again)
        unrecorded = {(r.claimed.id, r.claimed.attempt) for r in (*self._acks, *self._acking)}
        unfinished = [key[0] for key in self._in_flight if key not in unrecorded]
        for task in background:
            task.cancel()
        try:
            await asyncio.wait_for(self._leave(unfinished), SHUTDOWN_DB_TIMEOUT)
        except DB_ERRORS as exc:  # TimeoutError included
            log.warning("could not sign off cleanly (%s); leases expire by themselves",
                        _describe(exc))
        if self._listener is not None:
            await self._listener.stop()
        if self._dispatcher is not None:
            await close_quietly(self._dispatcher)
        log.info("daemon %s stopped", self.id)


    async def _leave(self, unfinished: list[int]) -> None:
        assert self._store is not None
        if unfinished:
            await self._store.release(unfinished)
        if not await self._store.other_daemons_alive(3 * self.config.daemon.heartbeat_interval):
            await self._store.set_sleeping(False)  # nobody listens: writers skip NOTIFY
        await self._store.daemon_gone()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def main(config: Config, config_path: str | None) -> None:
    """`qlm-bridge run`: log setup, the event loop, signals."""
    setup_logging(config.observe.log_format, config.observe.log_level)
    daemon = Daemon(config, config_path)
    try:
        asyncio.run(daemon.run(install_signals=True))
    except (OSError, asyncpg.PostgresError) as exc:
        raise BridgeError(f"cannot start: {_describe(exc)}") from None
