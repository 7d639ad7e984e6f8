"""Capture: every event from real SQL on the sample schema, its content, and its guarantees
(transactional, one event per row, NOTIFY hint, least privilege, data types)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from tests.support.server import Db, previous_sql


@dataclass(frozen=True)
class Ev:
    event_type: str
    kind: str
    op: str
    source_table: str
    row: dict[str, Any]
    previous: dict[str, Any] | None


def events(db: Db) -> list[Ev]:
    """The captured events; `previous` is what the daemon derives from the stored old row
    (qlm_bridge.changed_v2: the old values of the changed columns), by column name."""
    rows = db.query(f"SELECT event_type, kind, op, source_table, row_data, {previous_sql()} "
                    "FROM qlm_bridge.event ORDER BY id")
    return [Ev(*r) for r in rows]


def types(db: Db) -> list[str]:
    return [e.event_type for e in events(db)]


def clear(db: Db) -> None:
    db.execute("DELETE FROM qlm_bridge.event")


def seed(db: Db, key: str = "K1", **columns: Any) -> None:
    """One customer and one license (computer unset, 1 seat free), then no events."""
    db.execute("INSERT INTO customers (customer_id, full_name, email) "
               "VALUES (1, 'Ann', 'ann@example.com') ON CONFLICT DO NOTHING")
    cols = {"activation_key": key, "customer_id": 1, "product_name": "Pro", **columns}
    names = ", ".join(cols)
    marks = ", ".join(["%s"] * len(cols))
    db.execute(f"INSERT INTO license_keys ({names}) VALUES ({marks})", list(cols.values()))
    clear(db)


def set_runtime(db: Db, **values: bool) -> None:
    """Set runtime flags; sleeping = true comes with an expiry an hour ahead, as a daemon about to
    sleep sets it (without one, writers do not notify)."""
    for name, value in values.items():
        db.execute(f"UPDATE qlm_bridge.runtime SET {name} = %s", (value,))
        if name == "sleeping":
            db.execute("UPDATE qlm_bridge.runtime SET sleeping_until = "
                       "CASE WHEN sleeping THEN now() + interval '1 hour' END")


# --- license events ----------------------------------------------------------------------------


def test_license_created_holds_the_new_row(db: Db) -> None:
    db.execute("INSERT INTO customers (full_name) VALUES ('Ann')")
    clear(db)
    db.execute("INSERT INTO license_keys (activation_key, customer_id, product_id, features) "
               "VALUES ('K1', 1, 7, 'F1;F2')")
    [ev] = events(db)
    assert (ev.event_type, ev.kind, ev.op) == ("license_created", "license", "INSERT")
    assert ev.source_table == "public.license_keys"
    assert ev.row["activation_key"] == "K1"
    assert ev.row["product_id"] == 7
    assert ev.row["features"] == "F1;F2"
    assert ev.row["available_licenses"] == 1  # defaults are in the row after the change
    assert ev.row["computer_id"] is None
    assert ev.previous is None


def test_license_deleted_holds_the_row_before(db: Db) -> None:
    seed(db, computer_id="PC1", comment="last words")
    db.execute("DELETE FROM license_keys WHERE activation_key = 'K1'")
    [ev] = events(db)
    assert (ev.event_type, ev.op) == ("license_deleted", "DELETE")
    assert ev.row["activation_key"] == "K1"
    assert ev.row["computer_id"] == "PC1"
    assert ev.row["comment"] == "last words"
    assert ev.previous is None


@pytest.mark.parametrize(
    ("before", "update"),
    [
        ({}, "activation_count = activation_count + 1"),
        ({}, "available_licenses = available_licenses - 1"),
        ({}, "computer_id = 'PC1'"),  # NULL -> value
        ({"computer_id": ""}, "computer_id = 'PC1'"),  # empty -> value
    ],
    ids=["count-rises", "available-falls", "computer-null-to-value", "computer-empty-to-value"],
)
def test_activation_rules(db: Db, before: dict[str, Any], update: str) -> None:
    seed(db, **before)
    db.execute(f"UPDATE license_keys SET {update}, computer_name = 'box'")
    [ev] = events(db)
    assert (ev.event_type, ev.op) == ("license_activated", "UPDATE")
    assert ev.row["computer_name"] == "box"
    assert ev.previous is not None and ev.previous["computer_name"] is None


def test_activation_previous_holds_old_values_of_changed_columns_only(db: Db) -> None:
    seed(db)
    db.execute("UPDATE license_keys SET computer_id = 'PC1', available_licenses = 0, "
               "activation_count = 1, product_name = 'Pro'")  # product_name unchanged
    [ev] = events(db)
    assert ev.event_type == "license_activated"
    assert ev.previous == {"computer_id": None, "available_licenses": 1, "activation_count": 0}
    assert ev.row["computer_id"] == "PC1" and ev.row["available_licenses"] == 0


@pytest.mark.parametrize(
    ("before", "update"),
    [
        ({"available_licenses": 0}, "available_licenses = 1"),
        ({"computer_id": "PC9"}, "computer_id = NULL"),
        ({"computer_id": "PC9"}, "computer_id = ''"),
    ],
    ids=["available-rises", "computer-to-null", "computer-to-empty"],
)
def test_release_rules(db: Db, before: dict[str, Any], update: str) -> None:
    seed(db, **before)
    db.execute(f"UPDATE license_keys SET {update}")
    [ev] = events(db)
    assert (ev.event_type, ev.op) == ("license_released", "UPDATE")


def test_released_names_the_released_computer(db: Db) -> None:
    seed(db, computer_id="PC-42", computer_name="desk", available_licenses=0,
         activation_count=1)
    db.execute("UPDATE license_keys SET computer_id = NULL, computer_name = NULL, "
               "available_licenses = 1")
    [ev] = events(db)
    assert ev.event_type == "license_released"
    assert ev.previous == {"computer_id": "PC-42", "computer_name": "desk",
                           "available_licenses": 0}
    assert ev.row["computer_id"] is None


def test_one_update_yields_at_most_one_of_activated_and_released(db: Db) -> None:
    # activation_count rises (activates) while computer_id goes to NULL (releases)
    seed(db, computer_id="PC1")
    db.execute("UPDATE license_keys SET activation_count = 5, computer_id = NULL")
    assert types(db) == ["license_activated"]


def test_plain_update_emits_nothing_by_default(db: Db) -> None:
    seed(db, computer_id="PC1")
    db.execute("UPDATE license_keys SET comment = 'note', computer_id = 'PC2', "
               "activation_count = activation_count - 1")  # value -> other value; count falls
    db.execute("UPDATE license_keys SET comment = comment")
    assert types(db) == []


def test_license_modified_while_capture_modified(db: Db) -> None:
    seed(db)
    set_runtime(db, capture_modified=True)
    db.execute("UPDATE license_keys SET comment = 'note'")
    db.execute("UPDATE license_keys SET comment = comment")  # a no-op: still nothing
    db.execute("UPDATE license_keys SET computer_id = 'PC1'")  # activations stay activations
    evs = events(db)
    assert [e.event_type for e in evs] == ["license_modified", "license_activated"]
    assert evs[0].previous == {"comment": None}
    assert evs[0].row["comment"] == "note"


# --- customer events ---------------------------------------------------------------------------


def test_customer_events(db: Db) -> None:
    db.execute("INSERT INTO customers (full_name, email, privacy_policy_consent) "
               "VALUES ('Ann', 'ann@example.com', true)")
    db.execute("UPDATE customers SET email = 'ann@corp.example', company = 'Corp'")
    db.execute("DELETE FROM customers")
    created, modified, deleted = events(db)
    assert (created.event_type, created.kind, created.op) == (
        "customer_created", "customer", "INSERT")
    assert created.source_table == "public.customers"
    assert created.row["email"] == "ann@example.com"
    assert created.row["privacy_policy_consent"] is True
    assert created.row["created_at"] is not None
    assert (modified.event_type, modified.op) == ("customer_modified", "UPDATE")
    assert modified.previous == {"email": "ann@example.com", "company": None}
    assert modified.row["email"] == "ann@corp.example"
    assert (deleted.event_type, deleted.op) == ("customer_deleted", "DELETE")
    assert deleted.row["company"] == "Corp"
    assert deleted.previous is None


def test_noop_customer_update_emits_nothing(db: Db) -> None:
    db.execute("INSERT INTO customers (full_name, email) VALUES ('Ann', NULL)")
    clear(db)
    db.execute("UPDATE customers SET full_name = full_name, email = NULL")
    assert types(db) == []


def test_customer_delete_cascading_to_license_is_a_plain_license_update(db: Db) -> None:
    seed(db)
    db.execute("DELETE FROM customers")  # ON DELETE SET NULL updates the license
    assert types(db) == ["customer_deleted"]


# --- statements and transactions ---------------------------------------------------------------


def test_multi_row_statements_give_one_event_per_row(db: Db) -> None:
    db.execute("INSERT INTO license_keys (activation_key) "
               "SELECT 'K' || i FROM generate_series(1, 1000) i")
    db.execute("UPDATE license_keys SET available_licenses = 0")
    db.execute("UPDATE license_keys SET comment = 'x'")  # plain: nothing
    db.execute("DELETE FROM license_keys WHERE activation_key LIKE 'K1%'")
    counts = dict(db.query("SELECT event_type, count(*) FROM qlm_bridge.event GROUP BY 1"))
    assert counts == {"license_created": 1000, "license_activated": 1000,
                      "license_deleted": 112}  # K1, K10-K19, K100-K199, K1000
    keys = db.scalar("SELECT count(DISTINCT row_data->>'activation_key') FROM qlm_bridge.event "
                     "WHERE event_type = 'license_activated'")
    assert keys == 1000


def test_rolled_back_changes_leave_no_event(db: Db) -> None:
    with psycopg.connect(db.dsn) as conn:
        conn.execute("INSERT INTO customers (full_name) VALUES ('Ann')")
        conn.execute("INSERT INTO license_keys (activation_key) VALUES ('K1')")
        assert conn.execute("SELECT count(*) FROM qlm_bridge.event").fetchone() == (2,)
        conn.rollback()
        with conn.transaction():
            conn.execute("INSERT INTO license_keys (activation_key) VALUES ('K2')")
            with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
                conn.execute("UPDATE license_keys SET computer_id = 'PC1'")
                conn.execute("INSERT INTO license_keys (activation_key) VALUES ('K2')")
    evs = events(db)
    assert [(e.event_type, e.row["activation_key"]) for e in evs] == [("license_created", "K2")]


def test_one_megabyte_comment_commits_and_is_captured_whole(db: Db) -> None:
    seed(db)
    set_runtime(db, sleeping=True)  # the NOTIFY must not carry the row
    big = "".join(chr(0x41 + i % 26) for i in range(1024 * 1024 - 3)) + "é€"
    db.execute("UPDATE license_keys SET comment = %s, computer_id = 'PC1'", (big,))
    db.execute("INSERT INTO license_keys (activation_key, comment) VALUES ('K2', %s)", (big,))
    rows = db.query("SELECT event_type, row_data->>'comment' FROM qlm_bridge.event ORDER BY id")
    assert [r[0] for r in rows] == ["license_activated", "license_created"]
    assert rows[0][1] == big and rows[1][1] == big


# --- NOTIFY ------------------------------------------------------------------------------------


@pytest.fixture
def listener(db: Db) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("LISTEN qlm_bridge")
        yield conn


def next_notify(conn: psycopg.Connection[Any]) -> psycopg.Notify:
    got = list(conn.notifies(timeout=10, stop_after=1))
    assert got, "no notification within 10 s"
    return got[0]


def test_notify_while_sleeping_carries_a_tiny_payload(
    db: Db, listener: psycopg.Connection[Any]
) -> None:
    set_runtime(db, sleeping=True)
    db.execute("INSERT INTO license_keys (activation_key, comment) VALUES ('K1', %s)",
               ("x" * 100_000,))
    note = next_notify(listener)
    assert note.channel == "qlm_bridge"
    assert len(note.payload) < 64


def test_customer_writes_notify_too(db: Db, listener: psycopg.Connection[Any]) -> None:
    set_runtime(db, sleeping=True)
    db.execute("INSERT INTO customers (full_name) VALUES ('Ann')")
    assert next_notify(listener).channel == "qlm_bridge"


def _three_events_then_marker(db: Db, listener: psycopg.Connection[Any]) -> None:
    """Three captured changes, then a marker NOTIFY: the marker is the first notification
    (notifications arrive in commit order), so none of the three notified."""
    db.execute("INSERT INTO customers (full_name) VALUES ('Ann')")
    db.execute("INSERT INTO license_keys (activation_key) VALUES ('K1')")
    db.execute("UPDATE license_keys SET computer_id = 'PC1'")
    db.execute("NOTIFY qlm_bridge, 'marker'")
    assert next_notify(listener).payload == "marker"
    assert len(events(db)) == 3


def test_a_fresh_install_does_not_notify(db: Db, listener: psycopg.Connection[Any]) -> None:
    """No daemon has run yet: writers skip NOTIFY (and its commit lock) until one sleeps; its
    first poll finds what was written before."""
    assert db.query("SELECT sleeping, sleeping_until FROM qlm_bridge.runtime") == [(False, None)]
    _three_events_then_marker(db, listener)


def test_an_expired_sleep_does_not_notify(db: Db, listener: psycopg.Connection[Any]) -> None:
    """A daemon that died asleep: once its sleeping_until has passed, writers stop notifying."""
    db.execute("UPDATE qlm_bridge.runtime SET sleeping = true, "
               "sleeping_until = now() - interval '1 second'")
    db.execute("INSERT INTO license_keys (activation_key) VALUES ('K1')")
    db.execute("NOTIFY qlm_bridge, 'marker'")
    assert next_notify(listener).payload == "marker"
    db.execute("UPDATE qlm_bridge.runtime SET sleeping_until = now() + interval '1 hour'")
    db.execute("INSERT INTO license_keys (activation_key) VALUES ('K2')")
    assert next_notify(listener).payload == ""


def test_no_notify_while_awake(db: Db, listener: psycopg.Connection[Any]) -> None:
    set_runtime(db, sleeping=False)
    _three_events_then_marker(db, listener)


def test_no_event_no_notify(db: Db, listener: psycopg.Connection[Any]) -> None:
    set_runtime(db, sleeping=False)
    seed(db)
    set_runtime(db, sleeping=True)
    db.execute("UPDATE license_keys SET comment = 'plain'")
    db.execute("NOTIFY qlm_bridge, 'marker'")
    assert next_notify(listener).payload == "marker"


# --- least privilege ---------------------------------------------------------------------------


@pytest.fixture
def app_role(db: Db) -> Iterator[str]:
    """A role that may only read and write the license and customer tables."""
    role = f"qlmb_app_{uuid.uuid4().hex[:12]}"
    db.execute(f"CREATE ROLE {role} NOLOGIN")
    db.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON license_keys, customers TO {role}")
    db.execute(f"GRANT USAGE ON SEQUENCE customers_customer_id_seq TO {role}")
    db.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
    try:
        yield role
    finally:
        db.execute(f"DROP OWNED BY {role} CASCADE")
        db.execute(f"DROP ROLE {role}")


def as_role(db: Db, role: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(db.dsn, autocommit=True)
    conn.execute(f"SET ROLE {role}")
    return conn


def test_restricted_role_writes_and_is_captured(db: Db, app_role: str) -> None:
    set_runtime(db, sleeping=True)
    with as_role(db, app_role) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (app_role,)
        conn.execute("INSERT INTO customers (full_name) VALUES ('Ann')")
        conn.execute("INSERT INTO license_keys (activation_key, customer_id) VALUES ('K1', 1)")
        conn.execute("UPDATE license_keys SET computer_id = 'PC1'")
        conn.execute("UPDATE license_keys SET computer_id = NULL")
        conn.execute("UPDATE customers SET email = 'a@example.com'")
        conn.execute("DELETE FROM license_keys")
        conn.execute("DELETE FROM customers")
    assert types(db) == ["customer_created", "license_created", "license_activated",
                         "license_released", "customer_modified", "license_deleted",
                         "customer_deleted"]


BRIDGE_STATEMENTS = [
    "SELECT * FROM qlm_bridge.event",
    "INSERT INTO qlm_bridge.event (event_type, kind, source_table, op, row_data) "
    "VALUES ('license_created', 'license', 'x', 'INSERT', '{}')",
    "UPDATE qlm_bridge.runtime SET sleeping = false",
    "DELETE FROM qlm_bridge.delivery",
    "SELECT * FROM qlm_bridge.attempt_log",
    "ALTER TABLE qlm_bridge.event ADD COLUMN evil text",
    "SELECT qlm_bridge.capture_license_v1()",
    "SELECT qlm_bridge.capture_customer_v1()",
]


@pytest.mark.parametrize("schema_usage", [False, True], ids=["no-schema-usage", "schema-usage"])
def test_restricted_role_cannot_touch_the_bridge(db: Db, app_role: str,
                                                 schema_usage: bool) -> None:
    if schema_usage:  # even with USAGE on the schema, no table or function is open to it
        db.execute(f"GRANT USAGE ON SCHEMA qlm_bridge TO {app_role}")
    with as_role(db, app_role) as conn:
        for statement in BRIDGE_STATEMENTS:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement.encode())
    assert db.scalar("SELECT count(*) FROM qlm_bridge.event") == 0


def test_search_path_hijack_does_not_affect_capture(db: Db, app_role: str) -> None:
    db.execute(f"""
        CREATE SCHEMA evil AUTHORIZATION {app_role};
        SET ROLE {app_role};
        CREATE TABLE evil.hits (what text);
        CREATE TABLE evil.event (id bigserial, event_id uuid DEFAULT gen_random_uuid(),
            event_type text, kind text, source_table text, op text, row_data jsonb,
            previous jsonb, created_at timestamptz DEFAULT now(),
            fanned_out boolean DEFAULT false);
        CREATE TABLE evil.runtime (sleeping boolean, capture_modified boolean);
        INSERT INTO evil.runtime VALUES (false, true);
        CREATE FUNCTION evil.to_jsonb(anyelement) RETURNS jsonb LANGUAGE sql
            AS $$ INSERT INTO evil.hits VALUES ('to_jsonb') RETURNING '{{}}'::jsonb $$;
        CREATE FUNCTION evil.row_to_json(anyelement) RETURNS json LANGUAGE sql
            AS $$ INSERT INTO evil.hits VALUES ('row_to_json') RETURNING '{{}}'::json $$;
        CREATE FUNCTION evil.jsonb_each(jsonb, OUT key text, OUT value jsonb)
            RETURNS SETOF record LANGUAGE sql
            AS $$ INSERT INTO evil.hits VALUES ('jsonb_each') RETURNING 'k', '1'::jsonb $$;
        CREATE FUNCTION evil.pg_notify(text, text) RETURNS void LANGUAGE sql
            AS $$ INSERT INTO evil.hits VALUES ('pg_notify') $$;
        CREATE FUNCTION evil.jsonb_object_agg(text, jsonb) RETURNS jsonb LANGUAGE sql
            AS $$ INSERT INTO evil.hits VALUES ('agg') RETURNING '{{}}'::jsonb $$;
        CREATE FUNCTION evil.texteq(text, text) RETURNS boolean LANGUAGE sql
            AS $$ INSERT INTO evil.hits VALUES ('texteq') RETURNING true $$;
        CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.texteq);
        CREATE OPERATOR evil.> (LEFTARG = integer, RIGHTARG = integer,
                                FUNCTION = pg_catalog.int4lt);
        RESET ROLE;
    """)
    set_runtime(db, sleeping=True)
    with as_role(db, app_role) as conn:
        conn.execute("CREATE TEMP TABLE event (LIKE evil.event INCLUDING ALL)")
        conn.execute("CREATE TEMP TABLE runtime (LIKE evil.runtime)")
        conn.execute("SET search_path = evil, public, pg_catalog")
        conn.execute("INSERT INTO license_keys (activation_key, computer_id) VALUES ('K1', '')")
        conn.execute("UPDATE license_keys SET activation_count = 1")  # rises (evil > says no)
        conn.execute("UPDATE license_keys SET computer_id = 'PC1'")
        conn.execute("UPDATE license_keys SET comment = 'plain'")  # evil runtime says capture
        conn.execute("INSERT INTO customers (full_name) VALUES ('Ann')")
        conn.execute("UPDATE customers SET email = 'x@example.com'")
        hits = conn.execute("SELECT count(*) FROM evil.hits").fetchone()
        evil_events = conn.execute("SELECT count(*) FROM evil.event").fetchone()
    assert hits == (0,)
    assert evil_events == (0,)
    evs = events(db)
    assert [e.event_type for e in evs] == ["license_created", "license_activated",
                                           "license_activated", "customer_created",
                                           "customer_modified"]
    assert evs[1].previous == {"activation_count": 0}
    assert evs[4].previous == {"email": None}


def test_trigger_functions_are_security_definer_with_pinned_search_path(db: Db) -> None:
    rows = db.query("SELECT p.proname, p.prosecdef, p.proconfig, "
                    "has_function_privilege('public', p.oid, 'EXECUTE') "
                    "FROM pg_proc p WHERE p.pronamespace = 'qlm_bridge'::regnamespace "
                    "AND p.prorettype = 'trigger'::regtype ORDER BY 1")
    assert rows == [
        ("capture_customer_v1", True, ["search_path=pg_catalog, pg_temp"], False),
        ("capture_license_v1", True, ["search_path=pg_catalog, pg_temp"], False),
    ]


# --- data types --------------------------------------------------------------------------------


def test_data_types_are_captured_as_valid_json(db: Db) -> None:
    db.execute("""
        ALTER TABLE license_keys
            ADD COLUMN n40 numeric, ADD COLUMN f_nan float8, ADD COLUMN f_inf float8,
            ADD COLUMN n_nan numeric, ADD COLUMN bin bytea, ADD COLUMN tags text[],
            ADD COLUMN grid int[], ADD COLUMN j json, ADD COLUMN jb jsonb,
            ADD COLUMN ts timestamp, ADD COLUMN tstz timestamptz, ADD COLUMN span interval,
            ADD COLUMN nothing int
    """)
    weird = "emoji 😀 \U0001f9ec tab\tnl\ncr\rbell\x07 esc\x1b del\x7f quote\" back\\"
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'Europe/Berlin'")
        conn.execute(
            "INSERT INTO license_keys (activation_key, comment, n40, f_nan, f_inf, n_nan, bin, "
            "tags, grid, j, jb, ts, tstz, span, nothing) VALUES "
            "('K1', %s, 1234567890123456789012345678901234567890.5, 'NaN', '-Infinity', 'NaN', "
            "'\\x00ff10'::bytea, ARRAY['a', NULL, 'c,d'], '{{1,2},{3,4}}', "
            "'{\"a\": [1, 2.50]}', '{\"b\": {\"c\": null}}', '2024-02-29 23:59:59.123456', "
            "'2024-06-01 12:00:00+00', '1 year 2 mons 3 days 04:05:06', NULL)",
            (weird,),
        )
    text = dict(db.query("SELECT j.key, j.value FROM qlm_bridge.event, "
                         "json_each_text(row_data) j"))
    kinds = dict(db.query("SELECT j.key, json_typeof(j.value) FROM qlm_bridge.event, "
                          "json_each(row_data) j"))
    assert text["n40"] == "1234567890123456789012345678901234567890.5"
    assert kinds["n40"] == "number"
    # JSON has no NaN/Infinity: they become the strings PostgreSQL prints
    assert (text["f_nan"], kinds["f_nan"]) == ("NaN", "string")
    assert (text["f_inf"], kinds["f_inf"]) == ("-Infinity", "string")
    assert (text["n_nan"], kinds["n_nan"]) == ("NaN", "string")
    assert text["bin"] == "\\x00ff10"
    assert kinds["tags"] == "array" and kinds["grid"] == "array"
    assert kinds["j"] == "object" and kinds["jb"] == "object"
    assert text["ts"] == "2024-02-29T23:59:59.123456"
    # timestamptz is captured in the writer's session time zone (same instant; the daemon
    # renders it in UTC: test_payload_times.py)
    assert text["tstz"] == "2024-06-01T14:00:00+02:00"
    assert text["span"] == "1 year 2 mons 3 days 04:05:06"
    assert kinds["nothing"] == "null"
    assert text["comment"] == weird
    # and the whole row reads back as JSON in Python, value for value
    row = db.scalar("SELECT row_data FROM qlm_bridge.event")
    assert row["tags"] == ["a", None, "c,d"]
    assert row["grid"] == [[1, 2], [3, 4]]
    assert row["j"] == {"a": [1, 2.5]}
    assert row["jb"] == {"b": {"c": None}}
    assert row["comment"] == weird
    # the JSON text keeps every digit (a float-parsing JSON reader would not)
    raw = db.scalar("SELECT row_data::text FROM qlm_bridge.event")
    assert '"n40":1234567890123456789012345678901234567890.5' in raw
    assert '"j":{"a": [1, 2.50]}' in raw  # a json column as it was written
    assert json.loads(raw, parse_float=Decimal)["n40"] == Decimal(
        "1234567890123456789012345678901234567890.5")


def test_the_key_is_the_json_form_of_the_key_columns(db: Db) -> None:
    """event.key (schema version 4) is written from the record's fields, in the form `produce`
    computed from the JSON row before (each value as `row_data ->> column`, joined by '|'),
    whatever the columns' types and the writer's time zone, for every operation."""
    from bridge import install

    db.execute("ALTER TABLE license_keys ADD COLUMN tags text[], ADD COLUMN pad char(6), "
               "ADD COLUMN jb jsonb, ADD COLUMN n numeric")
    key = ("activation_key", "expiry_date", "tags", "pad", "jb", "n", "computer_id")
    install.install(db.config(capture={"licenses": {"key": list(key)}}))
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'Asia/Kolkata'")
        conn.execute("SET DateStyle = 'German'")  # ::text would differ; JSON's form does not
        conn.execute("INSERT INTO license_keys (activation_key, expiry_date, tags, pad, jb, n) "
                     "VALUES ('K|1', '2026-01-15 12:00:00+00', ARRAY['a', NULL], 'ab', "
                     "'{\"x\": [1, \"y\"]}', 1.50)")
        conn.execute("UPDATE license_keys SET computer_id = 'PC', activation_count = 1")
        conn.execute("DELETE FROM license_keys")
    cols = db.query("SELECT key, (SELECT kind || ':' || string_agg(coalesce(row_data ->> c, ''),"
                    " '|' ORDER BY n) FROM unnest(%s::text[]) WITH ORDINALITY AS k(c, n)) "
                    "FROM qlm_bridge.event ORDER BY id", (list(key),))
    assert [k for k, _ in cols] == [
        'license:K|1|2026-01-15T17:30:00+05:30|["a",null]|ab    |{"x": [1, "y"]}|1.50|',
        'license:K|1|2026-01-15T17:30:00+05:30|["a",null]|ab    |{"x": [1, "y"]}|1.50|PC',
        'license:K|1|2026-01-15T17:30:00+05:30|["a",null]|ab    |{"x": [1, "y"]}|1.50|PC']
    assert all(k == computed for k, computed in cols)
    # a table without key columns has no key, as produce had none for it
    install.install(db.config(capture={"customers": {"key": []}}))
    db.execute("INSERT INTO customers (full_name) VALUES ('Ann')")
    assert db.scalar("SELECT count(*) FROM qlm_bridge.event WHERE kind = 'customer' "
                     "AND key IS NULL") == 1


def test_array_and_null_changes_are_in_previous(db: Db) -> None:
    db.execute("ALTER TABLE customers ADD COLUMN tags text[], ADD COLUMN doc jsonb")
    db.execute("INSERT INTO customers (full_name, tags, doc) VALUES ('Ann', '{a}', '[1]')")
    db.execute("UPDATE customers SET tags = '{a,b}', doc = NULL")
    ev = events(db)[-1]
    assert ev.event_type == "customer_modified"
    assert ev.previous == {"tags": ["a"], "doc": [1]}
    assert ev.row["doc"] is None
