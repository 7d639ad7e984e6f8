"""What the console reads and does, per site: the `ConsoleSource` value and its queries.

The console is handed sources; it never reaches into the daemon. A source is one license
database ("site") as it is right now: its name, its asyncpg pool (None while the site is not
connected) and its config (bridge schema, webhooks, capture key columns). Replay is
`qlm-bridge replay`'s own code (`bridge.ops.replay`), run in a thread. The SQL is in
`sql/console.sql`.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from bridge import ops, sql, store
from bridge.config import Config, redact_url
from bridge.errors import BridgeError
from bridge.events import ALL_EVENTS
from bridge.keys import KeyColumns, key_columns, legacy_key

PAGE_SIZE = 50
COUNT_CAP = 100_000  # rows the overview counts at most, per query
KEY_REPLAY_CAP = 10_000  # events a replay by key re-queues at most
STATES = ("pending", "failed", "delivered", "skipped")


@dataclass(frozen=True)
class ConsoleSource:
    """One site the console shows: everything it needs, nothing of the daemon's internals."""

    name: str
    pool: asyncpg.Pool | None  # None while the site is not connected
    config: Config  # the site's config now (schema, webhooks, capture keys)
    problem: str | None = None  # why the site is not connected, when known

    @property
    def schema(self) -> str:
        return self.config.database.schema_name

    @property
    def key_columns(self) -> KeyColumns:
        return key_columns(self.config)


class SiteUnavailable(BridgeError):
    """The site's database cannot be read right now (the page says so, with a 503)."""


async def replay(source: ConsoleSource, selection: ops.ReplayFilter) -> ops.ReplayResult:
    """`qlm-bridge replay`, for this site (its own short psycopg connection, in a thread)."""
    return await asyncio.to_thread(ops.replay, source.config.database.dsn, source.config,
                                   selection)


# --- rendered SQL ------------------------------------------------------------------------------


def _key_of(keys: KeyColumns) -> str:
    """The key of event `e` (bridge/keys.py): event.key, or for an event captured before schema
    version 4 the same form from its JSON row (as key_legacy_index indexes it)."""
    return f"coalesce(e.key, {legacy_key(keys, 'e.')})"


def _key_match(keys: KeyColumns, param: str) -> str:
    """`e` is an event of the key `param` (the value, or the values joined by '|', without the
    kind): event.key by key_index, earlier events by key_legacy_index."""
    kinds = [kind for kind, cols in keys if cols]
    if not kinds:
        return "false"
    wanted = "ARRAY[" + ", ".join(f"{sql.quote_literal(k + ':')} || {param}::text"
                                 for k in kinds) + "]"
    return (f"(e.key = ANY ({wanted}) OR "
            f"(e.key IS NULL AND {legacy_key(keys, 'e.')} = ANY ({wanted})))")


def _key_show(keys: KeyColumns) -> str:
    """The key as the list shows it and the filter takes it: without the kind."""
    if not any(cols for _, cols in keys):
        return "NULL::text"
    return f"substr({_key_of(keys)}, length(e.kind) + 2)"


@functools.cache
def queries(schema: str, keys: KeyColumns) -> dict[str, str]:
    """console.sql rendered for one schema and its key columns."""
    values = {"schema": sql.quote_ident(schema), "key_show": _key_show(keys)}
    blocks = sql.blocks("console.sql")
    out = {name: sql.render(blocks[name], **values)
           for name in ("overview_open", "overview_delivered", "overview_unfanned", "daemons",
                        "endpoints", "event", "event_deliveries", "event_attempts", "session")}
    out["deliveries"] = sql.render(blocks["deliveries"], key_match=_key_match(keys, "$4"),
                                   order="DESC", **values)
    out["deliveries_newer"] = sql.render(blocks["deliveries"], key_match=_key_match(keys, "$4"),
                                         order="ASC", **values)
    common = dict(sql.queries(schema))  # the payload field map, as the daemon reads it
    out["field_map"], out["field_names"] = common["field_map"], common["field_names"]
    out["key_event_ids"] = sql.render(blocks["key_event_ids"], key_match=_key_match(keys, "$2"),
                                      **values)
    return out


async def _fetch(source: ConsoleSource, name: str, *args: Any) -> list[asyncpg.Record]:
    """One read-only statement with custom plans (optional filters fold away) and a timeout."""
    if source.pool is None:
        raise SiteUnavailable(f"site {source.name!r} is not connected"
                              + (f": {source.problem}" if source.problem else " yet"))
    q = queries(source.schema, source.key_columns)
    try:
        async with source.pool.acquire() as conn, conn.transaction(readonly=True):
            await conn.execute(q["session"])
            return list(await conn.fetch(q[name], *args))
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise SiteUnavailable(f"site {source.name!r}: the database answered "
                              f"{type(exc).__name__}: {first}") from None


# --- the list ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    state: str | None = None
    url: str | None = None
    event_type: str | None = None
    key: str | None = None
    event_id: uuid.UUID | None = None
    since: datetime | None = None
    since_text: str | None = None  # as typed ("2h"), for links and the form

    def params(self) -> dict[str, str]:
        """The filter as query parameters (for links and the replay form)."""
        out = {"state": self.state, "url": self.url, "event_type": self.event_type,
               "key": self.key, "event_id": str(self.event_id) if self.event_id else None,
               "since": self.since_text}
        return {k: v for k, v in out.items() if v}

    def is_empty(self) -> bool:
        return not self.params()


def parse_filters(query: Mapping[str, str]) -> tuple[Filters, list[str]]:
    """Filters from query parameters; unusable ones are dropped and explained."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    for name in ("url", "key", "event_type", "state"):
        text = (query.get(name) or "").strip()
        if text:
            values[name] = text
    if values.get("state") and values["state"] not in STATES:
        problems.append(f"state: {values.pop('state')!r} is not one of {', '.join(STATES)}")
    event_type = values.get("event_type")
    if event_type and event_type not in ALL_EVENTS:
        problems.append(f"event_type: unknown event type {values.pop('event_type')!r}")
    event_id = (query.get("event_id") or "").strip()
    if event_id:
        try:
            values["event_id"] = uuid.UUID(event_id)
        except ValueError:
            problems.append(f"event_id: {event_id!r} is not a UUID")
    since = (query.get("since") or "").strip()
    if since:
        try:
            values["since"] = ops.parse_since(since)
            values["since_text"] = since
        except ValueError as exc:
            problems.append(f"since: {exc}")
    return Filters(**values), problems


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    event_id: uuid.UUID
    event_type: str
    key: str | None
    url: str
    state: str
    attempts: int
    last_status: int | None
    last_error: str | None
    next_attempt_at: datetime
    locked_until: datetime | None
    created_at: datetime
    updated_at: datetime
    now: datetime

    @property
    def shown_state(self) -> str:
        """pending split as the overview splits it: in flight, retrying, pending."""
        if self.state != "pending":
            return self.state
        if self.locked_until is not None and self.locked_until > self.now:
            return "in flight"
        return "retrying" if self.attempts > 0 else "pending"


@dataclass(frozen=True)
class Page:
    rows: tuple[DeliveryRow, ...]
    older: int | None  # `before` for the next older page
    newer: int | None  # `after` for the next newer page


def _row(r: asyncpg.Record) -> DeliveryRow:
    return DeliveryRow(r["id"], r["event_id"], r["event_type"], r["key"], redact_url(r["url"]),
                       r["state"], r["attempts"], r["last_status"], r["last_error"],
                       r["next_attempt_at"], r["locked_until"], r["created_at"],
                       r["updated_at"], r["now"])


async def deliveries(source: ConsoleSource, f: Filters, before: int | None = None,
                     after: int | None = None, size: int = PAGE_SIZE) -> Page:
    """One page, newest first: the first, an older (`before`) or a newer (`after`) one."""
    args = (f.state, f.url, f.event_type, f.key, f.event_id, f.since)
    if after is not None:
        got = await _fetch(source, "deliveries_newer", *args, None, after, size + 1)
        more_newer = len(got) > size
        rows = [_row(r) for r in reversed(got[:size])]
        return Page(tuple(rows), rows[-1].id if rows else None,
                    rows[0].id if rows and more_newer else None)
    got = await _fetch(source, "deliveries", *args, before, None, size + 1)
    rows = [_row(r) for r in got[:size]]
    older = rows[-1].id if len(got) > size else None
    newer = rows[0].id if rows and before is not None else None
    return Page(tuple(rows), older, newer)


async def key_event_ids(source: ConsoleSource, key: str) -> list[uuid.UUID]:
    return [r["event_id"] for r in await _fetch(source, "key_event_ids", KEY_REPLAY_CAP, key)]


# --- the overview ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    url: str
    event_type: str
    pending: int = 0
    in_flight: int = 0
    retrying: int = 0
    failed: int = 0
    skipped: int = 0
    delivered_hour: int = 0
    oldest_pending: datetime | None = None


@dataclass(frozen=True)
class DaemonInfo:
    id: str
    hostname: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    config_hash: str | None
    stale: bool
    gone_at: datetime | None = None  # marked gone by a live daemon (missed heartbeats)


@dataclass(frozen=True)
class Overview:
    now: datetime
    counts: tuple[Counts, ...]
    capped: bool  # a count query reached COUNT_CAP: the numbers are lower bounds
    unfanned: int
    oldest_unfanned: datetime | None
    daemons: tuple[DaemonInfo, ...]
    endpoints: tuple[ops.EndpointRow, ...]  # endpoints with a rate limit or a breaker
    subscriptions: tuple[tuple[str, str], ...] = field(default=())

    def totals(self) -> Counts:
        def total(name: str) -> int:
            return sum(int(getattr(c, name)) for c in self.counts)
        oldest = [c.oldest_pending for c in self.counts if c.oldest_pending is not None]
        return Counts("", "", total("pending"), total("in_flight"), total("retrying"),
                      total("failed"), total("skipped"), total("delivered_hour"),
                      min(oldest) if oldest else None)


async def overview(source: ConsoleSource) -> Overview:
    opened = await _fetch(source, "overview_open", COUNT_CAP)
    delivered = await _fetch(source, "overview_delivered", COUNT_CAP)
    unfanned = (await _fetch(source, "overview_unfanned", COUNT_CAP))[0]
    daemon_rows = await _fetch(source, "daemons")
    endpoint_rows = await _fetch(source, "endpoints")
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for r in opened:
        groups[(r["url"], r["event_type"])] = {
            k: r[k] for k in ("pending", "in_flight", "retrying", "failed", "skipped",
                              "oldest_pending")}
    for r in delivered:
        groups.setdefault((r["url"], r["event_type"]), {})["delivered_hour"] = r["delivered"]
    subscriptions = tuple(source.config.webhooks.subscriptions())
    for event_type, url in subscriptions:  # configured, even if idle
        groups.setdefault((url, event_type), {})
    counts = tuple(Counts(redact_url(url), event_type, **values)
                   for (url, event_type), values in sorted(groups.items()))
    capped = any(r["scanned"] >= COUNT_CAP for r in (*opened[:1], *delivered[:1]))
    now = unfanned["now"]
    stale_after = max(3 * source.config.daemon.heartbeat_interval, 15.0)
    daemons = tuple(
        DaemonInfo(r["id"], r["hostname"], r["pid"], r["started_at"], r["heartbeat_at"],
                   r["config_hash"], (now - r["heartbeat_at"]).total_seconds() > stale_after,
                   r["gone_at"])
        for r in daemon_rows)
    endpoints = tuple(ops.endpoint_row(source.config, r) for r in endpoint_rows)
    return Overview(now, counts, capped, int(unfanned["unfanned"]), unfanned["oldest"], daemons,
                    endpoints, subscriptions)


# --- one event ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventInfo:
    id: int
    event_id: uuid.UUID
    event_type: str
    kind: str
    source_table: str
    op: str
    created_at: datetime
    fanned_out: bool
    key: str | None
    info: str | None
    previous: str | None
    now: datetime


@dataclass(frozen=True)
class EventDelivery:
    id: int
    url: str
    state: str
    attempts: int
    last_status: int | None
    last_error: str | None
    next_attempt_at: datetime
    locked_until: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Attempt:
    url: str
    attempt: int
    started_at: datetime
    duration_ms: float
    http_status: int | None
    error: str | None
    response_body: str | None
    daemon_id: str | None


@dataclass(frozen=True)
class EventPage:
    event: EventInfo
    deliveries: tuple[EventDelivery, ...]
    attempts: tuple[Attempt, ...]


async def event(source: ConsoleSource, event_id: uuid.UUID) -> EventPage | None:
    found = await _fetch(source, "event", event_id)
    if not found:
        return None
    row = dict(found[0])
    # rendered as the daemon renders what it sends (bridge/render.py, the same field map)
    fields = await store.complete_fields(functools.partial(_fetch, source), [row])
    rendered = store.rendered(fields, row)
    for column in ("row_data", "old_data", "previous_v1"):
        del row[column]
    info = EventInfo(**row, info=rendered[0], previous=rendered[1])
    ds = tuple(EventDelivery(**{**dict(r), "url": redact_url(r["url"])})
               for r in await _fetch(source, "event_deliveries", info.id))
    attempts = tuple(Attempt(**{**dict(r), "url": redact_url(r["url"])})
                     for r in await _fetch(source, "event_attempts", event_id))
    return EventPage(info, ds, attempts)
