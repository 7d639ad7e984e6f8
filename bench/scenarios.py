"""The measurements P1-P6. Each returns a list of Figure rows (value, same-run baseline, ratio)."""

from __future__ import annotations

import asyncio
import functools
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
    per_url: int | None = None  # P2/P4 per_url_concurrency; None: the daemon's default

    @classmethod
    def of(cls, quick: bool) -> Modes:
        # P2 is issue 9's 10,000-row burst in both modes
        if quick:
            return cls(True, 10_000, 2, 1, 10, 20_000, 2000, 1500)
        return cls(False, 10_000, 6, 3, 30, 100_000, 6000, 5000)

    @property
    def concurrency(self) -> dict[str, int]:
        """The bridge's webhooks.* concurrency keys for P2/P4 (empty: the daemon's defaults)."""
        if self.per_url is None:
            return {}
        return {"max_concurrency": max(64, self.per_url), "per_url_concurrency": self.per_url}

    @property
    def bridge_per_url(self) -> int:
        from bridge.config import WebhooksConfig
        return self.per_url or WebhooksConfig().per_url_concurrency


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
    results: Path = Path(__file__).resolve().parent / "results"  # where the PNG plots go

    def plot(self, name: str, draw: Callable[[Path], Path]) -> None:
        """Write results/<name> with `draw`; a missing matplotlib costs the plot, not the run."""
        try:
            out = draw(self.results / name)
        except ImportError as exc:
            self.log(f"  no plot {name}: {exc} (pip install -e '.[test,bench]')")
            return
        self.shared.setdefault("plots", []).append(out.name)
        self.log(f"  plot: {out}")


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
            pg0 = env.postgres_cpu_seconds(ctx.postmaster)
            t0 = workload.burst(dsn, n, f"{path.strip('/').replace('/', '-')}-")
            # the writer's, not ours (its backend usually exits before the sample: ~0)
            insert = env.postgres_cpu_seconds(ctx.postmaster) - pg0
            s = ctx.rx.wait_count(path, n, timeout=max(60, n / 100))
        rss = env.peak_rss_mb(d.pid)
    finally:
        ctx.procs.stop(d.proc)
        ctx.dbs.drop(dsn)
    cpu["postgres_insert"] = insert
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


PEER_IN_FLIGHT = 32  # the raw client's and pgqueuer's requests in flight (issue 9's measurement)
PGQUEUER_BATCHES = (20, 50)  # pgqueuer's dequeue batch sizes: the best one is its figure


@dataclass(frozen=True)
class Peer:
    """One baseline's P2 run: the rate and when its stream started (commit or first request)."""

    name: str
    rate: float
    start: float
    path: str
    loop: str
    cpu: dict[str, float] = field(default_factory=dict)


def _sample_files(ctx: Ctx, like: str) -> tuple[Path, Path]:
    """The bridge's body and signature headers as the receiver saw them on `like`, as files."""
    stats = ctx.rx.stats()["paths"][like]
    body = ctx.workdir / "body.json"
    body.write_text(stats["sample"])
    keep = {k: v for k, v in stats["headers"].items()
            if k.lower().startswith("x-qlm") or k.lower() in ("content-type", "user-agent")}
    headers = ctx.workdir / "headers.json"
    headers.write_text(json.dumps(keep))
    return body, headers


def _peer_json(ctx: Ctx, args: list[str], timeout: float) -> dict[str, Any]:
    p = ctx.procs.spawn([sys.executable, "-m", *args])
    out, _ = p.communicate(timeout=timeout)
    ctx.procs.started.remove(p)
    lines = out.decode().strip().splitlines()
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{args[0]} exited {p.returncode} without a result")
    result: dict[str, Any] = json.loads(lines[-1])
    if result["errors"]:
        raise RuntimeError(f"{args[0]}: {result['errors']} error(s)")
    return result


def _raw(ctx: Ctx, n: int, path: str, concurrency: int, like: str) -> Peer:
    body, headers = _sample_files(ctx, like)
    with _cpu(ctx, {"receiver": ctx.rx.proc.pid}) as cpu:
        result = _peer_json(ctx, ["bench.rawclient", ctx.rx.url(path), str(n), str(concurrency),
                                  str(body), str(headers)], timeout=max(60, n / 200))
    cpu["client"], cpu["requests"] = float(result["cpu"]), float(result["ok"])
    return Peer("raw", float(result["ok"] / (result["end"] - result["start"])),
                float(result["start"]), path, str(result["loop"]), cpu)


def _pgqueuer(ctx: Ctx, n: int, path: str, batch: int, concurrency: int, like: str) -> Peer:
    """pgqueuer in its own process on a fresh database of the same server; commit to last
    receipt, like the bridge."""
    body, headers = _sample_files(ctx, like)
    dsn = ctx.dbs.clone(bridge=False)
    try:
        result = _peer_json(ctx, ["bench.pgqueuer_peer", dsn, ctx.rx.url(path), str(n),
                                  str(batch), str(concurrency), str(body), str(headers)],
                            timeout=max(90, n / 50))
    finally:
        ctx.dbs.drop(dsn)
    s = ctx.rx.wait_count(path, n, timeout=10)
    if s["count"] < n:
        raise RuntimeError(f"pgqueuer: only {s['count']}/{n} received")
    return Peer(f"pgqueuer batch {batch}", n / max(1e-6, s["last"] - result["commit"]),
                float(result["commit"]), path, str(result["loop"]))


def _pgqueuer_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("pgqueuer")
    except PackageNotFoundError:
        return "?"


def _receipts_plot(ctx: Ctx, runs: dict[str, tuple[float, str]]) -> None:
    """P2's receipts per 100 ms for each run, from the receiver's arrival log (/lat/ paths)."""
    from bench import plots
    stats = ctx.rx.stats()["paths"]
    arrivals = [t for _, t in env.http_json(ctx.rx.url("/arrivals"))]
    series = {}
    for label, (start, path) in runs.items():
        last = stats.get(path, {}).get("last", start)
        series[label] = [t - start for t in arrivals if start <= t <= last]
    ctx.plot("p2-receipts.png", functools.partial(
        plots.receipts, title=f"P2: {ctx.modes.p2_rows}-row burst, receipts per 100 ms",
        series=series))


def _pgqueuer_runs(ctx: Ctx, n: int) -> list[Peer]:
    """pgqueuer at each batch size (none when the `bench` extra is not installed)."""
    from importlib.util import find_spec
    if find_spec("pgqueuer") is None:
        ctx.log("  pgqueuer is not installed (pip install -e '.[test,bench]'): no P2 peer")
        return []
    return [_pgqueuer(ctx, n, f"/lat/pgq-b{b}", b, PEER_IN_FLIGHT, like="/lat/p2")
            for b in PGQUEUER_BATCHES]


def _pgqueuer_figure(drain: Drain, pgq: list[Peer], where: str, short: str) -> Figure:
    batches = " and ".join(map(str, PGQUEUER_BATCHES))
    if not pgq:
        return Figure("P2.pgqueuer", f"P2 bridge vs pgqueuer: {where}", round(drain.rate), "/s",
                      None, ">= 2.00x", None, notes="pgqueuer not installed")
    best = max(pgq, key=lambda p: p.rate)
    return Figure(
        "P2.pgqueuer", f"P2 bridge vs pgqueuer {_pgqueuer_version()} ({PEER_IN_FLIGHT} in "
        f"flight, best of batch {batches}: {best.name.split()[-1]}, {best.loop}): {where} "
        "(deliveries/s)", round(drain.rate), "/s", round(best.rate), ">= 2.00x",
        _ge(drain.rate / best.rate, 2.0) and not short, notes=short,
        extra={"pgqueuer": {p.name: p.rate for p in pgq}})


def p2_throughput(ctx: Ctx) -> list[Figure]:
    n = ctx.modes.p2_rows
    conc = ctx.modes.concurrency
    k = ctx.modes.bridge_per_url
    # /lat/ paths: the receiver logs each arrival's time, for the receipts-over-time plot
    drain = _deliver_burst(ctx, n, "/lat/p2", profile=f"p2-c{k}", concurrency=conc)
    raw = _raw(ctx, n, "/lat/raw", PEER_IN_FLIGHT, like="/lat/p2")
    pgq = _pgqueuer_runs(ctx, n)
    info = _deliver_burst(ctx, n, "/ok/p2info", log_level="info", concurrency=conc)
    ctx.shared["p2_rate"] = drain.rate
    ctx.shared["idle_rss"] = drain.idle_rss_mb
    body_len = len(ctx.rx.stats()["paths"]["/lat/p2"]["sample"].encode())
    ctx.log(f"  bridge {drain.rate:.0f}/s (stream {drain.stream_rate:.0f}/s, first after "
            f"{(drain.first - drain.start) * 1000:.0f} ms), raw {raw.rate:.0f}/s, "
            + "".join(f"{p.name} {p.rate:.0f}/s, " for p in pgq)
            + f"info-log {info.rate:.0f}/s; cpu {drain.cpu}")
    ctx.log(f"  bridge / raw = {drain.rate / raw.rate:.2f}x (target >= 0.60x)" + (
        f", bridge / pgqueuer = {drain.rate / max(p.rate for p in pgq):.2f}x (target >= "
        "2.00x)" if pgq else ""))
    _receipts_plot(ctx, {"bridge": (drain.start, "/lat/p2"),
                         f"raw client ({PEER_IN_FLIGHT} in flight)": (raw.start, raw.path),
                         **{p.name: (p.start, p.path) for p in pgq}})
    short = "" if drain.received == n else f"only {drain.received}/{n} delivered"
    where = (f"{n}-row burst, 1 URL, bridge per_url_concurrency={k}"
             f"{'' if ctx.modes.per_url else ' (daemon default)'}")
    return [
        Figure("P2.raw", f"P2 bridge vs raw client ({PEER_IN_FLIGHT} in flight, {raw.loop}, "
               f"no database): {where} (deliveries/s)", round(drain.rate), "/s",
               round(raw.rate), ">= 0.60x", _ge(drain.rate / raw.rate, 0.60) and not short,
               notes=short,
               extra={"stream_rate": drain.stream_rate, "cpu_seconds": drain.cpu,
                      "body_bytes": body_len, "concurrency": conc or "daemon default",
                      "raw_in_flight": PEER_IN_FLIGHT, "raw_loop": raw.loop}),
        _pgqueuer_figure(drain, pgq, where, short),
        _cpu_budget(drain, raw),
        Figure("P2.log_info", "P2 with observe.log_level=info (vs warning)", round(info.rate),
               "/s", round(drain.rate), "-", None, extra={"cpu_seconds": info.cpu}),
    ]


def _cpu_budget(drain: Drain, raw: Peer) -> Figure:
    """CPU per delivery on each side of P2 (the burst's own INSERT left out). When both runs are
    bound by the machine's cores, bridge/raw can be at most raw's CPU per request divided by
    the bridge's CPU per delivery: that ratio is the ceiling the 0.60x target has to fit under."""
    n = max(1, drain.received)
    us = {"daemon": drain.cpu["daemon"] / n * 1e6,
          "postgres": (drain.cpu["postgres"] - drain.cpu["postgres_insert"]) / n * 1e6,
          "receiver": drain.cpu["receiver"] / n * 1e6}
    m = max(1.0, raw.cpu.get("requests", 0))
    raw_us = {"client": raw.cpu.get("client", 0) / m * 1e6,
              "receiver": raw.cpu.get("receiver", 0) / m * 1e6}
    bridge, base = sum(us.values()), sum(raw_us.values())
    notes = ("bridge " + " + ".join(f"{k} {v:.0f}" for k, v in us.items())
             + f" = {bridge:.0f} us; raw " + " + ".join(f"{k} {v:.0f}" for k, v in raw_us.items())
             + f" = {base:.0f} us; ceiling of bridge/raw where CPU-bound: {base / bridge:.2f}x")
    return Figure("P2.cpu", "P2 CPU per delivery, all processes (us; baseline: raw client + "
                  "receiver per request; ratio = how many raw requests one delivery costs)",
                  round(bridge), "us", round(base), "-", None, notes=notes,
                  extra={"bridge_us": us, "raw_us": raw_us})


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


P3_TARGETS = {"p50": 3.0, "p99": 10.0, "max": 30.0}  # ms, at 100/s and at 500/s (issue 9)


def _latency_figures(rate: int, lat: list[float], floor: list[float], extra: dict[str, Any],
                     notes: str) -> list[Figure]:
    figures = []
    for name, q in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999), ("max", 1.0)):
        v, base = _pct(lat, q), _pct(floor, q)
        target = P3_TARGETS.get(name)
        figures.append(Figure(
            f"P3.{rate}.{name}", f"P3 latency {name} at {rate}/s (ms, INSERT sent -> received; "
            f"baseline: HTTP round trip {name})", round(v, 2), "ms", round(base, 2),
            f"<= {target:g} ms" if target else "-", _le(v, target) if target else None,
            notes=notes if name == "p50" else "", extra=extra if name == "p50" else {}))
    return figures


def p3_latency(ctx: Ctx) -> list[Figure]:
    from bench import plots
    floor = asyncio.run(_floor(ctx.rx.url("/ok/floor"), 300))
    figures: list[Figure] = []
    for rate in (100, 500):
        dsn = ctx.dbs.clone()
        path = f"/lat/p3-{rate}"
        d = env.start_daemon(ctx.procs, ctx.workdir, _daemon_cfg(dsn, [ctx.rx.url(path)]))
        try:
            # the WAL of earlier scenarios (P2's bursts) would otherwise end in a checkpoint
            # during this one: 70-90 ms commits of the writer's own INSERT, no bridge cost
            ctx.dbs.server.execute("CHECKPOINT")
            time.sleep(0.5)
            with _cpu(ctx, {"daemon": d.pid}) as cpu:
                st = workload.steady(dsn, rate, ctx.modes.p3_seconds, f"lat{rate}-")
            ctx.rx.wait_count(path, len(st.sent) + st.writers, timeout=15)
        finally:
            ctx.procs.stop(d.proc)
            ctx.dbs.drop(dsn)
        arrivals = {k: t for k, t in env.http_json(ctx.rx.url("/arrivals")) if k in st.sent}
        keys = [k for k in st.sent if k in arrivals]
        lat = [(arrivals[k] - st.sent[k]) * 1000 for k in keys]
        insert = st.insert_ms
        missing = len(st.sent) - len(lat)
        short = st.rate < 0.95 * rate
        notes = "; ".join(x for x in (f"{missing} missing" if missing else "",
                                       f"writers reached only {st.rate:.0f}/s" if short else "")
                          if x)
        ctx.log(f"  {rate}/s: p50 {_pct(lat, 0.5):.2f} p99 {_pct(lat, 0.99):.2f} p99.9 "
                f"{_pct(lat, 0.999):.2f} max {max(lat):.2f} ms (floor p50 "
                f"{_pct(floor, 0.5):.2f}); the INSERT alone p50 {_pct(insert, 0.5):.2f} p99 "
                f"{_pct(insert, 0.99):.2f} max {max(insert):.2f} ms; writer behind <= "
                f"{st.behind_ms:.1f} ms, {st.writers} writer(s) reached {st.rate:.0f}/s; "
                f"cpu {cpu}")
        extra = {"events": len(st.sent), "missing": missing, "seconds": ctx.modes.p3_seconds,
                 "writer_rate": st.rate, "writers": st.writers,
                 "writer_behind_ms": st.behind_ms, "cpu_seconds": cpu,
                 "insert_ms": {"p50": _pct(insert, 0.5), "p99": _pct(insert, 0.99),
                               "max": max(insert)}}
        figures += _latency_figures(rate, lat, floor, extra, notes)
        ctx.plot(f"p3-latency-{rate}.png", functools.partial(
            plots.latency, title=f"P3: {rate} single-row INSERTs/s for "
            f"{ctx.modes.p3_seconds:g} s, latency of each event",
            sent=[st.sent[k] for k in keys], latency_ms=lat,
            insert_ms=[(st.committed[k] - st.sent[k]) * 1000 for k in keys],
            targets=P3_TARGETS))
    return figures


# --- P4 -------------------------------------------------------------------------------------------

def p4_backlog(ctx: Ctx) -> list[Figure]:
    n = ctx.modes.p4_rows
    dsn = ctx.dbs.clone()
    path = "/ok/p4"
    try:
        workload.burst(dsn, n, "backlog-")
        d = env.start_daemon(ctx.procs, ctx.workdir, _daemon_cfg(
            dsn, [ctx.rx.url(path)], webhooks=ctx.modes.concurrency), wait=False)
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
        Figure("P4.rate", f"P4 backlog drain, {n} pending at start, per_url_concurrency="
               f"{ctx.modes.bridge_per_url} (deliveries/s; baseline: this run's P2 bridge rate)",
               round(rate), "/s", round(p2) if p2 else None, ">= 1.00x",
               (rate >= p2 if p2 else None) if complete else False,
               notes="" if p2 else "no P2 in this run: no ratio",
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
                   round(mixed), "/s", round(alone), ">= 0.90x", _ge(mixed / alone, 0.90),
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
