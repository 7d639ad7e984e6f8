-- qlm-webhook-bridge schema, version 4: the event's key in a plain column.
-- Rendered by bridge/install.py (__SCHEMA__ is the quoted bridge schema name, __EVENTTABLE__ the
-- event table as a literal) and applied once, inside the installer's transaction, after the
-- earlier versions (fresh install) or on a version-1, -2 or -3 database (upgrade in place).
-- Catalog changes only: the event table is not rewritten.
--
-- What changes:
--   * event.key: 'license:<ActivationKey>' / 'customer:<CustomerID>' (bridge/keys.py has the
--     form), written by the capture triggers (capture_v3.sql) from the record's fields. Events
--     captured before keep NULL: whoever reads the key falls back to the same form computed
--     from their JSON row (queries.sql: produce; console.sql: key filter).
--   * The console's expression indexes over the JSON row, one per key column, are dropped: each
--     parsed the row's JSON on every captured change (about a tenth of the writer's cost) and
--     again on the daemon's `fanned_out` update, which is not HOT. Install creates a plain
--     index on event.key instead, and one over the JSON form for rows without key only
--     (console.sql: key_index), which new events skip after a NULL test.
--   * event_created_idx is dropped: prune walks the primary key instead.

-- The per-column key indexes of versions 1-3 (console.sql: key_index of those versions): every
-- index on event with an expression. They are replaced by the indexes of key_index.
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

-- No default: adding the column rewrites nothing, and earlier events read NULL. Collation "C":
-- the key is only ever compared for equality, and the index entry each captured change adds
-- then compares bytes instead of calling the locale's strcoll.
ALTER TABLE __SCHEMA__.event ADD COLUMN key text COLLATE "C";
COMMENT ON COLUMN __SCHEMA__.event.key IS
    'the license or customer the event is about (bridge/keys.py); NULL for events captured '
    'before schema version 4 (readers compute it from the JSON row) or without key columns';

-- Only prune read this index (events by capture time); it walks the primary key now
-- (ops.sql: prune_bound, prune_events), and each captured change costs one index entry less.
DROP INDEX __SCHEMA__.event_created_idx;

INSERT INTO __SCHEMA__.version (version) VALUES (4);
