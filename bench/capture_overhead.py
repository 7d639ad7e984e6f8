"""Capture write overhead: single-row INSERT TPS into `license_keys` with the capture triggers
installed vs an identical table without them, measured with pgbench.

Variants, each run for the same time with the same pgbench script:
  plain     an identical table (same columns, defaults, key, foreign key) without triggers
  awake     the capture triggers, runtime.sleeping = false (event row, no NOTIFY)
  sleeping  the capture triggers, runtime.sleeping = true (event row + NOTIFY, a listener is
            connected and draining, as the daemon would be)

    python -m bench.capture_overhead                 # embedded PostgreSQL 18 (fsync off)
    python -m bench.capture_overhead --dsn postgresql://postgres@127.0.0.1:5432/postgres
    python -m bench.capture_overhead --seconds 5 --clients 1,4 --json

`measure()` is importable for the benchmark harness: it returns one Result per (clients,
variant) and leaves nothing behind (its database is dropped).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import psycopg

if __package__ in (None, ""):  # run as a script: make `bridge` importable from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge import config as config_mod
from bridge import install
from bridge.embedded import EmbeddedPostgres

VARIANTS = ("plain", "awake", "sleeping")
PLAIN_TABLE = "license_keys_plain"
# One unique activation key per transaction; the same statement for every variant.
SCRIPT = ("INSERT INTO {table} (activation_key, product_id, product_name) "
          "VALUES (md5(random()::text || clock_timestamp()::text), 1, 'Pro');\n")
SETUP = f"""
CREATE TABLE {PLAIN_TABLE} (LIKE license_keys INCLUDING ALL);
ALTER TABLE {PLAIN_TABLE} ADD FOREIGN KEY (customer_id) REFERENCES customers ON DELETE SET NULL;
"""
_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)


@dataclass(frozen=True)
class Result:
    clients: int
    variant: str
    tps: float
    events: int


def _dsn(admin_dsn: str, database: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(admin_dsn)
    info["dbname"] = database
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


def _admin(admin_dsn: str, statement: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(statement.encode())


@contextmanager
def _database(admin_dsn: str) -> Iterator[str]:
    name = f"qlmb_bench_{uuid.uuid4().hex[:8]}"
    _admin(admin_dsn, f"CREATE DATABASE {name}")
    try:
        dsn = _dsn(admin_dsn, name)
        install.install(config_mod.parse({"database": {"dsn": dsn}}, "<bench>", env={}),
                        sample_schema=True)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SETUP.encode())
        yield dsn
    finally:
        _admin(admin_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextmanager
def _listener(dsn: str, channel: str) -> Iterator[None]:
    """A connection that LISTENs and drains, as the daemon's listener would."""
    stop = threading.Event()
    ready = threading.Event()

    def run() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'LISTEN "{channel}"'.encode())
            ready.set()
            while not stop.is_set():
                for _ in conn.notifies(timeout=0.2):
                    pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def _reset(dsn: str, sleeping: bool) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"TRUNCATE license_keys, {PLAIN_TABLE}, qlm_bridge.event, "
                     "qlm_bridge.delivery".encode())
        conn.execute("UPDATE qlm_bridge.runtime SET sleeping = %s", (sleeping,))
        conn.execute(b"VACUUM ANALYZE")
        conn.execute(b"CHECKPOINT")


def _pgbench(pgbench: Path, dsn: str, script: Path, clients: int, jobs: int,
             seconds: int) -> float:
    result = subprocess.run(
        [str(pgbench), "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(jobs, clients)),
         "-T", str(seconds), "-f", str(script), dsn],
        capture_output=True, text=True, timeout=seconds * 4 + 60, check=False,
    )
    found = _TPS.search(result.stdout)
    if result.returncode != 0 or not found:
        raise RuntimeError(f"pgbench failed ({result.returncode}): {result.stderr.strip()}")
    return float(found.group(1))


def measure(admin_dsn: str, pgbench: Path, clients: Sequence[int] = (1, 4), jobs: int = 2,
            seconds: int = 15) -> list[Result]:
    """TPS of every (clients, variant), on a throwaway database of the server at admin_dsn."""
    out: list[Result] = []
    with _database(admin_dsn) as dsn, tempfile.TemporaryDirectory() as tmp, \
            _listener(dsn, "qlm_bridge"):
        scripts = {}
        for table in ("license_keys", PLAIN_TABLE):
            scripts[table] = Path(tmp) / f"{table}.sql"
            scripts[table].write_text(SCRIPT.format(table=table), encoding="utf-8")
        for n in clients:
            for variant in VARIANTS:
                _reset(dsn, sleeping=variant == "sleeping")
                table = PLAIN_TABLE if variant == "plain" else "license_keys"
                tps = _pgbench(pgbench, dsn, scripts[table], n, jobs, seconds)
                with psycopg.connect(dsn) as conn:
                    row = conn.execute("SELECT count(*) FROM qlm_bridge.event").fetchone()
                out.append(Result(n, variant, tps, int(row[0]) if row else 0))
    return out


def ratios(results: Sequence[Result]) -> dict[int, dict[str, float]]:
    """variant TPS / plain TPS, per client count."""
    out: dict[int, dict[str, float]] = {}
    for r in results:
        plain = next(p.tps for p in results if p.clients == r.clients and p.variant == "plain")
        out.setdefault(r.clients, {})[r.variant] = r.tps / plain
    return out


def _server_version(admin_dsn: str) -> str:
    with psycopg.connect(admin_dsn) as conn:
        row = conn.execute("SELECT current_setting('server_version'), "
                           "current_setting('fsync'), current_setting('synchronous_commit')"
                           ).fetchone()
    assert row is not None
    return f"PostgreSQL {row[0]} (fsync={row[1]}, synchronous_commit={row[2]})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", help="admin DSN of a server (default: embedded PostgreSQL)")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--clients", default="1,4", help="comma-separated client counts")
    parser.add_argument("--jobs", type=int, default=2, help="pgbench threads (-j)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]

    with _server(args.dsn) as (admin_dsn, pgbench):
        server = _server_version(admin_dsn)
        results = measure(admin_dsn, pgbench, clients, args.jobs, args.seconds)
    rel = ratios(results)
    if args.json:
        print(json.dumps({"server": server, "seconds": args.seconds,
                          "results": [asdict(r) for r in results],
                          "ratios": {str(k): v for k, v in rel.items()}}, indent=2))
        return 0
    print(f"{server}; pgbench -M prepared -T {args.seconds}, one single-row INSERT per "
          "transaction")
    print(f"{'clients':>7} {'variant':>9} {'TPS':>10} {'vs plain':>9} {'events':>9}")
    for r in results:
        print(f"{r.clients:>7} {r.variant:>9} {r.tps:>10.0f} {rel[r.clients][r.variant]:>9.2f} "
              f"{r.events:>9}")
    return 0


@contextmanager
def _server(dsn: str | None) -> Iterator[tuple[str, Path]]:
    if dsn:
        found = shutil.which("pgbench")
        if not found:
            raise SystemExit("pgbench is not on PATH")
        yield dsn, Path(found)
        return
    with EmbeddedPostgres() as pg:
        yield pg.dsn("postgres"), pg.bin_dir / "pgbench"


if __name__ == "__main__":
    sys.exit(main())
