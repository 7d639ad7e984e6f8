"""The benchmark's webhook receiver, run in its own process: `python -m bench.receiver PORT`.

POST paths choose a behaviour:
  /ok/...    answer 200 at once (throughput)
  /lat/...   answer 200 and record (ActivationKey, arrival time.time()) (latency)
  /slow/...  answer 200 after 20 ms (scale-out)
  /hole/...  accept the request and never answer (isolation)
GET /stats -> per-path count, first and last arrival, body size; GET /arrivals -> the latency
records; POST /reset clears everything. Binds 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from dataclasses import dataclass, field

from aiohttp import web

_KEY = re.compile(rb'"ActivationKey": ?"([^"]*)"')
SLOW_SECONDS = 0.020


@dataclass
class PathStats:
    count: int = 0
    first: float = 0.0
    last: float = 0.0
    body_bytes: int = 0
    sample: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class State:
    paths: dict[str, PathStats] = field(default_factory=dict)
    arrivals: list[tuple[str, float]] = field(default_factory=list)


def _kind(path: str) -> str:
    return path.strip("/").split("/", 1)[0]


def make_app(state: State) -> web.Application:
    async def post(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        now = time.time()
        kind = _kind(request.path)
        s = state.paths.get(request.path)
        if s is None:
            s = state.paths[request.path] = PathStats(first=now, sample=body,
                                                      headers=dict(request.headers))
        s.count += 1
        s.last = now
        s.body_bytes += len(body)
        if kind == "lat":
            m = _KEY.search(body)
            state.arrivals.append((m.group(1).decode() if m else "", now))
        elif kind == "slow":
            await asyncio.sleep(SLOW_SECONDS)
        elif kind == "hole":
            await asyncio.sleep(3600)
        return web.Response(text="ok")

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({
            "paths": {p: {"count": s.count, "first": s.first, "last": s.last,
                          "body_bytes": s.body_bytes,
                          "sample": s.sample.decode("utf-8", "replace"), "headers": s.headers}
                      for p, s in state.paths.items()},
        })

    async def arrivals(_: web.Request) -> web.Response:
        return web.json_response(state.arrivals)

    async def reset(_: web.Request) -> web.Response:
        state.paths.clear()
        state.arrivals.clear()
        return web.Response(text="reset")

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_get("/stats", stats)
    app.router.add_get("/arrivals", arrivals)
    app.router.add_post("/reset", reset)
    app.router.add_post("/{tail:.*}", post)
    return app


def main() -> None:
    port = int(sys.argv[1])
    web.run_app(make_app(State()), host="127.0.0.1", port=port, access_log=None,
                print=lambda *_: print(json.dumps({"listening": port}), flush=True),
                shutdown_timeout=0.1, handle_signals=True)


if __name__ == "__main__":
    main()
