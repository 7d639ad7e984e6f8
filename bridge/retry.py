"""Retry policies: QLM's fixed interval, or exponential backoff with jitter; Retry-After."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from bridge.config import WebhooksConfig


@dataclass(frozen=True)
class RetryPolicy:
    kind: str  # "fixed" | "exponential"
    interval: float
    max_retries: int
    max_interval: float

    @classmethod
    def from_config(cls, cfg: WebhooksConfig) -> RetryPolicy:
        return cls(cfg.retry_policy, cfg.retry_interval, cfg.max_retries, cfg.max_retry_interval)

    def next_delay(self, attempts_done: int, retry_after: float | None = None,
                   rng: random.Random | None = None) -> float | None:
        """Seconds until the next attempt, or None when the delivery has failed for good.

        ``attempts_done`` counts every attempt so far (the first is 1): at most
        1 + max_retries attempts are made.
        """
        if attempts_done > self.max_retries:
            return None
        if self.kind == "exponential":
            base = min(self.max_interval, self.interval * 2.0 ** (attempts_done - 1))
            draw = rng.random() if rng is not None else random.random()
            delay = base * (0.5 + 0.5 * draw)  # "equal jitter"
        else:
            delay = self.interval
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_interval))
        return delay


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date; None when absent or malformed."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
