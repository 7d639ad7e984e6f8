"""The raw ceiling, run in its own process: the bridge's own HTTP client (bridge.dispatch) posting
the same body N times to one URL with C requests in flight, no database.

`python -m bench.rawclient URL N C BODY_FILE HEADERS_JSON_FILE` prints one JSON line:
{"start": t0, "end": t1, "ok": n, "errors": n} (time.time()).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from bridge.config import WebhooksConfig
from bridge.dispatch import Dispatcher


async def blast(url: str, n: int, concurrency: int, body: bytes,
                headers: dict[str, str]) -> dict[str, float]:
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
        start = time.time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        end = time.time()
    finally:
        await dispatcher.close()
    return {"start": start, "end": end, "ok": ok, "errors": errors}


def _run(coro: Any) -> Any:
    """The same event loop as the daemon (uvloop where installed): a like-for-like ceiling."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def main() -> None:
    url, n, c, body_file, headers_file = sys.argv[1:6]
    body = Path(body_file).read_bytes()
    headers = json.loads(Path(headers_file).read_text())
    result = _run(blast(url, int(n), int(c), body, headers))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
