"""P7 and P8: what the engine's features cost.

- P7, per-key ordering: a burst delivered with `ordering: none` vs `per_key`, with many keys
  (10 events per license) and with one hot key (every event for the same license, which per_key
  must send one at a time).
- P8, sites: the RSS of one daemon serving 10 idle sites vs one site, and the database
  connections each idle site holds.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from bench import env
from bench.scenarios import Ctx, Figure, _daemon_cfg, _ge, _le, _rss_now

_MANY = """
INSERT INTO license_keys (activation_key) SELECT %(p)s || g FROM generate_series(1, %(k)s) g;
DO $$ BEGIN
  FOR r IN 1..9 LOOP
    UPDATE license_keys SET comment = r::text WHERE activation_key LIKE '{p}%';
  END LOOP;
END $$;
"""
_HOT = """
INSERT INTO license_keys (activation_key) VALUES (%(p)s || 'hot');
DO $$ BEGIN
  FOR r IN 1..{n} LOOP
    UPDATE license_keys SET comment = r::text WHERE activation_key = '{p}hot';
  END LOOP;
END $$;
"""


def _burst(dsn: str, workload: str, prefix: str, n: int) -> float:
    """Commit one transaction of n events (created + modified); its commit time."""
    sql = workload.replace("{p}", prefix).replace("{n}", str(n - 1))
    with psycopg.connect(dsn) as conn:
        head, _, rest = sql.strip().partition(";")
        conn.execute(head, {"p": prefix, "k": n // 10})
        conn.execute(rest.strip().rstrip(";").encode())
        conn.commit()
        return time.time()


def _ordered_rate(ctx: Ctx, ordering: str, workload: str, n: int, tag: str) -> float:
    dsn = ctx.dbs.clone()
    path = f"/ok/p7-{tag}-{ordering}"
    url = ctx.rx.url(path)
    cfg = _daemon_cfg(dsn, [url], webhooks={
        "ordering": ordering, "events": {"license_created": [url], "license_modified": [url]}})
    d = env.start_daemon(ctx.procs, ctx.workdir, cfg)
    try:
        time.sleep(0.5)
        t0 = _burst(dsn, workload, f"{tag}{ordering}-", n)
        s = ctx.rx.wait_count(path, n, timeout=max(60, n / 50))
    finally:
        ctx.procs.stop(d.proc)
        ctx.dbs.drop(dsn)
    if s["count"] < n:
        raise RuntimeError(f"{path}: {s['count']}/{n} delivered")
    return float(n / (s["last"] - t0))


def p7_ordering(ctx: Ctx) -> list[Figure]:
    n = 2000 if ctx.modes.quick else 10_000
    hot = 300 if ctx.modes.quick else 1000
    out = []
    for tag, workload, count, label in (("many", _MANY, n, f"{n // 10} keys x 10 events"),
                                        ("hot", _HOT, hot, "one hot key")):
        none = _ordered_rate(ctx, "none", workload, count, tag)
        per_key = _ordered_rate(ctx, "per_key", workload, count, tag)
        ctx.log(f"  {label}: none {none:.0f}/s, per_key {per_key:.0f}/s")
        out.append(Figure(f"P7.{tag}", f"P7 per_key vs none, burst of {count}, {label} "
                          "(deliveries/s)", round(per_key), "/s", round(none)))
    return out


def _connections(admin_dsn: str, databases: list[str]) -> dict[str, int]:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT datname, count(*) FROM pg_stat_activity "
                            "WHERE application_name LIKE 'qlm-bridge%%' "
                            "AND datname = ANY(%s) GROUP BY 1", (databases,)).fetchall()
    return {r[0]: int(r[1]) for r in rows}


def _sites_daemon(ctx: Ctx, count: int) -> tuple[float | None, dict[str, int]]:
    dsns = [ctx.dbs.clone() for _ in range(count)]
    sites: dict[str, Any] = {
        f"s{i}": {"database": {"dsn": dsn},
                  "webhooks": {"events": {"license_created": [ctx.rx.url(f"/ok/p8-{i}")]}}}
        for i, dsn in enumerate(dsns)}
    cfg = _daemon_cfg(dsns[0], [ctx.rx.url("/ok/p8")])
    del cfg["database"]
    cfg["sites"] = sites
    d = env.start_daemon(ctx.procs, ctx.workdir, cfg)
    try:
        for i, dsn in enumerate(dsns):  # one event each, then idle
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("INSERT INTO license_keys (activation_key) VALUES (%s)", (f"s{i}",))
        for i in range(count):
            ctx.rx.wait_count(f"/ok/p8-{i}", 1, timeout=30)
        time.sleep(8)  # idle: heartbeats and keep-alives only
        rss = _rss_now(d.pid)
        names = [dsn.rsplit("/", 1)[1] for dsn in dsns]
        conns = _connections(ctx.dbs.server.admin_dsn, names)
    finally:
        ctx.procs.stop(d.proc)
        for dsn in dsns:
            ctx.dbs.drop(dsn)
    return rss, conns


def p8_sites(ctx: Ctx) -> list[Figure]:
    one, _ = _sites_daemon(ctx, 1)
    ten, conns = _sites_daemon(ctx, 10)
    worst = max(conns.values()) if conns else None
    ctx.log(f"  RSS 1 site {one} MB, 10 sites {ten} MB; connections per site {conns}")
    return [
        Figure("P8.rss", "P8 daemon RSS, 10 idle sites (MB; baseline: 1 site)", ten, "MB", one,
               "<= 2x", _le(ten / one, 2.0) if ten and one else None),
        Figure("P8.conns", "P8 database connections per idle site (most of 10 sites)",
               worst, "", None, "<= 2", _le(worst, 2) if worst is not None else None),
        Figure("P8.sites", "P8 sites holding connections after 8 s idle", len(conns), "",
               10, "10", _ge(len(conns), 10)),
    ]
