-- The listener's notification probe ($1 channel, $2 payload), sent through the query pool
-- (database.dsn) and expected back on the LISTEN connection (database.listen_dsn). A payload
-- that starts with 'qlm-bridge probe ' never wakes a daemon: every daemon on the schema
-- listens on the channel, and each waits only for its own token.

-- name: probe
SELECT pg_notify($1, $2);
