-- Uninstall: rendered by bridge/install.py. Every trigger that calls a capture function is
-- dropped (found in the catalog, so a table the config no longer names is covered too), then the
-- functions; the data tables only with --drop-data (drop_data block).

-- name: triggers
DO $qlm_bridge$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT tg.tgname, tg.tgrelid::pg_catalog.regclass AS rel
               FROM pg_catalog.pg_trigger tg
              WHERE tg.tgfoid IN (pg_catalog.to_regprocedure(__LICFUNC__),
                                  pg_catalog.to_regprocedure(__CUSFUNC__))
    LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
    END LOOP;
END
$qlm_bridge$;

-- name: functions
DROP FUNCTION IF EXISTS __SCHEMA__.capture_license_v1();
DROP FUNCTION IF EXISTS __SCHEMA__.capture_customer_v1();

-- name: drop_data
DROP SCHEMA IF EXISTS __SCHEMA__ CASCADE;
