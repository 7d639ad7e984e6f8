"""Metrics (Prometheus), health endpoints and logging setup."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

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
    """One registry per daemon process, so tests and several daemons in one process don't
    collide. Every metric has a `site` label (one daemon serves several license databases);
    each site records through its own `SiteMetrics` view, which fills that label in."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        s = ["site"]
        self.fanned_out = Counter("qlm_bridge_events_fanned_out_total",
                                  "Captured events fanned out to deliveries, by event type",
                                  [*s, "event_type"], registry=r)
        self.attempts = Counter("qlm_bridge_delivery_attempts_total",
                                "HTTP invocations by outcome",
                                [*s, "event_type", "url", "outcome"], registry=r)
        self.delivered = Counter("qlm_bridge_deliveries_delivered_total",
                                 "Deliveries that succeeded", [*s, "event_type", "url"],
                                 registry=r)
        self.failed = Counter("qlm_bridge_deliveries_failed_total",
                              "Deliveries that exhausted their retries",
                              [*s, "event_type", "url"], registry=r)
        self.retried = Counter("qlm_bridge_deliveries_retried_total",
                               "Failed attempts scheduled for a retry",
                               [*s, "event_type", "url"], registry=r)
        self.latency = Histogram(
            "qlm_bridge_delivery_duration_seconds", "HTTP request duration", [*s, "url"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r)
        self.end_to_end = Histogram(
            "qlm_bridge_commit_to_delivery_seconds", "Capture to successful delivery", s,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 300),
            registry=r)
        self.in_flight = Gauge("qlm_bridge_in_flight", "Requests in flight", s, registry=r)
        self.queue_depth = Gauge("qlm_bridge_queue_depth",
                                 "Pending deliveries (an event not fanned out yet counts as one)",
                                 s, registry=r)
        self.oldest_pending = Gauge("qlm_bridge_oldest_pending_seconds",
                                    "Age of the oldest pending delivery", s, registry=r)
        self.listener_connected = Gauge("qlm_bridge_listener_connected",
                                        "1 while the LISTEN connection is up", s, registry=r)
        self.notifications_arrive = Gauge(
            "qlm_bridge_notifications_arrive",
            "1 while a probe NOTIFY sent through the query pool comes back on the LISTEN "
            "connection; 0 means delivery relies on polling (see database.listen_dsn)", s,
            registry=r)
        self.breaker_open = Gauge("qlm_bridge_circuit_breaker_open",
                                  "1 while an endpoint's circuit breaker is open", [*s, "url"],
                                  registry=r)
        self.site_ready = Gauge("qlm_bridge_site_ready",
                                "1 while the site's database and LISTEN are up", s, registry=r)
        self.db_errors = Counter("qlm_bridge_database_errors_total",
                                 "Database errors the daemon recovered from", s, registry=r)

    def site(self, name: str) -> SiteMetrics:
        return SiteMetrics(self, name)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Bound:
    """One metric with the site label filled in: `.labels(rest...)`, or inc/set/observe for a
    metric whose only label is the site."""

    def __init__(self, metric: Any, site: str) -> None:
        self._metric = metric
        self._site = site

    def labels(self, *values: str) -> Any:
        return self._metric.labels(self._site, *values)

    def inc(self, amount: float = 1) -> None:
        self._metric.labels(self._site).inc(amount)

    def set(self, value: float) -> None:
        self._metric.labels(self._site).set(value)

    def observe(self, value: float) -> None:
        self._metric.labels(self._site).observe(value)


class SiteMetrics:
    """The metrics of one site (the same names as `Metrics`, site label bound)."""

    def __init__(self, metrics: Metrics, site: str) -> None:
        self.site = site
        self.parent = metrics
        for name in ("fanned_out", "attempts", "delivered", "failed", "retried", "latency",
                     "end_to_end", "in_flight", "queue_depth", "oldest_pending",
                     "listener_connected", "notifications_arrive", "breaker_open",
                     "site_ready", "db_errors"):
            setattr(self, name, _Bound(getattr(metrics, name), site))
        for metric in (metrics.end_to_end, metrics.in_flight, metrics.queue_depth,
                       metrics.oldest_pending, metrics.listener_connected, metrics.site_ready,
                       metrics.db_errors):
            metric.labels(site)  # shown (as 0) from the start, not from the first change

    fanned_out: _Bound
    attempts: _Bound
    delivered: _Bound
    failed: _Bound
    retried: _Bound
    latency: _Bound
    end_to_end: _Bound
    in_flight: _Bound
    queue_depth: _Bound
    oldest_pending: _Bound
    listener_connected: _Bound
    notifications_arrive: _Bound
    breaker_open: _Bound
    site_ready: _Bound
    db_errors: _Bound


# readiness of one site (by name) or of all (None): (ready, detail, {site: (ready, detail)}),
# or None for a site name that does not exist
Check = Callable[[str | None], Awaitable[tuple[bool, str, dict[str, tuple[bool, str]]] | None]]


class Mountable(Protocol):
    """Something that adds its routes to the app (the web console, bridge/console/)."""

    def install(self, app: web.Application) -> None: ...


async def serve(host: str, port: int, metrics: Metrics, ready: Check,
                refresh: Callable[[], Awaitable[None]] | None = None,
                console: Mountable | None = None) -> web.AppRunner:
    """Serve /metrics, /healthz (process alive), /readyz (every enabled site's database and
    LISTEN up; `/readyz?site=NAME` checks one site) and, when given, the console's /console
    paths."""

    async def metrics_handler(_: web.Request) -> web.Response:
        if refresh is not None:
            with contextlib.suppress(Exception):  # the gauges keep their last value
                await refresh()
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        site = request.query.get("site")
        answer = await ready(site)
        if answer is None:
            return web.json_response({"ready": False, "detail": f"no site {site!r}"},
                                     status=404)
        ok, detail, sites = answer
        body = {"ready": ok, "detail": detail,
                "sites": {name: {"ready": r, "detail": d} for name, (r, d) in sites.items()}}
        return web.json_response(body, status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if console is not None:
        console.install(app)
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


# The site a task works for: each site's services run in a task started with it set, and every
# log line they write carries it (`site=eu`); unset for a config without `sites:`.
current_site: contextvars.ContextVar[str | None] = contextvars.ContextVar("site", default=None)


class SiteFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        site = current_site.get()
        if site is not None:
            fields = getattr(record, "fields", None)
            record.fields = {"site": site, **(fields if isinstance(fields, dict) else {})}
        return True


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(SiteFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("asyncio").setLevel(logging.WARNING)
