"""Bad data in the tables: every column type reaches the receiver as valid JSON that parses back
to the same value (numbers with every digit), or install rejects the table with a clear reason.
Tables with composite keys and quoted mixed-case names; a 1 MB text; a 10,000-row UPDATE."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from bridge import install
from bridge.daemon import Daemon
from bridge.errors import BridgeError
from tests.support.campaign import insert_licenses
from tests.support.receiver import Receiver
from tests.support.server import Db

SCHEMA = """
CREATE TABLE "Customers" (
    "TenantId"   int,
    "CustomerNo" int,
    "FullName"   text,
    PRIMARY KEY ("TenantId", "CustomerNo")
);
CREATE TABLE "LicenseKeys" (
    "ActivationKey"   text,
    "ProductId"       int,
    "ComputerID"      text,
    "ActivationCount" int NOT NULL DEFAULT 0,
    big      numeric,
    f8_nan   float8,
    f8_inf   float8,
    f4_ninf  real,
    n_nan    numeric,
    raw      bytea,
    tags     text[],
    grid     int[],
    doc      json,
    docb     jsonb,
    ts       timestamp,
    tstz     timestamptz,
    dur      interval,
    note     text,
    nothing  text,
    PRIMARY KEY ("ActivationKey", "ProductId")
);
"""

CAPTURE: dict[str, Any] = {
    "licenses": {"table": "LicenseKeys", "key": ["ActivationKey", "ProductId"],
                 "activation": {"increases": ["ActivationCount"], "becomes_set": ["ComputerID"]},
                 "release": {"becomes_empty": ["ComputerID"]}},
    "customers": {"table": "Customers", "key": ["TenantId", "CustomerNo"]},
}

BIG = "1234567890123456789012345678.901234567890"  # 40 digits
TEXT = "emoji \U0001F600 \U00010348, controls \x01\x07\x1b\x7f \t\r\n, quote \" backslash \\ " \
       "and \u2028 line separator"
ROW = {
    "big": BIG, "f8_nan": "NaN", "f8_inf": "Infinity", "f4_ninf": "-Infinity", "n_nan": "NaN",
    "raw": b"\x00\xde\xad\xbe\xef", "tags": ["a", None, 'q"uote', "\U0001F600"],
    "grid": "{{1,2},{3,4}}", "doc": '{"a": [1, 2.50, 1e400], "b": null}',
    "docb": '{"k": {"deep": [true, false]}, "n": 12345678901234567890.123}',
    "ts": "2024-02-29 23:59:59.999999", "tstz": "2024-02-29 23:59:59.999999+05:30",
    "dur": "1 year 2 mons 3 days 04:05:06.789", "note": TEXT, "nothing": None,
}


def _deliver(db: Db, events: dict[str, list[str]], write: Any, expect: int,
             capture: dict[str, Any] | None = None, timeout: float = 60) -> Receiver:
    async def run() -> Receiver:
        rx = await Receiver().start()
        cfg = db.config(webhooks={"events": {e: [rx.url(p) for p in ps]
                                             for e, ps in events.items()},
                                  "max_concurrency": 64, "per_url_concurrency": 32},
                        **({"capture": capture} if capture else {}))
        d = Daemon(cfg)
        task = asyncio.create_task(d.run())
        try:
            await asyncio.wait_for(d.ready.wait(), 10)
            await asyncio.to_thread(write)
            await rx.wait_for(lambda: len({h.event_id for h in rx.received}) >= expect, timeout,
                              f"{expect} events")
        finally:
            d.stop()
            await asyncio.wait_for(task, 15)
            await rx.stop()
        return rx

    return asyncio.run(run())


@pytest.fixture
def odd_db(empty_db: Db) -> Db:
    empty_db.execute(SCHEMA)
    install.install(empty_db.config(capture=CAPTURE))
    return empty_db


def test_every_type_arrives_faithfully(odd_db: Db) -> None:
    db = odd_db
    cols = ", ".join(ROW)
    marks = ", ".join(["%s"] * len(ROW))

    def write() -> None:
        db.execute('INSERT INTO "Customers" VALUES (1, 2, %s)', (TEXT,))
        db.execute(f'INSERT INTO "LicenseKeys" ("ActivationKey", "ProductId", {cols}) '
                   f"VALUES ('K-1', 7, {marks})", tuple(ROW.values()))
        db.execute('UPDATE "LicenseKeys" SET "ComputerID" = \'PC\u00e9\', '
                   '"ActivationCount" = 1')

    rx = _deliver(db, {"license_created": ["/l"], "license_activated": ["/l"],
                       "customer_created": ["/c"]}, write, 3, capture=CAPTURE)
    bodies = {json.loads(h.body, parse_float=Decimal)["EventType"]:
              json.loads(h.body, parse_float=Decimal) for h in rx.received}
    customer = bodies["customer_created"]["CustomerInfo"]
    assert (customer["TenantId"], customer["CustomerNo"], customer["FullName"]) == (1, 2, TEXT)
    lic = bodies["license_created"]["LicenseInfo"]
    assert (lic["ActivationKey"], lic["ProductId"]) == ("K-1", 7)
    assert lic["Big"] == Decimal(BIG) and str(lic["Big"]) == BIG  # every digit
    assert (lic["F8Nan"], lic["F8Inf"], lic["F4Ninf"], lic["NNan"]) == \
        ("NaN", "Infinity", "-Infinity", "NaN")
    assert bytes.fromhex(lic["Raw"].removeprefix("\\x")) == ROW["raw"]
    assert lic["Tags"] == ROW["tags"]
    assert lic["Grid"] == [[1, 2], [3, 4]]
    assert lic["Doc"] == {"a": [1, Decimal("2.50"), Decimal("1e400")], "b": None}
    assert lic["Docb"]["n"] == Decimal("12345678901234567890.123")
    assert datetime.fromisoformat(lic["Ts"]) == datetime(2024, 2, 29, 23, 59, 59, 999999)
    tstz = datetime.fromisoformat(lic["Tstz"])
    assert tstz == datetime.fromisoformat("2024-02-29T23:59:59.999999+05:30")
    assert lic["Dur"] == "1 year 2 mons 3 days 04:05:06.789"
    assert lic["Note"] == TEXT and lic["Nothing"] is None
    activated = bodies["license_activated"]
    assert activated["LicenseInfo"]["ComputerID"] == "PC\u00e9"
    assert activated["Previous"] == {"ComputerID": None, "ActivationCount": 0}
    for h in rx.received:  # strict JSON: no bare NaN/Infinity tokens
        json.loads(h.body, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))


def test_one_megabyte_text_arrives_whole(db: Db) -> None:
    text = ("0123456789abcdef\U0001F600" * 60_000)[:1_000_000]
    rx = _deliver(db, {"license_created": ["/l"]},
                  lambda: db.execute("INSERT INTO license_keys (activation_key, comment) "
                                     "VALUES ('BIG', %s)", (text,)), 1)
    assert json.loads(rx.received[0].body)["LicenseInfo"]["Comment"] == text


def test_ten_thousand_row_update_delivers_every_event(db: Db) -> None:
    n = 10_000
    insert_licenses(db.dsn, "U", 0, n)  # license_created: nobody subscribes

    rx = _deliver(db, {"license_activated": ["/a"]},
                  lambda: db.execute("UPDATE license_keys SET computer_id = 'PC'"), n,
                  timeout=120)
    keys = {json.loads(h.body)["LicenseInfo"]["ActivationKey"] for h in rx.received}
    assert len(keys) == n
    assert db.scalar("SELECT count(*) FROM qlm_bridge.delivery WHERE state = 'delivered'") == n


def test_rules_on_a_type_without_the_operator_are_rejected_at_install(empty_db: Db) -> None:
    empty_db.execute(SCHEMA)
    bad = {**CAPTURE, "licenses": {**CAPTURE["licenses"],
                                   "activation": {"increases": ["doc"]}}}
    with pytest.raises(BridgeError) as err:
        install.install(empty_db.config(capture=bad))
    message = str(err.value)
    assert "LicenseKeys" in message and "json" in message
    assert empty_db.scalar("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal") == 0


def test_interval_and_timestamps_survive_unusual_session_settings(db: Db) -> None:
    """The writer's session settings shape the captured text; the payload is exact, and its
    timestamptz values are in UTC whatever the writer's TimeZone."""
    def write() -> None:
        with __import__("psycopg").connect(db.dsn, autocommit=True) as conn:
            conn.execute("SET TimeZone = 'Pacific/Chatham'")
            conn.execute("SET DateStyle = 'SQL, DMY'")
            conn.execute("INSERT INTO license_keys (activation_key, expiry_date) "
                         "VALUES ('TZ', '2030-01-01 00:00:00+00')")

    rx = _deliver(db, {"license_created": ["/l"]}, write, 1)
    expiry = json.loads(rx.received[0].body)["LicenseInfo"]["ExpiryDate"]
    assert expiry == "2030-01-01T00:00:00.000000Z"
    assert datetime.fromisoformat(expiry).utcoffset() == timedelta(0)
