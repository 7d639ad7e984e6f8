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

-- name: field_map
-- Every column of a captured table gets its payload field name (naming rule, then QLM names,
-- then config overrides, which the daemon refreshes).
INSERT INTO __SCHEMA__.field_map (kind, column_name, field_name)
SELECT __KIND__, a.attname, __SCHEMA__.field_name_v1(a.attname)
  FROM pg_catalog.pg_attribute a
 WHERE a.attrelid = to_regclass(__QUALIFIED__) AND a.attnum > 0 AND NOT a.attisdropped
ON CONFLICT (kind, column_name) DO NOTHING;

-- name: field_overrides
INSERT INTO __SCHEMA__.field_map (kind, column_name, field_name)
SELECT * FROM unnest(__KINDS__::text[], __COLUMNS__::text[], __FIELDS__::text[])
ON CONFLICT (kind, column_name) DO UPDATE SET field_name = EXCLUDED.field_name;

-- name: runtime
UPDATE __SCHEMA__.runtime SET capture_modified = __CAPTURE_MODIFIED__ WHERE id = 1;
