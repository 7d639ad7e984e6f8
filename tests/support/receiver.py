"""The one webhook receiver for tests, the campaign and the benchmark: a real aiohttp server on
127.0.0.1 (optionally TLS) that records EVERY request, whatever its method and path, and answers
with a behaviour chosen per path. It can stop and come back on the same port.

In a test: `rx = await Receiver(behaviours={"/hook": status(503)}).start()`.
As its own process (the benchmark): `python -m tests.support.receiver PORT`, with control routes
GET /stats, GET /arrivals and POST /reset, and behaviours by first path segment: /ok/... answers
200, /lat/... answers 200 and records (key, arrival time.time()), /slow/... answers after 20 ms,
/hole/... never answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import socket
import ssl
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Behaviour = Callable[[web.Request, int], Awaitable[web.StreamResponse]]

# --- behaviours (request, how many requests this path has had, this one included) -------------


async def ok(_: web.Request, __: int) -> web.StreamResponse:
    return web.Response(text="ok")


def status(code: int, **headers: str) -> Behaviour:
    text = None if code in (204, 304) else f"status {code}"  # these carry no body

    async def handler(_: web.Request, __: int) -> web.StreamResponse:
        return web.Response(status=code, text=text, headers=headers)
    return handler


def fail_first(n: int, code: int = 500, **headers: str) -> Behaviour:
    """`code` (with `headers`) for the first n requests, then 200."""
    async def handler(_: web.Request, count: int) -> web.StreamResponse:
        if count <= n:
            return web.Response(status=code, headers=headers)
        return web.Response(text="ok")
    return handler


def redirect(location: str, code: int = 301) -> Behaviour:
    async def handler(_: web.Request, __: int) -> web.StreamResponse:
        return web.Response(status=code, headers={"Location": location})
    return handler


def delay(seconds: float) -> Behaviour:
    async def handler(_: web.Request, __: int) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(text="ok")
    return handler


@dataclass
class InFlight:
    """Counts the requests being answered at once, across every path it is installed on."""

    now: int = 0
    peak: int = 0

    def behaviour(self, seconds: float) -> Behaviour:
        """Hold each request `seconds`, then answer 200."""
        async def handler(_: web.Request, __: int) -> web.StreamResponse:
            self.now += 1
            self.peak = max(self.peak, self.now)
            try:
                await asyncio.sleep(seconds)
            finally:
                self.now -= 1
            return web.Response(text="ok")
        return handler


def black_hole() -> Behaviour:
    """Accept the request and never answer."""
    return delay(3600)


def big_body(size: int = 10 * 1024 * 1024) -> Behaviour:
    chunk = b"x" * 65536

    async def handler(request: web.Request, __: int) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Length": str(size)})
        await resp.prepare(request)
        sent = 0
        with contextlib.suppress(ConnectionError, OSError):
            while sent < size:
                await resp.write(chunk[:size - sent])
                sent += len(chunk)
        return resp
    return handler


def slow_body(status_code: int = 500) -> Behaviour:
    """Headers at once, then one byte every 0.2 s, forever."""
    async def handler(request: web.Request, __: int) -> web.StreamResponse:
        resp = web.StreamResponse(status=status_code)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                await resp.write(b".")
                await asyncio.sleep(0.2)
        return resp
    return handler


def reset() -> Behaviour:
    """Abort the TCP connection with an RST after reading the request."""
    async def handler(request: web.Request, __: int) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        raise ConnectionResetError("reset by the test receiver")
    return handler


def flaky(failure_rate: float, seed: int = 7) -> Behaviour:
    rng = random.Random(seed)

    async def handler(_: web.Request, __: int) -> web.StreamResponse:
        if rng.random() < failure_rate:
            return web.Response(status=503, text="flaky")
        return web.Response(text="ok")
    return handler


# --- the receiver ---------------------------------------------------------------------------


@dataclass
class Received:
    """One request as it arrived."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()
    wall: float  # time.time(), comparable with other processes

    @property
    def event_id(self) -> str:
        return self.headers.get("X-QLM-Event-Id", "")


@dataclass
class PathStats:
    """Per-path figures (kept even when requests are not recorded one by one)."""

    count: int = 0
    first: float = 0.0
    last: float = 0.0
    body_bytes: int = 0
    sample: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Receiver:
    """`behaviours` maps an exact path, or a prefix ending in `/*`, to a behaviour (default: 200).
    `record=False` keeps only the per-path stats (the benchmark's throughput runs)."""

    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    ssl_context: ssl.SSLContext | None = None
    record: bool = True
    port: int = 0
    received: list[Received] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    stats: dict[str, PathStats] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self, control: web.RouteTableDef | None = None) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        if control is not None:
            app.router.add_routes(control)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def start(self, control: web.RouteTableDef | None = None) -> Receiver:
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)  # the injected faults
        self._runner = web.AppRunner(self.app(control), access_log=None, shutdown_timeout=0.1,
                                     handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context,
                           reuse_address=True)
        await site.start()
        server: Any = site._server
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def url(self, path: str = "/hook") -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def behaviour(self, path: str) -> Behaviour:
        exact = self.behaviours.get(path)
        if exact is not None:
            return exact
        first = "/" + path.strip("/").split("/", 1)[0] + "/*"
        return self.behaviours.get(first, ok)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        path = request.path
        now = time.time()
        self.counts[path] += 1
        s = self.stats.get(path)
        if s is None:
            s = self.stats[path] = PathStats(first=now, sample=body, headers=dict(request.headers))
        s.count += 1
        s.last = now
        s.body_bytes += len(body)
        if self.record:
            self.received.append(Received(request.method, path, dict(request.headers), body,
                                          time.monotonic(), now))
        self._arrived.set()
        return await self.behaviour(path)(request, self.counts[path])

    def clear(self) -> None:
        self.received.clear()
        self.counts.clear()
        self.stats.clear()

    # --- reading what arrived ---

    def on(self, path: str, method: str = "POST") -> list[Received]:
        """The requests to `path` with `method` ("*": any method)."""
        return [r for r in self.received if r.path == path and method in ("*", r.method)]

    def anything_but(self, paths: set[str], method: str = "POST") -> list[Received]:
        """Every request that is not a `method` request to one of `paths`: what should never
        have arrived (a followed redirect arrives as a GET, maybe on another path)."""
        return [r for r in self.received if r.path not in paths or r.method != method]

    def unique(self, path: str) -> set[str]:
        return {r.event_id for r in self.on(path)}

    def duplicates(self, path: str) -> int:
        return len(self.on(path)) - len(self.unique(path))

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 15.0,
                       what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; "
                                     f"received {len(self.received)} request(s)")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(remaining, 0.05))


@contextlib.contextmanager
def in_thread(rx: Receiver) -> Iterator[Receiver]:
    """Serve `rx` from an event loop in a background thread, for code under test that runs its
    own loop (`asyncio.run` inside a synchronous call)."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()

    async def serve() -> None:
        await rx.start()
        started.set()
        await stop.wait()
        await rx.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert started.wait(10), "the receiver did not start"
        yield rx
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def json_answer(data: Any, code: int = 200) -> Behaviour:
    async def handler(_: web.Request, __: int) -> web.StreamResponse:
        return web.json_response(data, status=code)
    return handler


def text_answer(text: str, code: int = 200) -> Behaviour:
    async def handler(_: web.Request, __: int) -> web.StreamResponse:
        return web.Response(status=code, text=text)
    return handler


# --- as its own process (the benchmark) -------------------------------------------------------

_KEY = re.compile(rb'"(?:ActivationKey|FullName)": ?"([^"]*)"')
SLOW_SECONDS = 0.020


def latency(arrivals: list[tuple[str, float]]) -> Behaviour:
    """200, and record (ActivationKey or FullName, arrival time.time())."""
    async def handler(request: web.Request, __: int) -> web.StreamResponse:
        now = time.time()
        m = _KEY.search(await request.read())
        arrivals.append((m.group(1).decode() if m else "", now))
        return web.Response(text="ok")
    return handler


def bench_receiver() -> tuple[Receiver, web.RouteTableDef]:
    """The benchmark's receiver: stats only, behaviours by path kind, control routes."""
    arrivals: list[tuple[str, float]] = []
    rx = Receiver(behaviours={"/lat/*": latency(arrivals), "/slow/*": delay(SLOW_SECONDS),
                              "/hole/*": black_hole()}, record=False)
    control = web.RouteTableDef()

    @control.get("/stats")
    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"paths": {
            p: {"count": s.count, "first": s.first, "last": s.last, "body_bytes": s.body_bytes,
                "sample": s.sample.decode("utf-8", "replace"), "headers": s.headers}
            for p, s in rx.stats.items()}})

    @control.get("/arrivals")
    async def get_arrivals(_: web.Request) -> web.Response:
        return web.json_response(arrivals)

    @control.post("/reset")
    async def clear(_: web.Request) -> web.Response:
        rx.clear()
        arrivals.clear()
        return web.Response(text="reset")

    return rx, control


def main() -> None:
    port = int(sys.argv[1])
    rx, control = bench_receiver()
    web.run_app(rx.app(control), host="127.0.0.1", port=port, access_log=None,
                print=lambda *_: print(json.dumps({"listening": port}), flush=True),
                shutdown_timeout=0.1, handle_signals=True)


if __name__ == "__main__":
    main()
