-- Pre-install checks, rendered by bridge/install.py: they run first inside the install
-- transaction and abort it with a message naming the missing table or column.

-- name: table_exists
DO $qlm_bridge$
BEGIN
    IF to_regclass(__QUALIFIED__) IS NULL THEN
        RAISE EXCEPTION 'qlm-bridge: table % (capture.__SECTION__) does not exist; create it or '
                        'use --sample-schema', __QUALIFIED__;
    END IF;
END
$qlm_bridge$;

-- name: columns_exist
DO $qlm_bridge$
DECLARE
    missing text;
BEGIN
    SELECT string_agg(quote_ident(c), ', ') INTO missing
      FROM unnest(__COLUMNS__::text[]) AS c
     WHERE NOT EXISTS (
        SELECT 1 FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = to_regclass(__QUALIFIED__) AND a.attname = c
           AND a.attnum > 0 AND NOT a.attisdropped);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'qlm-bridge: table % has no column(s) % (named in capture.__SECTION__)',
                        __QUALIFIED__, missing;
    END IF;
END
$qlm_bridge$;

-- name: rules_valid
-- The activation and release rules must compile against the license table: a column type without
-- the operator a rule needs (json has no `>`) would otherwise fail every UPDATE at run time.
DO $qlm_bridge$
BEGIN
    PERFORM 1 FROM __TABLE__ AS new CROSS JOIN __TABLE__ AS old
     WHERE false AND (__ACTIVATED__ OR __RELEASED__);
EXCEPTION WHEN OTHERS THEN
    RAISE EXCEPTION 'qlm-bridge: the activation/release rules (capture.licenses) do not apply to '
                    'table %: %', __QUALIFIED__, SQLERRM;
END
$qlm_bridge$;

-- name: field_map
-- Every column of a captured table gets its payload field name (naming rule, then QLM names,
-- then config overrides, which the daemon refreshes).
INSERT INTO __SCHEMA__.field_map (kind, column_name, field_name, position)
SELECT __KIND__, a.attname, __SCHEMA__.field_name_v1(a.attname), a.attnum
  FROM pg_catalog.pg_attribute a
 WHERE a.attrelid = to_regclass(__QUALIFIED__) AND a.attnum > 0 AND NOT a.attisdropped
ON CONFLICT (kind, column_name) DO UPDATE SET position = EXCLUDED.position
 WHERE __SCHEMA__.field_map.position IS DISTINCT FROM EXCLUDED.position;

-- name: field_types
-- Schema version 3 on: each column's type (domains resolved), so the daemon renders timestamptz
-- values in UTC. Refreshed by every install (only where it differs).
UPDATE __SCHEMA__.field_map f SET type_name = t.type_name
  FROM (SELECT a.attname, __SCHEMA__.base_type_v2(a.atttypid) AS type_name
          FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = to_regclass(__QUALIFIED__) AND a.attnum > 0 AND NOT a.attisdropped
       ) AS t
 WHERE f.kind = __KIND__ AND f.column_name = t.attname
   AND f.type_name IS DISTINCT FROM t.type_name;

-- name: field_overrides
-- QLM's own names (field_name) where the naming rule says something else.
INSERT INTO __SCHEMA__.field_map (kind, column_name, field_name)
SELECT * FROM unnest(__KINDS__::text[], __COLUMNS__::text[], __FIELDS__::text[])
ON CONFLICT (kind, column_name) DO UPDATE SET field_name = EXCLUDED.field_name
 WHERE __SCHEMA__.field_map.field_name IS DISTINCT FROM EXCLUDED.field_name;

-- name: config_overrides
-- The config's webhooks.field_names (override); overrides no longer in the config are cleared.
-- The daemon applies the same rule at start and reload (queries.sql: set_field_names).
UPDATE __SCHEMA__.field_map m SET override = NULL
 WHERE m.override IS NOT NULL
   AND (m.kind, m.column_name) NOT IN (
        SELECT * FROM unnest(__KINDS__::text[], __COLUMNS__::text[]));
INSERT INTO __SCHEMA__.field_map (kind, column_name, field_name, override)
SELECT w.kind, w.column_name, __SCHEMA__.field_name_v1(w.column_name), w.field
  FROM unnest(__KINDS__::text[], __COLUMNS__::text[], __FIELDS__::text[])
       AS w(kind, column_name, field)
ON CONFLICT (kind, column_name) DO UPDATE SET override = EXCLUDED.override
 WHERE __SCHEMA__.field_map.override IS DISTINCT FROM EXCLUDED.override;

-- name: field_names_unique
-- After field_map and field_overrides: two current columns of a captured table must not become
-- the same payload field (activation_key and "ActivationKey", or an override onto another
-- column's name), or the webhook body would silently keep only one of the values.
DO $qlm_bridge$
DECLARE
    clashes text;
BEGIN
    SELECT string_agg(format('columns %s all become payload field %s', cols, to_json(field)),
                      '; ' ORDER BY field) INTO clashes
      FROM (SELECT coalesce(f.override, f.field_name, __SCHEMA__.field_name_v1(a.attname))
                       AS field,
                   string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) AS cols
              FROM pg_catalog.pg_attribute a
              LEFT JOIN __SCHEMA__.field_map f ON f.kind = __KIND__ AND f.column_name = a.attname
             WHERE a.attrelid = to_regclass(__QUALIFIED__) AND a.attnum > 0 AND NOT a.attisdropped
             GROUP BY 1
            HAVING count(*) > 1) AS clash;
    IF clashes IS NOT NULL THEN
        RAISE EXCEPTION 'qlm-bridge: table % (capture.__SECTION__): %; rename a column or give '
                        'one another name in webhooks.field_names.%', __QUALIFIED__, clashes,
                        __KIND__;
    END IF;
END
$qlm_bridge$;

-- name: runtime
-- (only when it differs, so a repeated install writes nothing)
UPDATE __SCHEMA__.runtime SET capture_modified = __CAPTURE_MODIFIED__
 WHERE id = 1 AND capture_modified IS DISTINCT FROM __CAPTURE_MODIFIED__;

-- name: lock
-- Serialises concurrent installs and uninstalls (held until the transaction ends).
SELECT pg_catalog.pg_advisory_xact_lock(__LOCK__);

-- name: version_table
-- The parameter is the quoted bridge schema name + '.version'; false when not installed.
SELECT pg_catalog.to_regclass(%s) IS NOT NULL;

-- name: version
SELECT max(version)::int FROM __SCHEMA__.version;
