"""P1, capture write overhead: pgbench TPS of single-row INSERTs (4 writers) into `license_keys`
with the capture triggers, as a ratio to a trigger-free copy of it in the same database
(`CREATE TABLE ... (LIKE license_keys INCLUDING ALL)`), in the three states a bridge is in:

  fresh     installed, no daemon has ever run (runtime as install left it)
  stopped   a daemon ran, went idle, and was stopped gracefully (SIGTERM)
  running   a daemon is running and busy, delivering every captured row to a receiver

plus the activation UPDATE (two rows turned into JSON) with the daemon stopped, and (no target,
to read the running state by) the INSERT with NOTIFY forced on and no daemon. Each ratio's two
sides run back to back, in alternating order, `reps` times (the machine is shared: compare only
figures of one run); the figure is the median, the notes give the range of the per-pair ratios,
how often writers had NOTIFY on, and the writers' backend CPU per transaction (read from /proc
while pgbench runs: a ratio that other load on the machine disturbs far less than TPS).

    python -m bench --only P1 --dsn postgresql://postgres@127.0.0.1:5432/postgres
    python -m bench.capture_overhead --dsn ...        # the same, P1 only
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench import env, workload
from bench.scenarios import Ctx, Figure

PLAIN = "license_keys_plain"
CLIENTS = 4
PRELOAD = 20_000  # rows the activation UPDATE picks from ('pre-1' .. 'pre-N'), in both tables
TARGET = 0.70
SETUP = f"""
CREATE TABLE {PLAIN} (LIKE license_keys INCLUDING ALL);
ALTER TABLE {PLAIN} ADD FOREIGN KEY (customer_id) REFERENCES customers ON DELETE SET NULL;
INSERT INTO {PLAIN} (activation_key, product_id, num_licenses, available_licenses)
SELECT 'pre-' || g, 7, 1000000, 1000000 FROM generate_series(1, {PRELOAD}) g;
INSERT INTO license_keys SELECT * FROM {PLAIN};
TRUNCATE qlm_bridge.event CASCADE;
"""


@dataclass
class Pairs:
    """TPS of both sides, measured pairwise."""

    plain: list[float] = field(default_factory=list)
    bridged: list[float] = field(default_factory=list)
    notify_share: list[float] = field(default_factory=list)  # of samples with NOTIFY on
    # CPU of the writers' backends per transaction, microseconds: less sensitive than TPS to
    # what else runs on a shared machine
    plain_cpu_us: list[float] = field(default_factory=list)
    bridged_cpu_us: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [b / p for b, p in zip(self.bridged, self.plain, strict=True)]

    @property
    def cpu_ratios(self) -> list[float]:
        """plain CPU per transaction / bridged: the TPS ratio a CPU-bound server would see."""
        return [p / b for b, p in zip(self.bridged_cpu_us, self.plain_cpu_us, strict=True)
                if b > 0]


def _reset(dsn: str) -> None:
    """Back to the preloaded state (no trigger fires: replica role), outbox and queue empty, a
    checkpoint, so every run starts from the same table and index sizes."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        for table in ("license_keys", PLAIN):
            conn.execute(f"DELETE FROM {table} WHERE activation_key NOT LIKE 'pre-%'".encode())
        _truncate_outbox(conn)
        conn.execute("VACUUM ANALYZE license_keys, license_keys_plain")
        conn.execute("CHECKPOINT")


def _truncate_outbox(conn: psycopg.Connection[tuple[object, ...]], tries: int = 20) -> None:
    """Empty the outbox, the queue and the log; a running daemon may hold their locks (or
    deadlock with the TRUNCATE), so wait a little and try again."""
    conn.execute("SET lock_timeout = '2s'")
    for attempt in range(tries):
        try:
            conn.execute("TRUNCATE qlm_bridge.event, qlm_bridge.attempt_log CASCADE")
            return
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected):
            if attempt == tries - 1:
                raise
            time.sleep(0.2)


def _set_notify(dsn: str, on: bool) -> None:
    """Force the NOTIFY flag as an idle daemon sets it (on, an hour ahead) or as a stopped one
    leaves it (off)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE qlm_bridge.runtime SET sleeping = %s, sleeping_until = "
                     "CASE WHEN %s THEN now() + interval '1 hour' END", (on, on))


def _runtime(dsn: str) -> tuple[bool, bool]:
    """(sleeping, writers notify now)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT sleeping, coalesce(sleeping AND sleeping_until > now(), "
                           "false) FROM qlm_bridge.runtime").fetchone()
    assert row is not None
    return bool(row[0]), bool(row[1])


@dataclass
class Watch:
    """What a pgbench run did besides its TPS: whether writers had NOTIFY on (one sample per
    tick) and the CPU seconds of each pgbench backend (the last reading before it ended)."""

    notify: list[bool] = field(default_factory=list)
    cpu: dict[int, float] = field(default_factory=dict)


@contextmanager
def _watching(dsn: str, every: float = 0.1) -> Iterator[Watch]:
    """Sample the NOTIFY flag and the pgbench backends' CPU while the block runs (only this
    database's backends: other work on a shared server does not count)."""
    watch = Watch()
    stop = threading.Event()

    def run() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                row = conn.execute("SELECT coalesce(sleeping AND sleeping_until > now(), false)"
                                   " FROM qlm_bridge.runtime").fetchone()
                watch.notify.append(bool(row and row[0]))
                for (pid,) in conn.execute(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND application_name = 'pgbench'").fetchall():
                    seconds = env.cpu_seconds(pid)
                    if seconds:
                        watch.cpu[pid] = seconds
                stop.wait(every)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        stop.set()
        thread.join(10)


def _pairs(ctx: Ctx, dsn: str, scripts: dict[str, Path], kind: str) -> Pairs:
    out = Pairs()
    binary = ctx.dbs.server.pgbench()
    for rep in range(ctx.modes.p1_reps):
        sides = ("plain", "bridged") if rep % 2 == 0 else ("bridged", "plain")
        for side in sides:
            _reset(dsn)
            script = scripts[f"{kind}.{side}"]
            seconds = ctx.modes.p1_seconds
            with _watching(dsn) as watch:
                tps = workload.pgbench_run(binary, dsn, script, CLIENTS, seconds)
            cpu_us = sum(watch.cpu.values()) * 1e6 / (tps * seconds)
            if side == "plain":
                out.plain.append(tps)
                out.plain_cpu_us.append(cpu_us)
            else:
                out.bridged.append(tps)
                out.bridged_cpu_us.append(cpu_us)
                out.notify_share.append(sum(watch.notify) / max(1, len(watch.notify)))
    return out


def _figure(state: str, what: str, pairs: Pairs, notes: str) -> Figure:
    ratios = pairs.ratios
    median = statistics.median(ratios)
    rng = f"pairs {min(ratios):.2f}-{max(ratios):.2f}"
    share = statistics.mean(pairs.notify_share) if pairs.notify_share else 0.0
    cpu = pairs.cpu_ratios
    cpu_note = (f"; backend CPU per transaction {statistics.median(pairs.bridged_cpu_us):.0f}"
                f" vs {statistics.median(pairs.plain_cpu_us):.0f} us, ratio "
                f"{statistics.median(cpu):.2f} ({min(cpu):.2f}-{max(cpu):.2f})") if cpu else ""
    return Figure(
        f"P1.{state}", f"P1 {what}, {CLIENTS} writers, {state}",
        round(statistics.median(pairs.bridged), 1), "tps", round(statistics.median(pairs.plain), 1),
        f">= {TARGET:.2f}", median >= TARGET,
        notes=f"{notes}; {rng}; NOTIFY on in {share:.0%} of samples{cpu_note}",
        extra={"runs": pairs.bridged, "baseline_runs": pairs.plain, "ratios": ratios,
               "median_ratio": median, "notify_share": pairs.notify_share,
               "cpu_us": pairs.bridged_cpu_us, "baseline_cpu_us": pairs.plain_cpu_us,
               "cpu_ratios": cpu})


def _scripts(workdir: Path) -> dict[str, Path]:
    texts = {"insert": workload.INSERT_SCRIPT, "update": workload.UPDATE_SCRIPT.format(
        rows=PRELOAD)}
    out = {}
    for kind, text in texts.items():
        for side, table in (("bridged", "license_keys"), ("plain", PLAIN)):
            path = workdir / f"p1-{kind}-{side}.sql"
            path.write_text(text.replace("license_keys", table))
            out[f"{kind}.{side}"] = path
    return out


def _daemon_config(dsn: str, url: str) -> dict[str, Any]:
    return env.base_config(dsn, webhooks={"events": {"license_created": [url]}})


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def p1_capture(ctx: Ctx) -> list[Figure]:
    dsn = ctx.dbs.clone(bridge=True)
    figures: list[Figure] = []
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SETUP.encode())
        scripts = _scripts(ctx.workdir)
        cfg = _daemon_config(dsn, ctx.rx.url("/ok/p1"))

        state = _runtime(dsn)
        pairs = _pairs(ctx, dsn, scripts, "insert")
        figures.append(_figure("fresh", "single-row INSERT", pairs,
                               f"fresh install, no daemon ran (sleeping={state[0]})"))
        ctx.log(f"  {figures[-1].figure}: ratio {figures[-1].ratio:.2f} ({figures[-1].notes})")

        # a daemon runs, goes idle (writers would NOTIFY), and is stopped gracefully
        d = env.start_daemon(ctx.procs, ctx.workdir, cfg, name="p1-daemon")
        _wait(lambda: _runtime(dsn)[1], 30, "the idle daemon to turn NOTIFY on")
        ctx.procs.stop(d.proc)
        state = _runtime(dsn)
        for kind, what in (("insert", "single-row INSERT"), ("update", "activation UPDATE")):
            pairs = _pairs(ctx, dsn, scripts, kind)
            figures.append(_figure("stopped" if kind == "insert" else "stopped.update", what,
                                   pairs, f"daemon stopped gracefully (sleeping={state[0]})"))
            ctx.log(f"  {figures[-1].figure}: ratio {figures[-1].ratio:.2f} "
                    f"({figures[-1].notes})")

        # what NOTIFY costs (for reading the running state): the flag forced on, no daemon
        _set_notify(dsn, True)
        pairs = _pairs(ctx, dsn, scripts, "insert")
        _set_notify(dsn, False)
        figures.append(_figure("notify", "single-row INSERT", pairs,
                               "no daemon, NOTIFY forced on (diagnostic, no target)"))
        figures[-1] = dataclasses.replace(figures[-1], target="-", met=None)
        ctx.log(f"  {figures[-1].figure}: ratio {figures[-1].ratio:.2f} ({figures[-1].notes})")

        # a daemon running, delivering every captured row
        ctx.rx.reset()
        d = env.start_daemon(ctx.procs, ctx.workdir, cfg, name="p1-daemon-busy")
        try:
            pairs = _pairs(ctx, dsn, scripts, "insert")
            delivered = ctx.rx.count("/ok/p1")
        finally:
            ctx.procs.stop(d.proc)
        figures.append(_figure("running", "single-row INSERT", pairs,
                               f"daemon running and busy ({delivered} delivered meanwhile)"))
        ctx.log(f"  {figures[-1].figure}: ratio {figures[-1].ratio:.2f} ({figures[-1].notes})")
    finally:
        ctx.dbs.drop(dsn)
    return figures


def main(argv: list[str] | None = None) -> int:
    from bench.run import main as run_main

    return run_main(["--only", "P1", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
