"""The raw ceiling, run in its own process: the bridge's own HTTP client (bridge.dispatch) posting
the same body N times to one URL with C requests in flight, no database, on the daemon's own event
loop (`bridge.daemon.run_loop`: uvloop where installed), so the two sides compare like for like.

`python -m bench.rawclient URL N C BODY_FILE HEADERS_JSON_FILE` prints one JSON line:
{"start": t0, "end": t1, "ok": n, "errors": n, "loop": "uvloop", "cpu": s} (time.time();
cpu: this process's CPU seconds while sending).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from bridge.config import WebhooksConfig
from bridge.daemon import run_loop
from bridge.dispatch import Dispatcher


async def blast(url: str, n: int, concurrency: int, body: bytes,
                headers: dict[str, str]) -> dict[str, Any]:
    dispatcher = Dispatcher(WebhooksConfig(max_concurrency=concurrency,
                                           per_url_concurrency=concurrency))
    await dispatcher.start()
    remaining = n
    ok = errors = 0

    async def worker() -> None:
        nonlocal remaining, ok, errors
        while remaining > 0:
            remaining -= 1
            out = await dispatcher.post(url, body, headers)
            if out.ok:
                ok += 1
            else:
                errors += 1

    try:
        start, cpu = time.time(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        end, cpu = time.time(), time.process_time() - cpu
    finally:
        await dispatcher.close()
    return {"start": start, "end": end, "ok": ok, "errors": errors, "loop": loop_name(),
            "cpu": cpu}


def loop_name() -> str:
    """The running event loop's implementation ("uvloop" or "asyncio"), for the figure's notes."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def main() -> None:
    url, n, c, body_file, headers_file = sys.argv[1:6]
    body = Path(body_file).read_bytes()
    headers = json.loads(Path(headers_file).read_text())
    result: list[dict[str, Any]] = []

    async def run() -> None:
        result.append(await blast(url, int(n), int(c), body, headers))

    run_loop(run())
    print(json.dumps(result[0]), flush=True)


if __name__ == "__main__":
    main()
