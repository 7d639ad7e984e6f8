"""`python -m bench [--quick] [--dsn DSN] [--only P1,P2] [--profile]`: run P1-P6 against a
PostgreSQL server (embedded by default), write bench/results/latest.json, latest.md and the PNG
plots (P2 receipts over time, P3 latency of each event against its send time)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import engine_features, env, scenarios
from bench.scenarios import Figure

HERE = Path(__file__).resolve().parent
SCENARIOS = {**scenarios.ALL, "P7": engine_features.p7_ordering, "P8": engine_features.p8_sites}


def code_version() -> dict[str, str]:
    """The commit and the daemon files as measured (the tree may have uncommitted edits)."""
    import hashlib
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False, cwd=env.ROOT).stdout.strip()
    files = ["bridge/daemon.py", "bridge/store.py", "bridge/dispatch.py", "sql/queries.sql",
             "sql/capture_v1.sql"]
    digest = hashlib.sha256(b"".join((env.ROOT / f).read_bytes() for f in files
                                     if (env.ROOT / f).exists())).hexdigest()[:12]
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *files], capture_output=True,
                           text=True, check=False, cwd=env.ROOT).stdout.split()
    return {"commit": head, "daemon_sha256": digest,
            "uncommitted": ",".join(f for f in dirty if "/" in f)}


def machine(server: env.Server) -> dict[str, Any]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = subprocess.run(["free", "-h"], capture_output=True, text=True, check=False).stdout
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory": mem.strip(),
            "kernel": platform.release(),
            "loadavg_at_end": Path("/proc/loadavg").read_text().split()[:3],
            "python": platform.python_version(),
            "postgres": server.version(), "code": code_version(),
            "postgres_kind": "embedded" if server.embedded is not None else "external DSN"}


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and abs(v) < 100:
        return f"{v:.2f}"
    return f"{v:.0f}"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown(figures: list[Figure], info: dict[str, Any]) -> str:
    met = {True: "yes", False: "**no**", None: "-"}
    lines = [
        f"# Benchmark results ({info['mode']} mode, {info['finished']})",
        "",
        f"Machine: {info['machine']['nproc']} CPU(s), {info['machine']['cpu']}, "
        f"PostgreSQL {info['machine']['postgres']} ({info['machine']['postgres_kind']}), "
        f"Python {info['machine']['python']}, kernel {info['machine']['kernel']}; load average "
        f"at the end {' '.join(info['machine']['loadavg_at_end'])} (other work shares the "
        "machine: every ratio's two sides are measured back to back in this run).",
        "",
        "```",
        info["machine"]["memory"],
        "```",
        "",
        f"Code: commit {info['machine']['code']['commit']}, daemon files sha256 "
        f"{info['machine']['code']['daemon_sha256']}"
        + (f" (uncommitted edits in {info['machine']['code']['uncommitted']})"
           if info['machine']['code']['uncommitted'] else "") + ".",
        "",
        "| figure | value | baseline | ratio | target | met? |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures:
        value = f"{_fmt(f.value)} {f.unit}".strip()
        base = f"{_fmt(f.baseline)} {f.unit}".strip() if f.baseline is not None else "-"
        note = f" ({f.notes})" if f.notes else ""
        lines.append(f"| {f.figure}{note} | {value} | {base} | {_ratio(f.ratio)} | "
                     f"{f.target} | {met[f.met]} |")
    lines += ["", "Ratios are value / baseline, both measured in this run; a target written as "
              "a ratio (`>= 0.60x`) applies to that column."]
    if info.get("plots"):
        lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in info["plots"]) + "."]
    lines += ["", f"Run time: {info['seconds']:.0f} s. Command: `{info['command']}`.", ""]
    return "\n".join(lines)


def _command(args: argparse.Namespace) -> str:
    """The command as run, for the results; never the DSN (it may carry a password)."""
    parts = ["python -m bench"]
    parts += ["--quick"] if args.quick else []
    parts += [f"--only {args.only}"] if args.only else []
    parts += [f"--per-url {args.per_url}"] if args.per_url is not None else []
    parts += [f"--p3-seconds {args.p3_seconds:g}"] if args.p3_seconds is not None else []
    parts += ["--dsn ..."] if args.dsn else []
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short runs (about a minute or two)")
    ap.add_argument("--dsn", help="an existing server's admin DSN (default: embedded PostgreSQL)")
    ap.add_argument("--only", default="", help="comma-separated subset, e.g. P2,P4")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy the daemon during P2 and P4 (bench/profiles/)")
    ap.add_argument("--per-url", type=int, default=None,
                    help="the bridge's per_url_concurrency in P2 and P4 (default: the daemon's "
                    f"default); the raw client and pgqueuer keep {scenarios.PEER_IN_FLIGHT} in "
                    "flight")
    ap.add_argument("--p3-seconds", type=float, default=None,
                    help="P3's duration per rate (default: 10 s quick, 30 s full)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, configs)")
    ap.add_argument("--out", default=str(HERE / "results"), help="results directory")
    args = ap.parse_args(argv)
    wanted = [p.strip().upper() for p in args.only.split(",") if p.strip()] or list(SCENARIOS)
    started = time.monotonic()
    figures: list[Figure] = []
    modes = scenarios.Modes.of(args.quick)
    modes.per_url = args.per_url
    if args.p3_seconds is not None:
        modes.p3_seconds = args.p3_seconds
    procs = env.Procs()
    workdir = Path(tempfile.mkdtemp(prefix="qlm-bench-"))
    print(f"bench: work dir {workdir}", flush=True)
    with env.server(args.dsn) as server:
        dbs = env.Databases(server)
        try:
            dbs.prepare()
            rx = env.start_receiver(procs, workdir)
            ctx = scenarios.Ctx(procs, dbs, rx, workdir, modes,
                                profile_dir=HERE / "profiles" if args.profile else None,
                                postmaster=server.postmaster_pid(),
                                log=lambda s: print(s, flush=True), results=Path(args.out))
            for name in wanted:
                t = time.monotonic()
                print(f"{name} ...", flush=True)
                try:
                    figures += SCENARIOS[name](ctx)
                except Exception as exc:  # one failed measurement must not lose the others
                    print(f"  {name} failed: {type(exc).__name__}: {exc}", flush=True)
                    figures.append(Figure(name, f"{name} (failed: {type(exc).__name__}: "
                                          f"{str(exc)[:120]})", None, ""))
                print(f"  {name} took {time.monotonic() - t:.0f} s", flush=True)
            info = {"mode": "quick" if args.quick else "full",
                    "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                    "machine": machine(server), "seconds": time.monotonic() - started,
                    "plots": ctx.shared.get("plots", []),
                    "command": _command(args)}
        finally:
            procs.close()
            dbs.close()
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(
        {**info, "figures": [f.as_dict() for f in figures]}, indent=2, default=str) + "\n")
    table = markdown(figures, info)
    (out / "latest.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
