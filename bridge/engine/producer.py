"""The producer: wake-ups -> fan out and claim -> request slots -> executor tasks.

One pass (`pass_once`) fans out new events and claims, in the same statement, the new
deliveries this daemon has room to start (so a delivery sent at once costs no claim UPDATE);
then it claims due rows (retries, leftovers, ordered and rate-limited endpoints) of the URLs
that may have some. A pass that finds nothing lets the NOTIFY gate decide whether writers
should notify, then waits for a reason to look again: a notification, a freed slot, a retry or
endpoint wait coming due, or the jittered poll.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Callable

from bridge.clock import Clock
from bridge.config import Config
from bridge.engine.completer import Completer
from bridge.engine.executor import Executor
from bridge.engine.flag import Flag, wait_any
from bridge.engine.gate import NotifyGate
from bridge.engine.policy import Policies
from bridge.engine.slots import Slots
from bridge.observe import SiteMetrics
from bridge.store import BreakerChange, Claimed, Result, Store

log = logging.getLogger("bridge.daemon")


# Draining: once a pass fans out this many events, writers are committing faster than one
# NOTIFY per wake-up is worth; the flag goes off and the daemon looks again every DRAIN_POLL
# seconds on its own, until QUIET_PASSES passes in a row find no new event.
DRAIN_THRESHOLD = 16
DRAIN_POLL = 0.005
QUIET_PASSES = 4


def fan_out_limit(batch_size: int, enabled: bool, urls: list[str], fast: list[str],
                  room: dict[str, int]) -> int:
    """How many events one pass fans out. When every subscribed URL is a plain one (no per-key
    order, rate limit or breaker), only as many as some URL can start now: those deliveries
    are inserted already claimed, so none costs a claim UPDATE, and the rest of a burst waits
    as events (cheaper than as pending delivery rows). Otherwise a whole batch."""
    if not enabled or not urls or len(fast) < len(urls):
        return batch_size
    return min(batch_size, max((room.get(u, 0) for u in urls), default=0))


def jitter(seconds: float) -> float:
    return seconds * random.uniform(0.8, 1.2)


class Producer:
    def __init__(self, store: Store, config: Callable[[], Config],
                 policies: Callable[[], Policies], slots: Slots, gate: NotifyGate,
                 executor: Executor, completer: Completer, metrics: SiteMetrics, clock: Clock,
                 wake: Flag) -> None:
        self.store = store
        self.config = config
        self.policies = policies
        self.slots = slots
        self.gate = gate
        self.executor = executor
        self.completer = completer
        self.metrics = metrics
        self.clock = clock
        self.wake = wake  # set by the listener, reloads, reaping, shutdown
        self.slot_free = Flag()
        self.urls: list[str] = []  # configured URLs, then URLs with leftover deliveries
        self.more: set[str] = set()  # URLs whose last claim may have left due rows behind
        self.fan_more = True  # the last fan-out was a full batch (or none has run)
        self.poll_due = True
        self.last_fan = self.last_claim = 0.0
        self.due: dict[str, float] = {}  # URL -> when an endpoint wait (rate, breaker) ends
        self.retry_at: float | None = None  # the earliest known retry
        self.stopping = False
        self.tasks: set[asyncio.Task[None]] = set()
        self._backlog = False
        self.quiet = 0  # passes in a row whose fan-out found no new event
        self.starved: set[str] = set()  # URLs left out of `more` for lack of room
        self._failures: dict[str, int] = {}  # consecutive failures per breaker URL, here

    # --- one pass ----------------------------------------------------------------------------

    async def pass_once(self) -> bool:
        """Fan out and claim what there is room for, start it; True if anything was found."""
        cfg = self.config()
        woken = self.wake.is_set() or self.poll_due
        self.wake.clear()
        self.poll_due = False
        now = self.clock.monotonic()
        self._backlog = False
        found = False
        claim_all = woken and (now - self.last_claim >= cfg.daemon.poll_interval)
        if woken or self.fan_more or now - self.last_fan >= cfg.daemon.poll_interval:
            fanned, unclaimed = await self._produce(cfg)
            found = fanned > 0
            if unclaimed:
                self.more.update(self.urls)
        if self.retry_at is not None and now >= self.retry_at:
            self.retry_at = None
            claim_all = True
        if claim_all or now - self.last_claim >= cfg.daemon.poll_interval:
            self.more.update(self.urls)
        for url, when in list(self.due.items()):
            if now >= when:
                del self.due[url]
                self.more.add(url)
        if cfg.webhooks.enabled and self.more:
            found = await self._claim(cfg) or found
        if self._backlog and self.gate.backlog():
            await self.store.set_sleeping(False)  # draining: writers may skip NOTIFY
        return found

    async def _produce(self, cfg: Config) -> tuple[int, bool]:
        """Fan out one batch; returns (events fanned out, whether rows were left unclaimed)."""
        pol = self.policies()
        enabled = cfg.webhooks.enabled
        subs = cfg.webhooks.subscriptions()
        urls = list(dict.fromkeys(u for _, u in subs))
        fast = [u for u in urls if not pol(u).per_key and not pol(u).shared_state]
        room = self.slots.room(fast) if enabled else {}
        limit = fan_out_limit(cfg.daemon.batch_size, enabled, urls, fast, room)
        if limit == 0:  # nothing could start: events wait, unfanned, until a slot frees
            self.fan_more = True
            return 0, False
        self.last_fan = self.clock.monotonic()
        claimed, by_type = await self.store.produce(
            limit, subs, enabled, room, pol.per_key_urls(),
            (cfg.capture.licenses.key, cfg.capture.customers.key), cfg.daemon.lease)
        events = sum(by_type.values())
        for event_type, count in by_type.items():
            self.metrics.fanned_out.labels(event_type).inc(count)
        self.fan_more = events >= limit
        self.quiet = 0 if events else self.quiet + 1
        self._backlog |= events >= min(DRAIN_THRESHOLD, cfg.daemon.batch_size)
        self._start(claimed, cfg)
        per_type = Counter(t for t, _ in subs)
        created = sum(n * per_type[t] for t, n in by_type.items())
        return events, enabled and len(claimed) < created

    async def _claim(self, cfg: Config) -> bool:
        pol = self.policies()
        wanted = self.slots.room(u for u in self.urls if u in self.more)
        for url in list(self.more):
            if url not in wanted and url not in self.due:
                self.more.discard(url)  # no room: an acknowledgement of its rows asks again
                self.starved.add(url)
        shared = {u: min(n, pol(u).concurrency - self.slots.held_for(u))
                  for u, n in wanted.items() if pol(u).shared_state}  # no prefetch: rates
        #   and breakers are charged when rows are claimed, so claim only what starts now
        admitted = {}
        if shared:
            admitted = await self.store.admit(
                shared, [pol(u).rate_limit for u in shared], [pol(u).burst for u in shared],
                max(pol(u).timeout for u in shared) + 5)  # a probe's answer is due by then
            now = self.clock.monotonic()
            for url in shared:
                adm = admitted.get(url)
                if adm is None:  # no shared row yet: nothing is sent unlimited
                    wanted[url] = 0
                    await self.store.endpoints_init([url], [pol(url).burst])
                    self.due[url] = now + 0.01
                    continue
                wanted[url] = adm.granted
                if adm.wait is not None:
                    self.due[url] = now + max(adm.wait, 0.001)
        wanted = {u: n for u, n in wanted.items() if n > 0}
        if not wanted:
            return False
        self.last_claim = self.clock.monotonic()
        claimed = await self.store.claim(wanted, cfg.daemon.lease)
        self._start(claimed, cfg)  # before anything else can fail: claimed rows must go out
        got = Counter(c.url for c in claimed)
        for url, asked in wanted.items():
            if got[url] < asked:
                self.more.discard(url)  # drained for now; a wake-up or a poll asks again
            elif url not in admitted:
                self._backlog = True
        unused = {u: admitted[u].granted - got[u] for u in admitted
                  if admitted[u].granted > got[u]}
        if unused:
            probes = {u for u in unused if pol(u).breaker is not None and got[u] == 0}
            try:
                await self.store.refund(unused, probes)
            except Exception as exc:  # tokens and probes lapse by themselves
                log.warning("could not give back unused rate tokens or probes: %s", exc)
        return bool(claimed)

    # --- starting requests -----------------------------------------------------------------

    def _start(self, claimed: list[Claimed], cfg: Config) -> None:
        if not claimed:
            return
        # a queued row must start while its lease still covers a whole request
        budget = cfg.daemon.lease - max(self.policies()(c.url).timeout for c in claimed)
        start_by = self.clock.monotonic() + budget - min(1.0, budget / 4)
        for c in claimed:
            self.slots.add(c, start_by)
        self.start_ready({c.url for c in claimed})

    def start_ready(self, urls: set[str] | None = None) -> None:
        """Start the queued requests that have a free slot; give back expired ones."""
        if self.stopping:
            return
        start, expired = self.slots.startable(urls)
        for c in start:
            task = asyncio.create_task(self._run(c))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if expired:
            self.give_back(expired)
        self.metrics.in_flight.set(len(self.slots.held))

    async def _run(self, c: Claimed) -> None:
        try:
            result = await self.executor.execute(c)
        finally:
            self.slots.request_done(c)
        self.completer.add(result)
        self._local_breaker(result)
        self.start_ready({c.url})

    def give_back(self, claimed: list[Claimed]) -> None:
        """Release claimed rows that were never sent (their attempt does not count)."""
        self.slot_free.set()
        task = asyncio.create_task(self._release([(c.id, c.attempt) for c in claimed]))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _release(self, claims: list[tuple[int, int]]) -> None:
        try:
            await self.store.release(claims)
        except Exception as exc:  # their leases expire by themselves
            log.warning("could not give back %d claimed delivery(ies): %s", len(claims), exc)

    # --- results -----------------------------------------------------------------------------

    def _local_breaker(self, result: Result) -> None:
        """Count consecutive failures here too, so a failing endpoint is paused at once, before
        the shared state is written (requests already queued here would otherwise go out)."""
        breaker = self.policies()(result.claimed.url).breaker
        if breaker is None:
            return
        url = result.claimed.url
        if result.state == "delivered":
            self._failures[url] = 0
            return
        self._failures[url] = self._failures.get(url, 0) + 1
        if self._failures[url] >= breaker.failures and self.slots.paused_until(url) is None:
            self._pause(url, breaker.cooldown)

    def _pause(self, url: str, seconds: float) -> None:
        until = self.clock.monotonic() + seconds
        queued = self.slots.pause(url, until)
        self.due[url] = until
        if queued:
            self.give_back(queued)

    def on_recorded(self, batch: list[Result], changes: list[BreakerChange]) -> None:
        """The completer recorded `batch`: free its slots, note retries, start what waits."""
        now = self.clock.monotonic()
        pol = self.policies()
        for r in batch:
            self.slots.acked(r.claimed)
            if r.claimed.url in self.starved:  # room again: its due rows may be claimed
                self.starved.discard(r.claimed.url)
                self.more.add(r.claimed.url)
            if r.retry_in is None and pol(r.claimed.url).per_key:
                self.more.add(r.claimed.url)  # its key's next event may be claimed now
            if r.retry_in is not None:
                due = now + r.retry_in + 0.005
                self.retry_at = due if self.retry_at is None else min(self.retry_at, due)
        for ch in changes:
            self._breaker_changed(ch)
        self.start_ready()
        self.slot_free.set()

    def _breaker_changed(self, ch: BreakerChange) -> None:
        breaker = self.policies()(ch.url).breaker
        if ch.state == "opens" and breaker is not None:
            log.warning("circuit breaker opened for %s after %d consecutive failure(s); "
                        "no request for %g s, then one probe", ch.url, ch.failures,
                        breaker.cooldown)
            self.metrics.breaker_open.labels(ch.url).set(1)
            if self.slots.paused_until(ch.url) is None:
                self._pause(ch.url, breaker.cooldown)
        elif ch.state == "closed" and ch.was_open:
            log.info("circuit breaker closed for %s: the probe succeeded", ch.url)
            self.metrics.breaker_open.labels(ch.url).set(0)
            self._failures[ch.url] = 0
            self.slots.resume(ch.url)
            self.more.add(ch.url)
            self.wake.set()

    # --- waiting -----------------------------------------------------------------------------

    async def idle(self) -> None:
        """Nothing found: settle the NOTIFY gate, then wait for a reason to look again."""
        cfg = self.config()
        if self.more or self.fan_more:
            # not idle, only out of room: a freed slot, a wake-up or an endpoint wait ending
            # brings the next pass; a flag that is on keeps its expiry renewed
            if self.gate.on and self.gate.idle():
                await self.store.set_sleeping(True, self.gate.expiry)
                self.gate.flag_set(await self.store.current_snapshot())
            await wait_any((self.wake, self.slot_free), self._timeout(cfg))
            self.slot_free.clear()
            return
        if self.gate.on is False and self.quiet < QUIET_PASSES:
            # draining with NOTIFY off: writers will not wake us, so look again shortly
            await wait_any((self.wake, self.slot_free), min(DRAIN_POLL, self._timeout(cfg)))
            self.slot_free.clear()
            self.poll_due = True
            return
        if self.gate.snapshot is not None:
            if await self.store.snapshot_settled(self.gate.snapshot):
                self.gate.settled()
                self.poll_due = True  # every writer that might have skipped NOTIFY has ended
                return
        elif self.gate.idle():
            await self.store.set_sleeping(True, self.gate.expiry)
            if self.gate.flag_set(await self.store.current_snapshot()):
                self.poll_due = True  # a writer may have committed before the flag was set
                return
        timeout = self._timeout(cfg)
        if self.gate.snapshot is not None:
            timeout = min(timeout, 0.01)
        woke = await wait_any((self.wake, self.slot_free), timeout)
        self.slot_free.clear()
        if not woke and timeout >= cfg.daemon.poll_interval * 0.8:
            self.poll_due = True

    def _timeout(self, cfg: Config) -> float:
        """Until the next poll, retry or endpoint wait, whichever comes first."""
        now = self.clock.monotonic()
        timeout = jitter(cfg.daemon.poll_interval)
        for when in (self.retry_at, *self.due.values()):
            if when is not None:
                timeout = min(timeout, max(0.0, when - now))
        return timeout

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.slot_free.set()
