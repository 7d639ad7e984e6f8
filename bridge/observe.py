"""Metrics (Prometheus), health endpoints and logging setup."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    """One registry per daemon, so tests and several daemons in one process don't collide."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.fanned_out = Counter("qlm_bridge_events_fanned_out_total",
                                  "Captured events fanned out to deliveries, by event type",
                                  ["event_type"], registry=r)
        self.attempts = Counter("qlm_bridge_delivery_attempts_total",
                                "HTTP invocations by outcome",
                                ["event_type", "url", "outcome"], registry=r)
        self.delivered = Counter("qlm_bridge_deliveries_delivered_total",
                                 "Deliveries that succeeded", ["event_type", "url"], registry=r)
        self.failed = Counter("qlm_bridge_deliveries_failed_total",
                              "Deliveries that exhausted their retries",
                              ["event_type", "url"], registry=r)
        self.retried = Counter("qlm_bridge_deliveries_retried_total",
                               "Failed attempts scheduled for a retry",
                               ["event_type", "url"], registry=r)
        self.latency = Histogram(
            "qlm_bridge_delivery_duration_seconds", "HTTP request duration", ["url"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r)
        self.end_to_end = Histogram(
            "qlm_bridge_commit_to_delivery_seconds", "Capture to successful delivery",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 300),
            registry=r)
        self.in_flight = Gauge("qlm_bridge_in_flight", "Requests in flight", registry=r)
        self.queue_depth = Gauge("qlm_bridge_queue_depth", "Pending deliveries", registry=r)
        self.oldest_pending = Gauge("qlm_bridge_oldest_pending_seconds",
                                    "Age of the oldest pending delivery", registry=r)
        self.listener_connected = Gauge("qlm_bridge_listener_connected",
                                        "1 while the LISTEN connection is up", registry=r)
        self.notifications_arrive = Gauge(
            "qlm_bridge_notifications_arrive",
            "1 while a probe NOTIFY sent through the query pool comes back on the LISTEN "
            "connection; 0 means delivery relies on polling (see database.listen_dsn)",
            registry=r)
        self.db_errors = Counter("qlm_bridge_database_errors_total",
                                 "Database errors the daemon recovered from", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


Check = Callable[[], Awaitable[tuple[bool, str]]]


async def serve(host: str, port: int, metrics: Metrics, ready: Check,
                refresh: Callable[[], Awaitable[None]] | None = None) -> web.AppRunner:
    """Serve /metrics, /healthz (process alive) and /readyz (database and LISTEN up)."""

    async def metrics_handler(_: web.Request) -> web.Response:
        if refresh is not None:
            try:
                await refresh()
            except Exception:  # the gauges keep their last value
                metrics.db_errors.inc()
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ok, detail = await ready()
        return web.json_response({"ready": ok, "detail": detail}, status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("asyncio").setLevel(logging.WARNING)
