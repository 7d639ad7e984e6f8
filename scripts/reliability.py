#!/usr/bin/env python3
"""The reliability campaign, long versions: the figures in RELIABILITY.md come from this script.

    .venv/bin/python scripts/reliability.py                  # every case, full size (~40 min)
    .venv/bin/python scripts/reliability.py crash dbfaults    # some cases
    .venv/bin/python scripts/reliability.py --quick           # CI-sized, a minute or two
    .venv/bin/python scripts/reliability.py --soak-seconds 1800 soak

It starts its own embedded PostgreSQL (restarted mid-run by the `dbfaults` case); pass --dsn to
run the other cases against an existing server (throwaway databases are created there). Every
receiver listens on 127.0.0.1. Results print as JSON and are written to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.embedded import EmbeddedPostgres  # noqa: E402
from tests.support.campaign import (  # noqa: E402
    crash_storm,
    database_faults,
    receiver_down,
    receiver_faults,
    soak,
)
from tests.support.server import execute, install_bridge, with_database  # noqa: E402

CASES = ("crash", "dbfaults", "receiver", "down", "soak")


def fresh_db(admin_dsn: str) -> str:
    name = f"qlmb_rel_{uuid.uuid4().hex[:10]}"
    execute(admin_dsn, f"CREATE DATABASE {name}")
    dsn = with_database(admin_dsn, name)
    install_bridge(dsn)
    return dsn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", choices=[*CASES, []], default=[])
    ap.add_argument("--quick", action="store_true", help="CI-sized runs")
    ap.add_argument("--dsn", help="an existing server's admin DSN (dbfaults still embeds one)")
    ap.add_argument("--soak-seconds", type=float, default=None)
    ap.add_argument("--out", default=None, help="JSON results file (default: in the work dir)")
    args = ap.parse_args()
    cases = args.cases or list(CASES)
    quick = args.quick
    results: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="qlmb-campaign-"))
    with EmbeddedPostgres() as pg:
        admin = args.dsn or pg.dsn("postgres")
        runs: dict[str, Callable[[], Any]] = {
            "crash": lambda: crash_storm(fresh_db(admin), work, events=500 if quick else 5000,
                                         kills=3 if quick else 10),
            "dbfaults": lambda: database_faults(fresh_db(pg.dsn("postgres")), work,
                                                terminations=3 if quick else 10,
                                                restart=pg.restart, restarts=1 if quick else 3),
            "receiver": lambda: receiver_faults(fresh_db(admin), work),
            "down": lambda: receiver_down(fresh_db(admin), work, down=3 if quick else 30,
                                          retry_interval=0.5 if quick else 1.0),
            "soak": lambda: soak(fresh_db(admin), work,
                                 seconds=args.soak_seconds or (10 if quick else 1800),
                                 sample_every=1 if quick else 30),
        }
        for case in cases:
            started = time.monotonic()
            print(f"--- {case} ...", file=sys.stderr, flush=True)
            fig = asyncio.run(runs[case]())
            fig["wall_s"] = round(time.monotonic() - started, 1)
            results[case] = fig
            shown = {k: v for k, v in fig.items() if k != "samples"}
            print(json.dumps({case: shown}, indent=2, default=str), flush=True)
    out = Path(args.out) if args.out else work / "results.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"results written to {out}; daemon logs in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
