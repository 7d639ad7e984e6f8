"""A real aiohttp receiver on 127.0.0.1 for tests: records every request, answers per path."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Behaviour = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


async def ok(_: web.Request, __: int) -> web.StreamResponse:
    return web.Response(text="ok")


def status(code: int, **headers: str) -> Behaviour:
    async def handler(_: web.Request, __: int) -> web.StreamResponse:
        return web.Response(status=code, text=f"status {code}", headers=headers)
    return handler


def fail_first(n: int, code: int = 500) -> Behaviour:
    async def handler(_: web.Request, count: int) -> web.StreamResponse:
        return web.Response(status=code if count <= n else 200)
    return handler


def black_hole() -> Behaviour:
    async def handler(_: web.Request, __: int) -> web.StreamResponse:
        await asyncio.sleep(3600)
        return web.Response()
    return handler


@dataclass
class Receiver:
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    port: int = 0
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        server: Any = site._server
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        path = request.path
        self.counts[path] = self.counts.get(path, 0) + 1
        self.received.append(Received(path, dict(request.headers), body, time.monotonic()))
        self._arrived.set()
        behaviour = self.behaviours.get(path, ok)
        return await behaviour(request, self.counts[path])

    def on(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out; received {len(self.received)} request(s)")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(remaining, 0.1))
