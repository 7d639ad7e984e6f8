"""A quick delivery measurement (issue 3's closing figures), not a test:

1. the delivery rate for a 10,000-event burst (one INSERT of 10,000 customers) to a local
   receiver in another process, from the burst's commit to the last receipt;
2. commit-to-receipt latency (p50/p99) at 100 events/s for ~15 s, one transaction per event.

Three processes: this one (writer, coordinator), the daemon (`python -m bridge run`), the receiver
(`python bench/delivery_quick.py receiver PORT`). Receipt times are time.time() in the receiver;
commit times are time.time() right after the writer's COMMIT returned (same clock).

    .venv/bin/python bench/delivery_quick.py [--burst 10000] [--rate 100] [--seconds 15]

PostgreSQL: the server in QLM_BRIDGE_BENCH_DSN (an admin DSN; a throwaway database is created on
it), else an embedded PostgreSQL 18.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import yaml

ROOT = Path(__file__).resolve().parent.parent
_NAME = re.compile(rb'"FullName": ?"([^"]*)"')


# --- the receiver (its own process) ----------------------------------------------------------

def receiver(port: int) -> None:
    from aiohttp import web

    arrivals: list[tuple[str, float]] = []

    async def post(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        m = _NAME.search(body)
        arrivals.append((m.group(1).decode() if m else "", now))
        return web.Response(text="ok")

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"count": len(arrivals)})

    async def dump(_: web.Request) -> web.Response:
        return web.json_response(arrivals)

    async def reset(_: web.Request) -> web.Response:
        arrivals.clear()
        return web.json_response({"count": 0})

    app = web.Application()
    app.router.add_post("/hook", post)
    app.router.add_get("/stats", stats)
    app.router.add_get("/arrivals", dump)
    app.router.add_post("/reset", reset)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# --- the harness -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(url: str, method: str = "GET") -> Any:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def with_db(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(admin_dsn: str, burst: int, rate: float, seconds: float,
            webhooks: dict[str, Any]) -> dict[str, Any]:
    from bridge import config as config_mod
    from bridge import install

    name = f"qlmb_quick_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}".encode())
    dsn = with_db(admin_dsn, name)
    port = free_port()
    hook = f"http://127.0.0.1:{port}/hook"
    data = {"database": {"dsn": dsn},
            "webhooks": {"secret_key": "bench-secret", "events": {"customer_created": hook},
                         **webhooks}}
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="qlmb-quick-"))
    try:
        install.install(config_mod.parse(data, "<bench>", env={}), sample_schema=True)
        cfg_path = tmp / "bridge.yaml"
        cfg_path.write_text(yaml.safe_dump(data))
        procs.append(subprocess.Popen([sys.executable, __file__, "receiver", str(port)],
                                      cwd=ROOT))
        log = (tmp / "daemon.log").open("wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "bridge", "run", "--config", str(cfg_path)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        base = f"http://127.0.0.1:{port}"

        def receiver_up() -> bool:
            try:
                http(base + "/stats")
                return True
            except OSError:
                return False

        wait(receiver_up, 20, "the receiver")
        with psycopg.connect(dsn, autocommit=True) as conn:
            wait(lambda: conn.execute("SELECT count(*) FROM qlm_bridge.daemon")
                 .fetchone() == (1,), 30, "the daemon")
            time.sleep(0.5)

            # 1. the burst
            xacts = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            row = conn.execute(xacts).fetchone()
            before = row[0] if row else 0
            conn.execute("INSERT INTO customers (full_name) "
                         "SELECT 'b' || g FROM generate_series(1, %s) g", (burst,))
            committed = time.time()
            wait(lambda: http(base + "/stats")["count"] >= burst, 600, "the burst")
            last = max(t for _, t in http(base + "/arrivals"))
            burst_seconds = last - committed
            wait(lambda: conn.execute("SELECT count(*) FROM qlm_bridge.delivery "
                                      "WHERE state = 'delivered'").fetchone() == (burst,),
                 60, "the burst's acknowledgements")
            time.sleep(0.6)  # the statistics are flushed at most every 0.5 s
            row = conn.execute(xacts).fetchone()
            commits_per_delivery = ((row[0] if row else 0) - before) / burst
            http(base + "/reset", "POST")

            # 2. a steady 100 events/s
            total = int(rate * seconds)
            commits: dict[str, float] = {}
            start = time.monotonic()
            for i in range(total):
                due = start + i / rate
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                conn.execute("INSERT INTO customers (full_name) VALUES (%s)", (f"l{i}",))
                commits[f"l{i}"] = time.time()
            wait(lambda: http(base + "/stats")["count"] >= total, 60, "the steady stream")
            arrivals = {n: t for n, t in http(base + "/arrivals")}
        latencies = [(arrivals[n] - c) * 1000 for n, c in commits.items()]
        return {
            "postgres": admin_dsn.rsplit("@", 1)[-1],
            "webhooks": webhooks,
            "burst_events": burst,
            "burst_seconds": round(burst_seconds, 3),
            "burst_rate_per_s": round(burst / burst_seconds),
            "burst_db_commits_per_delivery": round(commits_per_delivery, 2),
            "steady_rate_per_s": rate,
            "steady_events": total,
            "latency_ms_p50": round(statistics.median(latencies), 2),
            "latency_ms_p99": round(percentile(latencies, 0.99), 2),
            "latency_ms_max": round(max(latencies), 2),
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "receiver":
        receiver(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--per-url", type=int, default=None,
                        help="webhooks.per_url_concurrency (default: the config default)")
    args = parser.parse_args()
    webhooks = {} if args.per_url is None else {"per_url_concurrency": args.per_url}
    sys.path.insert(0, str(ROOT))
    admin = os.environ.get("QLM_BRIDGE_BENCH_DSN")
    if admin:
        result = measure(admin, args.burst, args.rate, args.seconds, webhooks)
    else:
        from bridge.embedded import EmbeddedPostgres

        with EmbeddedPostgres() as pg:
            result = measure(pg.dsn("postgres"), args.burst, args.rate, args.seconds,
                             webhooks)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
