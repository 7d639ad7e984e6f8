-- Uninstall: rendered by bridge/install.py. Triggers are dropped per captured table (trigger
-- block), then the functions; the data tables only with --drop-data (drop_data block).

-- name: trigger
DROP TRIGGER IF EXISTS __TRIGGER__ ON __TABLE__;

-- name: functions
DROP FUNCTION IF EXISTS __SCHEMA__.capture_license_v1();
DROP FUNCTION IF EXISTS __SCHEMA__.capture_customer_v1();

-- name: drop_data
DROP SCHEMA IF EXISTS __SCHEMA__ CASCADE;
