-- `qlm-bridge demo`: its database set-up and the license lifecycle it plays.
-- Placeholders: __DATABASE__ / __SCHEMA__ (quoted identifiers), __MARKER__ (a quoted literal),
-- __CUSTOMERS__ / __LICENSES__ (qualified table names). Values are psycopg %(name)s parameters.

-- name: create_database
CREATE DATABASE __DATABASE__

-- name: schema_comment
-- NULL row: the schema does not exist; else its comment (the demo marks the schemas it creates).
SELECT coalesce(obj_description(oid, 'pg_namespace'), '')
  FROM pg_namespace WHERE nspname = %(schema)s

-- name: create_schema
CREATE SCHEMA IF NOT EXISTS __SCHEMA__;
COMMENT ON SCHEMA __SCHEMA__ IS __MARKER__;

-- name: mark_schema
COMMENT ON SCHEMA __SCHEMA__ IS __MARKER__

-- name: drop_schema
DROP SCHEMA IF EXISTS __SCHEMA__ CASCADE

-- The lifecycle: one statement per event, in the order a customer's life with a license goes.

-- name: customer_created
INSERT INTO __CUSTOMERS__ (full_name, email, company, phone, country, privacy_policy_consent)
VALUES ('Ada Lovelace', 'ada@example.com', 'Analytical Engines Ltd', '+44 20 7946 0001', 'GB',
        true)
RETURNING customer_id

-- name: customer_modified
UPDATE __CUSTOMERS__ SET email = 'ada@analytical-engines.example', updated_at = now()
 WHERE customer_id = %(customer_id)s

-- name: license_created
INSERT INTO __LICENSES__ (activation_key, customer_id, product_id, product_name, major_version,
                          minor_version, features, license_model, num_licenses,
                          available_licenses, order_id, order_date, expiry_date)
VALUES (%(key)s, %(customer_id)s, 7, 'Difference Engine Pro', 2, 1, 'export;scripting',
        'subscription', 1, 1, %(order_id)s, now(), now() + interval '1 year')

-- name: license_activated
UPDATE __LICENSES__
   SET computer_id = 'ADA-LAPTOP-01', computer_name = 'ada-laptop',
       activation_count = activation_count + 1, available_licenses = available_licenses - 1,
       activation_date = now()
 WHERE activation_key = %(key)s

-- name: license_released
UPDATE __LICENSES__
   SET computer_id = NULL, computer_name = NULL, available_licenses = available_licenses + 1,
       release_date = now()
 WHERE activation_key = %(key)s

-- name: license_deleted
DELETE FROM __LICENSES__ WHERE activation_key = %(key)s

-- name: customer_deleted
DELETE FROM __CUSTOMERS__ WHERE customer_id = %(customer_id)s
