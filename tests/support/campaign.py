"""The reliability campaign: writers, and one function per campaign case returning its
figures (the receiver, the daemon process and the base config come from tests.support).
tests/test_reliability.py runs bounded versions in CI; scripts/reliability.py runs the long
ones and prints the table for RELIABILITY.md."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import ssl
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from tests.support.config import config_data
from tests.support.daemon import DaemonProcess, sampling
from tests.support.receiver import (
    Behaviour,
    Received,
    Receiver,
    big_body,
    black_hole,
    flaky,
    redirect,
    reset,
    slow_body,
    status,
)
from tests.support.server import execute, query

# The campaign's policy over the base config: more retries, a shorter lease (faster reclaim).
CAMPAIGN: dict[str, dict[str, Any]] = {"webhooks": {"max_retries": 5}, "daemon": {"lease": 3}}


def campaign_config(dsn: str, **sections: dict[str, Any]) -> dict[str, Any]:
    """The base config with the campaign's policy, then `sections` merged over it."""
    merged = {k: {**CAMPAIGN.get(k, {}), **v} for k, v in sections.items()}
    return config_data(dsn, **{**CAMPAIGN, **merged})


# --- database helpers ------------------------------------------------------------------------


def insert_licenses(dsn: str, prefix: str, start: int, count: int) -> None:
    """One INSERT statement of `count` license rows (one license_created event each)."""
    execute(dsn, "INSERT INTO license_keys (activation_key) "
                 "SELECT %s || g FROM generate_series(%s::int, %s::int) g "
                 "ON CONFLICT DO NOTHING", (prefix, start, start + count - 1))


async def insert_until_committed(dsn: str, prefix: str, start: int, count: int,
                                 give_up: float = 60) -> None:
    """Insert a batch, retrying while the server is unreachable (the DB-restart case)."""
    deadline = time.monotonic() + give_up
    while True:
        try:
            await asyncio.to_thread(insert_licenses, dsn, prefix, start, count)
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def event_ids(dsn: str, event_type: str = "license_created") -> set[str]:
    rows = query(dsn, "SELECT event_id::text FROM qlm_bridge.event WHERE event_type = %s",
                 (event_type,))
    return {r[0] for r in rows}


def attempts_by_url(dsn: str) -> dict[str, list[tuple[int | None, str | None]]]:
    out: dict[str, list[tuple[int | None, str | None]]] = {}
    for url, st, err in query(dsn, "SELECT url, http_status, error FROM qlm_bridge.attempt_log "
                                   "ORDER BY id"):
        out.setdefault(url, []).append((st, err))
    return out


def _kb_to_mb(kb: int) -> float:
    return round(kb / 1024, 1)


# --- case 1: crash storm ---------------------------------------------------------------------


async def crash_storm(dsn: str, workdir: Path, *, events: int = 5000, urls: int = 4,
                      kills: int = 10, alive: tuple[float, float] = (0.5, 2.0),
                      max_concurrency: int = 64, seed: int = 1) -> dict[str, Any]:
    """Write `events` license_created events (each to `urls` URLs) while SIGKILLing the daemon
    `kills` times at random moments; then let a last daemon drain everything."""
    rng = random.Random(seed)
    rx = await Receiver().start()
    paths = [f"/u{i}" for i in range(urls)]
    cfg = campaign_config(dsn, webhooks={"events": {"license_created": [rx.url(p) for p in paths]},
                                     "max_concurrency": max_concurrency,
                                     "per_url_concurrency": max(1, max_concurrency // urls)})
    batch = max(1, events // (kills * 4 + 4))

    async def writer() -> None:
        for start in range(0, events, batch):
            await asyncio.to_thread(insert_licenses, dsn, "CS", start, min(batch, events - start))
            await asyncio.sleep(rng.uniform(0.05, 0.25))

    writing = asyncio.create_task(writer())
    resume: list[float] = []
    daemons: list[DaemonProcess] = []
    sampler = asyncio.create_task(sampling(lambda: daemons[-1:]))
    try:
        for k in range(kills + 1):
            d = DaemonProcess(workdir, cfg, name=f"crash{k}")
            daemons.append(d)
            before = len(rx.received)
            spawned = time.monotonic()
            d.start()

            def resumed(b: int = before) -> bool:
                return len(rx.received) > b or (writing.done() and _all_delivered(dsn))

            await rx.wait_for(resumed, 60, "deliveries after a restart")
            resume.append(time.monotonic() - spawned)
            if k == kills:
                break
            await asyncio.sleep(rng.uniform(*alive))
            d.kill()
            await asyncio.sleep(0.2)  # let requests already sent reach the receiver
        await writing
        expected = await asyncio.to_thread(event_ids, dsn)
        await rx.wait_for(lambda: all(len(rx.unique(p)) >= len(expected) for p in paths),
                          120, "every event at every URL")
        # what a killed daemon sent but never acknowledged is sent again once its lease ends
        await rx.wait_for(lambda: _not_delivered(dsn) == 0, 60, "every delivery acknowledged")
        await daemons[-1].terminate()
    finally:
        sampler.cancel()
        writing.cancel()
        for d in daemons:
            d.kill()
        await rx.stop()
    lost = sum(len(expected - rx.unique(p)) for p in paths)
    dups = sum(rx.duplicates(p) for p in paths)
    return {"events": len(expected), "deliveries": len(expected) * urls, "kills": kills,
            "lost": lost, "duplicates": dups, "duplicates_per_kill": round(dups / max(kills, 1), 1),
            "duplicate_bound_per_kill": max_concurrency,
            "resume_s_median": round(statistics.median(resume[1:] or resume), 2),
            "resume_s_max": round(max(resume[1:] or resume), 2),
            "rss_mb_max": _kb_to_mb(max((s for d in daemons for s in d.rss_samples), default=0)),
            "stuck": _not_delivered(dsn)}


def _all_delivered(dsn: str) -> bool:
    return _not_delivered(dsn) == 0 and not query(
        dsn, "SELECT 1 FROM qlm_bridge.event WHERE NOT fanned_out LIMIT 1")


def _not_delivered(dsn: str) -> int:
    return int(query(dsn, "SELECT count(*) FROM qlm_bridge.delivery "
                          "WHERE state <> 'delivered'")[0][0])


# --- case 2: database faults -----------------------------------------------------------------


TERMINATE = ("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
             "WHERE datname = current_database() AND application_name LIKE 'qlm-bridge%%' "
             "AND pid <> pg_backend_pid()")


async def database_faults(dsn: str, workdir: Path, *, terminations: int = 10,
                          restart: Callable[[], None] | None = None, restarts: int = 1,
                          gap: float = 1.0) -> dict[str, Any]:
    """Terminate the daemon's connections `terminations` times (and restart the server
    `restarts` times when `restart` is given) while events flow; time each resume."""
    rx = await Receiver().start()
    cfg = campaign_config(
        dsn, webhooks={"events": {"license_created": [rx.url("/a"), rx.url("/b")]}})
    d = DaemonProcess(workdir, cfg, name="dbfaults").start()
    counter = iter(range(10**9))
    resume_term: list[float] = []
    resume_restart: list[float] = []
    terminated = 0

    async def marker(prefix: str) -> float:
        """Insert one event once the database answers, then time until both URLs have it."""
        t0 = time.monotonic()
        n = next(counter)
        await insert_until_committed(dsn, prefix, n, 1)
        last = "SELECT event_id::text FROM qlm_bridge.event ORDER BY id DESC LIMIT 1"
        eid = (await asyncio.to_thread(query, dsn, last))[0][0]
        await rx.wait_for(lambda: eid in rx.unique("/a") and eid in rx.unique("/b"), 60,
                          f"marker event after a {prefix} fault")
        return time.monotonic() - t0

    try:
        await d.wait_ready(dsn)
        await marker("warm")
        for _ in range(terminations):
            await insert_until_committed(dsn, "bulk", next(counter) * 1000 + 10**6, 50)
            await asyncio.sleep(random.uniform(0, 0.3))
            terminated += (await asyncio.to_thread(query, dsn, TERMINATE))[0][0]
            resume_term.append(await marker("terminate"))
            await asyncio.sleep(gap * random.uniform(0.2, 1))
        if restart is not None:
            for _ in range(restarts):
                await insert_until_committed(dsn, "bulk", next(counter) * 1000 + 10**6, 50)
                await asyncio.to_thread(restart)
                resume_restart.append(await marker("restart"))
        expected = await asyncio.to_thread(event_ids, dsn)
        await rx.wait_for(lambda: len(rx.unique("/a")) >= len(expected)
                          and len(rx.unique("/b")) >= len(expected), 60, "every event")
        alive = d.proc is not None and d.proc.poll() is None
        await d.terminate()
    finally:
        d.kill()
        await rx.stop()
    lost = len(expected - rx.unique("/a")) + len(expected - rx.unique("/b"))
    out: dict[str, Any] = {
        "events": len(expected), "terminations": terminations,
        "connections_terminated": terminated, "lost": lost,
        "duplicates": rx.duplicates("/a") + rx.duplicates("/b"), "daemon_survived": alive,
        "resume_after_terminate_s_median": round(statistics.median(resume_term), 2)
        if resume_term else None,
        "resume_after_terminate_s_max": round(max(resume_term), 2) if resume_term else None,
    }
    if resume_restart:
        out["restarts"] = len(resume_restart)
        out["resume_after_restart_s_max"] = round(max(resume_restart), 2)
    return out


# --- case 3: receiver faults -----------------------------------------------------------------


def self_signed_cert(workdir: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl CLI)."""
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def server_ssl(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


FAULTS: dict[str, Callable[[], Behaviour]] = {
    "500": lambda: status(500),
    "429_retry_after": lambda: status(429, **{"Retry-After": "2"}),
    "301_elsewhere": lambda: redirect("/elsewhere"),
    "100mb_body": lambda: big_body(100 * 1024 * 1024),
    "slow_endless_body": lambda: slow_body(),
    "no_answer": black_hole,
    "connection_reset": reset,
}


async def receiver_faults(dsn: str, workdir: Path, *, good_events: int = 40,
                          spread: float = 8.0, max_retries: int = 3,
                          retry_interval: float = 0.5, timeout: float = 1.5) -> dict[str, Any]:
    """Each fault on its own URL (customer_created), a healthy URL (license_created) fed during
    the faults. Figures: attempts per fault vs the policy, the healthy URL's delivery and
    latency, daemon RSS (the kernel's high-water mark, so no peak is missed), and every request
    that is not a POST to a configured path (a followed redirect arrives as a GET)."""
    rx = await Receiver(behaviours={f"/{k}": f() for k, f in FAULTS.items()}).start()
    cert, key = self_signed_cert(workdir)
    tls = await Receiver(ssl_context=server_ssl(cert, key)).start()
    fault_urls = {k: rx.url(f"/{k}") for k in FAULTS} | {"tls_untrusted": tls.url("/tls")}
    cfg = campaign_config(dsn, webhooks={
        "events": {"customer_created": list(fault_urls.values()),
                   "license_created": [rx.url("/good")]},
        "max_retries": max_retries, "retry_interval": retry_interval, "timeout": timeout,
        "max_response_body": 4096, "per_url_concurrency": 4})
    d = DaemonProcess(workdir, cfg, name="rxfaults").start()
    inserted: dict[str, float] = {}
    try:
        await d.wait_ready(dsn)
        await asyncio.sleep(0.5)
        baseline = d.peak_rss_kb()
        await asyncio.to_thread(execute, dsn, "INSERT INTO customers (full_name) VALUES ('F')")
        for i in range(good_events):
            await asyncio.to_thread(insert_licenses, dsn, "G", i, 1)
            inserted[f"G{i}"] = time.monotonic()
            await asyncio.sleep(spread / good_events)
        await rx.wait_for(lambda: len(rx.unique("/good")) >= good_events, 30, "healthy URL")
        final = 1 + max_retries

        def settled() -> bool:
            rows = query(dsn, "SELECT count(*) FROM qlm_bridge.delivery WHERE state = 'pending'")
            return int(rows[0][0]) == 0

        await rx.wait_for(settled, 60, "every fault to settle")
        attempts = await asyncio.to_thread(attempts_by_url, dsn)
        states = dict(await asyncio.to_thread(
            query, dsn, "SELECT url, state FROM qlm_bridge.delivery"))
        bodies = await asyncio.to_thread(
            query, dsn, "SELECT max(length(response_body)) FROM qlm_bridge.attempt_log")
        ra = [h.at for h in rx.received if h.path == "/429_retry_after"]
        peak = d.peak_rss_kb()
        await d.terminate()
    finally:
        d.kill()
        await rx.stop()
        await tls.stop()
    latencies = sorted(h.at - inserted.get(_key_of(h), h.at) for h in rx.on("/good"))
    cases = {}
    for name, url in fault_urls.items():
        tries = attempts.get(url, [])
        cases[name] = {"attempts": len(tries), "policy_attempts": final,
                       "state": states.get(url), "last": (tries[-1] if tries else None)}
    cases["429_retry_after"]["min_gap_s"] = round(min(
        (b - a for a, b in itertools.pairwise(ra)), default=0), 2)
    configured = {f"/{k}" for k in FAULTS} | {"/good"}
    cases["301_elsewhere"]["followed"] = len(rx.anything_but(configured))
    return {
        "cases": cases,
        "good_delivered": len(rx.unique("/good")), "good_expected": good_events,
        "good_latency_s_p50": round(statistics.median(latencies), 3) if latencies else None,
        "good_latency_s_max": round(max(latencies), 3) if latencies else None,
        "rss_mb_baseline": _kb_to_mb(baseline), "rss_mb_peak": _kb_to_mb(peak),
        "max_stored_response_body": bodies[0][0],
    }


def _key_of(hit: Received) -> str:
    info = json.loads(hit.body).get("LicenseInfo") or {}
    return str(info.get("ActivationKey", ""))


async def receiver_down(dsn: str, workdir: Path, *, down: float = 30.0,
                        retry_interval: float = 1.0, events: int = 20) -> dict[str, Any]:
    """The receiver is down for `down` seconds, then back on the same port."""
    rx = await Receiver().start()
    port = rx.port
    max_retries = int(down / retry_interval) * 2 + 5
    cfg = campaign_config(dsn, webhooks={"events": {"license_created": [rx.url("/down")]},
                                     "retry_interval": retry_interval,
                                     "max_retries": max_retries})
    d = DaemonProcess(workdir, cfg, name="rxdown").start()
    try:
        await d.wait_ready(dsn)
        await rx.stop()
        went_down = time.monotonic()
        await asyncio.to_thread(insert_licenses, dsn, "D", 0, events)
        await asyncio.sleep(down)
        rx = Receiver(port=port)
        await rx.start()
        back = time.monotonic()
        await rx.wait_for(lambda: len(rx.unique("/down")) >= events, 30, "delivery once back")
        first = min(h.at for h in rx.received)
        attempts = await asyncio.to_thread(
            query, dsn, "SELECT max(attempts), min(attempts) FROM qlm_bridge.delivery")
        await d.terminate()
    finally:
        d.kill()
        await rx.stop()
    return {"down_s": round(back - went_down, 1), "events": events,
            "delivered": len(rx.unique("/down")), "lost": events - len(rx.unique("/down")),
            "attempts_max": attempts[0][0], "attempts_min": attempts[0][1],
            "policy": f"fixed {retry_interval:g} s, max_retries {max_retries}",
            "resume_s": round(first - back, 2)}


# --- case 4: soak ----------------------------------------------------------------------------


async def soak(dsn: str, workdir: Path, *, seconds: float = 1800, rate: float = 20,
               failure_rate: float = 0.1, prune_interval: float = 10,
               sample_every: float = 5) -> dict[str, Any]:
    """A steady rate of events to a flaky receiver with scheduled prune running."""
    rx = await Receiver(behaviours={"/flaky": flaky(failure_rate)}).start()
    cfg = campaign_config(dsn, webhooks={"events": {"license_created": [rx.url("/flaky"),
                                                                    rx.url("/ok")]},
                                     "max_retries": 8},
                      retention={"delivered_days": 1 / 86400 * 5, "log_days": 1 / 86400 * 5,
                                 "prune_interval": prune_interval})
    d = DaemonProcess(workdir, cfg, name="soak").start()
    samples: list[dict[str, Any]] = []
    sent = 0
    try:
        await d.wait_ready(dsn)
        start = time.monotonic()
        next_sample = start
        while time.monotonic() - start < seconds:
            await asyncio.to_thread(insert_licenses, dsn, "S", sent, 1)
            sent += 1
            await asyncio.sleep(1 / rate)
            if time.monotonic() >= next_sample:
                next_sample += sample_every
                rows = await asyncio.to_thread(query, dsn, """
                    SELECT (SELECT count(*) FROM qlm_bridge.event),
                           (SELECT count(*) FROM qlm_bridge.delivery),
                           (SELECT count(*) FROM qlm_bridge.attempt_log),
                           (SELECT count(*) FROM pg_stat_activity
                             WHERE datname = current_database()
                               AND application_name LIKE 'qlm-bridge%%')""")
                samples.append({"t": round(time.monotonic() - start), "rss_kb": d.rss_kb(),
                                "fds": d.open_fds(), "events": rows[0][0],
                                "deliveries": rows[0][1], "log_rows": rows[0][2],
                                "db_conns": rows[0][3]})
        await rx.wait_for(lambda: len(rx.unique("/ok")) >= sent
                          and len(rx.unique("/flaky")) >= sent, 60, "drain")
        await d.terminate()
    finally:
        d.kill()
        await rx.stop()
    errors = [line for line in d.log().splitlines() if " ERROR " in line or "Traceback" in line]
    half = samples[len(samples) // 2:] or samples
    return {
        "seconds": seconds, "events": sent, "lost": 2 * sent - len(rx.unique("/ok"))
        - len(rx.unique("/flaky")),
        "rss_mb_first": _kb_to_mb(samples[0]["rss_kb"]) if samples else None,
        "rss_mb_second_half_max": _kb_to_mb(max(s["rss_kb"] for s in half)) if half else None,
        "rss_mb_last": _kb_to_mb(samples[-1]["rss_kb"]) if samples else None,
        "fds_first": samples[0]["fds"] if samples else None,
        "fds_max": max(s["fds"] for s in samples) if samples else None,
        "db_conns_max": max(s["db_conns"] for s in samples) if samples else None,
        "queue_rows_max": max(s["deliveries"] for s in samples) if samples else None,
        "queue_rows_last": samples[-1]["deliveries"] if samples else None,
        "log_rows_last": samples[-1]["log_rows"] if samples else None,
        "unexplained_errors": errors[:5], "samples": samples,
    }


def dump(figures: dict[str, Any]) -> str:
    return json.dumps(figures, indent=2, default=str)


def now_iso() -> str:
    return datetime.now().isoformat(timespec="seconds")
