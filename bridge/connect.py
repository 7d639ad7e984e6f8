"""Every database connection the bridge opens, made in one place from `database.*`.

- `create_pool`: the daemon's asyncpg query pool (`database.dsn`);
- `connect`: one asyncpg connection, on `database.dsn` or, for LISTEN, `database.listen_dsn`;
- `psycopg_connect`: the short-lived psycopg connection of install, status, replay and prune.

`database.prepared_statements: false` turns prepared statements off everywhere: asyncpg's
statement cache (`statement_cache_size=0`: every query is an unnamed statement parsed, bound and
run in one round trip) and psycopg's automatic preparing (`prepare_threshold=None`). A
transaction-mode pooler (PgBouncer before 1.21, or without `max_prepared_statements`) hands each
transaction to any server connection, so a statement prepared on one is missing on the next.

When prepared statements are on and such an error comes back anyway, the pool turns them off
for the rest of the run (its connections are replaced) and says once, with the database's HINT,
which setting to change. The statement that failed did not run (the error comes from the
Parse or Bind step), and callers retry it: a result that could not be recorded is recorded on
the retry, not sent again later.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import asyncpg
import psycopg

from bridge.config import ConfigError, DatabaseConfig, describe_dsn
from bridge.errors import DatabaseUnavailable

log = logging.getLogger("bridge.connect")

PoolReset = Callable[[asyncpg.Connection], Awaitable[None]]

SETTING = "database.prepared_statements: false"

# The server's answers when a pooler moved a session between prepared and used statement.
_ASYNCPG_LOST = (asyncpg.exceptions.InvalidSQLStatementNameError,   # 26000: does not exist
                 asyncpg.exceptions.DuplicatePreparedStatementError)  # 42P05: already exists
_PSYCOPG_LOST = (psycopg.errors.InvalidSqlStatementName, psycopg.errors.DuplicatePreparedStatement)


def asyncpg_dsn(dsn: str) -> str:
    """asyncpg takes URLs only; turn a libpq key=value DSN into one."""
    if "://" in dsn:
        return dsn
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    user = quote(str(info.pop("user", "")), safe="")
    password = info.pop("password", None)
    auth = user + (":" + quote(str(password), safe="") if password is not None else "")
    host = str(info.pop("host", ""))
    port = info.pop("port", None)
    netloc = (auth + "@" if auth else "") + (host if "/" not in host else "")
    if port:
        netloc += f":{port}"
    if "/" in host:
        info["host"] = host
    db = quote(str(info.pop("dbname", "")), safe="")
    query = "&".join(f"{k}={quote(str(v), safe='/')}" for k, v in info.items())
    return f"postgresql://{netloc}/{db}" + (f"?{query}" if query else "")


# --- recognising a pooler's prepared-statement error ---------------------------------------


def is_prepared_statement_lost(exc: BaseException) -> bool:
    """True for the errors a transaction-mode pooler causes with prepared statements."""
    if isinstance(exc, (*_ASYNCPG_LOST, *_PSYCOPG_LOST)):
        return True
    # a statement of the same name prepared by another client: parameter counts differ
    text = str(exc)
    return (isinstance(exc, asyncpg.exceptions.ProtocolViolationError
                       | psycopg.errors.ProtocolViolation)
            and "prepared statement" in text)


def _hint(exc: BaseException) -> str:
    hint = getattr(exc, "hint", None)  # asyncpg
    diag = getattr(exc, "diag", None)  # psycopg
    if not hint and diag is not None:
        hint = diag.message_hint
    return " ".join(str(hint or "").split())


def prepared_statement_message(exc: BaseException, target: str, then: str = "") -> str:
    """One message for a pooler's prepared-statement error: what happened, the setting to
    change, what happens now (`then`) and the database's HINT (folded onto one line)."""
    hint = _hint(exc)
    return (f"a prepared statement was lost between two statements at {target} "
            f"({exc_line(exc)}): a connection pooler in transaction mode "
            f"(e.g. PgBouncer) sits in between. Set `{SETTING}` in the config"
            + (f"; {then}" if then else "") + (f". HINT: {hint}" if hint else ""))


def describe_error(exc: BaseException, db: DatabaseConfig) -> str:
    """A database error for a message: its first line, or, for a pooler's prepared-statement
    error, the full explanation naming the setting."""
    if is_prepared_statement_lost(exc):
        return prepared_statement_message(exc, describe_dsn(db.dsn))
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- asyncpg -------------------------------------------------------------------------------


# Seconds a prepared statement (and so its cached plan) is kept. PostgreSQL keeps a generic plan
# made while the outbox tables were small (a fresh install, a benchmark's fresh database): a
# sequential scan there is cheapest, and it stays until autovacuum next analyzes the table
# (up to a minute, or longer) while the table grows under it. P3 showed the fan-out statement
# going from 0.8 to 7.6 ms over 15,000 events. Prepared again, the plan sees the table's
# current size.
STATEMENT_LIFETIME = 10.0


def _asyncpg_args(db: DatabaseConfig, application_name: str,
                  prepared: bool) -> dict[str, Any]:
    args: dict[str, Any] = {"timeout": db.connect_timeout,
                            "server_settings": {"application_name": application_name}}
    if not prepared:
        args["statement_cache_size"] = 0
    else:
        args["max_cached_statement_lifetime"] = STATEMENT_LIFETIME
    return args


class _PreparedStatementGuard:
    """Turns a pool's prepared statements off at the first error showing a pooler lost one."""

    def __init__(self, db: DatabaseConfig, application_name: str) -> None:
        self.db = db
        self.application_name = application_name
        self.pool: asyncpg.Pool | None = None
        self.switched = False

    async def lost(self, exc: BaseException) -> None:
        if self.switched or self.pool is None:
            return
        self.switched = True
        self.pool.set_connect_args(asyncpg_dsn(self.db.dsn),
                                   **_asyncpg_args(self.db, self.application_name, False))
        await self.pool.expire_connections()  # each is replaced when next released
        log.warning("%s", prepared_statement_message(
            exc, describe_dsn(self.db.dsn),
            then="going on without prepared statements until the daemon stops"))


def _guarded_connection_class(guard: _PreparedStatementGuard) -> type[asyncpg.Connection]:
    class GuardedConnection(asyncpg.Connection):  # type: ignore[misc]
        """Reports a pooler's prepared-statement error to the guard, then raises it."""

        async def _guard(self, call: Awaitable[Any]) -> Any:
            try:
                return await call
            except Exception as exc:
                if is_prepared_statement_lost(exc):
                    await guard.lost(exc)
                raise

        async def execute(self, *args: Any, **kwargs: Any) -> Any:
            return await self._guard(super().execute(*args, **kwargs))

        async def executemany(self, *args: Any, **kwargs: Any) -> Any:
            return await self._guard(super().executemany(*args, **kwargs))

        async def fetch(self, *args: Any, **kwargs: Any) -> Any:
            return await self._guard(super().fetch(*args, **kwargs))

        async def fetchval(self, *args: Any, **kwargs: Any) -> Any:
            return await self._guard(super().fetchval(*args, **kwargs))

        async def fetchrow(self, *args: Any, **kwargs: Any) -> Any:
            return await self._guard(super().fetchrow(*args, **kwargs))

        async def fetchmany(self, *args: Any, **kwargs: Any) -> Any:
            return await self._guard(super().fetchmany(*args, **kwargs))

    return GuardedConnection


# Array types asyncpg looks up in the catalog the first time a connection binds one (it knows
# their elements, not the arrays). The bridge's queries bind arrays of these.
_ARRAY_TYPES = ("int2", "int4", "int8", "float4", "float8", "numeric", "text", "bool", "uuid",
                "timestamptz", "interval", "jsonb", "bytea")
_PRELOAD = "SELECT " + " AND ".join(f"${i}::{t}[] IS NULL"
                                    for i, t in enumerate(_ARRAY_TYPES, start=1))


async def _preload_types(conn: asyncpg.Connection) -> None:
    """Look the array types up once per new connection, inside one transaction.

    asyncpg turns JIT off for its type lookup with a session setting in a statement of its own.
    Behind a transaction-mode pooler that setting lands on another server connection than the
    lookup, which is then JIT-compiled: 1-2 s per new connection, measured on PostgreSQL 15 with
    PgBouncer, a stall of every delivery meanwhile. In a transaction both run on one server.
    """
    async with conn.transaction():
        await conn.fetchval(_PRELOAD, *([None] * len(_ARRAY_TYPES)))


async def create_pool(db: DatabaseConfig, *, max_size: int = 4,
                      reset: PoolReset | None = None, idle_lifetime: float = 300.0,
                      application_name: str = "qlm-bridge") -> asyncpg.Pool:
    """The daemon's query pool on `database.dsn` (opens connections on demand and closes
    those unused for `idle_lifetime` seconds)."""
    guard = _PreparedStatementGuard(db, application_name)
    pool = asyncpg.create_pool(
        asyncpg_dsn(db.dsn), min_size=0, max_size=max_size, reset=reset, init=_preload_types,
        max_inactive_connection_lifetime=idle_lifetime,
        connection_class=_guarded_connection_class(guard),
        **_asyncpg_args(db, application_name, db.prepared_statements))
    guard.pool = pool
    await pool  # with min_size=0 this connects nothing yet
    return pool


async def connect(db: DatabaseConfig, *, listen: bool = False,
                  application_name: str = "qlm-bridge") -> asyncpg.Connection:
    """One asyncpg connection: on `database.listen_dsn` (which defaults to `dsn`) when
    `listen`, else on `database.dsn`."""
    dsn = db.listen_target if listen else db.dsn
    return await asyncpg.connect(asyncpg_dsn(dsn),
                                 **_asyncpg_args(db, application_name, db.prepared_statements))


def unreachable(db: DatabaseConfig, exc: BaseException, *, listen: bool = False) -> str:
    """What went wrong with the database, for a log line, naming host, port, database and user
    (never the password) and the key: ``database not reachable at HOST:PORT database 'x' as
    'u' (database.dsn; ConnectionRefusedError: ...)``; an error the server answered with is
    said as such."""
    key = "database.listen_dsn" if listen and db.listen_dsn else "database.dsn"
    where = describe_dsn(db.listen_target if listen else db.dsn)
    if is_prepared_statement_lost(exc):
        return f"database at {where} ({key}) lost a prepared statement: {exc_line(exc)}"
    sqlstate = str(getattr(exc, "sqlstate", "") or "")
    if isinstance(exc, asyncpg.PostgresError) and not sqlstate.startswith(("08", "57P")):
        return f"database at {where} ({key}) answered: {exc_line(exc)}"
    return f"database not reachable at {where} ({key}; {exc_line(exc)})"


def exc_line(exc: BaseException) -> str:
    """``ErrorClass: first line of the message``."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# --- psycopg -------------------------------------------------------------------------------

PsycopgConnection = psycopg.Connection[tuple[Any, ...]]


def psycopg_connect(db: DatabaseConfig, *, dsn: str | None = None,
                    autocommit: bool = False) -> PsycopgConnection:
    """A psycopg connection on `database.dsn` (or `dsn`), or DatabaseUnavailable naming host,
    port, database and user (never the password)."""
    target = dsn or db.dsn
    try:
        conn = psycopg.connect(target, connect_timeout=max(1, int(db.connect_timeout)),
                               autocommit=autocommit)
    except psycopg.OperationalError as exc:
        reason = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])
        raise DatabaseUnavailable(
            f"cannot connect to the database at {describe_dsn(target)} (database.dsn): "
            f"{reason or type(exc).__name__}") from None
    except psycopg.ProgrammingError as exc:  # a DSN that libpq cannot parse
        text = str(exc).strip()
        raise ConfigError("database.dsn: not a valid connection string: "
                          f"{text.splitlines()[0] if text else type(exc).__name__}") from None
    if not db.prepared_statements:
        conn.prepare_threshold = None
    return conn
