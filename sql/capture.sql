-- Capture: what every version's trigger functions share (privileges, the trigger, dropping stale
-- triggers). The functions themselves are in capture_vN.sql. Rendered by bridge/install.py:
--   __SCHEMA__       quoted bridge schema        __FUNC__        quoted function name
--   __TRIGGER__ / __TGNAME__      the trigger name, quoted / as a string literal
--   __TABLE__                     the quoted schema-qualified captured table
--   __FUNCREF__ / __QUALIFIED__   the function signature / the table, as string literals

-- name: function_privileges
REVOKE ALL ON FUNCTION __SCHEMA__.__FUNC__() FROM PUBLIC;

-- name: trigger
CREATE OR REPLACE TRIGGER __TRIGGER__
    AFTER INSERT OR UPDATE OR DELETE ON __TABLE__
    FOR EACH ROW EXECUTE FUNCTION __SCHEMA__.__FUNC__();

-- name: drop_triggers
-- Drop every trigger that calls this function except the one named for the given table
-- (install: a trigger of an earlier install on a table the config no longer names would go on
-- capturing; uninstall passes NULL for both, dropping them all, wherever they are).
DO $qlm_bridge$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT tg.tgname, tg.tgrelid::pg_catalog.regclass AS rel
               FROM pg_catalog.pg_trigger tg
              WHERE tg.tgfoid = pg_catalog.to_regprocedure(__FUNCREF__)
                AND (tg.tgrelid, tg.tgname::text) IS DISTINCT FROM
                    (pg_catalog.to_regclass(__QUALIFIED__), __TGNAME__::text)
    LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
    END LOOP;
END
$qlm_bridge$;
