"""The operator's commands: status, replay, prune and send-test.

One-shot commands on a short-lived psycopg connection (autocommit: every statement is its own
short transaction). The SQL is in `sql/ops.sql`; time is injectable (`now=`) so tests need no
sleeps. `prune_once` is also what the daemon runs on its schedule.
"""

from __future__ import annotations

import asyncio
import functools
import http
import json
import re
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import psycopg

from bridge import sql
from bridge.config import Config, check_url, redact_url
from bridge.connect import describe_error, psycopg_connect
from bridge.dispatch import Dispatcher, sanitize
from bridge.engine.policy import EndpointPolicy, Policies, policy_for
from bridge.errors import BridgeError, ConfigError
from bridge.events import ALL_EVENTS, kind_of
from bridge.payload import Event

Conn = psycopg.Connection[tuple[Any, ...]]
Progress = Callable[[int], None]

REPLAY_BATCH = 5000
RESPONSE_SHOWN = 500  # characters of the response body send-test prints


# --- plumbing --------------------------------------------------------------------------------


@functools.cache
def _queries(schema: str) -> dict[str, str]:
    return {name: sql.render(text, schema=sql.quote_ident(schema))
            for name, text in sql.blocks("ops.sql").items()}


@contextmanager
def _connection(conn_or_dsn: Conn | str, config: Config) -> Iterator[Conn]:
    """Use the caller's connection, or open (and close) one from a DSN."""
    if not isinstance(conn_or_dsn, str):
        yield conn_or_dsn
        return
    conn = psycopg_connect(config.database, dsn=conn_or_dsn, autocommit=True)
    try:
        yield conn
    finally:
        conn.close()


@contextmanager
def _session(conn_or_dsn: Conn | str, config: Config) -> Iterator[tuple[Conn, dict[str, str]]]:
    """A connection and the rendered queries, after checking that the bridge is installed;
    database errors become one clear BridgeError."""
    schema = config.database.schema_name
    q = _queries(schema)
    try:
        with _connection(conn_or_dsn, config) as conn:
            row = conn.execute(q["installed"],
                               {"qualified": f"{sql.quote_ident(schema)}.delivery"}).fetchone()
            if not row or not row[0]:
                raise BridgeError(f"the bridge schema {schema!r} is not installed in this "
                                  "database; run `qlm-bridge install` first")
            yield conn, q
    except psycopg.Error as exc:
        raise BridgeError(f"database error: {describe_error(exc, config.database)}") from None


# --- durations and times ---------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``15m``, ``2h``, ``7d``, ``1w`` or combinations (``1h30m``)."""
    compact = text.strip().lower().replace(" ", "")
    if not compact:
        raise ValueError("empty duration")
    if re.fullmatch(r"\d+(\.\d+)?", compact):
        raise ValueError(f"{text!r} needs a unit: s, m, h, d or w (e.g. 2h, 7d)")
    pos, total = 0, 0.0
    for match in _DURATION.finditer(compact):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(compact):
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 2h, 7d or 1h30m")
    return total


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """An ISO-8601 time (local time zone when none is given) or a duration ago (``2h``)."""
    try:
        seconds = parse_duration(text)
    except ValueError:
        pass
    else:
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither an ISO time (2026-01-31T12:00:00Z) nor a "
                         "duration ago (2h, 7d)") from None
    return moment if moment.tzinfo else moment.astimezone()


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


# --- status ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusRow:
    url: str
    event_type: str
    pending: int
    in_flight: int
    retrying: int
    failed: int
    skipped: int
    delivered: int


COUNTS = ("pending", "in_flight", "retrying", "failed", "skipped", "delivered")


@dataclass(frozen=True)
class DaemonRow:
    id: str
    hostname: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age: float
    config_hash: str | None
    stale: bool
    gone_at: datetime | None = None  # marked gone by a live daemon (missed heartbeats)


@dataclass(frozen=True)
class EndpointRow:
    """Shared state of an endpoint with a rate limit or a circuit breaker."""

    url: str
    rate_limit: float | None
    breaker: str  # "closed", "open (12 s left)", "half-open (probing)" or "-"
    failures: int


@dataclass(frozen=True)
class Status:
    now: datetime
    deliveries: tuple[StatusRow, ...]
    unfanned_events: int
    oldest_pending_age: float | None
    daemons: tuple[DaemonRow, ...]
    endpoints: tuple[EndpointRow, ...] = ()

    def totals(self) -> dict[str, int]:
        return {c: sum(getattr(r, c) for r in self.deliveries) for c in COUNTS}

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["now"] = self.now.isoformat()
        for d in out["daemons"]:
            d["started_at"] = d["started_at"].isoformat()
            d["heartbeat_at"] = d["heartbeat_at"].isoformat()
            d["gone_at"] = d["gone_at"].isoformat() if d["gone_at"] else None
        out["totals"] = self.totals()
        return out


def status(conn_or_dsn: Conn | str, config: Config, now: datetime | None = None) -> Status:
    """Queue counts per URL and event type, the fan-out backlog, the oldest wait, the daemons."""
    params = {"now": now}
    stale_after = max(3 * config.daemon.heartbeat_interval, 15.0)
    with _session(conn_or_dsn, config) as (conn, q):
        rows = tuple(StatusRow(redact_url(r[0]), r[1], *(int(v) for v in r[2:]))
                     for r in conn.execute(q["status_deliveries"], params).fetchall())
        summary = conn.execute(q["status_summary"], params).fetchone()
        daemons = tuple(
            DaemonRow(r[0], r[1], r[2], r[3], r[4], float(r[5]), r[6],
                      float(r[5]) > stale_after, r[7])
            for r in conn.execute(q["status_daemons"], params).fetchall())
        endpoints = tuple(endpoint_row(config, r)
                          for r in conn.execute(q["status_endpoints"], params).fetchall())
    assert summary is not None
    return Status(summary[2], rows, int(summary[0]), summary[1], daemons, endpoints)


def endpoint_row(config: Config, r: Sequence[Any]) -> EndpointRow:
    """One `status_endpoints` row (url, failures, open, open_for) as shown (status, console)."""
    url, failures, is_open, open_for = r[0], int(r[1]), bool(r[2]), r[3]
    ep = config.webhooks.endpoints.get(url)
    if is_open:
        breaker = f"open ({format_age(open_for)} left)"
    elif open_for is not None:
        breaker = "half-open (next request is a probe)"
    elif ep is not None and ep.circuit_breaker is not None:
        breaker = "closed"
    else:
        breaker = "-"
    return EndpointRow(redact_url(url), ep.rate_limit if ep is not None else None, breaker,
                       failures)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    out = []
    for row in (header, *rows):
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        out.append("  ".join(cells).rstrip())
    return out


def format_status(report: Status) -> str:
    lines = [f"qlm-bridge status at {report.now.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC", ""]
    header = ["URL", "EVENT", "PENDING", "IN-FLIGHT", "RETRYING", "FAILED", "SKIPPED",
              "DELIVERED"]
    right = set(range(2, 8))
    if report.deliveries:
        body_rows = [[r.url, r.event_type, *(str(getattr(r, c)) for c in COUNTS)]
                     for r in report.deliveries]
        totals = report.totals()
        body_rows.append(["TOTAL", "", *(str(totals[c]) for c in COUNTS)])
        lines += _table(header, body_rows, right)
    else:
        lines.append("no deliveries recorded yet")
    lines += ["", f"events waiting for fan-out: {report.unfanned_events}",
              f"oldest pending: {format_age(report.oldest_pending_age)}", ""]
    if report.daemons:
        lines.append(f"daemons ({len(report.daemons)}):")
        lines += _table(
            ["ID", "HOST", "PID", "STARTED (UTC)", "LAST HEARTBEAT", "CONFIG"],
            [[d.id, d.hostname, str(d.pid), f"{d.started_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}",
              f"{format_age(d.heartbeat_age)} ago" + _daemon_note(d),
              d.config_hash or "-"] for d in report.daemons],
            {2})
    else:
        lines.append("daemons: none seen (is `qlm-bridge run` running?)")
    if report.endpoints:
        lines += ["", f"endpoints with shared limits ({len(report.endpoints)}):"]
        lines += _table(["URL", "RATE LIMIT", "BREAKER", "FAILURES IN A ROW"],
                        [[e.url, f"{e.rate_limit:g}/s" if e.rate_limit else "-", e.breaker,
                          str(e.failures)] for e in report.endpoints], {3})
    return "\n".join(lines)


def _daemon_note(d: DaemonRow) -> str:
    if d.gone_at is not None:
        return f" (gone: missed heartbeats; seen gone at {d.gone_at.astimezone(UTC):%H:%M:%S})"
    return " (stale)" if d.stale else ""


# --- replay ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayFilter:
    event_ids: tuple[uuid.UUID, ...] = ()
    urls: tuple[str, ...] = ()
    event_types: tuple[str, ...] = ()
    since: datetime | None = None
    all_states: bool = False
    only_states: tuple[str, ...] = ()  # narrower than the default, e.g. ("failed",) (console)

    def is_empty(self) -> bool:
        return not (self.event_ids or self.urls or self.event_types or self.since)

    def states(self) -> list[str]:
        if self.only_states:
            return list(self.only_states)
        return ["failed", "skipped", "delivered"] if self.all_states else ["failed", "skipped"]


@dataclass(frozen=True)
class ReplayResult:
    requeued: int
    created: int  # new delivery rows for URLs configured now (replay by event id)
    unknown_event_ids: tuple[uuid.UUID, ...] = field(default=())

    @property
    def queued(self) -> int:
        return self.requeued + self.created


def replay(conn_or_dsn: Conn | str, config: Config, selection: ReplayFilter,
           now: datetime | None = None, progress: Progress | None = None,
           batch_size: int = REPLAY_BATCH) -> ReplayResult:
    """Re-queue matching failed/skipped (and with all_states, delivered) deliveries: pending,
    attempts 0, due now, unlocked. In batches, each its own transaction."""
    for event_type in selection.event_types:
        if event_type not in ALL_EVENTS:
            raise ConfigError(f"unknown event type {event_type!r} (known: {', '.join(ALL_EVENTS)})")
    ids = [str(e) for e in selection.event_ids] or None
    params: dict[str, Any] = {
        "states": selection.states(), "event_ids": ids,
        "urls": list(selection.urls) or None, "event_types": list(selection.event_types) or None,
        "since": selection.since, "now": now, "batch": batch_size, "after": 0,
    }
    requeued = created = 0
    unknown: tuple[uuid.UUID, ...] = ()
    with _session(conn_or_dsn, config) as (conn, q):
        while True:
            got = [r[0] for r in conn.execute(q["replay_batch"], params).fetchall()]
            requeued += len(got)
            if progress and got:
                progress(len(got))
            if len(got) < batch_size:
                break
            params["after"] = max(got)
        if ids:
            known = {r[0] for r in conn.execute(q["known_event_ids"], {"event_ids": ids})}
            unknown = tuple(e for e in selection.event_ids if e not in known)
            subs = [(t, u) for t, u in config.webhooks.subscriptions()
                    if not selection.event_types or t in selection.event_types]
            if subs:
                created = len(conn.execute(q["replay_fan_out"], {
                    "sub_types": [t for t, _ in subs], "sub_urls": [u for _, u in subs],
                    "event_ids": ids, "urls": params["urls"], "now": now}).fetchall())
                if progress and created:
                    progress(created)
        if requeued or created:
            conn.execute(q["wake_daemons"], {"channel": config.database.channel})
    return ReplayResult(requeued, created, unknown)


# --- prune -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneProgress:
    events: int
    logs: int


Run = Callable[[str, dict[str, Any]], Awaitable[list[Any]]]


async def prune(run: Run, config: Config, now: datetime | None = None, *,
                older_than: float | None = None, logs_older_than: float | None = None,
                progress: Callable[[PruneProgress], None] | None = None) -> tuple[int, int]:
    """Delete settled events (all deliveries delivered or skipped, or none) older than
    retention.delivered_days and attempt_log rows older than retention.log_days, in batches of
    retention.batch_size, each batch its own short transaction. Returns (events, log rows).
    `run(block, params)` runs one named block of ops.sql and returns its rows (psycopg for the
    CLI, asyncpg in the daemon)."""
    retention = config.retention
    batch = retention.batch_size
    events_age = older_than if older_than is not None else retention.delivered_days * 86400
    logs_age = logs_older_than if logs_older_than is not None else retention.log_days * 86400
    events = logs = 0
    params: dict[str, Any] = {"now": now, "older_than": events_age, "batch": batch,
                              "after_id": 0}
    params["bound"] = (await run("prune_bound", params))[0][0]
    while True:
        got = [r[0] for r in await run("prune_events", params)]
        events += len(got)
        if progress and got:
            progress(PruneProgress(events, logs))
        if len(got) < batch:
            break
        params["after_id"] = max(got)
    log_params = {"now": now, "older_than": logs_age, "batch": batch}
    while True:
        deleted = len(await run("prune_logs", log_params))
        logs += deleted
        if progress and deleted:
            progress(PruneProgress(events, logs))
        if deleted < batch:
            break
    return events, logs


def prune_once(conn_or_dsn: Conn | str, config: Config, now: datetime | None = None, *,
               older_than: float | None = None, logs_older_than: float | None = None,
               progress: Callable[[PruneProgress], None] | None = None) -> tuple[int, int]:
    """`prune` over psycopg (the CLI)."""
    with _session(conn_or_dsn, config) as (conn, q):
        async def run(name: str, params: dict[str, Any]) -> list[Any]:
            return conn.execute(q[name], params).fetchall()

        return asyncio.run(prune(run, config, now, older_than=older_than,
                                 logs_older_than=logs_older_than, progress=progress))


async def prune_pool(pool: asyncpg.Pool, config: Config) -> tuple[int, int]:
    """`prune` over the daemon's asyncpg pool (the same statements)."""
    q = _queries(config.database.schema_name)

    async def run(name: str, params: dict[str, Any]) -> list[Any]:
        text, names = sql.numbered(q[name])
        return list(await pool.fetch(text, *(params[n] for n in names)))

    return await prune(run, config)


# --- send-test -------------------------------------------------------------------------------

_SAMPLE_LICENSE: dict[str, Any] = {
    "ActivationKey": "TEST-0000-0000-0000", "ComputerKey": "", "ComputerID": "TEST-COMPUTER",
    "ComputerName": "qlm-bridge-send-test", "NumLicenses": 1, "AvailableLicenses": 0,
    "ActivationCount": 1, "ProductID": 1, "ProductName": "Sample Product", "MajorVersion": 1,
    "MinorVersion": 0, "CustomerID": 0, "OrderID": "TEST-ORDER", "SubscriptionID": "",
    "UserData": "qlm-bridge send-test", "Comment": "a test event: no license changed",
}
_SAMPLE_CUSTOMER: dict[str, Any] = {
    "CustomerID": 0, "FullName": "Test Customer", "Email": "test@example.com",
    "Company": "Example Ltd", "Phone": "", "Country": "", "PrivacyConsent": True,
}
TEST_HEADER = "X-QLM-Test"


def sample_event(event_type: str, now: datetime | None = None) -> Event:
    """A realistic, clearly marked sample event of one type (nothing in the database)."""
    if event_type not in ALL_EVENTS:
        raise ConfigError(f"unknown event type {event_type!r} (known: {', '.join(ALL_EVENTS)})")
    kind = kind_of(event_type)
    info = dict(_SAMPLE_LICENSE if kind == "license" else _SAMPLE_CUSTOMER)
    previous = None
    if event_type == "license_released":
        previous = {"ComputerID": info["ComputerID"], "AvailableLicenses": 0}
        info |= {"ComputerID": "", "AvailableLicenses": 1}
    elif event_type == "license_modified":
        previous = {"Comment": "before"}
    elif event_type == "customer_modified":
        previous = {"Email": "old@example.com"}
    return Event(str(uuid.uuid4()), event_type, now or datetime.now(UTC), json.dumps(info),
                 json.dumps(previous) if previous else None)


@dataclass(frozen=True)
class SendResult:
    url: str
    event_type: str
    event_id: str
    status: int | None
    reason: str
    latency_ms: float
    response: str
    error: str | None = None
    location: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def signed(config: Config, url: str) -> bool:
    """Whether requests to `url` carry a signature (a global or an endpoint secret)."""
    return bool(policy_for(config.webhooks, url).signer.secrets)


def targets_for(config: Config, event_type: str) -> tuple[str, ...]:
    return config.webhooks.events.get(event_type, ())


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


async def _send_one(dispatcher: Dispatcher, policy: EndpointPolicy, event: Event) -> SendResult:
    """Sign and POST as the daemon's executor does: the endpoint's request (body, signed
    headers, its extra headers) through Dispatcher.post with the endpoint's timeout."""
    url = policy.url
    payload, hdrs = policy.request(event)
    hdrs[TEST_HEADER] = "1"
    out = await dispatcher.post(url, payload, hdrs, timeout=policy.timeout)
    if out.status is None:
        return SendResult(url, event.event_type, event.event_id, None, "", out.duration_ms, "",
                          out.error)
    return SendResult(url, event.event_type, event.event_id, out.status, _reason(out.status),
                      out.duration_ms, out.response_body or "",
                      location=sanitize(out.location, RESPONSE_SHOWN) if out.location else None)


async def _send_all(urls: Sequence[str], event_type: str, config: Config) -> list[SendResult]:
    """The daemon's HTTP client (block_private_addresses, ca_bundle, timeout) and per-endpoint
    policies (webhooks.endpoints), reading enough of each response to show it."""
    wh = config.webhooks
    policies = Policies(wh)
    shown = max(wh.max_response_body, RESPONSE_SHOWN + 1)
    dispatcher = Dispatcher(wh.model_copy(update={"max_response_body": shown}))
    await dispatcher.start()
    try:
        return [await _send_one(dispatcher, policies(url), sample_event(event_type))
                for url in urls]
    finally:
        await dispatcher.close()


def send_test(urls: Sequence[str], event_type: str, config: Config) -> list[SendResult]:
    """POST one signed sample event to each URL (no redirects followed); one result each."""
    checked = []
    for url in urls:
        try:
            checked.append(check_url(url))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    sample_event(event_type)  # validates the type before any request
    return asyncio.run(_send_all(checked, event_type, config))


def format_send_result(result: SendResult) -> str:
    lines = [f"POST {result.url}  ({result.event_type}, event id {result.event_id})"]
    if result.status is None:
        lines.append(f"  -> failed after {result.latency_ms:.1f} ms: {result.error}")
        return "\n".join(lines)
    verdict = "ok" if result.ok else "FAILED (not 2xx)"
    lines.append(f"  -> HTTP {result.status} {result.reason} in {result.latency_ms:.1f} ms: "
                 f"{verdict}")
    if result.location and 300 <= result.status < 400:
        lines.append(f"  redirect to {result.location} not followed (the bridge never follows "
                     "redirects)")
    text = result.response.strip()
    if text:
        shown = text if len(text) <= RESPONSE_SHOWN else text[:RESPONSE_SHOWN] + " ...(truncated)"
        lines.append(f"  response: {shown}")
    return "\n".join(lines)
