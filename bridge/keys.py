"""The event key (`event.key`, schema version 4): which license or customer an event is about.

One text form everywhere: ``<kind>:<value>[|<value>...]``, the configured key columns
(`capture.licenses.key` / `capture.customers.key`) in order, each value as ``row_data ->>
column`` renders it (`to_json(value) #>> '{}'`: a timestamptz in JSON's ISO form, an array as
a JSON array, text as itself), a NULL value as ''. A table without key columns has no key
(NULL). Per-key ordering (`delivery.key`) and the console's `key` filter use this form.

- The capture triggers compute it from the NEW/OLD record (`trigger_key`): no JSON is parsed.
- Events captured before schema version 4 have `event.key` NULL; readers fall back to the same
  form computed from their JSON row (`legacy_key`; `produce` in queries.sql has its own copy
  with the key columns as parameters).
"""

from __future__ import annotations

import hashlib

from bridge import sql
from bridge.config import Config

KeyColumns = tuple[tuple[str, tuple[str, ...]], ...]  # (kind, key columns) per captured table


def key_columns(config: Config) -> KeyColumns:
    """capture.licenses.key and capture.customers.key, by kind."""
    capture = config.capture
    return (("license", capture.licenses.key), ("customer", capture.customers.key))


def trigger_key(kind: str, columns: tuple[str, ...], record: str) -> str:
    """The key of the trigger's NEW or OLD record (`record`), as a PL/pgSQL expression; NULL
    without key columns. Column names are quoted; install checked they exist."""
    if not columns:
        return "NULL"
    values = " || '|' || ".join(
        f"coalesce(pg_catalog.to_json({record}.{sql.quote_ident(c)}) #>> '{{}}', '')"
        for c in columns)
    return f"{sql.quote_literal(kind + ':')} || {values}"


def legacy_key(keys: KeyColumns, alias: str = "") -> str:
    """The key of an event captured before schema version 4, from its JSON row (`row_data`,
    or `row_data_v1` before version 3), as an SQL expression over event `alias` (empty in an
    index definition). NULL for a kind without key columns; "NULL::text" when none has any."""
    whens = []
    for kind, columns in keys:
        if not columns:
            continue
        values = " || '|' || ".join(
            f"coalesce({alias}row_data ->> {sql.quote_literal(c)}, "
            f"{alias}row_data_v1 ->> {sql.quote_literal(c)}, '')" for c in columns)
        whens.append(f"WHEN {sql.quote_literal(kind)} THEN {sql.quote_literal(kind + ':')} "
                     f"|| {values}")
    return f"(CASE {alias}kind {' '.join(whens)} END)" if whens else "NULL::text"


def legacy_index_name(keys: KeyColumns) -> str:
    """The name of the console's index over `legacy_key` (a hash of the key columns: a changed
    capture.*.key gets its own index, and install drops the previous one)."""
    text = repr(tuple((kind, cols) for kind, cols in keys if cols))
    return f"event_key_v1_{hashlib.sha256(text.encode()).hexdigest()[:10]}_idx"
