"""Flag: asyncio.Event's interface, plus waiting on several flags at once without a task each.

The producer waits for one of its wake-up reasons (a notification, a freed slot, a timeout)
after nearly every pass. With asyncio.Event that took a task per event, asyncio.wait's own
waiter, and the cancelled tasks' last turns: about ten turns of the event loop per delivery at
100 events/s, most of the daemon's CPU at low rates. A Flag resolves the waiting future
directly: one future and one timer per wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


class Flag:
    """set / clear / is_set / wait, as asyncio.Event."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if not self._set:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                self._forget(fut)
        return True

    def _forget(self, fut: asyncio.Future[None]) -> None:
        if fut in self._waiters:
            self._waiters.remove(fut)


async def wait_any(flags: Iterable[Flag], timeout: float) -> bool:
    """Wait until one of `flags` is set or `timeout` seconds pass; True if one was set."""
    flags = tuple(flags)
    if any(f.is_set() for f in flags):
        return True
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    for f in flags:
        f._waiters.append(fut)
    timer = loop.call_later(max(0.0, timeout), _expire, fut)
    try:
        await fut
    finally:
        timer.cancel()
        for f in flags:
            f._forget(fut)
    return any(f.is_set() for f in flags)


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
