"""Render and apply install, upgrade and uninstall, each in one transaction.

The SQL itself lives in `sql/`: schema_v1.sql and the migrations in MIGRATIONS (data tables,
each applied once), capture_vN.sql (the trigger functions of a schema version, CAPTURE) and
capture.sql (the triggers, replaced on every install), checks.sql (pre-install checks and field
names) and uninstall.sql.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import psycopg

from bridge import keys, sql
from bridge.config import ActivationRule, Config
from bridge.connect import psycopg_connect
from bridge.errors import ConfigError, InstallError
from bridge.events import QLM_FIELD_NAMES

SCHEMA_VERSION = 4
# version -> file that brings a database from version-1 to version.
MIGRATIONS: dict[int, str] = {1: "schema_v1.sql", 2: "migrate_engine.sql", 3: "migrate_v3.sql",
                              4: "migrate_v4.sql"}
# version -> the capture functions written for it (a version not listed keeps the last one)
CAPTURE: dict[int, str] = {1: "capture_v1.sql", 3: "capture_v2.sql", 4: "capture_v3.sql"}
LOCK_KEY = 0x514C4D42  # 'QLMB': serialises concurrent installs


@dataclass(frozen=True)
class Plan:
    """What an install will do: from which schema version, and the SQL that does it."""

    from_version: int | None
    to_version: int
    sql: str


def _array(values: Iterable[str]) -> str:
    items = ", ".join(sql.quote_literal(v) for v in values)
    return f"ARRAY[{items}]::text[]"


def _condition(rule: ActivationRule) -> str:
    terms = []
    for col in rule.increases:
        c = sql.quote_ident(col)
        terms.append(f"coalesce(NEW.{c} > OLD.{c}, false)")
    for col in rule.decreases:
        c = sql.quote_ident(col)
        terms.append(f"coalesce(NEW.{c} < OLD.{c}, false)")
    for col in rule.becomes_set:
        c = sql.quote_ident(col)
        terms.append(f"(coalesce(OLD.{c}::text, '') = '' AND coalesce(NEW.{c}::text, '') <> '')")
    for col in rule.becomes_empty:
        c = sql.quote_ident(col)
        terms.append(f"(coalesce(OLD.{c}::text, '') <> '' AND coalesce(NEW.{c}::text, '') = '')")
    return "(" + " OR ".join(terms) + ")" if terms else "false"


def trigger_name(config: Config) -> str:
    return f"{config.database.schema_name}_capture_v1"[:63]


_RESERVED_SCHEMAS = frozenset({"public", "information_schema"})


def check_schema_name(config: Config) -> None:
    """The bridge schema must be its own: install revokes PUBLIC's rights on it and
    `uninstall --drop-data` drops it with CASCADE, which must never reach the license tables."""
    name = config.database.schema_name
    shared = {config.capture.licenses.table_schema, config.capture.customers.table_schema}
    if name in _RESERVED_SCHEMAS or name.startswith("pg_") or name in shared:
        raise ConfigError(
            f"database.schema: {name!r} cannot be the bridge schema (it is a system schema or "
            "holds the captured tables); use a schema of its own, e.g. qlm_bridge"
        )


def _checks(config: Config) -> list[str]:
    blocks = sql.blocks("checks.sql")
    out = []
    lic, cus = config.capture.licenses, config.capture.customers
    for section, table, columns in (
        ("licenses", lic, {*lic.key, *lic.activation.columns(), *lic.release.columns()}),
        ("customers", cus, set(cus.key)),
    ):
        qualified = sql.quote_literal(table.qualified())
        out.append(sql.render(blocks["table_exists"], qualified=qualified, section=section))
        if columns:
            out.append(sql.render(blocks["columns_exist"], qualified=qualified, section=section,
                                  columns=_array(sorted(columns))))
    out.append(sql.render(blocks["rules_valid"], table=lic.qualified(),
                          qualified=sql.quote_literal(lic.qualified()),
                          activated=_condition(lic.activation), released=_condition(lic.release)))
    return out


def _capture_file(version: int) -> str:
    return CAPTURE[max(v for v in CAPTURE if v <= version)]


def _capture(config: Config, version: int) -> list[str]:
    functions = sql.blocks(_capture_file(version))
    blocks = sql.blocks("capture.sql")
    schema = sql.quote_ident(config.database.schema_name)
    channel = sql.quote_literal(config.database.channel)
    lic = config.capture.licenses
    out = []
    for kind, table, func in (
        ("license", lic, "capture_license_v1"),
        ("customer", config.capture.customers, "capture_customer_v1"),
    ):
        values = {"schema": schema, "func": sql.quote_ident(func), "channel": channel}
        if version >= 4:  # event.key, and source_table as a literal
            values |= {"key_new": keys.trigger_key(kind, table.key, "NEW"),
                       "key_old": keys.trigger_key(kind, table.key, "OLD"),
                       "source": sql.quote_literal(f"{table.table_schema}.{table.table}")}
        if kind == "license":
            values |= {"activated": _condition(lic.activation), "released": _condition(lic.release)}
        out.append(sql.render(functions[f"{kind}_function"], **values))
        out.append(sql.render(blocks["function_privileges"], schema=schema,
                              func=sql.quote_ident(func)))
        out.append(sql.render(blocks["trigger"], schema=schema, func=sql.quote_ident(func),
                              trigger=sql.quote_ident(trigger_name(config)),
                              table=table.qualified()))
        out.append(sql.render(blocks["drop_triggers"],
                              funcref=_funcref(config, func),
                              qualified=sql.quote_literal(table.qualified()),
                              tgname=sql.quote_literal(trigger_name(config))))
    return out


def _console_indexes(config: Config, version: int) -> list[str]:
    """The web console's indexes (sql/console.sql), created when missing by every install."""
    blocks = sql.blocks("console.sql")
    schema = sql.quote_ident(config.database.schema_name)
    out = [sql.render(blocks["open_index"], schema=schema)]
    if version >= 4:
        key_cols = keys.key_columns(config)
        name = keys.legacy_index_name(key_cols)
        out.append(sql.render(blocks["key_index"], schema=schema))
        out.append(sql.render(blocks["key_legacy_index"], schema=schema,
                              name=sql.quote_ident(name), nameliteral=sql.quote_literal(name),
                              eventtable=sql.quote_literal(f"{schema}.event"),
                              kinds=_array(kind for kind, cols in key_cols if cols),
                              legacy=keys.legacy_key(key_cols)))
        return out
    # schema version 3 (upgrade tests build it): one expression index per key column
    columns = dict.fromkeys((*config.capture.licenses.key, *config.capture.customers.key))
    for column in columns:
        out.append(sql.render(blocks["key_index_v3"], schema=schema,
                              name=sql.quote_ident(key_index_name_v3(column)),
                              column=sql.quote_literal(column)))
    return out


def key_index_name_v3(column: str) -> str:
    """The name of schema version 3's console index on one key column (a hash keeps it short)."""
    return f"event_key_{hashlib.sha256(column.encode()).hexdigest()[:10]}_idx"


def _funcref(config: Config, func: str) -> str:
    """``'"schema"."func"()'``: a capture function's signature as a literal for to_regprocedure."""
    schema = sql.quote_ident(config.database.schema_name)
    return sql.quote_literal(f"{schema}.{sql.quote_ident(func)}()")


def _field_names(config: Config, version: int) -> list[str]:
    blocks = sql.blocks("checks.sql")
    schema = sql.quote_ident(config.database.schema_name)
    tables = (("license", "licenses", config.capture.licenses),
              ("customer", "customers", config.capture.customers))
    out = []
    for kind, _, table in tables:
        for block in ("field_map", "field_types") if version >= 3 else ("field_map",):
            out.append(sql.render(blocks[block], schema=schema, kind=sql.quote_literal(kind),
                                  qualified=sql.quote_literal(table.qualified())))
    qlm = [(k, c, f) for k, names in QLM_FIELD_NAMES.items() for c, f in names.items()]
    overrides = [(k, c, f) for k, names in config.webhooks.field_names.items()
                 for c, f in names.items()]
    for block, rows in (("field_overrides", qlm), ("config_overrides", overrides)):
        out.append(sql.render(blocks[block], schema=schema, kinds=_array(r[0] for r in rows),
                              columns=_array(r[1] for r in rows),
                              fields=_array(r[2] for r in rows)))
    # two current columns must not share a payload field (the body would keep only one value)
    for kind, section, table in tables:
        out.append(sql.render(blocks["field_names_unique"], schema=schema, section=section,
                              kind=sql.quote_literal(kind),
                              qualified=sql.quote_literal(table.qualified())))
    out.append(sql.render(blocks["runtime"], schema=schema,
                          capture_modified="true" if config.capture_modified() else "false"))
    return out


def render_install(config: Config, from_version: int | None, sample_schema: bool,
                   target: int = SCHEMA_VERSION) -> Plan:
    """The whole install/upgrade as one SQL script (without BEGIN/COMMIT). `target` is the
    schema version to bring the database to (tests build older versions with it)."""
    check_schema_name(config)
    if from_version is not None and from_version > target:
        raise InstallError(
            f"the bridge schema {config.database.schema_name!r} is at version {from_version}, "
            f"newer than this qlm-bridge ({target}); upgrade qlm-bridge"
        )
    parts = [_lock_sql()]
    if sample_schema:
        parts.append(sql.read("sample_schema.sql"))
    parts += _checks(config)
    schema = sql.quote_ident(config.database.schema_name)
    for version in range(1 if from_version is None else from_version + 1, target + 1):
        parts.append(sql.render(sql.read(MIGRATIONS[version]), schema=schema,
                                eventtable=sql.quote_literal(f"{schema}.event")))
    parts += _capture(config, target)
    if target >= 3:  # the console's indexes read the event row as schema version 3 has it
        parts += _console_indexes(config, target)
    parts += _field_names(config, target)
    return Plan(from_version, target, "\n".join(parts))


def render_uninstall(config: Config, drop_data: bool) -> str:
    """Drop every trigger calling a capture function, the functions, and (drop_data) the schema."""
    check_schema_name(config)
    blocks = sql.blocks("uninstall.sql")
    schema = sql.quote_ident(config.database.schema_name)
    parts = [_lock_sql()]
    drop = sql.blocks("capture.sql")["drop_triggers"]
    parts += [sql.render(drop, funcref=_funcref(config, func), qualified="NULL", tgname="NULL")
              for func in ("capture_license_v1", "capture_customer_v1")]
    parts.append(sql.render(blocks["functions"], schema=schema))
    if drop_data:
        parts.append(sql.render(blocks["drop_data"], schema=schema))
    return "\n".join(parts)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def current_version(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> int | None:
    """max(version) of the bridge schema, None when it is not installed."""
    try:
        return _read_version(conn, schema)
    except psycopg.Error as exc:
        raise InstallError(f"cannot read the bridge schema version: {_first_line(exc)}") from None


def _read_version(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> int | None:
    blocks = sql.blocks("checks.sql")
    with conn.cursor() as cur:
        cur.execute(blocks["version_table"], (f"{sql.quote_ident(schema)}.version",))
        row = cur.fetchone()
        if row is None or not row[0]:
            return None
        cur.execute(sql.render(blocks["version"], schema=sql.quote_ident(schema)).encode())
        got = cur.fetchone()
        return got[0] if got and isinstance(got[0], int) else None


def plan(config: Config, sample_schema: bool = False) -> Plan:
    with psycopg_connect(config.database) as conn:
        return render_install(config, current_version(conn, config.database.schema_name),
                              sample_schema)


def _execute_script(conn: psycopg.Connection[tuple[object, ...]], script: str) -> None:
    """Run a script in the connection's open transaction; errors become InstallError."""
    try:
        with conn.cursor() as cur:
            cur.execute(script.encode())
    except psycopg.errors.InsufficientPrivilege as exc:
        raise InstallError(f"insufficient privilege: {_first_line(exc)} (install needs a role "
                           "that may create the bridge schema and owns the captured tables)"
                           ) from None
    except psycopg.Error as exc:
        message = _first_line(exc)
        raise InstallError(message.removeprefix("qlm-bridge: ")) from None


def _lock_sql() -> str:
    return sql.render(sql.blocks("checks.sql")["lock"], lock=str(LOCK_KEY))


def _lock(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Serialise installs: the version read below must not change before this one commits."""
    _execute_script(conn, _lock_sql())


def install(config: Config, sample_schema: bool = False,
            target: int = SCHEMA_VERSION) -> Plan:
    """Install or upgrade (to schema version `target`) in one transaction; returns what was
    done."""
    check_schema_name(config)
    with psycopg_connect(config.database) as conn, \
            conn.transaction():
        _lock(conn)
        the_plan = render_install(config, current_version(conn, config.database.schema_name),
                                  sample_schema, target)
        _execute_script(conn, the_plan.sql)
        return the_plan


def uninstall(config: Config, drop_data: bool = False) -> str:
    """Remove the capture (and with drop_data the bridge schema) in one transaction."""
    script = render_uninstall(config, drop_data)
    with psycopg_connect(config.database) as conn, \
            conn.transaction():
        _execute_script(conn, script)
        return script
