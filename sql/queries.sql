-- Runtime queries of the daemon and the operator commands, one named block each.
-- __SCHEMA__ is the quoted bridge schema. $n parameters are asyncpg's.
-- Time is injectable for tests: coalesce($n::timestamptz, now()).

-- name: fan_out
-- Turn up to $1 new events into one delivery row per subscribed URL, in one statement; returns
-- how many events of each type were fanned out.
-- $2/$3 are parallel arrays (event_type, url) of the config at claim time; $4 = webhooks enabled
-- (when false, deliveries are recorded as 'skipped', replayable later).
WITH ev AS (
    SELECT e.id, e.event_type
      FROM __SCHEMA__.event e
     WHERE NOT e.fanned_out
     ORDER BY e.id
     LIMIT $1
       FOR UPDATE SKIP LOCKED
), marked AS (
    UPDATE __SCHEMA__.event e SET fanned_out = true FROM ev WHERE e.id = ev.id
    RETURNING e.id, e.event_type
), subs AS (
    SELECT s.event_type, s.url FROM unnest($2::text[], $3::text[]) AS s(event_type, url)
), ins AS (
    INSERT INTO __SCHEMA__.delivery (event_id, url, state)
    SELECT ev.id, subs.url, CASE WHEN $4::boolean THEN 'pending' ELSE 'skipped' END
      FROM ev JOIN subs ON subs.event_type = ev.event_type
    ON CONFLICT (event_id, url) DO NOTHING
    RETURNING 1
)
SELECT m.event_type, count(*) AS events FROM marked m GROUP BY m.event_type;

-- name: claim
-- Claim due deliveries for owner $3 with a lease of $4 seconds, in one statement: up to $2[i]
-- rows of URL $1[i] (the daemon asks only for what it has room for). Each URL's rows come from
-- its own index range, so a long backlog for one URL costs the others nothing. Rows locked by
-- another claimer are skipped; a row whose lease expired is claimable again (a crashed
-- daemon's work is reclaimed).
WITH want AS (
    SELECT w.url, w.n FROM unnest($1::text[], $2::int[]) AS w(url, n) WHERE w.n > 0
), due AS (
    SELECT pick.id
      FROM want
     CROSS JOIN LATERAL (
        SELECT d.id
          FROM __SCHEMA__.delivery d
         WHERE d.url = want.url
           AND d.state = 'pending'
           AND d.next_attempt_at <= coalesce($5::timestamptz, now())
           AND (d.locked_until IS NULL OR d.locked_until < coalesce($5::timestamptz, now()))
         ORDER BY d.next_attempt_at, d.id
         LIMIT want.n
           FOR UPDATE SKIP LOCKED
     ) AS pick
)
UPDATE __SCHEMA__.delivery d
   SET locked_by = $3,
       locked_until = coalesce($5::timestamptz, now()) + make_interval(secs => $4::float8),
       attempts = d.attempts + 1,
       updated_at = now()
  FROM due, __SCHEMA__.event e
 WHERE d.id = due.id AND e.id = d.event_id
-- info/previous: the payload's row and old values, rendered by the bridge schema's functions
-- (migrate_v2.sql: field names, column order, UTC times; every digit of numbers kept).
RETURNING d.id, d.url, d.attempts, e.event_id, e.event_type, e.kind, e.created_at,
          __SCHEMA__.payload_info_v2(e.kind, e.row_data, e.row_data_v1) AS info,
          __SCHEMA__.payload_previous_v2(e.kind, e.row_data, e.old_data, e.previous_v1)
              AS previous;

-- name: pending_urls
-- Every URL with pending deliveries (also URLs no longer in the config: what was fanned out to
-- them is still delivered). Refreshed now and then, not per claim.
SELECT DISTINCT d.url FROM __SCHEMA__.delivery d WHERE d.state = 'pending';

-- name: ack
-- Record a batch of finished attempts in one round trip: update each delivery (only if this
-- daemon still holds it at that attempt) and append one attempt_log row per attempt.
-- retry_in: seconds until the next attempt (state 'pending'), NULL otherwise.
WITH r AS (
    SELECT *
      FROM unnest($1::bigint[], $2::int[], $3::text[], $4::float8[], $5::int[], $6::text[],
                  $7::uuid[], $8::text[], $9::text[], $10::timestamptz[], $11::float8[],
                  $12::text[])
        AS r(id, attempt, state, retry_in, http_status, error,
             event_id, event_type, url, started_at, duration_ms, response_body)
), logged AS (
    INSERT INTO __SCHEMA__.attempt_log
        (delivery_id, event_id, event_type, url, attempt, started_at, duration_ms,
         http_status, error, response_body, daemon_id)
    SELECT r.id, r.event_id, r.event_type, r.url, r.attempt, r.started_at, r.duration_ms,
           r.http_status, r.error, r.response_body, $13
      FROM r
)
UPDATE __SCHEMA__.delivery d
   SET state = r.state,
       next_attempt_at = CASE WHEN r.retry_in IS NULL THEN d.next_attempt_at
                              ELSE now() + make_interval(secs => r.retry_in) END,
       locked_by = NULL,
       locked_until = NULL,
       last_status = r.http_status,
       last_error = r.error,
       updated_at = now()
  FROM r
 WHERE d.id = r.id AND d.attempts = r.attempt AND d.locked_by = $13;

-- name: release
-- Give back claimed deliveries that were never attempted (graceful shutdown).
UPDATE __SCHEMA__.delivery d
   SET locked_by = NULL, locked_until = NULL, attempts = d.attempts - 1, updated_at = now()
 WHERE d.id = ANY ($1::bigint[]) AND d.locked_by = $2;

-- name: set_sleeping
-- Idle ($1 true): writers NOTIFY until now() + $2 seconds; the idle daemon renews it every poll.
-- Draining ($1 false): writers skip NOTIFY.
UPDATE __SCHEMA__.runtime
   SET sleeping = $1::boolean,
       sleeping_until = CASE WHEN $1::boolean THEN now() + make_interval(secs => $2::float8) END
 WHERE id = 1 AND ($1::boolean OR sleeping);

-- name: set_capture_modified
UPDATE __SCHEMA__.runtime SET capture_modified = $1::boolean
 WHERE id = 1 AND capture_modified IS DISTINCT FROM $1::boolean;

-- name: current_snapshot
SELECT pg_current_snapshot()::text;

-- name: snapshot_settled
-- True once every transaction in progress at snapshot $1 has ended: a writer that read
-- runtime.sleeping = false before the daemon set it true has committed (or aborted) by then.
SELECT NOT EXISTS (
    SELECT 1 FROM pg_snapshot_xip($1::text::pg_snapshot) AS x(xid)
     WHERE x.xid IN (SELECT pg_snapshot_xip(pg_current_snapshot()))
);

-- name: heartbeat
INSERT INTO __SCHEMA__.daemon (id, hostname, pid, config_hash)
VALUES ($1, $2, $3, $4)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), config_hash = EXCLUDED.config_hash;

-- name: daemon_gone
DELETE FROM __SCHEMA__.daemon WHERE id = $1;

-- name: conflicting_daemons
-- Live daemons, registered before daemon $1, whose subscriptions (webhooks.events + enabled)
-- differ from $2 (of two started at once, the later one gives way).
SELECT o.id, o.hostname, o.pid
  FROM __SCHEMA__.daemon o, __SCHEMA__.daemon me
 WHERE me.id = $1 AND o.id <> $1
   AND o.heartbeat_at > now() - make_interval(secs => $3::float8)
   AND o.config_hash IS DISTINCT FROM $2
   AND (o.started_at, o.id) < (me.started_at, me.id);

-- name: other_daemons_alive
SELECT count(*) FROM __SCHEMA__.daemon
 WHERE id <> $1 AND heartbeat_at > now() - make_interval(secs => $2::float8);

-- name: set_field_names
-- The config's webhooks.field_names as (kind, column, field) arrays: set those overrides and
-- clear every other one (an override removed from the config no longer applies).
WITH wanted AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS w(kind, column_name, field)
), cleared AS (
    UPDATE __SCHEMA__.field_map m SET override = NULL
     WHERE m.override IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM wanted w
                        WHERE w.kind = m.kind AND w.column_name = m.column_name)
)
INSERT INTO __SCHEMA__.field_map (kind, column_name, field_name, override)
SELECT w.kind, w.column_name, __SCHEMA__.field_name_v1(w.column_name), w.field FROM wanted w
ON CONFLICT (kind, column_name) DO UPDATE SET override = EXCLUDED.override
 WHERE __SCHEMA__.field_map.override IS DISTINCT FROM EXCLUDED.override;

-- name: field_name_clashes
-- Payload field names shared by two current columns of a captured table ($1/$2: kind and the
-- quoted table name), after set_field_names.
SELECT m.kind, coalesce(m.override, m.field_name) AS field,
       string_agg(quote_ident(m.column_name), ', ' ORDER BY a.attnum) AS columns
  FROM __SCHEMA__.field_map m
  JOIN unnest($1::text[], $2::text[]) AS t(kind, qualified) ON t.kind = m.kind
  JOIN pg_catalog.pg_attribute a
    ON a.attrelid = to_regclass(t.qualified) AND a.attname = m.column_name
   AND a.attnum > 0 AND NOT a.attisdropped
 GROUP BY 1, 2
HAVING count(*) > 1;

-- name: schema_version
SELECT max(version) FROM __SCHEMA__.version;

-- name: queue_stats
-- Pending deliveries and the age of the oldest one (seconds), for the metrics gauges.
SELECT count(*) AS pending,
       coalesce(extract(epoch FROM now() - min(d.created_at)), 0)::float8 AS oldest
  FROM __SCHEMA__.delivery d WHERE d.state = 'pending';
