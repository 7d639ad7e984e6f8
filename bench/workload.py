"""Database writers for the benchmark: bursts, steady-rate inserts and pgbench runs."""

from __future__ import annotations

import math
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

# One row of license_keys about the size a license server writes (payload ~ 700 bytes).
_BURST = """
INSERT INTO license_keys (activation_key, product_id, product_name, major_version,
                          minor_version, features, license_model, num_licenses,
                          available_licenses, order_id, order_date, user_data, comment)
SELECT %(prefix)s || g, 7, 'Bench Product', 3, 1, 'f1;f2;f3', 'subscription', 5, 5,
       'order-' || g, now(), 'user data for ' || g, 'benchmark row'
  FROM generate_series(%(first)s::int, %(last)s::int) AS g
"""

_ONE = """
INSERT INTO license_keys (activation_key, product_id, product_name, major_version,
                          minor_version, features, license_model, num_licenses,
                          available_licenses, order_id, order_date, user_data, comment)
VALUES (%s, 7, 'Bench Product', 3, 1, 'f1;f2;f3', 'subscription', 5, 5, 'order', now(),
        'user data', 'benchmark row')
"""

INSERT_SCRIPT = """\
INSERT INTO license_keys (activation_key, product_id, product_name, num_licenses, \
available_licenses, order_id, user_data) VALUES (gen_random_uuid()::text, 7, 'Bench Product', \
5, 5, 'order-' || :client_id, 'user data');
"""

UPDATE_SCRIPT = """\
\\set k random(1, {rows})
UPDATE license_keys SET activation_count = activation_count + 1, \
available_licenses = available_licenses - 1, computer_id = 'pc-' || :client_id, \
activation_date = now() WHERE activation_key = 'pre-' || :k;
"""


def burst(dsn: str, n: int, prefix: str, chunk: int = 10_000) -> float:
    """Commit n license_keys rows in one transaction (a few multi-row INSERTs); commit time."""
    with psycopg.connect(dsn) as conn:
        for first in range(1, n + 1, chunk):
            conn.execute(_BURST, {"prefix": prefix, "first": first,
                                  "last": min(n, first + chunk - 1)})
        conn.commit()
        return time.time()


@dataclass(frozen=True)
class Steady:
    sent: dict[str, float]  # activation_key -> time.time() just before `execute` sent the INSERT
    committed: dict[str, float]  # activation_key -> time.time() when `execute` returned (commit)
    behind_ms: float  # how far a writer fell behind its schedule at worst
    writers: int  # connections (threads), each with one warm-up row before the schedule

    @property
    def insert_ms(self) -> list[float]:
        """Each INSERT's own round trip (autocommit: send to commit), ms."""
        return [(self.committed[k] - t) * 1000 for k, t in self.sent.items()]

    @property
    def rate(self) -> float:
        """The rate the writers reached (they can fall short of the schedule)."""
        times = sorted(self.sent.values())
        return (len(times) - 1) / max(1e-6, times[-1] - times[0]) if len(times) > 1 else 0.0


WRITER_RATE = 150  # events/s one writer connection is asked for at most (a commit ~1-3 ms)


@dataclass
class _Log:
    """What the writer threads record (dict and list updates are atomic under the GIL)."""

    sent: dict[str, float] = field(default_factory=dict)
    committed: dict[str, float] = field(default_factory=dict)
    behind: list[float] = field(default_factory=list)


def _write(dsn: str, schedule: list[tuple[str, float]], warmup: str, log: _Log) -> None:
    """One connection's share of the schedule: (key, due time) in order."""
    behind = 0.0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(_ONE, (warmup,))
        for key, due in schedule:
            now = time.time()
            if due > now:
                time.sleep(due - now)
            else:
                behind = max(behind, now - due)
            log.sent[key] = time.time()
            conn.execute(_ONE, (key,))
            log.committed[key] = time.time()
    log.behind.append(behind)


def steady(dsn: str, rate: float, seconds: float, prefix: str) -> Steady:
    """Single-row INSERTs (psycopg autocommit) at `rate` per second on an absolute schedule,
    spread round-robin over enough connections (one thread each) that one slow commit does not
    hold back the next event. Each event's time is taken just before `execute`, because that is
    when an application asks for the change: latency = arrival at the receiver minus that time.
    Each connection first writes one warm-up row (`<prefix>warmup-<n>`)."""
    writers = max(1, math.ceil(rate / WRITER_RATE))
    total = int(rate * seconds)
    start = time.time() + 0.3 + 0.1 * writers  # connect and warm up first
    schedule = [(f"{prefix}{i}", start + i / rate) for i in range(total)]
    log = _Log()
    threads = [threading.Thread(target=_write, args=(dsn, schedule[w::writers],
                                                     f"{prefix}warmup-{w}", log))
               for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent = dict(sorted(log.sent.items(), key=lambda kv: kv[1]))
    return Steady(sent, log.committed, max(log.behind, default=0.0) * 1000, writers)


def preload(dsn: str, rows: int) -> None:
    """Rows the activation UPDATE script picks from ('pre-1' .. 'pre-N')."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""INSERT INTO license_keys (activation_key, product_id, num_licenses,
                                                  available_licenses)
                        SELECT 'pre-' || g, 7, 1000000, 1000000
                          FROM generate_series(1, %s::int) g""", (rows,))
        has_bridge = conn.execute(
            "SELECT to_regclass('qlm_bridge.event') IS NOT NULL").fetchone()
        if has_bridge and has_bridge[0]:
            conn.execute("TRUNCATE qlm_bridge.event CASCADE")
        conn.execute("VACUUM ANALYZE license_keys")


def reset(dsn: str) -> None:
    """Back to the preloaded state before each pgbench run (no trigger fires: replica role), so
    every variant starts from the same table and index sizes."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("DELETE FROM license_keys WHERE activation_key NOT LIKE 'pre-%'")
        has_bridge = conn.execute(
            "SELECT to_regclass('qlm_bridge.event') IS NOT NULL").fetchone()
        if has_bridge and has_bridge[0]:
            conn.execute("TRUNCATE qlm_bridge.event CASCADE")
        conn.execute("VACUUM ANALYZE license_keys")
        conn.execute("CHECKPOINT")


def set_sleeping(dsn: str, sleeping: bool) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE qlm_bridge.runtime SET sleeping = %s WHERE id = 1", (sleeping,))


_TPS = re.compile(r"tps = ([0-9.]+) \(without initial connection time\)")


def pgbench(binary: str, dsn: str, script: Path, clients: int, seconds: float) -> float:
    reset(dsn)
    args = [binary, "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2)),
            "-T", str(int(seconds)), "-f", str(script), dsn]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60,
                         check=False)
    m = _TPS.search(out.stdout)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"pgbench failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return float(m.group(1))
