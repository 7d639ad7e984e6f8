"""Upgrade in place: a database installed by the released version (bridge schema 1, also 2 and 3)
with work in every state is upgraded by `qlm-bridge install`; a daemon then delivers every
pending and retrying delivery exactly once, failed ones stay failed (and replay), the log carries
over, and events captured before render exactly as the same change captured after the upgrade;
their keys (per-key ordering, the console's key filter) are those of the same change too."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bridge import install, ops, sql
from bridge.console import data
from bridge.console.data import ConsoleSource
from tests.support.daemon import running, wait_until
from tests.support.receiver import Receiver
from tests.support.server import Db
from tests.test_install import cli, write_config

# the ActivationKey of an event of any layout
KEY_SQL = "coalesce(e.row_data->>'activation_key', e.row_data_v1->>'activation_key')"
KEYS = ("PENDING", "RETRYING", "FAILED", "DELIVERED", "INFLIGHT", "UNFANNED")
# What a version-1 daemon left behind, per license key (its license_created delivery).
STATES = """
UPDATE qlm_bridge.event SET fanned_out = true WHERE row_data->>'activation_key' <> 'UNFANNED';
INSERT INTO qlm_bridge.delivery (event_id, url) SELECT id, __URL__ FROM qlm_bridge.event
 WHERE fanned_out ORDER BY id;
CREATE TEMP VIEW by_key AS
    SELECT d.id, e.event_id, e.event_type, e.row_data->>'activation_key' AS key
      FROM qlm_bridge.delivery d JOIN qlm_bridge.event e ON e.id = d.event_id;
-- retrying: one attempt failed, due again now
UPDATE qlm_bridge.delivery SET attempts = 1, last_status = 500, last_error = 'HTTP 500'
 WHERE id = (SELECT id FROM by_key WHERE key = 'RETRYING');
-- failed: out of retries
UPDATE qlm_bridge.delivery SET state = 'failed', attempts = 3, last_status = 500
 WHERE id = (SELECT id FROM by_key WHERE key = 'FAILED');
-- delivered
UPDATE qlm_bridge.delivery SET state = 'delivered', attempts = 1, last_status = 200
 WHERE id = (SELECT id FROM by_key WHERE key = 'DELIVERED');
-- in flight at a daemon that died: its lease runs out after the upgrade
UPDATE qlm_bridge.delivery SET attempts = 1, locked_by = 'v1-daemon',
       locked_until = now() + interval '2 seconds'
 WHERE id = (SELECT id FROM by_key WHERE key = 'INFLIGHT');
-- QLM's log of those attempts
INSERT INTO qlm_bridge.attempt_log (delivery_id, event_id, event_type, url, attempt, started_at,
                                    duration_ms, http_status, error, daemon_id)
SELECT b.id, b.event_id, b.event_type, __URL__, a, now() - interval '1 minute', 3.5,
       CASE WHEN b.key = 'DELIVERED' THEN 200 ELSE 500 END, NULL, 'v1-daemon'
  FROM by_key b
 CROSS JOIN LATERAL generate_series(1, CASE WHEN b.key = 'FAILED' THEN 3 ELSE 1 END) AS a
 WHERE b.key IN ('RETRYING', 'FAILED', 'DELIVERED') AND b.event_type = 'license_created';
"""


def _write(db: Db, keys: tuple[str, ...], activate: str) -> None:
    """Licenses written from an Asia/Kolkata session; one of them activated (an UPDATE)."""
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'Asia/Kolkata'")
        for key in keys:
            conn.execute("INSERT INTO license_keys (activation_key, product_id, expiry_date) "
                         "VALUES (%s, 7, '2026-01-15 12:00:00+00')", (key,))
        conn.execute("UPDATE license_keys SET computer_id = 'PC', activation_count = 1, "
                     "activation_date = '2026-01-16 08:00:00+00' WHERE activation_key = %s",
                     (activate,))


# the columns of version 1 (later versions add some)
COLUMNS = {"delivery": "id, event_id, url, state, attempts, next_attempt_at, locked_by, "
                       "locked_until, last_status, last_error, created_at, updated_at",
           "attempt_log": "id, delivery_id, event_id, event_type, url, attempt, started_at, "
                          "duration_ms, http_status, error, response_body, daemon_id"}


def _table(db: Db, name: str) -> list[tuple[Any, ...]]:
    return db.query(f"SELECT {COLUMNS[name]} FROM qlm_bridge.{name} ORDER BY id")


def _bodies(rx: Receiver) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for r in rx.received:
        body = json.loads(r.body)
        out[(body["EventType"], body["LicenseInfo"]["ActivationKey"])] = body
    return out


def _comparable(body: dict[str, Any]) -> dict[str, Any]:
    """The body without what differs between two captures of the same change."""
    info = {k: v for k, v in body["LicenseInfo"].items()
            if k not in ("ActivationKey", "CreationDate")}
    return {"EventType": body["EventType"], "LicenseInfo": info,
            "Previous": body.get("Previous")}


async def _upgrade(db: Db, tmp_path: Path, from_version: int) -> None:
    rx = await Receiver().start()
    url = rx.url("/hook")
    events = {"license_created": [url], "license_activated": [url]}
    # per-key ordering: events fanned out after the upgrade carry their key, also earlier ones
    cfg = db.config(webhooks={"events": events, "ordering": "per_key"})

    # an earlier schema (1: the released one), with work in every state
    install.install(cfg, sample_schema=True, target=from_version)
    assert db.scalar("SELECT max(version) FROM qlm_bridge.version") == from_version
    assert db.query("SELECT sleeping, sleeping_until FROM qlm_bridge.runtime") == [
        (from_version < 3, None)]
    _write(db, KEYS, activate="PENDING")
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute(STATES.replace("__URL__", sql.quote_literal(url)).encode())
    deliveries, log = _table(db, "delivery"), _table(db, "attempt_log")
    assert len(deliveries) == 6 and len(log) == 5
    if from_version == 2:  # the console's key index as an install of version 2 created it
        db.execute("CREATE INDEX event_key_old_idx ON qlm_bridge.event "
                   "((row_data ->> 'activation_key'))")

    # upgrade in place with the command an operator runs
    done = cli("install", "--config", str(write_config(tmp_path / "c.yaml", db.dsn,
                                                       webhooks={"events": events})))
    assert done.returncode == 0, done.stderr
    assert (f"upgraded bridge schema 'qlm_bridge' from version {from_version} to "
            f"{install.SCHEMA_VERSION}") in done.stdout
    assert db.scalar("SELECT max(version) FROM qlm_bridge.version") == install.SCHEMA_VERSION
    # nothing in flight was touched, and writers no longer NOTIFY with nobody listening
    assert _table(db, "delivery") == deliveries and _table(db, "attempt_log") == log
    assert db.query("SELECT sleeping FROM qlm_bridge.runtime") == [(False,)]
    old_layout = "row_data_v1 IS NOT NULL AND row_data IS NULL" if from_version < 3 else \
        "row_data_v1 IS NULL AND row_data IS NOT NULL"
    assert db.scalar(f"SELECT count(*) FROM qlm_bridge.event WHERE {old_layout} "
                     "AND key IS NULL") == 7
    # the console's key index over the JSON rows (both layouts) covers only the events without
    # event.key; the per-column ones of earlier versions are gone
    keyed = db.query("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'qlm_bridge' "
                     "AND tablename = 'event' AND (indexdef LIKE '%->>%' OR indexname LIKE "
                     "'event_key%')")
    assert len(keyed) == 2, keyed
    plain = dict(keyed).pop("event_key_idx")
    assert plain.endswith("USING btree (key)")
    legacy = next(d for n, d in keyed if n != "event_key_idx")
    assert "row_data_v1" in legacy and "COALESCE" in legacy and legacy.endswith(
        "WHERE (key IS NULL)")

    # the same changes captured by the upgraded triggers
    _write(db, ("AFTER",), activate="AFTER")
    due = {("license_created", k) for k in ("PENDING", "RETRYING", "INFLIGHT", "UNFANNED",
                                            "AFTER")} | {("license_activated", "PENDING"),
                                                         ("license_activated", "AFTER")}
    async with running(cfg):
        await rx.wait_for(lambda: len(rx.received) >= len(due), 30)
        await wait_until(lambda: db.scalar("SELECT count(*) FROM qlm_bridge.delivery "
                                           "WHERE state = 'pending'") == 0, 30, "settled")
    per_event = Counter(r.headers["X-QLM-Event-Id"] for r in rx.received)
    assert set(per_event.values()) == {1}, "a delivery was sent twice"
    bodies = _bodies(rx)
    assert set(bodies) == due  # nothing delivered or failed before is sent again

    # version-1 events render exactly as the same change captured after the upgrade, in UTC
    for event_type in ("license_created", "license_activated"):
        old, new = bodies[(event_type, "PENDING")], bodies[(event_type, "AFTER")]
        assert _comparable(old) == _comparable(new)
        assert old["LicenseInfo"]["ExpiryDate"] == "2026-01-15T12:00:00.000000Z"
    assert bodies[("license_activated", "PENDING")]["Previous"] == {
        "ActivationCount": 0, "ComputerID": None, "ActivationDate": None}

    # the keys: written by the trigger after the upgrade, from the JSON row before
    assert db.query("SELECT DISTINCT e.key, d.key FROM qlm_bridge.delivery d "
                    "JOIN qlm_bridge.event e ON e.id = d.event_id "
                    "WHERE d.key IS NOT NULL ORDER BY 1") == [
        ("license:AFTER", "license:AFTER"), (None, "license:UNFANNED")]
    source = ConsoleSource("default", None, cfg)
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        for key in ("PENDING", "AFTER"):
            q = data.queries("qlm_bridge", source.key_columns)["key_event_ids"]
            found = conn.execute(q.replace("$1", "100").replace("$2", sql.quote_literal(key))
                                 .encode()).fetchall()
            assert len(found) == 2, key  # created and activated

    states = dict(db.query(f"SELECT {KEY_SQL}, d.state FROM "
                           "qlm_bridge.delivery d JOIN qlm_bridge.event e ON e.id = d.event_id "
                           "WHERE e.event_type = 'license_created' "
                           "AND e.key IS NULL"))
    assert states == {"PENDING": "delivered", "RETRYING": "delivered", "FAILED": "failed",
                      "DELIVERED": "delivered", "INFLIGHT": "delivered",
                      "UNFANNED": "delivered"}
    # the log carries over, and the attempts go on from where they were
    assert _table(db, "attempt_log")[:len(log)] == log
    attempts = dict(db.query(f"SELECT {KEY_SQL}, max(l.attempt) "
                             "FROM qlm_bridge.attempt_log l JOIN qlm_bridge.event e "
                             "ON e.event_id = l.event_id WHERE e.event_type = 'license_created' "
                             "AND e.key IS NULL GROUP BY 1"))
    assert attempts == {"PENDING": 1, "RETRYING": 2, "FAILED": 3, "DELIVERED": 1,
                        "INFLIGHT": 2, "UNFANNED": 1}

    # the failed one replays, once, with its version-1 row
    rx.received.clear()
    result = ops.replay(db.dsn, cfg, ops.ReplayFilter(urls=(url,)))
    assert result.queued == 1
    async with running(cfg):
        await rx.wait_for(lambda: len(rx.received) >= 1, 30)
        await wait_until(lambda: db.scalar("SELECT count(*) FROM qlm_bridge.delivery "
                                           "WHERE state = 'pending'") == 0, 30, "settled")
    await rx.stop()
    assert list(_bodies(rx)) == [("license_created", "FAILED")]
    assert len(rx.received) == 1
    info = _bodies(rx)[("license_created", "FAILED")]["LicenseInfo"]
    assert (info["ProductID"], info["ExpiryDate"]) == (7, "2026-01-15T12:00:00.000000Z")

    # once the earlier events are gone (pruned), the next install drops their key index
    db.execute("DELETE FROM qlm_bridge.event WHERE key IS NULL")
    install.install(cfg)
    assert db.query("SELECT indexname FROM pg_indexes WHERE schemaname = 'qlm_bridge' "
                    "AND tablename = 'event' AND indexname LIKE 'event_key%'") == [
        ("event_key_idx",)]
    assert db.scalar("SELECT count(*) FROM pg_statistic_ext") == 0


@pytest.mark.parametrize("from_version", [1, 2, 3])
def test_an_earlier_database_upgrades_with_work_in_flight(empty_db: Db, tmp_path: Path,
                                                         from_version: int) -> None:
    asyncio.run(_upgrade(empty_db, tmp_path, from_version))


def test_a_version_1_daemon_cannot_send_empty_rows_after_the_upgrade(db: Db) -> None:
    """Its claim read event.row_data as jsonb and event.previous: after the upgrade that SQL
    fails (the daemon logs and retries) instead of sending a body without the row."""
    db.execute("INSERT INTO license_keys (activation_key) VALUES ('K')")
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedFunction):
            conn.execute("SELECT j.key FROM qlm_bridge.event e, jsonb_each(e.row_data) j")
        with pytest.raises(psycopg.errors.UndefinedColumn):
            conn.execute("SELECT e.previous FROM qlm_bridge.event e")
