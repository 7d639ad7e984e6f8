"""The executor: one claimed delivery -> one signed HTTP request -> a Result.

It decides what the attempt came to (delivered, retry after a delay, failed for good) from the
endpoint's retry policy and Retry-After, and records the attempt in the metrics and the log.
It touches no database: the completer records results.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from bridge.dispatch import Dispatcher, Outcome
from bridge.engine.policy import EndpointPolicy
from bridge.observe import SiteMetrics
from bridge.store import Claimed, Result

# The delivery log keeps the first engine's logger name: operators' log queries rely on it.
log = logging.getLogger("bridge.daemon")


def describe(exc: BaseException) -> str:
    """An exception's type and the first line of its message (never a traceback)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class Executor:
    def __init__(self, dispatcher: Callable[[], Dispatcher],
                 policy: Callable[[str], EndpointPolicy], metrics: SiteMetrics) -> None:
        self._dispatcher = dispatcher
        self._policy = policy
        self.metrics = metrics
        self._children: dict[tuple[str, ...], Any] = {}  # metric children, made lazily
        self._end_to_end = metrics.end_to_end.labels()

    async def execute(self, c: Claimed) -> Result:
        """Send one attempt. A cancelled request (shutdown) still yields a Result (it may have
        reached the receiver): it is logged and due again at once, for any daemon."""
        policy = self._policy(c.url)
        started = datetime.now(UTC)
        try:
            body, headers = policy.request(c.event)
            out = await self._dispatcher().post(c.url, body, headers, timeout=policy.timeout)
        except asyncio.CancelledError:
            out = Outcome(False, None, "cancelled: the daemon was shutting down", None,
                          _since(started))
            self._record(c, out, "pending", 0.0)
            return Result(c, "pending", 0.0, None, out.error, started, out.duration_ms, None)
        except Exception as exc:  # a bug or an odd URL must not leak the slot
            log.exception("unexpected error delivering to %s", c.url)
            out = Outcome(False, None, f"internal error: {describe(exc)}", None, _since(started))
        if out.ok:
            state, retry_in = "delivered", None
        else:
            retry_in = policy.retry.next_delay(c.attempt, out.retry_after)
            state = "failed" if retry_in is None else "pending"
        self._record(c, out, state, retry_in)
        return Result(c, state, retry_in, out.status, out.error, started, out.duration_ms,
                      out.response_body)

    def _child(self, metric: str, *labels: str) -> Any:
        """The child of `metric` with these labels (created on first use, so a URL that never
        succeeded has no `delivered` series), looked up once."""
        key = (metric, *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = getattr(self.metrics, metric).labels(*labels)
        return found

    def _record(self, c: Claimed, out: Outcome, state: str, retry_in: float | None) -> None:
        ev, url = c.event.event_type, c.url
        self._child("attempts", ev, url, "success" if out.ok else "failure").inc()
        self._child("latency", url).observe(out.duration_ms / 1000)
        if out.ok:
            self._child("delivered", ev, url).inc()
            self._end_to_end.observe(max(0.0, (datetime.now(UTC) - c.event.created_at)
                                         .total_seconds()))
            if log.isEnabledFor(logging.INFO):
                log.info("delivered", extra={"fields": _fields(c, out)})
        elif state == "pending":
            self._child("retried", ev, url).inc()
            log.warning("attempt failed: %s; retry in %.1f s", out.error, retry_in or 0,
                        extra={"fields": _fields(c, out)})
        else:
            self._child("failed", ev, url).inc()
            log.error("delivery failed for good after %d attempt(s): %s", c.attempt, out.error,
                      extra={"fields": _fields(c, out)})


def _fields(c: Claimed, out: Outcome) -> dict[str, Any]:
    """The structured fields of an attempt's log line."""
    return {"event_id": c.event.event_id, "event_type": c.event.event_type, "url": c.url,
            "attempt": c.attempt, "status": out.status if out.status is not None else "-",
            "duration_ms": round(out.duration_ms, 1)}


def _since(started: datetime) -> float:
    return (datetime.now(UTC) - started).total_seconds() * 1000

