"""Payload times: every timestamptz value arrives in UTC, in the form of the body's Timestamp,
whatever the writer's session TimeZone; `timestamp` and `date` columns arrive as written."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import psycopg

from bridge import install
from tests.support.daemon import running
from tests.support.receiver import Receiver
from tests.support.server import Db

UTC_FORM = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")  # payload.iso_utc's form
EXTRA_COLUMNS = ("ALTER TABLE license_keys ADD COLUMN local_ts timestamp, ADD COLUMN day date, "
                 "ADD COLUMN stamps timestamptz[], ADD COLUMN moment instant")


def _write(db: Db, zone: str, key: str) -> None:
    """One writer session in `zone`: a license with the same instants, then its activation
    (an UPDATE whose Previous holds a timestamptz)."""
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute(f"SET TimeZone = '{zone}'")
        conn.execute(
            "INSERT INTO license_keys (activation_key, expiry_date, local_ts, day, stamps, "
            "moment, order_date) VALUES (%s, '2026-01-15 12:00:00+00', "
            "'2026-01-15 12:00:00.5', '2026-01-15', "
            "ARRAY['2026-01-15 12:00:00.25+00'::timestamptz, NULL, '-infinity'], "
            "'1900-01-01 00:00:00+00', '2026-07-01 23:30:00.000001-02:00')", (key,))
        conn.execute("UPDATE license_keys SET computer_id = 'PC', "
                     "activation_date = '2026-01-16 08:00:00+00', "
                     "expiry_date = '2027-01-15 12:00:00+00' WHERE activation_key = %s", (key,))


async def _deliver(db: Db) -> list[dict[str, Any]]:
    rx = await Receiver().start()
    cfg = db.config(webhooks={"events": {"license_created": [rx.url()],
                                         "license_activated": [rx.url()]}})
    async with running(cfg):
        for zone, key in (("Asia/Kolkata", "IN"), ("UTC", "UTC"), ("Europe/Amsterdam", "NL")):
            await asyncio.to_thread(_write, db, zone, key)
        await rx.wait_for(lambda: len(rx.received) == 6)
    await rx.stop()
    return [json.loads(r.body) for r in rx.received]


def test_times_are_utc_whatever_the_writers_time_zone(db: Db) -> None:
    db.execute("CREATE DOMAIN instant AS timestamptz")  # a domain over timestamptz counts too
    db.execute(EXTRA_COLUMNS)
    install.install(db.config())  # records the new columns' types
    bodies = asyncio.run(_deliver(db))
    by = {(b["EventType"], b["LicenseInfo"]["ActivationKey"]): b for b in bodies}
    same: dict[str, list[Any]] = {}
    for (event_type, _key), body in sorted(by.items()):
        info = body["LicenseInfo"]
        assert UTC_FORM.match(body["Timestamp"])
        assert UTC_FORM.match(info["CreationDate"])
        assert info["LocalTs"] == "2026-01-15T12:00:00.5"  # as written: no zone, no conversion
        assert info["Day"] == "2026-01-15"
        assert info["Stamps"] == ["2026-01-15T12:00:00.250000Z", None, "-infinity"]
        assert info["Moment"] == "1900-01-01T00:00:00.000000Z"  # Amsterdam was +00:19:32 then
        assert info["OrderDate"] == "2026-07-02T01:30:00.000001Z"
        if event_type == "license_created":
            assert info["ExpiryDate"] == "2026-01-15T12:00:00.000000Z"
            assert "Previous" not in body
        else:
            assert info["ExpiryDate"] == "2027-01-15T12:00:00.000000Z"
            assert info["ActivationDate"] == "2026-01-16T08:00:00.000000Z"
            assert body["Previous"] == {"ComputerID": None, "ActivationDate": None,
                                        "ExpiryDate": "2026-01-15T12:00:00.000000Z"}
        payload = {k: v for k, v in body.items() if k not in ("EventId", "Timestamp")}
        payload["LicenseInfo"] = {k: v for k, v in info.items()
                                  if k not in ("ActivationKey", "CreationDate")}
        same.setdefault(event_type, []).append(payload)
    # the same change arrives identically from every writer's session
    for event_type, payloads in same.items():
        assert len(payloads) == 3, event_type
        assert payloads[0] == payloads[1] == payloads[2]


def test_a_stale_type_leaves_the_value_as_captured(db: Db) -> None:
    """A column whose type changed after install (field_map says timestamptz, the value is text)
    is sent as captured: the claim never fails on it."""
    db.execute("ALTER TABLE license_keys ALTER COLUMN comment TYPE text")
    db.execute("UPDATE qlm_bridge.field_map SET type_name = 'timestamp with time zone' "
               "WHERE kind = 'license' AND column_name = 'comment'")
    db.execute("INSERT INTO license_keys (activation_key, comment) VALUES ('K', 'not a time')")
    row = db.query("SELECT qlm_bridge.payload_info_v2(kind, row_data, row_data_v1) "
                   "FROM qlm_bridge.event")
    assert json.loads(row[0][0])["Comment"] == "not a time"
