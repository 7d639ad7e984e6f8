"""Fixtures only: the helpers live in tests/support (shared with bench/ and scripts/).

PostgreSQL: the server in QLM_BRIDGE_TEST_DSN (throwaway databases are created on it); else a
testcontainers PostgreSQL when a Docker engine answers; else an embedded server. The sample
schema and the bridge are installed once into a template database, and each test gets its own
`CREATE DATABASE ... TEMPLATE` clone.

Slow tests: `@pytest.mark.slow` marks the full-size reliability runs; they are skipped unless
QLM_BRIDGE_SLOW=1 (CI runs their bounded forms, which are not marked).
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator

import pytest

from tests.support.server import Db, Server, install_bridge, provision

_counter = itertools.count()
_RUN = uuid.uuid4().hex[:8]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("QLM_BRIDGE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set QLM_BRIDGE_SLOW=1 to run the full-size form")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    with provision(os.environ.get("QLM_BRIDGE_TEST_DSN")) as server:
        yield server


@pytest.fixture(scope="session")
def template_db(pg_server: Server) -> Iterator[str]:
    name = f"qlmb_tpl_{_RUN}"
    install_bridge(pg_server.create_database(name))
    yield name
    pg_server.drop_database(name)


def _throwaway(server: Server, prefix: str, template: str | None = None) -> Iterator[Db]:
    name = f"{prefix}_{_RUN}_{next(_counter)}"
    yield Db(name, server.create_database(name, template=template), server)
    server.drop_database(name)


@pytest.fixture
def db(pg_server: Server, template_db: str) -> Iterator[Db]:
    """A fresh database with the sample schema and the bridge installed."""
    yield from _throwaway(pg_server, "qlmb_t", template_db)


@pytest.fixture
def db2(pg_server: Server, template_db: str) -> Iterator[Db]:
    """A second database like `db` (a second site)."""
    yield from _throwaway(pg_server, "qlmb_t2", template_db)


@pytest.fixture
def empty_db(pg_server: Server) -> Iterator[Db]:
    """A fresh, empty database (nothing installed)."""
    yield from _throwaway(pg_server, "qlmb_e")
