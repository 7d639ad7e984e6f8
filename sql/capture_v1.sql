-- Capture trigger functions, version 1. Rendered by bridge/install.py:
--   __SCHEMA__       quoted bridge schema        __CHANNEL__     NOTIFY channel, as a literal
--   __KIND__         'license' or 'customer'     __FUNC__        quoted function name
--   __ACTIVATED__ / __RELEASED__  boolean expressions over OLD/NEW built from validated,
--                                 quoted column names (license tables only; 'false' otherwise)
--   __TRIGGER__ / __TGNAME__      the trigger name, quoted / as a string literal
--   __TABLE__                     the quoted schema-qualified captured table
--   __FUNCREF__ / __QUALIFIED__   the function signature / the table, as string literals
--
-- SECURITY DEFINER with a pinned search_path: the application role that writes the license
-- tables needs no grant on the bridge schema and cannot hijack name resolution.

-- name: license_function
CREATE OR REPLACE FUNCTION __SCHEMA__.__FUNC__() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $qlm_bridge$
DECLARE
    ev     text;
    newj   jsonb;
    oldj   jsonb;
    prev   jsonb;
BEGIN
    IF TG_OP = 'INSERT' THEN
        ev := 'license_created';
        newj := to_jsonb(NEW);
    ELSIF TG_OP = 'DELETE' THEN
        ev := 'license_deleted';
        newj := to_jsonb(OLD);
    ELSE
        IF __ACTIVATED__ THEN
            ev := 'license_activated';
        ELSIF __RELEASED__ THEN
            ev := 'license_released';
        ELSIF (SELECT r.capture_modified FROM __SCHEMA__.runtime r WHERE r.id = 1) THEN
            ev := 'license_modified';
        ELSE
            RETURN NULL;
        END IF;
        newj := to_jsonb(NEW);
        oldj := to_jsonb(OLD);
        IF ev = 'license_modified' AND newj = oldj THEN
            RETURN NULL;
        END IF;
        SELECT jsonb_object_agg(o.key, o.value) INTO prev
          FROM jsonb_each(oldj) o WHERE newj -> o.key IS DISTINCT FROM o.value;
    END IF;
    INSERT INTO __SCHEMA__.event (event_type, kind, source_table, op, row_data, previous)
    VALUES (ev, 'license', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_OP, newj, prev);
    IF (SELECT r.sleeping AND (r.sleeping_until IS NULL OR r.sleeping_until > now())
          FROM __SCHEMA__.runtime r WHERE r.id = 1) THEN
        PERFORM pg_notify(__CHANNEL__, '');
    END IF;
    RETURN NULL;
END
$qlm_bridge$;

-- name: customer_function
CREATE OR REPLACE FUNCTION __SCHEMA__.__FUNC__() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $qlm_bridge$
DECLARE
    ev     text;
    newj   jsonb;
    oldj   jsonb;
    prev   jsonb;
BEGIN
    IF TG_OP = 'INSERT' THEN
        ev := 'customer_created';
        newj := to_jsonb(NEW);
    ELSIF TG_OP = 'DELETE' THEN
        ev := 'customer_deleted';
        newj := to_jsonb(OLD);
    ELSE
        newj := to_jsonb(NEW);
        oldj := to_jsonb(OLD);
        IF newj = oldj THEN
            RETURN NULL;  -- a no-op UPDATE emits nothing
        END IF;
        ev := 'customer_modified';
        SELECT jsonb_object_agg(o.key, o.value) INTO prev
          FROM jsonb_each(oldj) o WHERE newj -> o.key IS DISTINCT FROM o.value;
    END IF;
    INSERT INTO __SCHEMA__.event (event_type, kind, source_table, op, row_data, previous)
    VALUES (ev, 'customer', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_OP, newj, prev);
    IF (SELECT r.sleeping AND (r.sleeping_until IS NULL OR r.sleeping_until > now())
          FROM __SCHEMA__.runtime r WHERE r.id = 1) THEN
        PERFORM pg_notify(__CHANNEL__, '');
    END IF;
    RETURN NULL;
END
$qlm_bridge$;

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
