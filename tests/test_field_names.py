"""webhooks.field_names overrides: applied by every daemon start, cleared when removed from the
config, and refused when two columns would become the same payload field."""

from __future__ import annotations

import asyncio
import json

import pytest

from bridge.daemon import Daemon
from bridge.errors import ConfigError
from tests.support.daemon import running
from tests.support.receiver import Receiver
from tests.support.server import Db


async def _deliver_one(db: Db, key: str,
                       field_names: dict[str, dict[str, str]]) -> dict[str, object]:
    rx = await Receiver().start()
    cfg = db.config(webhooks={"events": {"license_created": [rx.url()]},
                              "field_names": field_names})
    async with running(cfg):
        db.execute("INSERT INTO license_keys (activation_key, computer_id) VALUES (%s, 'PC')",
                   (key,))
        await rx.wait_for(lambda: len(rx.received) == 1)
    await rx.stop()
    info = json.loads(rx.received[0].body)["LicenseInfo"]
    assert isinstance(info, dict)
    return info


def test_an_override_removed_from_the_config_no_longer_applies(db: Db) -> None:
    first = asyncio.run(_deliver_one(db, "K1", {"license": {"computer_id": "MachineID"}}))
    assert first["MachineID"] == "PC" and "ComputerID" not in first
    second = asyncio.run(_deliver_one(db, "K2", {}))
    assert second["ComputerID"] == "PC" and "MachineID" not in second
    assert db.scalar("SELECT count(*) FROM qlm_bridge.field_map WHERE override IS NOT NULL") == 0


def test_a_clashing_override_stops_the_daemon_and_writes_nothing(db: Db) -> None:
    cfg = db.config(webhooks={"field_names": {"license": {"computer_id": "ActivationKey"}}})

    async def start() -> None:
        await Daemon(cfg).run()

    with pytest.raises(ConfigError) as err:
        asyncio.run(start())
    message = str(err.value)
    assert "webhooks.field_names" in message
    assert "activation_key" in message and "computer_id" in message
    assert db.scalar("SELECT count(*) FROM qlm_bridge.field_map WHERE override IS NOT NULL") == 0


def test_fields_come_in_table_column_order(db: Db) -> None:
    info = asyncio.run(_deliver_one(db, "K3", {}))
    assert list(info)[:4] == ["ActivationKey", "CustomerID", "ProductID", "ProductName"]
    assert list(info)[-2:] == ["CreationDate", "LastAccessedDate"]
