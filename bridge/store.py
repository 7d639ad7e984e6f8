"""Every runtime query the daemon runs (fan-out, claim, ack, log, heartbeat), over asyncpg.

The SQL is in `sql/queries.sql`; this module only binds parameters and shapes results.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from bridge import render, sql
from bridge.payload import Event

log = logging.getLogger("bridge.daemon")

# Failures that mean "the database went away": retry after a back-off, never crash.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionFailureError,
    # asyncpg raises this when a pooled connection that the server terminated mid-query is
    # reset on release (seen with pg_terminate_backend); the pool has dropped that connection
    asyncpg.exceptions._base.InternalClientError,
    TimeoutError,
)


@dataclass(frozen=True, slots=True)
class Claimed:
    """One claimed delivery: which row, to which URL, which attempt, and what to send."""

    id: int
    url: str
    attempt: int
    event: Event


@dataclass(frozen=True, slots=True)
class Result:
    """One finished attempt, ready to acknowledge."""

    claimed: Claimed
    state: str  # delivered | pending (retry) | failed
    retry_in: float | None
    http_status: int | None
    error: str | None
    started_at: datetime
    duration_ms: float
    response_body: str | None


@dataclass(frozen=True, slots=True)
class Admission:
    """What `admit` allowed one endpoint: how many requests, and when to ask again."""

    granted: int
    wait: float | None


@dataclass(frozen=True, slots=True)
class BreakerOutcome:
    url: str
    ok: bool  # an attempt of the batch succeeded
    tail: int  # failed attempts after the last success
    threshold: int
    cooldown: float


@dataclass(frozen=True, slots=True)
class BreakerChange:
    url: str
    state: str  # opens | open | closed
    was_open: bool
    failures: int


class Store:
    def __init__(self, pool: asyncpg.Pool, schema: str, owner: str) -> None:
        self.pool = pool
        q = dict(sql.queries(schema))
        tail = q.pop("claimed_rows").rstrip().rstrip(";")
        self.q = {name: text.replace("__CLAIMED_ROWS__", tail) for name, text in q.items()}
        self.owner = owner
        self.fields = render.Fields()  # read by load_fields (start, reload, new columns)

    async def produce(self, limit: int, subscriptions: Sequence[tuple[str, str]],
                      enabled: bool, room: dict[str, int], ordered: Sequence[str],
                      keys: tuple[Sequence[str], Sequence[str]],
                      lease: float) -> tuple[list[Claimed], dict[str, int]]:
        """Fan out up to `limit` new events, claiming up to ``room[url]`` of the new
        deliveries at once; returns the claimed rows and how many events of each type."""
        rows = await self.pool.fetch(
            self.q["produce"], limit, [s[0] for s in subscriptions],
            [s[1] for s in subscriptions], enabled, list(room), list(room.values()),
            self.owner, lease, list(ordered), list(keys[0]), list(keys[1]))
        claimed = await self._claimed([r for r in rows if r["id"] is not None])
        fanned = {r["event_type"]: int(r["attempts"]) for r in rows if r["id"] is None}
        return claimed, fanned

    async def claim(self, wanted: dict[str, int], lease: float,
                    now: datetime | None = None) -> list[Claimed]:
        """Claim up to ``wanted[url]`` due deliveries of each URL, in one statement."""
        rows = await self.pool.fetch(self.q["claim"], list(wanted), list(wanted.values()),
                                     self.owner, lease, now)
        return await self._claimed(rows)

    async def _fetch(self, name: str, *args: Any) -> list[asyncpg.Record]:
        return list(await self.pool.fetch(self.q[name], *args))

    async def load_fields(self) -> None:
        """Read the payload field map (at start, on reload, and when a captured row has a
        column it does not know)."""
        self.fields = await read_fields(self._fetch)

    async def _claimed(self, rows: Sequence[asyncpg.Record]) -> list[Claimed]:
        """Claimed rows with their payloads, rendered once per event."""
        try:
            return _render_claimed(self.fields, rows)
        except render.UnknownColumn:
            try:
                self.fields = await complete_fields(self._fetch, rows)
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                # these rows are claimed and must go out: a column the map cannot name yet is
                # sent under its own name this once (the next claim asks again)
                log.warning("could not read the payload field map (%s); sending unknown "
                            "columns under their column names", exc)
                return _render_claimed(_named_as_columns(self.fields, rows), rows)
            return _render_claimed(self.fields, rows)

    async def endpoints_init(self, urls: Sequence[str], bursts: Sequence[float]) -> None:
        await self.pool.execute(self.q["endpoints_init"], list(urls), list(bursts))

    async def admit(self, wanted: dict[str, int], rates: Sequence[float | None],
                    bursts: Sequence[float], probe_for: float) -> dict[str, Admission]:
        """Take rate tokens and breaker probes for shared-state endpoints."""
        rows = await self.pool.fetch(self.q["admit"], list(wanted), list(wanted.values()),
                                     list(rates), list(bursts), self.owner, probe_for)
        return {r["url"]: Admission(int(r["granted"]), r["wait"]) for r in rows}

    async def refund(self, unused: dict[str, int], probes: set[str]) -> None:
        urls = sorted(set(unused) | probes)
        await self.pool.execute(self.q["refund"], urls, [float(unused.get(u, 0)) for u in urls],
                                [u in probes for u in urls], self.owner)

    async def breaker_outcomes(self, outcomes: Sequence[BreakerOutcome]) -> list[BreakerChange]:
        rows = await self.pool.fetch(
            self.q["breaker_outcomes"], [o.url for o in outcomes], [o.ok for o in outcomes],
            [o.tail for o in outcomes], [o.threshold for o in outcomes],
            [o.cooldown for o in outcomes])
        return [BreakerChange(r["url"], r["state"], r["was_open"], r["failures"]) for r in rows]

    async def reap_daemons(self) -> list[asyncpg.Record]:
        """Mark daemons that missed three heartbeats gone and release what they held."""
        return list(await self.pool.fetch(self.q["reap_daemons"], self.owner))

    async def pending_urls(self) -> list[str]:
        return [r[0] for r in await self.pool.fetch(self.q["pending_urls"])]

    async def ack(self, results: Sequence[Result], resent: bool = False) -> None:
        """Record finished attempts; `resent` when an earlier try of this batch may have
        committed unseen (then no attempt is logged twice)."""
        cols: list[list[Any]] = [[] for _ in range(12)]
        for r in results:
            c = r.claimed
            for i, v in enumerate((c.id, c.attempt, r.state, r.retry_in, r.http_status, r.error,
                                   c.event.event_id, c.event.event_type, c.url, r.started_at,
                                   r.duration_ms, r.response_body)):
                cols[i].append(v)
        await self.pool.execute(self.q["ack"], *cols, self.owner, resent)

    async def release(self, claims: Sequence[tuple[int, int]]) -> None:
        """Give back claimed rows never attempted: (delivery id, attempt) pairs."""
        await self.pool.execute(self.q["release"], [c[0] for c in claims],
                                [c[1] for c in claims], self.owner)

    async def set_sleeping(self, sleeping: bool, expires_in: float = 0.0) -> None:
        await self.pool.execute(self.q["set_sleeping"], sleeping, expires_in)

    async def current_snapshot(self) -> str:
        return str(await self.pool.fetchval(self.q["current_snapshot"]))

    async def snapshot_settled(self, snapshot: str) -> bool:
        return bool(await self.pool.fetchval(self.q["snapshot_settled"], snapshot))

    async def heartbeat(self, hostname: str, pid: int, config_hash: str,
                        interval: float) -> bool:
        """Record a heartbeat; True if another daemon had marked this one gone meanwhile."""
        return bool(await self.pool.fetchval(self.q["heartbeat"], self.owner, hostname, pid,
                                             config_hash, interval))

    async def daemon_gone(self) -> None:
        await self.pool.execute(self.q["daemon_gone"], self.owner)

    async def conflicting_daemons(self, config_hash: str, within: float) -> list[str]:
        rows = await self.pool.fetch(self.q["conflicting_daemons"], self.owner, config_hash,
                                     within)
        return [f"{r['id']} (host {r['hostname']}, pid {r['pid']})" for r in rows]

    async def other_daemons_alive(self, within: float) -> int:
        return int(await self.pool.fetchval(self.q["other_daemons_alive"], self.owner, within))

    async def apply_config(self, capture_modified: bool,
                           field_names: dict[str, dict[str, str]],
                           tables: dict[str, str]) -> list[str]:
        """Write the capture switch and the field-name overrides in one transaction; nothing
        is written (and the clashes are returned) if two current columns of a captured table
        (`tables`: kind -> quoted name) would become the same payload field."""
        rows = [(k, c, f) for k, names in field_names.items() for c, f in names.items()]
        async with self.pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                await conn.execute(self.q["set_field_names"], [r[0] for r in rows],
                                   [r[1] for r in rows], [r[2] for r in rows])
                clashes = [f"{r['kind']} columns {r['columns']} all become payload field "
                           f"{r['field']!r}"
                           for r in await conn.fetch(self.q["field_name_clashes"], list(tables),
                                                     list(tables.values()))]
                if not clashes:
                    await conn.execute(self.q["set_capture_modified"], capture_modified)
            except BaseException:
                await tx.rollback()
                raise
            await (tx.rollback() if clashes else tx.commit())
        return clashes


# runs one named query of queries.sql with its arguments (the daemon's pool, the console's
# read-only transaction)
Fetch = Callable[..., Awaitable[Sequence[Any]]]


async def read_fields(fetch: Fetch) -> render.Fields:
    """The payload field map of a bridge schema."""
    by_kind: dict[str, dict[str, render.Field]] = {}
    for r in await fetch("field_map"):
        by_kind.setdefault(r["kind"], {})[r["column_name"]] = render.field_of(
            r["field"], r["position"], r["type_name"])
    return render.Fields(by_kind)


_ROW_COLUMNS = ("row_data", "old_data", "previous_v1")  # what a claimed row or event carries


def _unknown(fields: render.Fields, rows: Sequence[Any]) -> dict[str, set[str]]:
    """Per kind, the columns of `rows` (claimed rows or events) that `fields` does not know."""
    out = {}
    for kind in {r["kind"] for r in rows}:
        cols = fields.missing(kind, [r[c] for r in rows if r["kind"] == kind
                                     for c in _ROW_COLUMNS])
        if cols:
            out[kind] = cols
    return out


async def complete_fields(fetch: Fetch, rows: Sequence[Any]) -> render.Fields:
    """The field map read again, plus the naming rule's names for columns of `rows` that it
    still does not know."""
    fields = await read_fields(fetch)
    for kind, cols in _unknown(fields, rows).items():
        named = await fetch("field_names", sorted(cols))
        fields = fields.with_columns(kind, {r["col"]: r["field"] for r in named})
    return fields


def _named_as_columns(fields: render.Fields, rows: Sequence[Any]) -> render.Fields:
    for kind, cols in _unknown(fields, rows).items():
        fields = fields.with_columns(kind, {c: c for c in cols})
    return fields


def rendered(fields: render.Fields, r: Any) -> tuple[str, str | None]:
    """(info, previous) of one event row (columns kind, row_data, old_data, previous_v1)."""
    return render.payload(fields, r["kind"], r["row_data"], r["old_data"], r["previous_v1"])


def _render_claimed(fields: render.Fields, rows: Sequence[asyncpg.Record]) -> list[Claimed]:
    events: dict[int, Event] = {}
    out = []
    for r in rows:
        event = events.get(r["event_id"])
        if event is None:
            info, prev = rendered(fields, r)
            event = events[r["event_id"]] = Event(str(r["event_id"]), r["event_type"],
                                                  r["created_at"], info, prev)
        out.append(Claimed(r["id"], r["url"], r["attempts"], event))
    return out
