-- Uninstall: rendered by bridge/install.py. Every trigger that calls a capture function is
-- dropped first (capture_v1.sql's drop_triggers, found in the catalog, so a table the config no
-- longer names is covered too), then the functions; the data tables only with --drop-data.

-- name: functions
DROP FUNCTION IF EXISTS __SCHEMA__.capture_license_v1();
DROP FUNCTION IF EXISTS __SCHEMA__.capture_customer_v1();

-- name: drop_data
DROP SCHEMA IF EXISTS __SCHEMA__ CASCADE;
