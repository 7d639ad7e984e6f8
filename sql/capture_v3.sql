-- Capture trigger functions version 3, for bridge schema version 4 on. Rendered by bridge/install.py:
--   __SCHEMA__       quoted bridge schema        __CHANNEL__     NOTIFY channel, as a literal
--   __FUNC__         quoted function name (capture_license_v1 / capture_customer_v1: the names
--                    on users' tables stay; only the bodies change)
--   __ACTIVATED__ / __RELEASED__  boolean expressions over OLD/NEW built from validated,
--                                 quoted column names (license function only)
--   __KEY_NEW__ / __KEY_OLD__     the event's key (event.key) from NEW / OLD, built by
--                                 install.key_expression from capture.*.key; NULL when the
--                                 table has no key columns
--   __SOURCE__       the captured table as event.source_table has it (schema.table, unquoted),
--                    a literal: the function is attached to that one table (capture.sql:
--                    drop_triggers), and TG_TABLE_SCHEMA costs a catalog lookup per row
-- The trigger itself and its privileges are in capture.sql.
--
-- As capture_v2.sql (schema version 3), plus event.key: the key of the license or customer
-- ('license:<ActivationKey>'), read from the record's fields, in the text form `produce` used
-- to compute from row_data (each value as `row_data ->> column` gives it, values joined by
-- '|'). The console's key filter and per-key ordering read it from a plain index on a plain
-- column: no index expression parses the row's JSON on every insert, nor again on the
-- daemon's `fanned_out` update.
--
-- The writer pays for as little as possible: one row_to_json per row (two for an UPDATE that
-- becomes an event), into json columns (no jsonb is built: that was most of the cost), one
-- INSERT, whose RETURNING reads the runtime row's NOTIFY flag (a second statement for it cost
-- the writer about 3 us more: each statement a trigger runs starts an executor). The event
-- type is decided here from OLD/NEW directly; `previous`, the payload field names and UTC times
-- are left to the daemon (migrate_v3.sql: payload_info_v2, payload_previous_v2). A no-op UPDATE
-- emits nothing: `NEW *= OLD` compares the two rows' stored images (works for every column
-- type, json included), before any JSON is built.
--
-- NOTIFY only while a daemon said it sleeps and its promise has not expired
-- (runtime.sleeping AND now() < runtime.sleeping_until; NULL: no NOTIFY).
--
-- SECURITY DEFINER with a pinned search_path: the application role that writes the license
-- tables needs no grant on the bridge schema and cannot hijack name resolution.

-- name: license_function
CREATE OR REPLACE FUNCTION __SCHEMA__.__FUNC__() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $qlm_bridge$
DECLARE
    ev text;
    wake boolean;  -- writers NOTIFY (read in the INSERT: one statement, not two)
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO __SCHEMA__.event (event_type, kind, source_table, op, key, row_data)
        VALUES ('license_created', 'license', __SOURCE__, TG_OP,
                __KEY_NEW__, row_to_json(NEW))
        RETURNING (SELECT r.sleeping AND r.sleeping_until > now()
                     FROM __SCHEMA__.runtime r WHERE r.id = 1) INTO wake;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO __SCHEMA__.event (event_type, kind, source_table, op, key, row_data)
        VALUES ('license_deleted', 'license', __SOURCE__, TG_OP,
                __KEY_OLD__, row_to_json(OLD))
        RETURNING (SELECT r.sleeping AND r.sleeping_until > now()
                     FROM __SCHEMA__.runtime r WHERE r.id = 1) INTO wake;
    ELSE
        IF __ACTIVATED__ THEN
            ev := 'license_activated';
        ELSIF __RELEASED__ THEN
            ev := 'license_released';
        ELSIF NEW *= OLD
              OR NOT (SELECT r.capture_modified FROM __SCHEMA__.runtime r WHERE r.id = 1) THEN
            RETURN NULL;
        ELSE
            ev := 'license_modified';
        END IF;
        INSERT INTO __SCHEMA__.event (event_type, kind, source_table, op, key, row_data,
                                      old_data)
        VALUES (ev, 'license', __SOURCE__, TG_OP,
                __KEY_NEW__, row_to_json(NEW), row_to_json(OLD))
        RETURNING (SELECT r.sleeping AND r.sleeping_until > now()
                     FROM __SCHEMA__.runtime r WHERE r.id = 1) INTO wake;
    END IF;
    IF wake THEN
        PERFORM pg_notify(__CHANNEL__, '');
    END IF;
    RETURN NULL;
END
$qlm_bridge$;

-- name: customer_function
CREATE OR REPLACE FUNCTION __SCHEMA__.__FUNC__() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $qlm_bridge$
DECLARE
    wake boolean;  -- writers NOTIFY (read in the INSERT: one statement, not two)
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO __SCHEMA__.event (event_type, kind, source_table, op, key, row_data)
        VALUES ('customer_created', 'customer', __SOURCE__, TG_OP,
                __KEY_NEW__, row_to_json(NEW))
        RETURNING (SELECT r.sleeping AND r.sleeping_until > now()
                     FROM __SCHEMA__.runtime r WHERE r.id = 1) INTO wake;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO __SCHEMA__.event (event_type, kind, source_table, op, key, row_data)
        VALUES ('customer_deleted', 'customer', __SOURCE__, TG_OP,
                __KEY_OLD__, row_to_json(OLD))
        RETURNING (SELECT r.sleeping AND r.sleeping_until > now()
                     FROM __SCHEMA__.runtime r WHERE r.id = 1) INTO wake;
    ELSIF NEW *= OLD THEN
        RETURN NULL;  -- a no-op UPDATE emits nothing
    ELSE
        INSERT INTO __SCHEMA__.event (event_type, kind, source_table, op, key, row_data,
                                      old_data)
        VALUES ('customer_modified', 'customer', __SOURCE__, TG_OP,
                __KEY_NEW__, row_to_json(NEW), row_to_json(OLD))
        RETURNING (SELECT r.sleeping AND r.sleeping_until > now()
                     FROM __SCHEMA__.runtime r WHERE r.id = 1) INTO wake;
    END IF;
    IF wake THEN
        PERFORM pg_notify(__CHANNEL__, '');
    END IF;
    RETURN NULL;
END
$qlm_bridge$;
