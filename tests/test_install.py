"""The installer: idempotent, transactional, versioned, printable for psql, removable; the CLI
commands with their exit codes; other schemas (quoted names, composite keys, custom rules) and
names that try to inject SQL."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bridge import install, sql
from bridge.config import Config
from bridge.errors import ConfigError, InstallError
from tests.support import config as support_config
from tests.support.config import base_config
from tests.support.server import Db, previous_sql

CAPTURE_FUNCS = ("capture_license_v1", "capture_customer_v1")
V = install.SCHEMA_VERSION


def qi(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def snapshot(db: Db, schema: str = "qlm_bridge") -> dict[str, Any]:
    """Everything an install writes, with identities (oid, xmin) where a rewrite would show."""
    ns = {"ns": qi(schema)}
    s = qi(schema)
    return {
        "version": db.query(f"SELECT version, installed_at, xmin::text FROM {s}.version "
                            "ORDER BY 1"),
        "functions": db.query(
            "SELECT p.oid::int, p.proname, p.prosrc, p.proconfig, p.prosecdef, p.proacl::text "
            "FROM pg_proc p WHERE p.pronamespace = to_regnamespace(%(ns)s) ORDER BY 2", ns),
        "triggers": triggers(db),
        "relations": db.query(
            "SELECT c.oid::int, c.relname, c.relkind FROM pg_class c "
            "WHERE c.relnamespace = to_regnamespace(%(ns)s) ORDER BY 2", ns),
        "runtime": db.query(f"SELECT xmin::text, * FROM {s}.runtime"),
        "field_map": db.query(f"SELECT xmin::text, * FROM {s}.field_map ORDER BY 2, 3"),
    }


def triggers(db: Db) -> list[tuple[Any, ...]]:
    return db.query("SELECT t.oid::int, t.tgname, t.tgrelid::regclass::text, "
                    "t.tgfoid::regprocedure::text, t.tgtype, t.tgenabled FROM pg_trigger t "
                    "WHERE NOT t.tgisinternal ORDER BY 2, 3")


def capture_functions(db: Db) -> list[str]:
    return [r[0] for r in db.query(
        "SELECT proname FROM pg_proc WHERE proname = ANY(%s) ORDER BY 1", (list(CAPTURE_FUNCS),))]


def event_types(db: Db, schema: str = "qlm_bridge") -> list[str]:
    return [r[0] for r in db.query(f"SELECT event_type FROM {qi(schema)}.event ORDER BY id")]


def has_schema(db: Db, name: str) -> bool:
    return bool(db.scalar("SELECT to_regnamespace(%s) IS NOT NULL", (qi(name),)))


def write_config(path: Path, dsn: str, **sections: Any) -> Path:
    """A minimal config (the defaults, not the test base config)."""
    return support_config.write_config(path, {"database": {"dsn": dsn}, **sections})


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def assert_clean_failure(result: subprocess.CompletedProcess[str], code: int) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("qlm-bridge: error: ")


# --- idempotent --------------------------------------------------------------------------------


def test_second_install_changes_nothing(db: Db) -> None:
    db.execute("INSERT INTO license_keys (activation_key) VALUES ('K0')")
    before = snapshot(db)
    assert len(before["triggers"]) == 2 and len(before["functions"]) == 9
    plan = install.install(db.config(), sample_schema=True)
    assert (plan.from_version, plan.to_version) == (V, V)
    assert snapshot(db) == before
    # one trigger per table still: each change gives exactly one event
    db.execute("INSERT INTO license_keys (activation_key) VALUES ('K1')")
    db.execute("UPDATE license_keys SET computer_id = 'PC1' WHERE activation_key = 'K1'")
    assert event_types(db) == ["license_created", "license_created", "license_activated"]


def test_cli_install_twice_exits_0(empty_db: Db, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", empty_db.dsn)
    first = cli("install", "--config", str(cfg), "--sample-schema")
    assert first.returncode == 0, first.stderr
    assert f"installed bridge schema 'qlm_bridge' version {V}" in first.stdout
    before = snapshot(empty_db)
    second = cli("install", "--config", str(cfg), "--sample-schema")
    assert second.returncode == 0, second.stderr
    assert f"is at version {V}" in second.stdout
    assert snapshot(empty_db) == before


def test_concurrent_installs_both_succeed(empty_db: Db) -> None:
    """Each install reads the schema version under the install lock, so the second one to run
    sees the first one's tables instead of failing on CREATE TABLE."""
    config = empty_db.config()
    results: list[object] = []

    def run() -> None:
        try:
            results.append(install.install(config, sample_schema=True))
        except Exception as exc:
            results.append(exc)

    with psycopg.connect(empty_db.dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (install.LOCK_KEY,))
        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and empty_db.scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted") < 2:
            time.sleep(0.02)
        holder.execute("SELECT pg_advisory_unlock(%s)", (install.LOCK_KEY,))
    for t in threads:
        t.join(30)
    assert all(isinstance(r, install.Plan) for r in results), results
    assert sorted(r.from_version or 0 for r in results if isinstance(r, install.Plan)) == [0, V]
    assert empty_db.scalar("SELECT max(version) FROM qlm_bridge.version") == V


# --- transactional -----------------------------------------------------------------------------


def test_missing_column_fails_and_leaves_nothing(empty_db: Db) -> None:
    config = empty_db.config(capture={"licenses": {
        "activation": {"increases": ["activation_count", "seats_taken"]}}})
    with pytest.raises(InstallError) as err:
        install.install(config, sample_schema=True)
    message = str(err.value)
    assert "no column(s) seats_taken" in message and '"public"."license_keys"' in message
    assert "activation_count" not in message  # only the missing column is named
    assert not has_schema(empty_db, "qlm_bridge")
    assert empty_db.scalar("SELECT to_regclass('public.license_keys')") is None  # sample too


def test_failure_after_the_schema_is_created_rolls_everything_back(empty_db: Db) -> None:
    # a table in the way makes CREATE TABLE fail half way through schema_v1.sql
    empty_db.execute("CREATE SCHEMA qlm_bridge; CREATE TABLE qlm_bridge.delivery (x int)")
    with pytest.raises(InstallError, match='relation "delivery" already exists'):
        install.install(empty_db.config(), sample_schema=True)
    rels = empty_db.query("SELECT relname FROM pg_class "
                          "WHERE relnamespace = 'qlm_bridge'::regnamespace AND relkind = 'r'")
    assert rels == [("delivery",)]
    assert empty_db.scalar("SELECT to_regclass('public.customers')") is None


def test_failed_reinstall_keeps_the_working_install(db: Db) -> None:
    before = snapshot(db)
    db.execute("ALTER TABLE license_keys ADD COLUMN meta json")
    bad = db.config(capture={"licenses": {"activation": {"increases": ["meta"]}}})
    with pytest.raises(InstallError, match=r"activation/release rules .* json > json"):
        install.install(bad)
    assert snapshot(db) == before
    db.execute("INSERT INTO license_keys (activation_key) VALUES ('K1')")
    db.execute("UPDATE license_keys SET meta = '{}'")  # every UPDATE still works
    assert event_types(db) == ["license_created"]


def test_missing_table_is_named(empty_db: Db) -> None:
    with pytest.raises(InstallError, match=r'table "public"."license_keys" \(capture.licenses\) '
                                           r"does not exist"):
        install.install(empty_db.config())
    assert not has_schema(empty_db, "qlm_bridge")


# --- versions ----------------------------------------------------------------------------------


def test_newer_schema_version_is_refused(db: Db, tmp_path: Path) -> None:
    db.execute("INSERT INTO qlm_bridge.version (version) VALUES (99)")
    before = snapshot(db)
    with pytest.raises(InstallError, match=rf"version 99, newer than this qlm-bridge \({V}\)"):
        install.install(db.config())
    assert snapshot(db) == before
    cfg = write_config(tmp_path / "c.yaml", db.dsn)
    for args in (["install"], ["install", "--print-sql"]):
        result = cli(*args, "--config", str(cfg))
        assert_clean_failure(result, 1)
        assert "newer than this qlm-bridge" in result.stderr


def test_the_bridge_schema_must_be_its_own(db: Db) -> None:
    for name in ("public", "pg_catalog", "information_schema"):
        with pytest.raises(ConfigError, match="cannot be the bridge schema"):
            install.install(db.config(database={"dsn": db.dsn, "schema": name}))
        with pytest.raises(ConfigError, match="cannot be the bridge schema"):
            install.uninstall(db.config(database={"dsn": db.dsn, "schema": name}),
                              drop_data=True)
    lic = db.config(database={"dsn": db.dsn, "schema": "lic"},
                    capture={"licenses": {"schema": "lic"}})
    with pytest.raises(ConfigError, match="'lic' cannot be the bridge schema"):
        install.install(lic)
    assert db.scalar("SELECT count(*) FROM license_keys") == 0  # untouched, still there


# --- printed SQL -------------------------------------------------------------------------------


def psql(dsn: str, script: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("psql")
    assert binary, "psql is needed to prove the printed SQL applies"
    return subprocess.run([binary, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f",
                           str(script)], capture_output=True, text=True, timeout=60, check=False)


def test_printed_sql_applies_with_psql(empty_db: Db, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", empty_db.dsn)
    printed = cli("install", "--config", str(cfg), "--sample-schema", "--print-sql")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.startswith("BEGIN;\n") and printed.stdout.rstrip().endswith("COMMIT;")
    assert not has_schema(empty_db, "qlm_bridge")  # printing changed nothing
    script = tmp_path / "install.sql"
    script.write_text(printed.stdout, encoding="utf-8")
    applied = psql(empty_db.dsn, script)
    assert applied.returncode == 0, applied.stderr
    assert "ERROR" not in applied.stderr
    assert empty_db.query("SELECT max(version) FROM qlm_bridge.version") == [(V,)]
    empty_db.execute("INSERT INTO customers (full_name) VALUES ('Ann')")
    empty_db.execute("INSERT INTO license_keys (activation_key) VALUES ('K1')")
    assert event_types(empty_db) == ["customer_created", "license_created"]
    # the same as the installer's own result: a real install now has nothing to add
    before = snapshot(empty_db)
    assert install.install(empty_db.config(), sample_schema=True).from_version == V
    assert snapshot(empty_db) == before

    printed = cli("uninstall", "--config", str(cfg), "--print-sql")
    assert printed.returncode == 0, printed.stderr
    script.write_text(printed.stdout, encoding="utf-8")
    applied = psql(empty_db.dsn, script)
    assert applied.returncode == 0, applied.stderr
    assert triggers(empty_db) == [] and capture_functions(empty_db) == []
    assert event_types(empty_db) == ["customer_created", "license_created"]


# --- uninstall ---------------------------------------------------------------------------------


def test_uninstall_keeps_data_and_install_again_works(db: Db) -> None:
    db.execute("INSERT INTO license_keys (activation_key) VALUES ('K1')")
    versions = db.query("SELECT version, installed_at FROM qlm_bridge.version")
    install.uninstall(db.config())
    assert triggers(db) == [] and capture_functions(db) == []
    db.execute("INSERT INTO license_keys (activation_key) VALUES ('K2')")  # not captured
    assert event_types(db) == ["license_created"]
    assert db.scalar("SELECT count(*) FROM qlm_bridge.field_map") > 0
    install.uninstall(db.config())  # a second uninstall is a no-op

    plan = install.install(db.config())
    assert plan.from_version == V
    assert db.query("SELECT version, installed_at FROM qlm_bridge.version") == versions
    db.execute("UPDATE license_keys SET computer_id = 'PC1' WHERE activation_key = 'K2'")
    assert event_types(db) == ["license_created", "license_activated"]
    assert len(triggers(db)) == 2


def test_uninstall_drop_data_drops_the_schema(db: Db) -> None:
    db.execute("INSERT INTO license_keys (activation_key) VALUES ('K1')")
    install.uninstall(db.config(), drop_data=True)
    assert not has_schema(db, "qlm_bridge")
    assert triggers(db) == []
    assert db.scalar("SELECT count(*) FROM license_keys") == 1  # the business data stays
    assert install.install(db.config()).from_version is None
    db.execute("DELETE FROM license_keys")
    assert event_types(db) == ["license_deleted"]


def test_reinstall_on_another_table_moves_the_trigger(db: Db) -> None:
    db.execute("CREATE TABLE licenses_v2 (LIKE license_keys INCLUDING ALL)")
    install.install(db.config(capture={"licenses": {"table": "licenses_v2"}}))
    tables = sorted(r[2] for r in triggers(db))
    assert tables == ["customers", "licenses_v2"]  # the old table's trigger is gone
    db.execute("INSERT INTO license_keys (activation_key) VALUES ('OLD')")
    db.execute("INSERT INTO licenses_v2 (activation_key) VALUES ('NEW')")
    assert db.query("SELECT source_table, row_data->>'activation_key' FROM qlm_bridge.event") == [
        ("public.licenses_v2", "NEW")]
    # uninstall finds triggers in the catalog, whatever the config names now
    install.uninstall(db.config())
    assert triggers(db) == [] and capture_functions(db) == []


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_exit_codes(empty_db: Db, tmp_path: Path) -> None:
    good = write_config(tmp_path / "good.yaml", empty_db.dsn)
    missing_table = cli("install", "--config", str(good))
    assert_clean_failure(missing_table, 1)
    assert "license_keys" in missing_table.stderr and "does not exist" in missing_table.stderr

    bad = write_config(tmp_path / "bad.yaml", empty_db.dsn, capture={"licences": {}})
    bad_config = cli("install", "--config", str(bad))
    assert_clean_failure(bad_config, 2)
    assert "capture.licences" in bad_config.stderr
    assert_clean_failure(cli("install", "--config", str(tmp_path / "nope.yaml")), 2)
    assert_clean_failure(cli("uninstall", "--config", str(bad)), 2)
    public = write_config(tmp_path / "public.yaml", empty_db.dsn, database={
        "dsn": empty_db.dsn, "schema": "public"})
    assert_clean_failure(cli("uninstall", "--config", str(public), "--drop-data"), 2)

    unreachable = write_config(tmp_path / "down.yaml", "postgresql://postgres@127.0.0.1:1/x")
    assert_clean_failure(cli("install", "--config", str(unreachable)), 1)

    ok = cli("install", "--config", str(good), "--sample-schema")
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == ""
    removed = cli("uninstall", "--config", str(good))
    assert removed.returncode == 0, removed.stderr
    assert "kept" in removed.stdout
    assert triggers(empty_db) == [] and has_schema(empty_db, "qlm_bridge")
    dropped = cli("uninstall", "--config", str(good), "--drop-data")
    assert dropped.returncode == 0, dropped.stderr
    assert not has_schema(empty_db, "qlm_bridge")


def test_console_script(empty_db: Db, tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "qlm-bridge"
    cfg = write_config(tmp_path / "c.yaml", empty_db.dsn)
    result = subprocess.run([str(script), "install", "-c", str(cfg), "--sample-schema"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert has_schema(empty_db, "qlm_bridge")


# --- other schemas -----------------------------------------------------------------------------

CUSTOM = """
CREATE SCHEMA "Sales";
CREATE TABLE "Sales"."Customers" ("CustomerId" bigint PRIMARY KEY, "Name" text);
CREATE TABLE "Sales"."LicenseKeys" (
    "ActivationKey" text,
    "Edition"       int,
    "SeatsUsed"     int NOT NULL DEFAULT 0,
    "MachineId"     text,
    "Note"          text,
    PRIMARY KEY ("ActivationKey", "Edition")
);
"""


def custom_config(db: Db, **database: Any) -> Config:
    return base_config(db.dsn, database={"dsn": db.dsn, **database}, capture={
        "licenses": {"schema": "Sales", "table": "LicenseKeys", "key": ["ActivationKey", "Edition"],
                     "activation": {"increases": ["SeatsUsed"], "becomes_set": ["MachineId"]},
                     "release": {"decreases": ["SeatsUsed"], "becomes_empty": ["MachineId"]}},
        "customers": {"schema": "Sales", "table": "Customers", "key": ["CustomerId"]},
    })


def test_custom_tables_with_quoted_mixed_case_names(empty_db: Db) -> None:
    empty_db.execute(CUSTOM)
    install.install(custom_config(empty_db))
    run = empty_db.execute
    run("""INSERT INTO "Sales"."Customers" VALUES (1, 'Ann')""")
    run("""INSERT INTO "Sales"."LicenseKeys" ("ActivationKey", "Edition")
           VALUES ('K', 1), ('K', 2)""")
    run("""UPDATE "Sales"."LicenseKeys" SET "SeatsUsed" = 1 WHERE "Edition" = 1""")
    run("""UPDATE "Sales"."LicenseKeys" SET "MachineId" = 'M2' WHERE "Edition" = 2""")
    run("""UPDATE "Sales"."LicenseKeys" SET "Note" = 'plain'""")
    run("""UPDATE "Sales"."LicenseKeys" SET "SeatsUsed" = 0 WHERE "Edition" = 1""")
    run("""UPDATE "Sales"."LicenseKeys" SET "MachineId" = '' WHERE "Edition" = 2""")
    run("""UPDATE "Sales"."Customers" SET "Name" = 'Bea'""")
    run("""DELETE FROM "Sales"."LicenseKeys" WHERE "Edition" = 1""")
    rows = empty_db.query("SELECT event_type, source_table, row_data->>'Edition', "
                          f"{previous_sql()} FROM qlm_bridge.event ORDER BY id")
    assert rows == [
        ("customer_created", "Sales.Customers", None, None),
        ("license_created", "Sales.LicenseKeys", "1", None),
        ("license_created", "Sales.LicenseKeys", "2", None),
        ("license_activated", "Sales.LicenseKeys", "1", {"SeatsUsed": 0}),
        ("license_activated", "Sales.LicenseKeys", "2", {"MachineId": None}),
        ("license_released", "Sales.LicenseKeys", "1", {"SeatsUsed": 1}),
        ("license_released", "Sales.LicenseKeys", "2", {"MachineId": "M2"}),
        ("customer_modified", "Sales.Customers", None, {"Name": "Ann"}),
        ("license_deleted", "Sales.LicenseKeys", "1", None),
    ]
    fields = dict(empty_db.query("SELECT column_name, field_name FROM qlm_bridge.field_map "
                                 "WHERE kind = 'license'"))
    assert fields["ActivationKey"] == "ActivationKey" and fields["MachineId"] == "MachineId"
    install.uninstall(custom_config(empty_db))
    assert triggers(empty_db) == []


INJECTIONS = [
    ({"licenses": {"table": 'license_keys"; DROP TABLE customers; --'}},
     r'table "public"\."license_keys""; DROP TABLE customers; --" \(capture\.licenses\) '
     r"does not exist"),
    ({"licenses": {"schema": "public\"; DROP TABLE customers; --"}},
     r"does not exist"),
    ({"customers": {"table": "customers'); DROP TABLE customers; --"}},
     r"""table "public"\."customers'\); DROP TABLE customers; --" \(capture\.customers\)"""),
    ({"licenses": {"activation": {"increases": ['x"); DROP TABLE customers; --']}}},
     r'has no column\(s\) "x""\); DROP TABLE customers; --" \(named in capture\.licenses\)'),
    ({"licenses": {"release": {"becomes_empty": ["computer_id) OR true OR (1"]}}},
     r'has no column\(s\) "computer_id\) OR true OR \(1"'),
    ({"customers": {"key": ["customer_id", "id'; DROP TABLE customers; --"]}},
     r"""has no column\(s\) "id'; DROP TABLE customers; --" """),
]


@pytest.mark.parametrize(("capture", "message"), INJECTIONS)
def test_names_cannot_inject_sql(db: Db, capture: dict[str, Any], message: str) -> None:
    before = snapshot(db)
    with pytest.raises(InstallError, match=message):
        install.install(db.config(capture=capture))
    assert db.scalar("SELECT to_regclass('public.customers') IS NOT NULL")
    assert snapshot(db) == before


def test_names_with_quotes_and_semicolons_are_just_identifiers(empty_db: Db) -> None:
    schema = 'qlm"; DROP TABLE x; --'
    table = "lic'; DROP TABLE x; --"
    empty_db.execute("CREATE TABLE x (id int)")
    empty_db.execute(f"CREATE TABLE {qi(table)} "
                     "(LIKE x INCLUDING ALL, computer_id text, available_licenses int, "
                     "activation_count int, activation_key text)")
    config = base_config(empty_db.dsn, database={"dsn": empty_db.dsn, "schema": schema},
                         capture={"licenses": {"table": table}})
    install.install(config, sample_schema=True)
    quoted_table, quoted_schema = qi(table), qi(schema)
    # writers notify while a daemon sleeps (a fresh install does not notify)
    empty_db.execute(f"UPDATE {quoted_schema}.runtime SET sleeping = true, "
                     "sleeping_until = now() + interval '1 hour'")
    with psycopg.connect(empty_db.dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {quoted_schema}".encode())
        empty_db.execute(f"INSERT INTO {quoted_table} (id, activation_key) VALUES (1, 'K')")
        empty_db.execute(f"UPDATE {quoted_table} SET computer_id = 'PC'")
        note = next(iter(listener.notifies(timeout=10, stop_after=1)))
    assert note.channel == schema
    assert empty_db.query(f"SELECT event_type, source_table FROM {quoted_schema}.event") == [
        ("license_created", f"public.{table}"), ("license_activated", f"public.{table}")]
    assert empty_db.scalar("SELECT to_regclass('x') IS NOT NULL")
    snap = snapshot(empty_db, schema)
    install.install(config)
    assert snapshot(empty_db, schema) == snap
    install.uninstall(config, drop_data=True)
    assert not has_schema(empty_db, schema)
    assert empty_db.scalar("SELECT to_regclass('x') IS NOT NULL")


# --- payload field names must be unique per table ----------------------------------------------


def test_columns_with_the_same_field_name_are_refused(empty_db: Db) -> None:
    empty_db.execute(sql.read("sample_schema.sql"))
    empty_db.execute('CREATE TABLE dup_keys (LIKE license_keys, "ActivationKey" text)')
    config = empty_db.config(capture={"licenses": {"table": "dup_keys"}})
    with pytest.raises(InstallError) as err:
        install.install(config)
    message = str(err.value)
    assert message.startswith('table "public"."dup_keys" (capture.licenses): ')
    assert 'columns activation_key, "ActivationKey" all become payload field "ActivationKey"' \
        in message
    assert "webhooks.field_names.license" in message
    assert not has_schema(empty_db, "qlm_bridge")  # nothing installed
    assert triggers(empty_db) == []
    # renaming one of them in the payload fixes it
    install.install(empty_db.config(capture={"licenses": {"table": "dup_keys"}}, webhooks={
        "field_names": {"license": {"ActivationKey": "ActivationKeyText"}}}))
    assert triggers(empty_db) != []


def test_a_dropped_column_does_not_clash(empty_db: Db) -> None:
    empty_db.execute(sql.read("sample_schema.sql"))
    empty_db.execute('CREATE TABLE dup_keys (LIKE license_keys, "ActivationKey" text)')
    empty_db.execute('ALTER TABLE dup_keys DROP COLUMN "ActivationKey"')
    install.install(empty_db.config(capture={"licenses": {"table": "dup_keys"}}))
    assert triggers(empty_db) != []


OVERRIDE_CLASHES = [
    ({"license": {"computer_id": "ActivationKey"}},
     r'table "public"\."license_keys" \(capture\.licenses\): columns activation_key, '
     r'computer_id all become payload field "ActivationKey"'),
    ({"customer": {"email": "FullName"}},
     r'table "public"\."customers" \(capture\.customers\): columns full_name, email all '
     r'become payload field "FullName"'),
    ({"license": {"comment": "CreationDate"}},  # onto a QLM name (created_at -> CreationDate)
     r'columns comment, created_at all become payload field "CreationDate"'),
]


@pytest.mark.parametrize(("field_names", "message"), OVERRIDE_CLASHES)
def test_an_override_onto_another_columns_field_is_refused(
        db: Db, field_names: dict[str, dict[str, str]], message: str) -> None:
    before = snapshot(db)
    with pytest.raises(InstallError, match=message):
        install.install(db.config(webhooks={"field_names": field_names}))
    assert snapshot(db) == before  # the working install is kept as it was


def test_an_override_for_a_missing_column_does_not_clash(db: Db) -> None:
    install.install(db.config(webhooks={"field_names": {"license": {"no_such": "ActivationKey"}}}))
    names = dict(db.query("SELECT column_name, coalesce(override, field_name) "
                          "FROM qlm_bridge.field_map WHERE kind = 'license'"))
    assert names["activation_key"] == "ActivationKey"  # the present column keeps its name
    assert names["no_such"] == "ActivationKey"  # kept for when the column appears


def test_the_sample_schema_has_unique_field_names(empty_db: Db) -> None:
    install.install(empty_db.config(), sample_schema=True)
    clashes = empty_db.query(
        "SELECT f.kind, f.field_name FROM qlm_bridge.field_map f "
        "JOIN pg_attribute a ON a.attname = f.column_name AND a.attnum > 0 "
        "AND a.attrelid = CASE f.kind WHEN 'license' THEN 'license_keys'::regclass "
        "ELSE 'customers'::regclass END GROUP BY 1, 2 HAVING count(*) > 1")
    assert clashes == []
