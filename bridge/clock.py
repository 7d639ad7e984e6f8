"""Time for the engine's services: a Clock protocol, the system clock, and a fake for tests.

Services take a clock instead of calling `time.monotonic()`, so the decision logic (slots,
the NOTIFY gate, rate and breaker waits) is unit-tested without sleeping.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
