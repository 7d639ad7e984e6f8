-- Capture trigger functions of bridge schema version 1 (to_jsonb rows, `previous` computed by the
-- writer). Kept so that install can render a version-1 database (bridge/install.py: CAPTURE,
-- used by the upgrade tests); installs from schema version 3 on use capture_v2.sql. Placeholders as in
-- capture_v2.sql.

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
