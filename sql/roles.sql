-- Least-privilege role for the daemon (qlm-bridge run / status / replay / prune).
-- Replace qlm_bridge with your bridge schema and choose a password. Install itself needs a role
-- that owns the bridge schema and may create triggers on the license tables (the table owner).
CREATE ROLE qlm_bridge_daemon LOGIN PASSWORD 'change-me';
GRANT USAGE ON SCHEMA qlm_bridge TO qlm_bridge_daemon;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA qlm_bridge TO qlm_bridge_daemon;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA qlm_bridge TO qlm_bridge_daemon;
-- The daemon never reads the license or customer tables: every event carries its row.
