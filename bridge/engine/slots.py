"""Per-URL queues and request slots (pure: no I/O, time from a clock).

A URL holds at most `limit(url)` requests in flight plus `prefetch` claimed rows queued behind
them, so when a request finishes the next starts at once, with no database round trip, and a
black-holed URL fills only its own queue. Requests started and not yet acknowledged never exceed
`max_concurrency` across every URL: that is the most a SIGKILL can send twice.

A queued row must start while its lease still covers a whole request (`start_by`); one that
cannot is handed back unsent. A paused URL (open circuit breaker) starts nothing until resumed.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable

from bridge.clock import Clock
from bridge.store import Claimed

Key = tuple[int, int]  # (delivery id, attempt): a lease that expired while an ack was delayed
#                        can hand the same row to this daemon again, at the next attempt


class Slots:
    def __init__(self, limit: Callable[[str], int], prefetch: int | Callable[[], int],
                 max_concurrency: int | Callable[[], int], clock: Clock) -> None:
        self.limit = limit
        # fixed numbers, or getters that follow a reloaded config
        self._prefetch = prefetch if callable(prefetch) else (lambda: prefetch)
        self._max = max_concurrency if callable(max_concurrency) else (lambda: max_concurrency)
        self.clock = clock
        self.held: dict[Key, Claimed] = {}  # claimed, not yet acknowledged or given back
        self._per_url: Counter[str] = Counter()  # held, per URL
        self._queues: dict[str, deque[tuple[Claimed, float]]] = {}
        self._running: Counter[str] = Counter()  # requests in flight, per URL
        self._paused: dict[str, float] = {}  # URL -> monotonic time it may start again
        self.sent = 0  # started, not yet acknowledged

    # --- claiming --------------------------------------------------------------------------

    def room(self, urls: Iterable[str]) -> dict[str, int]:
        """How many more rows each URL may claim now (only URLs with room)."""
        out = {}
        now = self.clock.monotonic()
        prefetch = self._prefetch()
        for url in urls:
            if self._paused.get(url, 0.0) > now:
                continue
            n = self.limit(url) + prefetch - self._per_url[url]
            if n > 0:
                out[url] = n
        return out

    def add(self, c: Claimed, start_by: float) -> None:
        self.held[(c.id, c.attempt)] = c
        self._per_url[c.url] += 1
        self._queues.setdefault(c.url, deque()).append((c, start_by))

    # --- starting --------------------------------------------------------------------------

    def startable(self, urls: Iterable[str] | None = None) -> tuple[list[Claimed], list[Claimed]]:
        """Queued rows that may start now (marked running), and rows whose lease would run
        out mid-request (forgotten: give them back)."""
        start: list[Claimed] = []
        expired: list[Claimed] = []
        now = self.clock.monotonic()
        bound = self._max()
        for url in list(self._queues if urls is None else urls):
            queue = self._queues.get(url)
            if queue is None or self._paused.get(url, 0.0) > now:
                continue
            limit = self.limit(url)
            while queue and self._running[url] < limit and self.sent < bound:
                c, start_by = queue.popleft()
                if now > start_by:
                    expired.append(c)
                    continue
                self._running[url] += 1
                self.sent += 1
                start.append(c)
            if not queue:
                del self._queues[url]
        for c in expired:
            self.forget(c)
        return start, expired

    def request_done(self, c: Claimed) -> None:
        """The HTTP request ended; the row stays held (and counted in `sent`) until acked."""
        self._running[c.url] -= 1
        if self._running[c.url] <= 0:
            del self._running[c.url]

    def acked(self, c: Claimed) -> None:
        self.sent -= 1
        self.forget(c)

    def forget(self, c: Claimed) -> None:
        if self.held.pop((c.id, c.attempt), None) is not None:
            self._per_url[c.url] -= 1
            if self._per_url[c.url] <= 0:
                del self._per_url[c.url]

    # --- pausing (circuit breaker) ---------------------------------------------------------

    def pause(self, url: str, until: float) -> list[Claimed]:
        """Start nothing for `url` until `until`; returns its queued rows, forgotten (give
        them back unsent: waiting must not use up their retries)."""
        self._paused[url] = max(until, self._paused.get(url, 0.0))
        queued = [c for c, _ in self._queues.pop(url, ())]
        for c in queued:
            self.forget(c)
        return queued

    def resume(self, url: str) -> None:
        self._paused.pop(url, None)

    def paused_until(self, url: str) -> float | None:
        until = self._paused.get(url)
        return until if until is not None and until > self.clock.monotonic() else None

    # --- shutdown --------------------------------------------------------------------------

    def queued(self) -> list[Claimed]:
        return [c for queue in self._queues.values() for c, _ in queue]

    def drop_queues(self) -> list[Claimed]:
        """Forget every queued row (shutdown); returns them, to give back."""
        rows = self.queued()
        self._queues.clear()
        for c in rows:
            self.forget(c)
        return rows

    def running(self, url: str) -> int:
        return self._running[url]

    def held_for(self, url: str) -> int:
        """Rows of `url` claimed and not yet acknowledged or given back."""
        return self._per_url[url]
