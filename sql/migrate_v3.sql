-- qlm-webhook-bridge schema, version 3: capture that costs the writer little.
-- Rendered by bridge/install.py (__SCHEMA__ is the quoted bridge schema name) and applied once,
-- inside the installer's transaction, after the earlier versions (fresh install) or on a
-- version-1 or -2 database (upgrade in place). Every statement here is a catalog change or
-- touches one row: the event table is not rewritten, so upgrading a big outbox takes no time
-- and no long lock.
--
-- What changes:
--   * The triggers no longer build jsonb nor compute `previous` in the writer's transaction.
--     They store row_to_json(NEW) (OLD for DELETE) in event.row_data, now `json`, and for an
--     UPDATE the whole old row in event.old_data; the daemon derives `previous` (the old values
--     of the changed columns), the payload field names and UTC times when it claims a delivery
--     (payload_info_v2 / payload_previous_v2 below).
--   * Events captured before (schema versions 1 and 2) keep their jsonb text in row_data_v1 / previous_v1 (renamed,
--     not converted) and render exactly as before. Renaming also stops a version-1 daemon left
--     running against an upgraded schema: its claim no longer compiles, so it sends nothing
--     rather than an empty LicenseInfo.
--   * runtime: writers NOTIFY only while sleeping AND sleeping_until > now(). A NULL
--     sleeping_until no longer means "no expiry": it means "do not notify". A fresh install
--     starts with sleeping = false, so no commit pays for NOTIFY before a daemon has run; a
--     daemon's first poll covers what was written before it started.
--   * event.kind / event.op lose their CHECK constraints (the capture functions write them).
--   * field_map.type_name: each column's type (domains resolved to their base type), written
--     by install, so the daemon knows which values are timestamptz.

-- The console's key indexes (console.sql: key_index) of an earlier install follow the renamed
-- column; drop them, and install creates them again over both row layouts.
DO $qlm_bridge$
DECLARE
    i regclass;
BEGIN
    FOR i IN SELECT x.indexrelid::regclass FROM pg_catalog.pg_index x
              WHERE x.indrelid = pg_catalog.to_regclass(__EVENTTABLE__) AND x.indexprs IS NOT NULL
    LOOP
        EXECUTE pg_catalog.format('DROP INDEX %s', i);
    END LOOP;
END
$qlm_bridge$;
ALTER TABLE __SCHEMA__.event RENAME COLUMN row_data TO row_data_v1;
ALTER TABLE __SCHEMA__.event RENAME COLUMN previous TO previous_v1;
ALTER TABLE __SCHEMA__.event ALTER COLUMN row_data_v1 DROP NOT NULL;
ALTER TABLE __SCHEMA__.event ADD COLUMN row_data json;
-- Only the capture functions write kind and op, with constants; the CHECKs on them cost every
-- writer about 7 us per row (each trigger's INSERT prepares them anew), a fifth of the trigger.
ALTER TABLE __SCHEMA__.event DROP CONSTRAINT IF EXISTS event_kind_check;
ALTER TABLE __SCHEMA__.event DROP CONSTRAINT IF EXISTS event_op_check;
ALTER TABLE __SCHEMA__.event ADD COLUMN old_data json;
COMMENT ON COLUMN __SCHEMA__.event.row_data IS
    'row_to_json of the row after the change (before it, for DELETE); NULL for version-1 events';
COMMENT ON COLUMN __SCHEMA__.event.old_data IS
    'UPDATE only: row_to_json of the row before the change';
COMMENT ON COLUMN __SCHEMA__.event.row_data_v1 IS
    'events captured by schema versions 1-2: the row as jsonb';
COMMENT ON COLUMN __SCHEMA__.event.previous_v1 IS
    'events captured by schema versions 1-2: old values of the changed columns, as jsonb';

ALTER TABLE __SCHEMA__.runtime ALTER COLUMN sleeping SET DEFAULT false;
-- versions 1-2 left sleeping = true with no expiry on a database where no daemon had run yet
UPDATE __SCHEMA__.runtime SET sleeping = false WHERE id = 1 AND sleeping_until IS NULL;
COMMENT ON COLUMN __SCHEMA__.runtime.sleeping_until IS
    'writers NOTIFY while sleeping and now() < sleeping_until; NULL: they do not';

ALTER TABLE __SCHEMA__.field_map ADD COLUMN type_name text;
COMMENT ON COLUMN __SCHEMA__.field_map.type_name IS
    'the column''s type as format_type() writes it, domains resolved (written by install)';

-- The type a column's values have in JSON: domains resolved to their base type, also for the
-- elements of an array ("timestamp with time zone[]").
CREATE FUNCTION __SCHEMA__.base_type_v2(typ oid) RETURNS text
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $qlm_bridge$
    WITH RECURSIVE chain(oid, base, elem, depth) AS (
        SELECT t.oid, t.typbasetype, t.typelem, 0 FROM pg_type t WHERE t.oid = typ
        UNION ALL
        SELECT t.oid, t.typbasetype, t.typelem, c.depth + 1
          FROM chain c JOIN pg_type t ON t.oid = c.base
         WHERE c.base <> 0
    ), resolved AS (
        SELECT c.oid, c.elem FROM chain c ORDER BY c.depth DESC LIMIT 1
    )
    SELECT CASE WHEN r.elem <> 0 AND t.typcategory = 'A'
                THEN __SCHEMA__.base_type_v2(r.elem) || '[]'
                ELSE format_type(r.oid, NULL) END
      FROM resolved r JOIN pg_type t ON t.oid = r.oid
$qlm_bridge$;

-- A captured timestamptz (its JSON text, e.g. "2026-01-15T17:30:00+05:30") as the payload
-- writes every time: UTC, microseconds, 'Z', the form of the body's Timestamp
-- ("2026-01-15T12:00:00.000000Z"). Anything else (infinity, BC dates, a value that is no
-- timestamptz because the column's type changed after install) is left as captured, so a claim
-- never fails on it (checked with LIKE and translate: a regular expression cost more than the
-- conversion). Plain SQL without SET, so the planner inlines it into the payload functions.
CREATE FUNCTION __SCHEMA__.utc_v2(value text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $qlm_bridge$
    SELECT CASE WHEN value OPERATOR(pg_catalog.~~)
                         ('"____-__-__' OPERATOR(pg_catalog.||) 'T__:__:__%')
                     AND pg_catalog.translate(pg_catalog.substr(value, 2, 19), '0123456789', '')
                         OPERATOR(pg_catalog.=) '--T::'
                     AND pg_catalog.translate(pg_catalog.substr(value, 21), '0123456789:.', '')
                         OPERATOR(pg_catalog.=) ANY ('{"+\"","-\""}'::text[])
                THEN '"' OPERATOR(pg_catalog.||) pg_catalog.to_char(
                         pg_catalog.timezone('UTC', pg_catalog.btrim(value, '"')::timestamptz),
                         'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') OPERATOR(pg_catalog.||) '"'
                ELSE value END
$qlm_bridge$;

-- Arrays of timestamptz (nested arrays too): each element through utc_v2.
CREATE FUNCTION __SCHEMA__.utc_array_v2(value text) RETURNS text
LANGUAGE plpgsql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $qlm_bridge$
BEGIN
    IF left(value, 1) <> '[' THEN
        RETURN value;
    END IF;
    RETURN (SELECT '[' || coalesce(string_agg(
                CASE WHEN json_typeof(e.value) = 'array'
                     THEN __SCHEMA__.utc_array_v2(e.value::text)
                     ELSE __SCHEMA__.utc_v2(e.value::text) END, ',' ORDER BY e.n), '') || ']'
              FROM json_array_elements(value::json) WITH ORDINALITY AS e(value, n));
END
$qlm_bridge$;

-- changed_v2, payload_info_v2 and payload_previous_v2 run in the daemon's claim, once per
-- delivery, with the daemon's privileges (not SECURITY DEFINER): they carry no SET search_path,
-- whose save and restore on every call cost about a third of the rendering (147 -> 101 us of
-- server CPU per delivery, measured on PostgreSQL 15). pg_catalog is searched first anyway, and
-- the bridge's own functions are schema-qualified.
-- The columns an UPDATE changed, with their old values: (key, old value as JSON text), in
-- column order. Values are compared as the trigger wrote them (same session, same text for the
-- same value), so a change the writer can see is a change here.
CREATE FUNCTION __SCHEMA__.changed_v2(new_row json, old_row json)
RETURNS TABLE (key text, value text, n bigint)
LANGUAGE sql STABLE PARALLEL SAFE AS $qlm_bridge$
    SELECT o.key, o.value::text, o.n
      FROM json_each(old_row) WITH ORDINALITY AS o(key, value, n)
      LEFT JOIN json_each(new_row) AS w(key, value) ON w.key = o.key
     WHERE w.value::text IS DISTINCT FROM o.value::text
$qlm_bridge$;

-- The body's LicenseInfo / CustomerInfo: the event's row as a JSON object with payload field
-- names (field_map: QLM's names, then webhooks.field_names overrides; unknown columns by the
-- naming rule), in table column order, timestamptz in UTC. Version-1 events (row_data_v1) render
-- through the same rules. The claim statement calls this once per claimed delivery.
CREATE FUNCTION __SCHEMA__.payload_info_v2(kind text, row_data json, row_data_v1 jsonb)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $qlm_bridge$
    SELECT '{' || string_agg(
               to_json(coalesce(f.override, f.field_name, __SCHEMA__.field_name_v1(j.key)))::text
               || ':' || CASE f.type_name
                              WHEN 'timestamp with time zone' THEN __SCHEMA__.utc_v2(j.value::text)
                              WHEN 'timestamp with time zone[]'
                                  THEN __SCHEMA__.utc_array_v2(j.value::text)
                              ELSE j.value::text END,
               ',' ORDER BY f.position, j.n) || '}'
      FROM json_each(coalesce(row_data, row_data_v1::json)) WITH ORDINALITY AS j(key, value, n)
      LEFT JOIN __SCHEMA__.field_map f ON f.kind = payload_info_v2.kind AND f.column_name = j.key
$qlm_bridge$;

-- The body's Previous: the old values of the columns an UPDATE changed (changed_v2), rendered
-- like payload_info_v2; NULL for INSERT and DELETE events (no Previous in the body).
CREATE FUNCTION __SCHEMA__.payload_previous_v2(kind text, row_data json, old_data json,
                                               previous_v1 jsonb)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $qlm_bridge$
    SELECT '{' || string_agg(
               to_json(coalesce(f.override, f.field_name, __SCHEMA__.field_name_v1(j.key)))::text
               || ':' || CASE f.type_name
                              WHEN 'timestamp with time zone' THEN __SCHEMA__.utc_v2(j.value)
                              WHEN 'timestamp with time zone[]'
                                  THEN __SCHEMA__.utc_array_v2(j.value)
                              ELSE j.value END,
               ',' ORDER BY f.position, j.n, j.key) || '}'
      FROM (SELECT c.key, c.value, c.n FROM __SCHEMA__.changed_v2(row_data, old_data) AS c
            UNION ALL
            SELECT r.key, r.value::text, NULL FROM jsonb_each(previous_v1) AS r(key, value)
           ) AS j(key, value, n)
      LEFT JOIN __SCHEMA__.field_map f
        ON f.kind = payload_previous_v2.kind AND f.column_name = j.key
$qlm_bridge$;

INSERT INTO __SCHEMA__.version (version) VALUES (3);
