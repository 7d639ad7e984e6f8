"""Issue 13: QLM sites. One daemon serves two license databases, each with its own URLs,
secret and switch; SIGHUP adds, removes and changes sites; one site's database is cut off while
the other keeps delivering, and it recovers with nothing lost. Real PostgreSQL (two databases),
real receivers, the daemon as a real process (`qlm-bridge run`)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge import config as config_mod
from bridge.errors import ConfigError
from tests.support.config import base_config, config_data
from tests.support.daemon import DaemonProcess
from tests.support.receiver import Receiver
from tests.support.server import Db


def sites_config(db: Db, db2: Db, rx: Receiver, **extra: Any) -> dict[str, Any]:
    data = config_data(db.dsn)
    del data["database"]
    data["webhooks"]["max_retries"] = 50
    data["sites"] = {
        "eu": {"database": {"dsn": db.dsn},
               "webhooks": {"secret_key": "eu-secret",
                            "events": {"license_created": rx.url("/eu")}}},
        "us": {"database": {"dsn": db2.dsn},
               "webhooks": {"secret_key": "us-secret",
                            "events": {"license_created": rx.url("/us")}}},
    }
    data.update(extra)
    return data


@contextlib.asynccontextmanager
async def two_site_daemon(db: Db, db2: Db, tmp_path: Path
                          ) -> AsyncIterator[tuple[Receiver, dict[str, Any], DaemonProcess]]:
    """A receiver and `qlm-bridge run` serving sites eu (db) and us (db2), both started; the
    daemon must exit 0 on SIGTERM and log no traceback."""
    rx = await Receiver().start()
    data = sites_config(db, db2, rx)
    d = DaemonProcess(tmp_path, data, name="sites")
    try:
        d.start()
        await d.wait_log("started", occurrences=2)
        yield rx, data, d
        d.signal(signal.SIGTERM)
        assert await d.wait() == 0
    finally:
        d.kill()
        await rx.stop()
    assert "Traceback" not in d.log()


def insert(db: Db, prefix: str, n: int) -> None:
    db.execute(f"INSERT INTO license_keys (activation_key) "
               f"SELECT '{prefix}-' || g FROM generate_series(1, {n}) g")


def keys(rx: Receiver, path: str) -> list[str]:
    return [json.loads(r.body)["LicenseInfo"]["ActivationKey"] for r in rx.on(path)]


def test_config_without_sites_is_one_default_site(db: Db) -> None:
    sites = config_mod.parse_sites(base_config(db.dsn).model_dump(by_alias=False), "<t>")
    assert sites.names() == ["default"] and not sites.explicit


def test_site_overrides_key_by_key_and_same_database_is_an_error(db: Db) -> None:
    data: dict[str, Any] = {"webhooks": {"max_retries": 7, "timeout": 3},
            "sites": {"a": {"database": {"dsn": db.dsn},
                            "webhooks": {"max_retries": 2}},
                      "b": {"database": {"dsn": db.dsn, "schema": "other"}}}}
    sites = config_mod.parse_sites(data, "f.yaml", env={})
    a, b = sites.pick("a"), sites.pick("b")
    assert (a.webhooks.max_retries, a.webhooks.timeout) == (2, 3)
    assert (b.webhooks.max_retries, b.webhooks.timeout) == (7, 3)
    with pytest.raises(ConfigError, match="choose one with --site NAME"):
        sites.pick(None)
    with pytest.raises(ConfigError, match="did you mean 'a'"):
        sites.pick("aa")
    data["sites"]["b"]["database"] = {"dsn": db.dsn}
    data["sites"]["b"]["daemon"] = {"lease": 9}
    with pytest.raises(ConfigError) as err:
        config_mod.parse_sites(data, "f.yaml", env={})
    assert "sites.a and sites.b: the same database and bridge schema" in str(err.value)
    assert "sites.b.daemon: a site may set only database, webhooks, capture" in str(err.value)


def test_two_sites_each_with_its_urls_and_secret_and_sighup(db: Db, db2: Db,
                                                             tmp_path: Path) -> None:
    asyncio.run(_two_sites(db, db2, tmp_path))


async def _two_sites(db: Db, db2: Db, tmp_path: Path) -> None:
    async with two_site_daemon(db, db2, tmp_path) as (rx, data, d):
        insert(db, "EU", 3)
        insert(db2, "US", 4)
        await rx.wait_for(lambda: len(rx.on("/eu")) == 3 and len(rx.on("/us")) == 4)
        for r, secret in [(r, b"eu-secret") for r in rx.on("/eu")] + \
                         [(r, b"us-secret") for r in rx.on("/us")]:
            assert r.headers["X-QLM-Signature"] == hashlib.sha256(r.body + secret).hexdigest()
        assert sorted(keys(rx, "/eu")) == ["EU-1", "EU-2", "EU-3"]
        assert "site=eu" in d.log() and "site=us" in d.log()
        # SIGHUP: switch the us site off; only it is skipped
        data["sites"]["us"]["webhooks"]["enabled"] = False
        d.write_config(data)
        d.signal(signal.SIGHUP)
        await d.wait_log("config reloaded")
        insert(db, "EU2", 2)
        insert(db2, "US2", 2)
        await rx.wait_for(lambda: len(rx.on("/eu")) == 5)
        await asyncio.sleep(1.0)
        assert len(rx.on("/us")) == 4
        assert db2.scalar("SELECT count(*) FROM qlm_bridge.delivery WHERE state = 'skipped'") == 2
        # SIGHUP: remove eu, add a site "eu2" on the same database under its new name
        del data["sites"]["eu"]
        data["sites"]["eu2"] = {"database": {"dsn": db.dsn},
                                "webhooks": {"secret_key": "eu2-secret",
                                             "events": {"license_created": rx.url("/eu2")}}}
        d.write_config(data)
        d.signal(signal.SIGHUP)
        await d.wait_log("site eu2 added")
        await d.wait_log("site eu removed")
        await d.wait_log("started", occurrences=3)
        insert(db, "EU3", 2)
        await rx.wait_for(lambda: len(rx.on("/eu2")) == 2)
        assert len(rx.on("/eu")) == 5


def test_one_site_cut_off_while_the_other_delivers(db: Db, db2: Db, tmp_path: Path) -> None:
    asyncio.run(_cut_off(db, db2, tmp_path))


async def _cut_off(db: Db, db2: Db, tmp_path: Path) -> None:
    async with two_site_daemon(db, db2, tmp_path) as (rx, _, d):
        try:
            insert(db2, "US-A", 5)
            await rx.wait_for(lambda: len(rx.on("/us")) == 5)
            # cut the us site off: no new connections, and its connections terminated
            db.server.execute(f"ALTER DATABASE {db2.name} ALLOW_CONNECTIONS false")
            db.server.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              f"WHERE datname = '{db2.name}' AND pid <> pg_backend_pid()")
            await d.wait_log("site=us")
            # the eu site keeps delivering meanwhile
            for i in range(5):
                insert(db, f"EU-{i}", 10)

                def arrived(want: int = 10 * (i + 1)) -> bool:
                    return len(rx.on("/eu")) == want

                await rx.wait_for(arrived, timeout=10)
            db.server.execute(f"ALTER DATABASE {db2.name} ALLOW_CONNECTIONS true")
            insert(db2, "US-B", 5)  # written once access is back
            await rx.wait_for(lambda: len(rx.on("/us")) == 10, timeout=30)
        finally:
            db.server.execute(f"ALTER DATABASE {db2.name} ALLOW_CONNECTIONS true")
    assert sorted(keys(rx, "/us")) == sorted([f"US-A-{i}" for i in range(1, 6)]
                                             + [f"US-B-{i}" for i in range(1, 6)])
    assert len(set(keys(rx, "/eu"))) == 50
