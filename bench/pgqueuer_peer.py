"""P2's second baseline, run in its own process: a pgqueuer (https://github.com/janbjorge/pgqueuer)
consumer that POSTs each job's payload to one URL, with the same HTTP client as the bridge and
the raw client (`bridge.dispatch`), on the same event loop (`bridge.daemon.run_loop`).

`python -m bench.pgqueuer_peer DSN URL N BATCH CONCURRENCY BODY_FILE HEADERS_JSON_FILE`

DSN names a fresh database: pgqueuer's schema is installed there. The consumer starts and idles
(LISTENing, as the bridge's daemon does before its burst), then N jobs, each carrying the body as
its payload, are enqueued in one transaction (the burst) from a second connection. The consumer
dequeues `BATCH` jobs per round trip and posts with at most `CONCURRENCY` requests in flight; it
stops when all N are done and prints one JSON line:
{"commit": t, "done": t, "ok": n, "errors": n, "batch": b, "loop": "uvloop"} (time.time()).
The harness measures the rate from `commit` to the receiver's last arrival, like the bridge's P2.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import asyncpg
from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager

from bench.rawclient import loop_name
from bridge.config import WebhooksConfig
from bridge.daemon import run_loop
from bridge.dispatch import Dispatcher

ENTRYPOINT = "webhook"


@dataclass(frozen=True)
class Spec:
    dsn: str
    url: str
    n: int
    batch: int
    concurrency: int
    body: bytes
    headers: dict[str, str]


@dataclass
class Tally:
    ok: int = 0
    errors: int = 0
    commit: float = 0.0
    done: float = 0.0
    loop: str = ""


async def _enqueue_burst(spec: Spec) -> float:
    """n jobs in one transaction; the commit time (time.time())."""
    conn = await asyncpg.connect(spec.dsn)
    try:
        queries = Queries(AsyncpgDriver(conn))
        async with conn.transaction():
            await queries.enqueue([ENTRYPOINT] * spec.n, [spec.body] * spec.n, [0] * spec.n)
        return time.time()
    finally:
        await conn.close()


def _consumer(spec: Spec, queries: Queries, dispatcher: Dispatcher, tally: Tally
              ) -> QueueManager:
    qm = QueueManager(queries)
    in_flight = asyncio.Semaphore(spec.concurrency)

    @qm.entrypoint(ENTRYPOINT)
    async def post(job: Job) -> None:
        async with in_flight:
            out = await dispatcher.post(spec.url, job.payload or b"", spec.headers)
        if out.ok:
            tally.ok += 1
        else:
            tally.errors += 1
        if tally.ok + tally.errors >= spec.n:
            tally.done = time.time()
            qm.shutdown.set()

    return qm


async def measure(spec: Spec) -> Tally:
    conn = await asyncpg.connect(spec.dsn)
    queries = Queries(AsyncpgDriver(conn))
    await queries.install()
    dispatcher = Dispatcher(WebhooksConfig(max_concurrency=spec.concurrency,
                                           per_url_concurrency=spec.concurrency))
    await dispatcher.start()
    tally = Tally(loop=loop_name())
    qm = _consumer(spec, queries, dispatcher, tally)
    try:
        # pgqueuer's smallest worker cap (twice the batch); HTTP concurrency is the semaphore's.
        worker = asyncio.create_task(qm.run(
            batch_size=spec.batch, max_concurrent_tasks=2 * spec.batch,
            dequeue_timeout=timedelta(seconds=5), log_aggregation_interval=timedelta(0)))
        await asyncio.sleep(0.5)  # idle and listening, as the bridge's daemon is
        tally.commit = await _enqueue_burst(spec)
        await asyncio.wait_for(worker, timeout=max(60.0, spec.n / 50))
    finally:
        await dispatcher.close()
        await conn.close()
    return tally


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    dsn, url, n, batch, concurrency, body_file, headers_file = sys.argv[1:8]
    spec = Spec(dsn, url, int(n), int(batch), int(concurrency), Path(body_file).read_bytes(),
                json.loads(Path(headers_file).read_text()))
    result: list[Tally] = []

    async def run() -> None:
        result.append(await measure(spec))

    run_loop(run())
    t = result[0]
    print(json.dumps({"commit": t.commit, "done": t.done, "ok": t.ok, "errors": t.errors,
                      "batch": spec.batch, "loop": t.loop}), flush=True)


if __name__ == "__main__":
    main()
