"""The completer: records finished attempts in batches (group commit).

While one batch is being written the next gathers, so the number of statements per delivery
falls as the load rises. Each batch is one statement (delivery rows + attempt_log rows); a
batch whose write failed is sent again marked `resent`, which logs no attempt twice even when
the first try committed unseen. Breaker outcomes of the batch are written after it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from bridge.clock import Clock
from bridge.engine.executor import describe
from bridge.engine.policy import EndpointPolicy
from bridge.listener import backoff
from bridge.observe import SiteMetrics
from bridge.store import BreakerChange, BreakerOutcome, Result, Store

log = logging.getLogger("bridge.daemon")


def breaker_outcomes(batch: Sequence[Result],
                     policy: Callable[[str], EndpointPolicy]) -> list[BreakerOutcome]:
    """Per breaker URL of the batch: did any attempt succeed, and how many failed after the
    last success (in the order they finished)."""
    seen: dict[str, tuple[bool, int]] = {}
    for r in batch:
        ok, tail = seen.get(r.claimed.url, (False, 0))
        if r.state == "delivered":
            seen[r.claimed.url] = (True, 0)
        elif r.error is not None and not r.error.startswith("cancelled"):
            seen[r.claimed.url] = (ok, tail + 1)
    out = []
    for url, (ok, tail) in seen.items():
        b = policy(url).breaker
        if b is not None:
            out.append(BreakerOutcome(url, ok, tail, b.failures, b.cooldown))
    return out


class Completer:
    def __init__(self, store: Store, policy: Callable[[str], EndpointPolicy], metrics: SiteMetrics,
                 clock: Clock, on_done: Callable[[list[Result], list[BreakerChange]], None],
                 max_delay: float) -> None:
        self.store = store
        self.policy = policy
        self.metrics = metrics
        self.clock = clock
        self.on_done = on_done
        self.max_delay = max_delay
        self._pending: list[Result] = []
        self._writing: list[Result] = []
        self._wake = asyncio.Event()

    def add(self, result: Result) -> None:
        self._pending.append(result)
        self._wake.set()

    def unrecorded(self) -> list[Result]:
        return [*self._writing, *self._pending]

    async def run(self) -> None:
        failures = 0
        resent = False
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending, []
                self._writing = batch
                try:
                    changes = await self._write(batch, resent)
                except Exception as exc:  # the completer must outlive any error, or slots leak
                    self._pending[:0] = batch
                    resent = True
                    self.metrics.db_errors.inc()
                    delay = backoff(failures, base=0.05, cap=self.max_delay)
                    failures += 1
                    log.warning("could not record %d result(s) (%s); retrying in %.2f s",
                                len(batch), describe(exc), delay)
                    await asyncio.sleep(delay)
                    continue
                finally:
                    self._writing = []
                failures = 0
                resent = False
                try:
                    self.on_done(batch, changes)
                except Exception:  # a bug here must not end the completer (slots would leak)
                    log.exception("error after recording %d result(s)", len(batch))

    async def _write(self, batch: list[Result], resent: bool) -> list[BreakerChange]:
        await self.store.ack(batch, resent)
        outcomes = breaker_outcomes(batch, self.policy)
        return await self.store.breaker_outcomes(outcomes) if outcomes else []

    async def flush(self, timeout: float) -> None:
        """Shutdown: wait (bounded) until everything handed in is recorded."""
        self._wake.set()
        deadline = self.clock.monotonic() + timeout
        while self.unrecorded() and self.clock.monotonic() < deadline:
            await asyncio.sleep(0.02)
