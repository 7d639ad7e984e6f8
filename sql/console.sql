-- The web console's statements (bridge/console/), one named block each.
-- __SCHEMA__ is the quoted bridge schema; $n parameters are asyncpg's.
-- __KEY_MATCH__ / __KEY_SHOW__ are rendered from capture.*.key (bridge/console/data.py): event.key,
-- or for events captured before schema version 4 the same form from their JSON row, with the key
-- columns as literals so that it matches the index of `key_legacy_index` below (while it exists;
-- without it the arm for those events reads event_key_idx's NULL entries, of which there are
-- none then, or only events of a kind without key columns).
-- The list and event queries run with plan_cache_mode = force_custom_plan: the optional filters
-- ($n IS NULL OR ...) fold away for each call and the planner picks the index of the filter
-- actually given. docs/console.md shows their plans on 1,000,000 deliveries.

-- name: open_index
-- Run by every install (IF NOT EXISTS): deliveries that are not delivered, by state, newest
-- first. Serves the state filter (pending, failed, skipped) and the overview's counts without
-- reading delivered rows, the bulk of the table. An ack marking a row delivered adds no entry.
CREATE INDEX IF NOT EXISTS delivery_open_idx ON __SCHEMA__.delivery (state, id)
    WHERE state <> 'delivered';

-- name: key_index
-- Run by every install (schema version 4 on): events by key (event.key, 'license:<key>'), for
-- the console's `key` filter and replay by key. A plain column: the writer's index entry costs
-- no JSON parsing (the expression indexes of earlier versions parsed row_data on every insert,
-- and again on the daemon's fanned_out update).
CREATE INDEX IF NOT EXISTS event_key_idx ON __SCHEMA__.event (key);

-- name: key_legacy_index
-- Run by every install: the key of events captured before schema version 4 (event.key NULL),
-- computed from their JSON row as bridge/keys.py:legacy_key writes it (over the key columns as
-- literals; the index name carries a hash of them), for the console's `key` filter.
--   * Only while such events exist (of a kind that has key columns): a fresh install has none,
--     and on an upgraded one they only grow fewer (prune), so once they are gone the next
--     install drops the index. Partial, so an event written meanwhile costs a NULL test, no
--     JSON parsing; still every statement that writes an event prepares the predicate, which
--     is why the index is not kept for nothing.
--   * The planner ignores the statistics of a partial index's expression (it would expect 1 %
--     of the events to match a key, and walk the deliveries instead), so a statistics object of
--     the same name keeps them; ANALYZE builds it, writers do not pay for it.
--   * Other expression indexes and statistics on event are dropped: those of capture.*.key as
--     it was, and the per-column indexes of schema versions 1-3 (migrate_v4.sql drops those
--     too).
DO $qlm_bridge$
DECLARE
    keep boolean := EXISTS (SELECT 1 FROM __SCHEMA__.event e
                             WHERE e.key IS NULL AND e.kind = ANY (__KINDS__::text[]));
    i regclass;
    s text;
BEGIN
    FOR i IN SELECT x.indexrelid::regclass
               FROM pg_catalog.pg_index x JOIN pg_catalog.pg_class c ON c.oid = x.indexrelid
              WHERE x.indrelid = pg_catalog.to_regclass(__EVENTTABLE__) AND x.indexprs IS NOT NULL
                AND (NOT keep OR c.relname <> __NAMELITERAL__)
    LOOP
        EXECUTE pg_catalog.format('DROP INDEX %s', i);
    END LOOP;
    FOR s IN SELECT pg_catalog.format('%I.%I', n.nspname, x.stxname)
               FROM pg_catalog.pg_statistic_ext x
               JOIN pg_catalog.pg_namespace n ON n.oid = x.stxnamespace
              WHERE x.stxrelid = pg_catalog.to_regclass(__EVENTTABLE__)
                AND (NOT keep OR x.stxname <> __NAMELITERAL__)
    LOOP
        EXECUTE 'DROP STATISTICS ' || s;
    END LOOP;
    IF keep THEN
        CREATE INDEX IF NOT EXISTS __NAME__ ON __SCHEMA__.event ((__LEGACY__))
            WHERE key IS NULL;
        CREATE STATISTICS IF NOT EXISTS __SCHEMA__.__NAME__ ON (__LEGACY__)
            FROM __SCHEMA__.event;
    END IF;
END
$qlm_bridge$;

-- name: key_index_v3
-- The key index of schema version 3, one per key column (install builds that version for the
-- upgrade tests only); migrate_v4.sql drops it.
CREATE INDEX IF NOT EXISTS __NAME__ ON __SCHEMA__.event
    ((coalesce(row_data ->> __COLUMN__, row_data_v1 ->> __COLUMN__)));

-- name: session
-- Before each console statement, inside its read-only transaction: custom plans (see above) and
-- a statement timeout, so a console page can never hold a connection for long.
SELECT set_config('plan_cache_mode', 'force_custom_plan', true),
       set_config('statement_timeout', '5s', true);

-- name: deliveries
-- One page of deliveries (keyset: $7 = older than this id, $8 = newer than this id). __ORDER__
-- is DESC (newest first; the first page and older pages) or ASC (a newer page, reversed by the
-- caller), so the primary key or delivery_open_idx gives the order without a sort. Each filter is ignored when NULL:
-- $1 state, $2 url, $3 event_type, $4 key, $5 event_id, $6 since (updated at or after).
-- $9 = rows wanted (the caller asks for one more to know whether an older page exists).
SELECT d.id, e.event_id, e.event_type, __KEY_SHOW__ AS key, d.url, d.state, d.attempts,
       d.last_status, d.last_error, d.next_attempt_at, d.locked_until, d.created_at,
       d.updated_at, now() AS now
  FROM __SCHEMA__.delivery d
  JOIN __SCHEMA__.event e ON e.id = d.event_id
 WHERE ($1::text IS NULL OR d.state = $1::text)
   AND ($2::text IS NULL OR d.url = $2::text)
   AND ($3::text IS NULL OR e.event_type = $3::text)
   AND ($4::text IS NULL OR __KEY_MATCH__)
   AND ($5::uuid IS NULL OR e.event_id = $5::uuid)
   AND ($6::timestamptz IS NULL OR d.updated_at >= $6::timestamptz)
   AND ($7::bigint IS NULL OR d.id < $7::bigint)
   AND ($8::bigint IS NULL OR d.id > $8::bigint)
 ORDER BY d.id __ORDER__
 LIMIT $9::int;

-- name: key_event_ids
-- The events of one key ($2: ActivationKey or CustomerID), newest first, at most $1: replay by
-- key (key_index, key_legacy_index).
SELECT e.event_id
  FROM __SCHEMA__.event e
 WHERE __KEY_MATCH__
 ORDER BY e.id DESC
 LIMIT $1::int;

-- name: overview_open
-- Per URL and event type, the deliveries not delivered yet: pending (in flight = claimed with a
-- lease running; retrying = waiting after a failed attempt), failed, and the oldest pending
-- delivery's creation. Reads delivery_open_idx only, capped at $1 rows (the caller says
-- "at least" when the cap is reached), so a huge backlog cannot make the page slow.
WITH open AS (
    -- the event type by primary key, row by row: at most $1 lookups, whatever the table size
    SELECT d.url, d.state, d.attempts, d.locked_until, d.created_at,
           (SELECT e.event_type FROM __SCHEMA__.event e WHERE e.id = d.event_id) AS event_type
      FROM __SCHEMA__.delivery d
     WHERE d.state <> 'delivered'
     LIMIT $1::int
)
SELECT o.url, o.event_type,
       count(*) FILTER (WHERE o.state = 'pending') AS pending,
       count(*) FILTER (WHERE o.state = 'pending' AND o.locked_until > now()) AS in_flight,
       count(*) FILTER (WHERE o.state = 'pending' AND o.attempts > 0
                          AND (o.locked_until IS NULL OR o.locked_until <= now())) AS retrying,
       count(*) FILTER (WHERE o.state = 'failed') AS failed,
       count(*) FILTER (WHERE o.state = 'skipped') AS skipped,
       min(o.created_at) FILTER (WHERE o.state = 'pending') AS oldest_pending,
       (SELECT count(*) FROM open) AS scanned
  FROM open o
 GROUP BY o.url, o.event_type;

-- name: overview_delivered
-- Successful attempts in the last hour per URL and event type, from attempt_log's started_at
-- index (the last hour only, capped at $1 rows).
WITH recent AS (
    SELECT a.url, a.event_type
      FROM __SCHEMA__.attempt_log a
     WHERE a.started_at >= now() - interval '1 hour'
       AND a.http_status BETWEEN 200 AND 299
     LIMIT $1::int
)
SELECT r.url, r.event_type, count(*) AS delivered, (SELECT count(*) FROM recent) AS scanned
  FROM recent r
 GROUP BY r.url, r.event_type;

-- name: overview_unfanned
-- Events not fanned out yet and the oldest one's capture time (event_pending_idx: tiny), and
-- the database's clock (relative times are computed against it).
SELECT count(*) AS unfanned, min(created_at) AS oldest, now() AS now
  FROM (SELECT created_at FROM __SCHEMA__.event WHERE NOT fanned_out LIMIT $1::int) AS u;

-- name: daemons
-- gone_at: set by a live daemon when this one missed three heartbeats.
SELECT id, hostname, pid, started_at, heartbeat_at, config_hash, gone_at
  FROM __SCHEMA__.daemon
 ORDER BY gone_at IS NOT NULL, heartbeat_at DESC, id;

-- name: endpoints
-- The shared state of endpoints with a rate limit or a circuit breaker (the columns of
-- ops.sql's status_endpoints, read by bridge.ops.endpoint_row).
SELECT url, failures, open_until > now() AS open,
       extract(epoch FROM open_until - now())::float8 AS open_for, tokens
  FROM __SCHEMA__.endpoint
 ORDER BY url;

-- name: event
-- One event as captured; bridge/console/data.py renders its payload as the daemon does
-- (bridge/render.py). The console tests compare that with the bytes a receiver got.
SELECT e.id, e.event_id, e.event_type, e.kind, e.source_table, e.op, e.created_at,
       e.fanned_out, __KEY_SHOW__ AS key, now() AS now,
       coalesce(e.row_data, e.row_data_v1::json) AS row_data, e.old_data,
       e.previous_v1::text AS previous_v1
  FROM __SCHEMA__.event e
 WHERE e.event_id = $1::uuid;

-- name: event_deliveries
SELECT d.id, d.url, d.state, d.attempts, d.last_status, d.last_error, d.next_attempt_at,
       d.locked_until, d.created_at, d.updated_at
  FROM __SCHEMA__.delivery d
 WHERE d.event_id = $1::bigint
 ORDER BY d.url;

-- name: event_attempts
-- Every logged attempt of one event (attempt_log_event_idx), oldest first.
SELECT a.url, a.attempt, a.started_at, a.duration_ms, a.http_status, a.error,
       a.response_body, a.daemon_id
  FROM __SCHEMA__.attempt_log a
 WHERE a.event_id = $1::uuid
 ORDER BY a.started_at, a.id;
