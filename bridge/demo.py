"""`qlm-bridge demo`: the whole bridge on one machine in a few seconds.

Without a DSN it starts an embedded PostgreSQL, creates a database with the sample QLM-style
tables and installs the bridge (as `qlm-bridge install --sample-schema`). With a DSN it works in
two schemas of its own there (the sample tables in ``qlm_bridge_demo_data``, the bridge in
``qlm_bridge_demo``) and drops them afterwards, so user data is never touched. Then it starts a
receiver on 127.0.0.1 that checks X-QLM-Signature, runs the daemon in-process and plays a
license lifecycle that fires all seven QLM events, printing each delivery as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from aiohttp import web

from bridge import config as config_mod
from bridge import install, sql
from bridge.config import Config
from bridge.errors import BridgeError, ConfigError
from bridge.events import QLM_EVENTS

Echo = Callable[[str], None]

EMBEDDED_DATABASE = "qlm_demo"
BRIDGE_SCHEMA = "qlm_bridge_demo"  # with --dsn: never the operator's own bridge schema
DATA_SCHEMA = "qlm_bridge_demo_data"  # with --dsn: the sample tables, away from user tables
MARKER = "created by qlm-bridge demo; dropped when the demo ends"
HOOK_PATH = "/qlm-webhook"


@dataclass(frozen=True)
class Step:
    event_type: str
    action: str


STEPS: tuple[Step, ...] = (
    Step("customer_created", "Ada Lovelace signs up             INSERT INTO customers"),
    Step("customer_modified", "Ada changes her e-mail address     UPDATE customers"),
    Step("license_created", "she buys a license                 INSERT INTO license_keys"),
    Step("license_activated", "she activates it on her laptop     UPDATE license_keys"),
    Step("license_released", "she releases the laptop's seat     UPDATE license_keys"),
    Step("license_deleted", "the license is revoked             DELETE FROM license_keys"),
    Step("customer_deleted", "Ada's account is closed            DELETE FROM customers"),
)
assert sorted(s.event_type for s in STEPS) == sorted(QLM_EVENTS)


@dataclass(frozen=True)
class Target:
    """Where the demo runs: the database, the bridge schema and the sample tables."""

    dsn: str
    bridge_schema: str
    data_schema: str | None  # None: the sample tables in the default schema (embedded)

    def table(self, name: str) -> str:
        if self.data_schema is None:
            return sql.quote_ident(name)
        return f"{sql.quote_ident(self.data_schema)}.{sql.quote_ident(name)}"


@dataclass(frozen=True)
class Arrival:
    event_type: str
    event_id: str
    url: str
    status: int
    latency_ms: float | None
    signature_ok: bool
    body: bytes


def signature_valid(body: bytes, header: str | None, secret: str) -> bool:
    """The receiver's check, as receivers do it: `bridge.verify` on the raw body bytes."""
    from bridge.verify import verify_signature

    return verify_signature(body, secret, header)


@dataclass
class DemoReceiver:
    """A receiver as a customer would write one: verify, then answer 200 (401 if forged)."""

    secret: str
    echo: Echo
    show_bodies: bool = False
    arrivals: list[Arrival] = field(default_factory=list)
    written_at: dict[str, float] = field(default_factory=dict)  # event type -> write time
    port: int = 0
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> DemoReceiver:
        app = web.Application()
        app.router.add_post(HOOK_PATH, self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server: Any = site._server
        self.port = int(server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{HOOK_PATH}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.monotonic()
        ok = signature_valid(body, request.headers.get("X-QLM-Signature"), self.secret)
        event_type = request.headers.get("X-QLM-Event", "?")
        status = 200 if ok else 401
        arrival = Arrival(event_type, request.headers.get("X-QLM-Event-Id", "?"),
                          str(request.url), status, self._latency(event_type, body, now), ok,
                          body)
        duplicate = any(a.event_id == arrival.event_id for a in self.arrivals)
        self.arrivals.append(arrival)
        self.echo(format_arrival(arrival, duplicate))
        if self.show_bodies:
            self.echo(_indent(json.dumps(json.loads(body), indent=2)))
        self._arrived.set()
        return web.Response(status=status, text="ok" if ok else "bad signature")

    def _latency(self, event_type: str, body: bytes, now: float) -> float | None:
        written = self.written_at.get(event_type)
        if written is not None:
            return (now - written) * 1000
        try:  # an event the operator caused (--keep): from its capture time
            stamp = datetime.fromisoformat(json.loads(body)["Timestamp"])
            return max(0.0, (datetime.now(UTC) - stamp).total_seconds() * 1000)
        except (ValueError, KeyError, TypeError):
            return None

    def delivered(self, event_type: str) -> bool:
        return any(a.event_type == event_type and a.status == 200 for a in self.arrivals)

    async def wait_for(self, event_type: str) -> None:
        while not self.delivered(event_type):
            self._arrived.clear()
            await self._arrived.wait()


def format_arrival(a: Arrival, duplicate: bool = False) -> str:
    latency = "-" if a.latency_ms is None else f"{a.latency_ms:.1f} ms"
    sig = "signature valid" if a.signature_ok else "SIGNATURE INVALID"
    dup = "  (duplicate)" if duplicate else ""
    return f"      {a.event_type:<18} -> {a.url}  HTTP {a.status}  {latency:>9}  {sig}{dup}"


def _indent(text: str) -> str:
    return "\n".join("        " + line for line in text.splitlines())


# --- the database side ---------------------------------------------------------------------


def _connect(dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    return install.connect(dsn, timeout=10)


def _embedded_target(pg: Any) -> Target:
    with psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.render(sql.blocks("demo.sql")["create_database"],
                                database=sql.quote_ident(EMBEDDED_DATABASE)).encode())
    return Target(pg.dsn(EMBEDDED_DATABASE), "qlm_bridge", None)


def _claim_schemas(dsn: str) -> Target:
    """Create the demo's data schema; refuse schemas by those names that the demo did not make."""
    blocks = sql.blocks("demo.sql")
    with _connect(dsn) as conn, conn.transaction():
        for schema in (BRIDGE_SCHEMA, DATA_SCHEMA):
            row = conn.execute(blocks["schema_comment"], {"schema": schema}).fetchone()
            if row is not None and row[0] != MARKER:
                raise BridgeError(f"schema {schema!r} already exists in this database and was "
                                  "not created by qlm-bridge demo; the demo will not touch it")
        conn.execute(sql.render(blocks["create_schema"], schema=sql.quote_ident(DATA_SCHEMA),
                                marker=sql.quote_literal(MARKER)).encode())
    return Target(dsn, BRIDGE_SCHEMA, DATA_SCHEMA)


def _install(cfg: Config, target: Target) -> install.Plan:
    if target.data_schema is None:
        return install.install(cfg, sample_schema=True)
    # The sample tables land in the demo's data schema: the first one on the search path.
    dsn = psycopg.conninfo.make_conninfo(target.dsn,
                                         options=f"-c search_path={target.data_schema}")
    plan = install.install(cfg.model_copy(update={
        "database": cfg.database.model_copy(update={"dsn": dsn})}), sample_schema=True)
    with _connect(target.dsn) as conn, conn.transaction():
        conn.execute(sql.render(sql.blocks("demo.sql")["mark_schema"],
                                schema=sql.quote_ident(target.bridge_schema),
                                marker=sql.quote_literal(MARKER)).encode())
    return plan


def _drop_schemas(cfg: Config, target: Target) -> None:
    if target.data_schema is None:
        return
    install.uninstall(cfg, drop_data=True)
    with _connect(target.dsn) as conn, conn.transaction():
        conn.execute(sql.render(sql.blocks("demo.sql")["drop_schema"],
                                schema=sql.quote_ident(target.data_schema)).encode())


def demo_config(target: Target, url: str, secret: str, metrics_port: int | None,
                console_token: str | None = None) -> Config:
    data: dict[str, Any] = {
        "database": {"dsn": target.dsn, "schema": target.bridge_schema, "connect_timeout": 5},
        "webhooks": {"secret_key": secret, "events": {e: [url] for e in QLM_EVENTS},
                     "retry_interval": 1, "max_retries": 3, "timeout": 5},
        "daemon": {"poll_interval": 1, "lease": 30, "heartbeat_interval": 2,
                   "shutdown_timeout": 3, "reconnect_max_delay": 2},
        "retention": {"prune_interval": 0},
    }
    if target.data_schema is not None:
        data["capture"] = {"licenses": {"schema": target.data_schema},
                           "customers": {"schema": target.data_schema}}
    if metrics_port is not None:
        data["observe"] = {"listen": f"127.0.0.1:{metrics_port}",
                           "console_token": console_token}
    return config_mod.parse(data, "<demo config>", env={})


class Lifecycle:
    """Plays the seven steps, one statement each, on its own autocommit connection."""

    def __init__(self, target: Target) -> None:
        blocks = sql.blocks("demo.sql")
        tables = {"customers": target.table("customers"),
                  "licenses": target.table("license_keys")}
        self.statements = {s.event_type: sql.render(blocks[s.event_type], **tables)
                           for s in STEPS}
        self.dsn = target.dsn
        token = secrets.token_hex(4).upper()
        self.params: dict[str, Any] = {"key": f"DEMO-{token[:4]}-{token[4:]}",
                                       "order_id": f"ORD-{token}"}
        self._conn: psycopg.AsyncConnection[tuple[Any, ...]] | None = None

    async def __aenter__(self) -> Lifecycle:
        self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def play(self, step: Step) -> None:
        assert self._conn is not None
        cur = await self._conn.execute(self.statements[step.event_type], self.params)
        if step.event_type == "customer_created":
            row = await cur.fetchone()
            assert row is not None
            self.params["customer_id"] = row[0]


# --- running it ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Options:
    dsn: str | None = None
    keep: bool = False
    timeout: float = 60.0
    show_bodies: bool = False


def run(options: Options, echo: Echo) -> None:
    """The demo, start to clean-up. Raises BridgeError (exit 1) when a delivery went wrong."""
    if options.timeout <= 0:
        raise ConfigError("--timeout must be a positive number of seconds")
    with _target(options, echo) as target:
        asyncio.run(_run(options, target, echo))


@contextlib.contextmanager
def _target(options: Options, echo: Echo) -> Iterator[Target]:
    if options.dsn is not None:
        echo(f"qlm-bridge demo: using {config_mod.describe_dsn(options.dsn)} "
             f"(schemas {BRIDGE_SCHEMA} and {DATA_SCHEMA}, dropped afterwards)")
        yield _claim_schemas(options.dsn)
        return
    from bridge.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres()
    try:
        pg.start()
        echo(f"qlm-bridge demo: embedded PostgreSQL on 127.0.0.1:{pg.port} "
             f"(data in {pg.root}, removed afterwards)")
        yield _embedded_target(pg)
    finally:
        pg.cleanup()


async def _run(options: Options, target: Target, echo: Echo) -> None:
    from bridge.daemon import Daemon
    from bridge.observe import setup_logging

    setup_logging("text", "warning")
    secret = "demo-" + secrets.token_urlsafe(18)
    rx = await DemoReceiver(secret, echo, options.show_bodies).start()
    metrics_port = _free_port() if options.keep else None
    console_token = secrets.token_urlsafe(24) if options.keep else None
    cfg = demo_config(target, rx.url, secret, metrics_port, console_token)
    daemon: Daemon | None = None
    task: asyncio.Task[None] | None = None
    installed = False
    try:
        async with asyncio.timeout(options.timeout):
            plan = await asyncio.to_thread(_install, cfg, target)
            installed = True
            tables = ("customers, license_keys" if target.data_schema is None
                      else f"{target.data_schema}.customers, {target.data_schema}.license_keys")
            echo(f"  installed bridge schema {target.bridge_schema!r} version {plan.to_version}"
                 f" with capture triggers on {tables}")
            echo(f"  receiver on {rx.url} verifies X-QLM-Signature")
            daemon = Daemon(cfg)
            task = asyncio.create_task(daemon.run(), name="daemon")
            await _until_ready(daemon, task)
            echo(f"  daemon {daemon.id} running; playing a license lifecycle:")
            await _play(target, rx, echo)
        _summary(rx, echo)
        if options.keep:
            await _explore(target, rx, metrics_port, console_token, echo)
    except TimeoutError:
        raise BridgeError(_timeout_message(rx, options.timeout)) from None
    finally:
        if daemon is not None and task is not None:
            daemon.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 15)
        await rx.stop()
        if installed:
            await asyncio.to_thread(_drop_schemas, cfg, target)


def _timeout_message(rx: DemoReceiver, timeout: float) -> str:
    missing = [s.event_type for s in STEPS if not rx.delivered(s.event_type)]
    text = f"the demo did not finish within {timeout:g} s"
    if missing:
        text += f"; not delivered: {', '.join(missing)}"
    invalid = sum(1 for a in rx.arrivals if not a.signature_ok)
    if invalid:
        text += f"; {invalid} request(s) carried an invalid X-QLM-Signature"
    return text


async def _until_ready(daemon: Any, task: asyncio.Task[None]) -> None:
    ready = asyncio.ensure_future(daemon.ready.wait())
    try:
        await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ready.cancel()
    if task.done():
        task.result()  # raises what stopped the daemon
        raise BridgeError("the daemon stopped before it was ready")


async def _play(target: Target, rx: DemoReceiver, echo: Echo) -> None:
    async with Lifecycle(target) as life:
        for n, step in enumerate(STEPS, 1):
            echo(f"  [{n}/{len(STEPS)}] {step.action}")
            rx.written_at[step.event_type] = time.monotonic()
            await life.play(step)
            await rx.wait_for(step.event_type)


def _summary(rx: DemoReceiver, echo: Echo) -> None:
    delivered = [s.event_type for s in STEPS if rx.delivered(s.event_type)]
    invalid = [a for a in rx.arrivals if not a.signature_ok]
    latencies = [a.latency_ms for a in rx.arrivals if a.latency_ms is not None and a.status == 200]
    ids = {a.event_id for a in rx.arrivals}
    dups = len(rx.arrivals) - len(ids)
    timing = ""
    if latencies:
        timing = (f"; write -> receiver latency median {statistics.median(latencies):.1f} ms, "
                  f"max {max(latencies):.1f} ms")
    echo(f"summary: {len(delivered)}/{len(STEPS)} events delivered, "
         f"{len(rx.arrivals) - len(invalid)}/{len(rx.arrivals)} signatures valid, "
         f"{dups} duplicate(s){timing}")
    if invalid:
        raise BridgeError(f"{len(invalid)} request(s) carried an invalid X-QLM-Signature")
    if len(delivered) != len(STEPS):
        missing = sorted(set(QLM_EVENTS) - set(delivered))
        raise BridgeError(f"not delivered: {', '.join(missing)}")


async def _explore(target: Target, rx: DemoReceiver, metrics_port: int | None,
                   console_token: str | None, echo: Echo) -> None:
    tables = ("customers, license_keys" if target.data_schema is None
              else f"{target.data_schema}.customers, {target.data_schema}.license_keys")
    rx.written_at.clear()  # from now on, latency counts from each event's capture time
    echo("\n--keep: everything stays up until Ctrl-C. Change a row and watch it arrive:")
    echo(f"  database  {target.dsn}   (tables {tables}; bridge schema {target.bridge_schema})")
    echo(f"  receiver  {rx.url}")
    echo(f"  metrics   http://127.0.0.1:{metrics_port}/metrics   "
         f"(and /healthz, /readyz)")
    echo(f"  console   http://127.0.0.1:{metrics_port}/console   "
         f"(log in with the token {console_token})")
    customers = "customers" if target.data_schema is None else f"{target.data_schema}.customers"
    echo(f"  try:      psql '{target.dsn}' -c \"INSERT INTO {customers} "
         "(full_name) VALUES ('Grace Hopper')\"")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    echo("stopping and cleaning up")
