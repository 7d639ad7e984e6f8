"""The delivery daemon: wake-up -> fan out -> claim -> deliver -> acknowledge.

- Wake-ups come from the listener (NOTIFY) and a jittered poll timer; retries wake it when due.
- Claims are per URL and bounded: a URL holds at most `per_url_concurrency` requests in flight
  plus `prefetch` claimed rows queued behind them, so when a request finishes the next starts at
  once, with no database round trip; a black-holed URL fills only its own queue. A queued row
  whose lease would run out before it could finish is given back unsent.
- Finished attempts are acknowledged in batches by one acker task (group commit: while one ack
  is in flight the next batch gathers). Claimed-but-unacknowledged rows never exceed
  `webhooks.max_concurrency`, which therefore bounds what a SIGKILL can duplicate.
- While it drains it tells writers to skip NOTIFY (runtime.sleeping = false); before it sleeps
  it sets the flag (with an expiry it renews, so a dead daemon stops costing writers) and polls
  once more after every writer that could have missed it has ended.
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
from collections import Counter, deque
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

import asyncpg

from bridge import config as config_mod
from bridge import payload
from bridge.config import Config
from bridge.connect import create_pool, unreachable
from bridge.dispatch import Dispatcher, Outcome, close_quietly
from bridge.errors import BridgeError, ConfigError
from bridge.listener import Listener, backoff
from bridge.observe import Metrics, serve, setup_logging
from bridge.retry import RetryPolicy
from bridge.store import CONNECTION_ERRORS, Claimed, Result, Store

log = logging.getLogger("bridge.daemon")

DB_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)
# At start these do not heal by waiting: say so and exit instead of retrying for ever.
FATAL_AT_START: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,  # bad user or password
    asyncpg.exceptions.InvalidCatalogNameError,  # no such database
)
# How long a daemon whose slots are all taken waits for one to free before it goes idle.
BUSY_WAIT = 0.05
# How often the list of URLs with pending deliveries (incl. URLs no longer configured) is read.
URL_REFRESH = 30.0
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
        # claimed, not yet acknowledged (queued, running or awaiting its ack); keyed by
        # (delivery id, attempt): a lease that expired while an ack was delayed can hand the
        # same row to this daemon again
        self._in_flight: dict[tuple[int, int], Claimed] = {}
        self._per_url: Counter[str] = Counter()  # claimed, not yet acknowledged, per URL
        self._queues: dict[str, deque[tuple[Claimed, float]]] = {}  # (claimed, start by)
        self._running: Counter[str] = Counter()  # HTTP requests in flight per URL
        self._urls: list[str] = []  # configured URLs, then URLs with leftover deliveries
        self._more: set[str] = set()  # URLs whose last claim may have left due rows behind
        # requests started and not yet acknowledged: what a SIGKILL could duplicate; bounded
        # by webhooks.max_concurrency
        self._sent = 0
        self._acks: list[Result] = []
        self._acking: list[Result] = []  # the batch being written
        self._tasks: set[asyncio.Task[None]] = set()
        self._reloads: set[asyncio.Future[None]] = set()
        self._sleeping_flag = False
        self._flag_renewed = 0.0
        self._snapshot: str | None = None
        self._next_retry: float | None = None
        self._fan_out_due = True
        self._fan_task: asyncio.Task[None] | None = None
        self._fan_done = asyncio.Event()
        self._fanned = 0  # events fanned out since the last claim pass
        self._fan_error: BaseException | None = None
        self._poll_due = True
        self._last_fan_out = 0.0
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
        self._pool = await create_pool(cfg.database, max_size=4, reset=_no_reset)
        self._store = Store(self._pool, cfg.database.schema_name, self.id)
        if not await self._check_schema():
            log.info("daemon %s stopped before the database was reachable", self.id)
            return
        await self._register()
        clashes = await self._apply_db_config(cfg)
        if clashes:
            with contextlib.suppress(*DB_ERRORS):
                await self._store.daemon_gone()
            raise ConfigError("webhooks.field_names: " + "; ".join(clashes))
        self._dispatcher = Dispatcher(cfg.webhooks)
        await self._dispatcher.start()
        self._listener = Listener(
            cfg.database, self._wake, probe_pool=self._pool,
            keepalive=cfg.daemon.heartbeat_interval,
            reconnect_max_delay=cfg.daemon.reconnect_max_delay)
        self._listener.start()
        runner = None
        address = cfg.observe.address()
        if address is not None:
            runner = await serve(address[0], address[1], self.metrics, self._readiness,
                                 self._refresh_gauges)
        await self._refresh_urls()
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
                log.warning("%s; retrying in %.1f s", unreachable(self.config.database, exc),
                            delay)
                if await self._sleep_unless_stopping(delay):
                    return False

    async def _register(self) -> None:
        """First heartbeat, then refuse to run beside a live daemon that fans out differently
        (an event fanned out by one would never reach the URLs only the other has)."""
        assert self._store is not None
        mine = self.config.subscriptions_fingerprint()
        await self._store.heartbeat(socket.gethostname(), os.getpid(), mine)
        others = await self._store.conflicting_daemons(
            mine, 3 * self.config.daemon.heartbeat_interval)
        if others:
            with contextlib.suppress(*DB_ERRORS):
                await self._store.daemon_gone()
            raise ConfigError(
                "webhooks.events/enabled differ from those of the running daemon(s) "
                + ", ".join(others) + " on the same bridge schema; every daemon must fan out "
                "alike: stop them first, or edit every config and send SIGHUP to each daemon")

    async def _refresh_urls(self) -> None:
        """Claim from the configured URLs and from URLs that still have pending deliveries."""
        assert self._store is not None
        configured = list(dict.fromkeys(u for _, u in self.config.webhooks.subscriptions()))
        leftover = self._urls  # if the database cannot say, keep the URLs known so far
        with contextlib.suppress(*DB_ERRORS):
            leftover = await self._store.pending_urls()
        self._urls = configured + [u for u in leftover if u not in set(configured)]
        self._more.update(self._urls)

    async def _apply_db_config(self, config: Config) -> list[str]:
        """Write the license_modified switch and the field-name overrides of `config`;
        returns the field-name clashes that kept them from being written."""
        assert self._store is not None
        tables = {"license": config.capture.licenses.qualified(),
                  "customer": config.capture.customers.qualified()}
        try:
            return await self._store.apply_config(
                config.capture_modified(), dict(config.webhooks.field_names), tables)
        except DB_ERRORS as exc:
            log.warning("could not apply capture settings (%s); will retry on reload",
                        _describe(exc))
            return []

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
        if new.database != old.database:
            log.warning("database.* changes need a restart; applying the rest")
            new = new.model_copy(update={"database": old.database})
        clashes = await self._apply_db_config(new)
        if clashes:
            log.error("reload failed, keeping the running config: webhooks.field_names: %s",
                      "; ".join(clashes))
            return
        self.config = new
        self.policy = RetryPolicy.from_config(new.webhooks)
        if new.webhooks != old.webhooks and self._dispatcher is not None:
            fresh = Dispatcher(new.webhooks)
            await fresh.start()
            stale, self._dispatcher = self._dispatcher, fresh
            delay = old.webhooks.timeout + 1
            asyncio.get_running_loop().call_later(
                delay, lambda: asyncio.ensure_future(close_quietly(stale)))
        await self._refresh_urls()
        if new.subscriptions_fingerprint() != old.subscriptions_fingerprint():
            others = []
            with contextlib.suppress(*DB_ERRORS):
                others = await self._store.conflicting_daemons(
                    new.subscriptions_fingerprint(), 3 * new.daemon.heartbeat_interval) \
                    if self._store is not None else []
            if others:
                log.warning("webhooks.events changed here but not yet on %s: reload them too",
                            ", ".join(others))
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
                if isinstance(exc, asyncpg.UndefinedTableError | asyncpg.UndefinedFunctionError):
                    log.error("the bridge schema %r is gone (uninstalled with --drop-data?): "
                              "reinstall it or stop this daemon; retrying in %.2f s",
                              self.config.database.schema_name, delay)
                elif isinstance(exc, CONNECTION_ERRORS):
                    log.warning("%s; retrying in %.2f s", unreachable(self.config.database, exc),
                                delay)
                elif isinstance(exc, DB_ERRORS):
                    log.warning("database error (%s); retrying in %.2f s", _describe(exc), delay)
                else:
                    log.exception("unexpected error; retrying in %.2f s", delay)
                await self._sleep_unless_stopping(delay)

    async def _cycle(self) -> bool:
        """One pass: start a fan-out of new events (in the background, so delivering goes on
        meanwhile), claim what there is room for, start it."""
        assert self._store is not None
        cfg = self.config
        if self._fan_error is not None:
            error, self._fan_error = self._fan_error, None
            raise error
        woken = self._wake.is_set() or self._poll_due
        self._wake.clear()
        self._poll_due = False
        now = time.monotonic()
        # Fan out only when there may be new events: woken (NOTIFY, poll, reconnect, reload,
        # the "poll once more" of the idle path), the last fan-out was a full batch, or a poll
        # interval went by.
        if (woken or self._fan_out_due or now - self._last_fan_out >= cfg.daemon.poll_interval):
            if self._fan_task is None:
                self._last_fan_out = now
                self._fan_out_due = False
                self._fan_task = asyncio.create_task(self._fan_out(), name="fan-out")
            else:
                self._fan_out_due = True  # once more after the running one: it may be late
        fanned, self._fanned = self._fanned, 0
        if not cfg.webhooks.enabled:
            return await self._await_fan_out() or fanned > 0
        retry_due = self._next_retry is not None and now >= self._next_retry
        if woken or fanned or retry_due or now - self._last_claim >= cfg.daemon.poll_interval:
            self._more.update(self._urls)  # anything may be due: ask every URL with room
            if retry_due:
                self._next_retry = None
        wanted = {u: n for u, n in self._room().items() if u in self._more}
        claimed: list[Claimed] = []
        if wanted:
            self._last_claim = now
            claimed = await self._store.claim(wanted, cfg.daemon.lease)
            got = Counter(c.url for c in claimed)
            for url, asked in wanted.items():
                if got[url] < asked:
                    self._more.discard(url)  # drained for now; a wake-up or a poll asks again
            # a queued row must start while its lease still covers a whole request
            budget = cfg.daemon.lease - cfg.webhooks.timeout
            start_by = time.monotonic() + budget - min(1.0, budget / 4)
            for c in claimed:
                self._enqueue(c, start_by)
            for url in got:
                self._pump(url)
            if claimed and self._sleeping_flag:
                self._sleeping_flag = False
                await self._store.set_sleeping(False)  # draining: writers may skip NOTIFY
        if claimed or fanned:
            return True
        return await self._await_fan_out()

    async def _fan_out(self) -> None:
        """One fan-out statement; its result wakes the claim loop."""
        assert self._store is not None
        cfg = self.config
        try:
            by_type = await self._store.fan_out(cfg.daemon.batch_size,
                                                cfg.webhooks.subscriptions(),
                                                cfg.webhooks.enabled)
            n = sum(by_type.values())
        except Exception as exc:  # handed to the main loop, which backs off and fans out again
            self._fan_error = exc
            self._fan_out_due = True
            by_type, n = {}, 0
        finally:
            self._fan_task = None
        if n:
            for event_type, count in by_type.items():
                self.metrics.fanned_out.labels(event_type).inc(count)
            self._fanned += n
        if n >= cfg.daemon.batch_size:
            self._fan_out_due = True
        self._fan_done.set()

    async def _await_fan_out(self) -> bool:
        """Nothing claimed: if a fan-out is running (or one is due), wait for it (or a freed
        slot, or a wake-up) instead of going idle; True when there is a reason to look again."""
        if self._fan_task is None and not self._fan_out_due and not self._fanned \
                and self._fan_error is None:
            return False
        if self._fan_task is not None:
            self._fan_done.clear()
            await self._wait_any((self._fan_done, self._wake), self.config.daemon.poll_interval)
        return True

    def _room(self) -> dict[str, int]:
        """How many rows each URL may claim now: room for `per_url_concurrency` requests in
        flight plus `prefetch` queued behind them (a stuck URL fills only its own queue)."""
        wh = self.config.webhooks
        cap = wh.per_url_concurrency + wh.prefetch
        room = {url: cap - self._per_url[url] for url in self._urls}
        return {url: n for url, n in room.items() if n > 0}

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
        if not self._sleeping_flag or \
                time.monotonic() - self._flag_renewed >= self.config.daemon.poll_interval:
            await self._store.set_sleeping(True, 3 * self.config.daemon.poll_interval + 5)
            self._sleeping_flag = True
            self._flag_renewed = time.monotonic()
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
        await self._wait_any((self._wake, self._slot_free), timeout)
        self._slot_free.clear()

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

    def _enqueue(self, c: Claimed, start_by: float) -> None:
        self._in_flight[(c.id, c.attempt)] = c
        self._per_url[c.url] += 1
        self._queues.setdefault(c.url, deque()).append((c, start_by))
        self.metrics.in_flight.set(len(self._in_flight))

    def _pump(self, url: str) -> None:
        """Start queued deliveries of one URL while it has free request slots."""
        queue = self._queues.get(url)
        limit = self.config.webhooks.per_url_concurrency
        expired: list[Claimed] = []
        total = self.config.webhooks.max_concurrency
        while (queue and self._running[url] < limit and self._sent < total
               and not self.stopping):
            c, start_by = queue.popleft()
            if time.monotonic() > start_by:
                expired.append(c)  # its lease would run out mid-request: give it back
                continue
            self._running[url] += 1
            self._sent += 1
            task = asyncio.create_task(self._deliver(c))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if queue is not None and not queue:
            del self._queues[url]
        if expired:
            self._give_back(expired)

    def _give_back(self, claimed: list[Claimed]) -> None:
        for c in claimed:
            self._forget(c)
        self._slot_free.set()
        if self._store is not None:
            task = asyncio.create_task(self._release([c.id for c in claimed]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _release(self, ids: list[int]) -> None:
        assert self._store is not None
        try:
            await self._store.release(ids)
        except Exception as exc:  # their leases expire by themselves
            log.warning("could not give back %d claimed delivery(ies): %s", len(ids),
                        _describe(exc))

    def _forget(self, c: Claimed) -> None:
        if self._in_flight.pop((c.id, c.attempt), None) is not None:
            self._per_url[c.url] -= 1
            if self._per_url[c.url] <= 0:
                del self._per_url[c.url]

    async def _deliver(self, c: Claimed) -> None:
        assert self._dispatcher is not None
        cfg = self.config.webhooks
        body = payload.body(c.event)
        headers = payload.headers(c.event, body, cfg.secret_key, cfg.standard_webhooks)
        started = datetime.now(UTC)
        try:
            out = await self._dispatcher.post(c.url, body, headers)
        except asyncio.CancelledError:
            # Shutdown cut the request short. It may have reached the receiver, so it counts as
            # an attempt (logged) and the delivery is due again at once, for any daemon.
            out = Outcome(False, None, "cancelled: the daemon was shutting down", None,
                          (datetime.now(UTC) - started).total_seconds() * 1000)
            self._record(c, out, "pending", 0.0)
            self._acks.append(Result(c, "pending", 0.0, None, out.error, started,
                                     out.duration_ms, None))
            self._ack_wake.set()
            raise
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
        self._running[c.url] -= 1
        if self._running[c.url] <= 0:
            del self._running[c.url]
        self._pump(c.url)  # the next queued delivery of this URL starts now

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
        self._sent -= len(batch)
        for r in batch:
            c = r.claimed
            self._forget(c)
            if r.retry_in is not None:
                due = now + r.retry_in + 0.005
                self._next_retry = due if self._next_retry is None else min(self._next_retry,
                                                                            due)
        self.metrics.in_flight.set(len(self._in_flight))
        for url in list(self._queues):  # requests held back by max_concurrency may start now
            self._pump(url)
        self._slot_free.set()

    # --- housekeeping ------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        assert self._store is not None
        hostname, pid = socket.gethostname(), os.getpid()
        last_prune = last_urls = time.monotonic()
        while True:
            try:
                await self._store.heartbeat(hostname, pid,
                                            self.config.subscriptions_fingerprint())
            except Exception as exc:
                log.warning("heartbeat failed: %s", _describe(exc))
            if time.monotonic() - last_urls >= URL_REFRESH:
                last_urls = time.monotonic()
                await self._refresh_urls()
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
        try:
            await asyncio.wait_for(self._store.pool.fetchval("SELECT 1"), 2)
        except DB_ERRORS as exc:  # TimeoutError included
            return False, f"database unreachable: {_describe(exc)}"
        if self._listener is None:
            return False, "LISTEN connection down"
        listening, detail = self._listener.notifications_ok
        return listening, f"database reachable, {detail}" if listening else detail

    async def _refresh_gauges(self) -> None:
        assert self._store is not None
        self.metrics.listener_connected.set(
            1 if self._listener is not None and self._listener.connected else 0)
        self.metrics.notifications_arrive.set(
            1 if self._listener is not None and self._listener.notifications_ok[0] else 0)
        row = await asyncio.wait_for(self._store.pool.fetchrow(self._store.q["queue_stats"]), 2)
        if row is not None:
            self.metrics.queue_depth.set(row["pending"])
            self.metrics.oldest_pending.set(row["oldest"])

    async def _shutdown(self, background: list[asyncio.Task[None]]) -> None:
        assert self._store is not None
        if self._fan_task is not None:  # a fan-out is one short statement: let it commit
            fan = self._fan_task
            await asyncio.wait({fan}, timeout=SHUTDOWN_DB_TIMEOUT)
            fan.cancel()
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
        except Exception as exc:  # TimeoutError included
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


async def _no_reset(_: asyncpg.Connection) -> None:
    """Pool connections keep no session state (no LISTEN, no SET, no advisory locks: the
    listener has its own connection), so asyncpg's reset round trip on every release is
    skipped."""


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (a faster event loop and socket transport: the
    daemon spends most of its time in them), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def main(config: Config, config_path: str | None) -> None:
    """`qlm-bridge run`: log setup, the event loop, signals."""
    setup_logging(config.observe.log_format, config.observe.log_level)
    daemon = Daemon(config, config_path)
    try:
        run_loop(daemon.run(install_signals=True))
    except (OSError, asyncpg.PostgresError) as exc:
        raise BridgeError(f"cannot start: {_describe(exc)}") from None
