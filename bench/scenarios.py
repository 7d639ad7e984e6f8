"""The measurements P1-P6. Each returns a list of Figure rows (value, same-run baseline, ratio)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import env, workload


@dataclass(frozen=True)
class Figure:
    id: str
    figure: str
    value: float | None
    unit: str
    baseline: float | None = None
    target: str = "-"
    met: bool | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


@dataclass
class Modes:
    quick: bool
    p2_rows: int
    p1_seconds: int
    p1_reps: int
    p3_seconds: float
    p4_rows: int
    p5_rows: int
    p6_rows: int
    per_url: int = 8

    @classmethod
    def of(cls, quick: bool) -> Modes:
        if quick:
            return cls(True, 5000, 2, 1, 10, 20_000, 2000, 1500)
        return cls(False, 20_000, 6, 3, 30, 100_000, 6000, 5000)


@dataclass
class Ctx:
    procs: env.Procs
    dbs: env.Databases
    rx: env.Receiver
    workdir: Path
    modes: Modes
    profile_dir: Path | None = None
    postmaster: int | None = None
    log: Callable[[str], None] = print
    shared: dict[str, Any] = field(default_factory=dict)


def _ge(v: float | None, t: float) -> bool | None:
    return None if v is None else v >= t


def _le(v: float | None, t: float) -> bool | None:
    return None if v is None else v <= t


@contextmanager
def _cpu(ctx: Ctx, pids: dict[str, int]) -> Iterator[dict[str, float]]:
    """CPU seconds each process (and PostgreSQL as a whole) used inside the block."""
    before = {k: env.cpu_seconds(p) for k, p in pids.items()}
    pg0 = env.postgres_cpu_seconds(ctx.postmaster)
    out: dict[str, float] = {}
    t0 = time.monotonic()
    yield out
    out["wall"] = time.monotonic() - t0
    for k, p in pids.items():
        out[k] = env.cpu_seconds(p) - before[k]
    out["postgres"] = env.postgres_cpu_seconds(ctx.postmaster) - pg0


@contextmanager
def _pyspy(ctx: Ctx, pid: int, name: str) -> Iterator[None]:
    """py-spy record of the daemon while the block runs (when --profile)."""
    if ctx.profile_dir is None:
        yield
        return
    exe = env.VENV_BIN / "py-spy"
    ctx.profile_dir.mkdir(parents=True, exist_ok=True)
    procs = [ctx.procs.spawn([str(exe), "record", "--pid", str(pid), "--rate", "250",
                              "--nonblocking", "--format", fmt, "-o",
                              str(ctx.profile_dir / f"{name}.{ext}")],
                             log=ctx.workdir / f"pyspy-{name}-{ext}.log")
             for fmt, ext in (("raw", "txt"), ("flamegraph", "svg"))]
    time.sleep(0.5)  # let it attach
    try:
        yield
    finally:
        for p in procs:
            p.send_signal(2)  # SIGINT: py-spy writes its output and exits
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
            ctx.procs.started.remove(p)


def _daemon_cfg(dsn: str, urls: list[str], **sections: Any) -> dict[str, Any]:
    return env.base_config(dsn, webhooks={"events": {"license_created": urls},
                                          **sections.pop("webhooks", {})}, **sections)


# --- P1 -------------------------------------------------------------------------------------------

def p1_capture(ctx: Ctx) -> list[Figure]:
    """Capture overhead in the three states (fresh, stopped, running): bench/capture_overhead.py."""
    from bench import capture_overhead

    return capture_overhead.p1_capture(ctx)


# --- P2 -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Drain:
    n: int
    received: int
    start: float
    first: float
    last: float
    cpu: dict[str, float]
    rss_mb: float | None
    idle_rss_mb: float | None

    @property
    def rate(self) -> float:
        return self.received / max(1e-6, self.last - self.start)

    @property
    def stream_rate(self) -> float:
        return (self.received - 1) / max(1e-6, self.last - self.first)


def _deliver_burst(ctx: Ctx, n: int, path: str, log_level: str = "warning",
                   profile: str | None = None, concurrency: dict[str, int] | None = None
                   ) -> Drain:
    dsn = ctx.dbs.clone()
    d = env.start_daemon(ctx.procs, ctx.workdir, _daemon_cfg(
        dsn, [ctx.rx.url(path)], observe={"log_level": log_level},
        webhooks=concurrency or {}))
    try:
        time.sleep(0.5)  # idle: runtime.sleeping is true, the burst's NOTIFY wakes it
        idle_rss = _rss_now(d.pid)
        with _pyspy(ctx, d.pid, profile) if profile else _nullctx(), \
                _cpu(ctx, {"daemon": d.pid, "receiver": ctx.rx.proc.pid}) as cpu:
            t0 = workload.burst(dsn, n, f"{path.strip('/').replace('/', '-')}-")
            s = ctx.rx.wait_count(path, n, timeout=max(60, n / 100))
        rss = env.peak_rss_mb(d.pid)
    finally:
        ctx.procs.stop(d.proc)
        ctx.dbs.drop(dsn)
    return Drain(n, s["count"], t0, s["first"], s["last"], cpu, rss, idle_rss)


@contextmanager
def _nullctx() -> Iterator[None]:
    yield


def _rss_now(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _raw(ctx: Ctx, n: int, path: str, concurrency: int, like: str) -> float:
    stats = ctx.rx.stats()["paths"][like]
    body = ctx.workdir / "body.json"
    body.write_text(stats["sample"])
    keep = {k: v for k, v in stats["headers"].items()
            if k.lower().startswith("x-qlm") or k.lower() in ("content-type", "user-agent")}
    headers = ctx.workdir / "headers.json"
    headers.write_text(json.dumps(keep))
    p = ctx.procs.spawn([sys.executable, "-m", "bench.rawclient", ctx.rx.url(path), str(n),
                         str(concurrency), str(body), str(headers)])
    out, _ = p.communicate(timeout=max(60, n / 200))
    ctx.procs.started.remove(p)
    result = json.loads(out.decode().strip().splitlines()[-1])
    if result["errors"]:
        raise RuntimeError(f"raw client: {result['errors']} error(s)")
    return float(result["ok"] / (result["end"] - result["start"]))


def p2_throughput(ctx: Ctx) -> list[Figure]:
    n = ctx.modes.p2_rows
    conc = {"max_concurrency": max(64, ctx.modes.per_url),
            "per_url_concurrency": ctx.modes.per_url}
    drain = _deliver_burst(ctx, n, "/ok/p2", profile=f"p2-c{ctx.modes.per_url}",
                           concurrency=conc)
    raw = _raw(ctx, n, "/ok/raw", min(conc.values()), like="/ok/p2")
    info = _deliver_burst(ctx, n, "/ok/p2info", log_level="info", concurrency=conc)
    ctx.shared["p2_rate"] = drain.rate
    ctx.shared["idle_rss"] = drain.idle_rss_mb
    body_len = len(ctx.rx.stats()["paths"]["/ok/p2"]["sample"].encode())
    ctx.log(f"  bridge {drain.rate:.0f}/s (stream {drain.stream_rate:.0f}/s, first after "
            f"{(drain.first - drain.start) * 1000:.0f} ms), raw {raw:.0f}/s, "
            f"info-log {info.rate:.0f}/s; cpu {drain.cpu}")
    complete = drain.received == n
    return [
        Figure("P2", f"P2 end-to-end, {n} rows burst, 1 URL, {min(conc.values())} in flight "
               f"(deliveries/s)", round(drain.rate), "/s", round(raw), ">= 0.80",
               _ge(drain.rate / raw, 0.80) if complete else False,
               notes="" if complete else f"only {drain.received}/{n} delivered",
               extra={"stream_rate": drain.stream_rate, "cpu_seconds": drain.cpu,
                      "body_bytes": body_len, "concurrency": conc}),
        Figure("P2.log_info", "P2 with observe.log_level=info (vs warning)", round(info.rate),
               "/s", round(drain.rate), "-", None, extra={"cpu_seconds": info.cpu}),
    ]


# --- P3 -------------------------------------------------------------------------------------------

async def _floor(url: str, n: int) -> list[float]:
    """Sequential POSTs of a small body: the HTTP round trip alone (ms)."""
    from bridge.config import WebhooksConfig
    from bridge.dispatch import Dispatcher
    d = Dispatcher(WebhooksConfig())
    await d.start()
    out = []
    try:
        for _ in range(n):
            r = await d.post(url, b'{"EventType":"floor"}', {"Content-Type": "application/json"})
            out.append(r.duration_ms)
    finally:
        await d.close()
    return out


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def p3_latency(ctx: Ctx) -> list[Figure]:
    floor = asyncio.run(_floor(ctx.rx.url("/ok/floor"), 300))
    floor_p50, floor_p99 = _pct(floor, 0.5), _pct(floor, 0.99)
    figures: list[Figure] = []
    for rate in (100, 500):
        dsn = ctx.dbs.clone()
        path = f"/lat/p3-{rate}"
        d = env.start_daemon(ctx.procs, ctx.workdir, _daemon_cfg(dsn, [ctx.rx.url(path)]))
        try:
            time.sleep(0.5)
            with _cpu(ctx, {"daemon": d.pid}) as cpu:
                st = workload.steady(dsn, rate, ctx.modes.p3_seconds, f"lat{rate}-")
            ctx.rx.wait_count(path, len(st.commits) + 1, timeout=15)
        finally:
            ctx.procs.stop(d.proc)
            ctx.dbs.drop(dsn)
        arrivals = {k: t for k, t in env.http_json(ctx.rx.url("/arrivals")) if k in st.commits}
        lat = [(arrivals[k] - c) * 1000 for k, c in st.commits.items() if k in arrivals]
        missing = len(st.commits) - len(lat)
        p50, p99, worst = _pct(lat, 0.5), _pct(lat, 0.99), max(lat)
        ctx.log(f"  {rate}/s: p50 {p50:.2f} p99 {p99:.2f} max {worst:.2f} ms "
                f"(floor p50 {floor_p50:.2f}); writer behind <= {st.behind_ms:.1f} ms; "
                f"cpu {cpu}")
        at100 = rate == 100
        extra = {"events": len(st.commits), "missing": missing,
                 "writer_behind_ms": st.behind_ms, "cpu_seconds": cpu,
                 "floor_p99_ms": floor_p99}
        figures += [
            Figure(f"P3.{rate}.p50", f"P3 latency p50 at {rate}/s (ms; baseline: HTTP "
                   "round trip p50)", round(p50, 2), "ms", round(floor_p50, 2),
                   "<= 3 ms" if at100 else "-", _le(p50, 3) if at100 else None, extra=extra),
            Figure(f"P3.{rate}.p99", f"P3 latency p99 at {rate}/s (ms; baseline: HTTP p99)",
                   round(p99, 2), "ms", round(floor_p99, 2), "<= 10 ms" if at100 else "-",
                   _le(p99, 10) if at100 else None),
            Figure(f"P3.{rate}.max", f"P3 latency max at {rate}/s (ms)", round(worst, 2), "ms",
                   round(max(floor), 2), "-", None,
                   notes=f"{missing} missing" if missing else ""),
        ]
    return figures


# --- P4 -------------------------------------------------------------------------------------------

def p4_backlog(ctx: Ctx) -> list[Figure]:
    n = ctx.modes.p4_rows
    dsn = ctx.dbs.clone()
    path = "/ok/p4"
    try:
        workload.burst(dsn, n, "backlog-")
        d = env.start_daemon(ctx.procs, ctx.workdir, _daemon_cfg(dsn, [ctx.rx.url(path)]),
                             wait=False)
        spawned = time.time()
        try:
            with _pyspy(ctx, d.pid, "p4"), \
                    _cpu(ctx, {"daemon": d.pid, "receiver": ctx.rx.proc.pid}) as cpu:
                s = ctx.rx.wait_count(path, n, timeout=max(120, n / 100))
            rss = env.peak_rss_mb(d.pid)
        finally:
            ctx.procs.stop(d.proc)
    finally:
        ctx.dbs.drop(dsn)
    rate = (s["count"] - 1) / max(1e-6, s["last"] - s["first"])
    p2 = ctx.shared.get("p2_rate")
    idle = ctx.shared.get("idle_rss")
    ctx.log(f"  drained {s['count']}/{n} at {rate:.0f}/s (from spawn "
            f"{s['count'] / (s['last'] - spawned):.0f}/s); peak RSS {rss} MB; cpu {cpu}")
    complete = s["count"] >= n
    return [
        Figure("P4.rate", f"P4 backlog drain, {n} pending at start (deliveries/s; baseline: "
               "P2 rate)", round(rate), "/s", round(p2) if p2 else None, ">= P2 rate",
               (rate >= p2 if p2 else None) if complete else False,
               extra={"from_spawn_rate": s["count"] / (s["last"] - spawned),
                      "cpu_seconds": cpu, "received": s["count"]}),
        Figure("P4.rss", "P4 daemon peak RSS (MB, VmHWM; baseline: idle daemon RSS)",
               round(rss, 1) if rss else None, "MB", round(idle, 1) if idle else None,
               "<= 150 MB", _le(rss, 150)),
    ]


# --- P5 -------------------------------------------------------------------------------------------

def _healthy_rate(ctx: Ctx, urls: list[str], path: str, n: int) -> tuple[float, float]:
    dsn = ctx.dbs.clone()
    d = env.start_daemon(ctx.procs, ctx.workdir, _daemon_cfg(
        dsn, urls, webhooks={"timeout": 3, "max_retries": 1, "retry_interval": 30}))
    try:
        time.sleep(0.5)
        t0 = workload.burst(dsn, n, f"iso{len(urls)}-")
        s = ctx.rx.wait_count(path, n, timeout=max(60, n / 50))
    finally:
        ctx.procs.stop(d.proc)
        ctx.dbs.drop(dsn)
    return float(s["count"] / max(1e-6, s["last"] - t0)), (s["first"] - t0) * 1000


def p5_isolation(ctx: Ctx) -> list[Figure]:
    n = ctx.modes.p5_rows
    alone, first_a = _healthy_rate(ctx, [ctx.rx.url("/ok/p5-alone")], "/ok/p5-alone", n)
    mixed, first_m = _healthy_rate(ctx, [ctx.rx.url("/hole/p5"), ctx.rx.url("/ok/p5-mixed")],
                                   "/ok/p5-mixed", n)
    ctx.log(f"  healthy alone {alone:.0f}/s (first after {first_a:.0f} ms), next to a black "
            f"hole {mixed:.0f}/s (first after {first_m:.0f} ms)")
    return [Figure("P5", "P5 healthy URL rate next to a black-holed URL (/s; baseline: alone)",
                   round(mixed), "/s", round(alone), ">= 0.90", _ge(mixed / alone, 0.90),
                   extra={"first_arrival_ms": {"alone": first_a, "mixed": first_m}})]


# --- P6 -------------------------------------------------------------------------------------------

def _slow_rate(ctx: Ctx, daemons: int, n: int) -> float:
    dsn = ctx.dbs.clone()
    path = f"/slow/p6-{daemons}"
    started = []
    try:
        for i in range(daemons):
            started.append(env.start_daemon(ctx.procs, ctx.workdir, _daemon_cfg(
                dsn, [ctx.rx.url(path)]), name=f"p6-{i}"))
        time.sleep(0.5)
        t0 = workload.burst(dsn, n, f"scale{daemons}-")
        s = ctx.rx.wait_count(path, n, timeout=max(60, n / 50))
    finally:
        for d in started:
            ctx.procs.stop(d.proc)
        ctx.dbs.drop(dsn)
    return float(s["count"] / max(1e-6, s["last"] - t0))


def p6_scale(ctx: Ctx) -> list[Figure]:
    n = ctx.modes.p6_rows
    one = _slow_rate(ctx, 1, n)
    two = _slow_rate(ctx, 2, n)
    ctx.log(f"  one daemon {one:.0f}/s, two {two:.0f}/s (receiver takes 20 ms)")
    return [Figure("P6", "P6 two daemons vs one, receiver takes 20 ms (/s; baseline: one)",
                   round(two), "/s", round(one), ">= 1.7x", _ge(two / one, 1.7),
                   extra={"per_url_concurrency": 8})]


ALL: dict[str, Callable[[Ctx], list[Figure]]] = {
    "P1": p1_capture, "P2": p2_throughput, "P3": p3_latency, "P4": p4_backlog,
    "P5": p5_isolation, "P6": p6_scale,
}
