"""Observability: /metrics, /healthz, /readyz scraped from a running daemon; JSON log lines."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bridge.daemon import Daemon
from bridge.observe import JsonFormatter, TextFormatter
from tests.support.net import free_port
from tests.support.receiver import Receiver, status
from tests.support.server import Db

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]



def _parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _get(samples: Samples, name: str, **labels: str) -> float | None:
    """A sample of the (only) site, "default", unless another site is named."""
    labels.setdefault("site", "default")
    return samples.get((name, frozenset(labels.items())))


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class Scraper:
    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session, self.base = session, f"http://127.0.0.1:{port}"
        self.samples: Samples = {}
        self.last: tuple[int, dict[str, Any]] = (0, {})

    async def metrics(self) -> Samples:
        async with self.session.get(self.base + "/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            self.samples = _parse(await resp.text())
            return self.samples

    async def json(self, path: str) -> tuple[int, dict[str, Any]]:
        async with self.session.get(self.base + path) as resp:
            self.last = (resp.status, await resp.json())
            return self.last


def _delivered_and_queued(scraper: Scraper, a: str, down: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        m = await scraper.metrics()
        return (_get(m, "qlm_bridge_deliveries_delivered_total", event_type="license_created",
                     url=a) == 1
                and _get(m, "qlm_bridge_deliveries_retried_total",
                         event_type="customer_created", url=down) == 1
                and _get(m, "qlm_bridge_queue_depth") == 1)
    return check


async def _scrape_a_running_daemon(db: Db) -> None:
    rx = await Receiver(behaviours={"/down": status(503)}).start()
    a, down = rx.url("/a"), rx.url("/down")
    port = free_port()
    cfg = db.config(
        webhooks={"events": {"customer_created": [a, down], "license_created": [a]},
                  "retry_interval": 300, "max_retries": 3},
        observe={"listen": f"127.0.0.1:{port}"})
    d = Daemon(cfg)
    task = asyncio.create_task(d.run())
    try:
        await asyncio.wait_for(d.ready.wait(), 10)
        async with aiohttp.ClientSession() as session:
            scraper = Scraper(session, port)

            async def ready() -> bool:
                code, _ = await scraper.json("/readyz")
                return code == 200

            # ready: the database answers and a probe NOTIFY came back on the LISTEN connection
            await _until(ready, "/readyz to answer 200")
            before_ann = time.monotonic()
            db.execute("INSERT INTO customers (full_name) VALUES ('Ann')")
            db.execute("INSERT INTO license_keys (activation_key, customer_id) VALUES ('K1', 1)")
            await _until(_delivered_and_queued(scraper, a, down), "the delivery metrics")
            m = scraper.samples
            delivered = "qlm_bridge_deliveries_delivered_total"
            assert _get(m, delivered, event_type="customer_created", url=a) == 1
            assert _get(m, delivered, event_type="customer_created", url=down) is None
            attempts = "qlm_bridge_delivery_attempts_total"
            assert _get(m, attempts, event_type="customer_created", url=down,
                        outcome="failure") == 1
            assert _get(m, attempts, event_type="license_created", url=a, outcome="success") == 1
            hist = "qlm_bridge_delivery_duration_seconds"
            assert _get(m, hist + "_count", url=a) == 2
            assert _get(m, hist + "_count", url=down) == 1
            assert _get(m, hist + "_bucket", url=a, le="+Inf") == 2
            assert _get(m, "qlm_bridge_commit_to_delivery_seconds_count") == 2
            captured = "qlm_bridge_events_fanned_out_total"
            assert _get(m, captured, event_type="customer_created") == 1
            assert _get(m, captured, event_type="license_created") == 1
            assert _get(m, "qlm_bridge_listener_connected") == 1
            assert _get(m, "qlm_bridge_notifications_arrive") == 1  # the probe came back
            # the one pending delivery (to /down) is the oldest: its age is bounded by the time
            # since Ann was written, and it keeps growing while it waits
            oldest = _get(m, "qlm_bridge_oldest_pending_seconds")
            assert oldest is not None and 0 < oldest <= time.monotonic() - before_ann + 0.5
            await asyncio.sleep(1)
            later = _get(await scraper.metrics(), "qlm_bridge_oldest_pending_seconds")
            assert later is not None and later - oldest >= 0.9
            m = scraper.samples
            assert _get(m, "qlm_bridge_in_flight") == 0
            assert await scraper.json("/healthz") == (200, {"status": "ok"})
            code, body = await scraper.json("/readyz")
            assert (code, body["ready"]) == (200, True), body

            # The database refuses connections and the daemon's sessions are cut: not ready.
            db.server.execute(f"ALTER DATABASE {db.name} ALLOW_CONNECTIONS false")
            db.server.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              f"WHERE datname = '{db.name}'")

            async def not_ready() -> bool:
                code, _ = await scraper.json("/readyz")
                return code == 503

            await _until(not_ready, "/readyz to answer 503")
            assert scraper.last[1]["ready"] is False
            assert (await scraper.json("/healthz"))[0] == 200  # alive, just not ready

            async def listener_down() -> bool:
                return _get(await scraper.metrics(), "qlm_bridge_listener_connected") == 0

            await _until(listener_down, "listener_connected to drop to 0")

            async def errors_counted() -> bool:
                errors = _get(await scraper.metrics(), "qlm_bridge_database_errors_total")
                return errors is not None and errors >= 1

            await _until(errors_counted, "the database errors to be counted")

            # Back again: the listener reconnects and the daemon is ready once more.
            db.server.execute(f"ALTER DATABASE {db.name} ALLOW_CONNECTIONS true")
            await _until(ready, "/readyz to recover")
            assert _get(await scraper.metrics(), "qlm_bridge_listener_connected") == 1
    finally:
        db.server.execute(f"ALTER DATABASE {db.name} ALLOW_CONNECTIONS true")
        d.stop()
        await asyncio.wait_for(task, 15)
        await rx.stop()


def test_metrics_health_and_readiness(db: Db) -> None:
    asyncio.run(_scrape_a_running_daemon(db))


async def _json_logs(db: Db, config_path: Path) -> list[dict[str, Any]]:
    rx = await Receiver(behaviours={"/down": status(500)}).start()
    a, down = rx.url("/a"), rx.url("/down")
    config_path.write_text(yaml.safe_dump({
        "database": {"dsn": db.dsn},
        "webhooks": {"secret_key": "test-secret", "retry_interval": 0.2, "timeout": 2,
                     "max_retries": 1, "events": {"customer_created": [a, down]}},
        "daemon": {"poll_interval": 0.5, "lease": 5, "heartbeat_interval": 0.5,
                   "shutdown_timeout": 5},
        "observe": {"log_format": "json", "log_level": "info"},
    }))
    # Captured before the daemon starts: the outbox, not NOTIFY, is the source of truth.
    db.execute("INSERT INTO customers (full_name) VALUES ('Ann')")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("QLM_BRIDGE_CONFIG", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "run", "--config", str(config_path),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=env)
    try:
        await rx.wait_for(lambda: len(rx.on("/a")) == 1 and len(rx.on("/down")) == 2)
        proc.send_signal(signal.SIGTERM)  # graceful: in-flight attempts finish and are logged
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await rx.stop()
    assert proc.returncode == 0, stderr.decode()
    lines = stderr.decode().splitlines()
    assert lines
    return [json.loads(line) for line in lines]  # every line is one JSON object


def test_json_log_lines_carry_the_delivery_fields(db: Db, tmp_path: Path) -> None:
    records = asyncio.run(_json_logs(db, tmp_path / "bridge.yaml"))
    event_id = db.scalar("SELECT event_id::text FROM qlm_bridge.event")
    a_url = next(r["url"] for r in records if r.get("url", "").endswith("/a"))
    down_url = a_url.removesuffix("/a") + "/down"
    deliveries = [r for r in records if "event_id" in r]
    for r in deliveries:
        assert {"ts", "level", "logger", "msg", "event_id", "event_type", "url", "attempt",
                "status", "duration_ms"} <= r.keys(), r
        assert r["event_id"] == event_id
        assert r["event_type"] == "customer_created"
        assert isinstance(r["duration_ms"], int | float) and r["duration_ms"] >= 0
    ok = [r for r in deliveries if r["url"] == a_url]
    assert [(r["level"], r["msg"], r["attempt"], r["status"]) for r in ok] == [
        ("info", "delivered", 1, 200)]
    failed = [(r["level"], r["attempt"], r["status"]) for r in deliveries
              if r["url"] == down_url]
    assert failed == [("warning", 1, 500), ("error", 2, 500)]
    assert any("started" in r["msg"] for r in records)
    assert any("stopped" in r["msg"] for r in records)


def _record(msg: str, fields: dict[str, Any] | None) -> logging.LogRecord:
    record = logging.LogRecord("bridge.daemon", logging.INFO, __file__, 1, msg, (), None)
    if fields is not None:
        record.fields = fields
    return record


def test_formatters_render_the_fields() -> None:
    fields = {"event_id": "e1", "event_type": "license_created", "url": "http://x/",
              "attempt": 1, "status": 200, "duration_ms": 3.2}
    line = json.loads(JsonFormatter().format(_record("delivered", fields)))
    assert line["msg"] == "delivered" and line["level"] == "info"
    assert {k: line[k] for k in fields} == fields
    assert line["ts"].endswith("Z")
    text = TextFormatter().format(_record("delivered", fields))
    assert text.endswith("delivered event_id=e1 event_type=license_created url=http://x/ "
                         "attempt=1 status=200 duration_ms=3.2")
    assert "fields" not in json.loads(JsonFormatter().format(_record("plain", None)))
