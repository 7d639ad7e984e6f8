-- Queries of the operator commands (status, replay, prune), one named block each.
-- __SCHEMA__ is the quoted bridge schema. %(name)s parameters are psycopg's.
-- Time is injectable for tests: coalesce(%(now)s::timestamptz, now()).

-- name: installed
SELECT to_regclass(%(qualified)s) IS NOT NULL;

-- name: status_deliveries
-- Counts per (URL, event type). pending includes in_flight (claimed, lease running) and
-- retrying (waiting for another attempt after at least one failed).
SELECT d.url, e.event_type,
       count(*) FILTER (WHERE d.state = 'pending') AS pending,
       count(*) FILTER (WHERE d.state = 'pending'
                          AND d.locked_until > coalesce(%(now)s::timestamptz, now())) AS in_flight,
       count(*) FILTER (WHERE d.state = 'pending' AND d.attempts > 0
                          AND (d.locked_until IS NULL
                               OR d.locked_until <= coalesce(%(now)s::timestamptz, now())))
           AS retrying,
       count(*) FILTER (WHERE d.state = 'failed') AS failed,
       count(*) FILTER (WHERE d.state = 'skipped') AS skipped,
       count(*) FILTER (WHERE d.state = 'delivered') AS delivered
  FROM __SCHEMA__.delivery d
  JOIN __SCHEMA__.event e ON e.id = d.event_id
 GROUP BY d.url, e.event_type
 ORDER BY d.url, e.event_type;

-- name: status_summary
-- Events not fanned out yet, and the age (seconds) of the oldest event still waiting for a
-- delivery or for its fan-out (NULL when nothing waits).
SELECT (SELECT count(*) FROM __SCHEMA__.event WHERE NOT fanned_out) AS unfanned,
       extract(epoch FROM coalesce(%(now)s::timestamptz, now()) - least(
           (SELECT min(e.created_at) FROM __SCHEMA__.event e WHERE NOT e.fanned_out),
           (SELECT min(e.created_at)
              FROM __SCHEMA__.delivery d JOIN __SCHEMA__.event e ON e.id = d.event_id
             WHERE d.state = 'pending')
       ))::float8 AS oldest_pending_age,
       coalesce(%(now)s::timestamptz, now()) AS now;

-- name: status_daemons
-- gone_at: set by a live daemon when this one missed three heartbeats (killed or cut off).
SELECT id, hostname, pid, started_at, heartbeat_at,
       extract(epoch FROM coalesce(%(now)s::timestamptz, now()) - heartbeat_at)::float8 AS age,
       config_hash, gone_at
  FROM __SCHEMA__.daemon
 ORDER BY gone_at IS NOT NULL, heartbeat_at DESC, id;

-- name: status_endpoints
-- The shared state of endpoints with a rate limit or a circuit breaker.
SELECT url, failures, open_until > coalesce(%(now)s::timestamptz, now()) AS open,
       extract(epoch FROM open_until - coalesce(%(now)s::timestamptz, now()))::float8
           AS open_for,
       tokens
  FROM __SCHEMA__.endpoint
 ORDER BY url;

-- name: replay_batch
-- Re-queue up to %(batch)s matching deliveries with id > %(after)s; each filter is ignored when
-- NULL. Rows a daemon holds locked right now are skipped (they are not failed anyway).
WITH pick AS (
    SELECT d.id
      FROM __SCHEMA__.delivery d
      JOIN __SCHEMA__.event e ON e.id = d.event_id
     WHERE d.state = ANY (%(states)s::text[])
       AND d.id > %(after)s
       AND (%(event_ids)s::uuid[] IS NULL OR e.event_id = ANY (%(event_ids)s::uuid[]))
       AND (%(urls)s::text[] IS NULL OR d.url = ANY (%(urls)s::text[]))
       AND (%(event_types)s::text[] IS NULL OR e.event_type = ANY (%(event_types)s::text[]))
       AND (%(since)s::timestamptz IS NULL OR d.updated_at >= %(since)s::timestamptz)
     ORDER BY d.id
     LIMIT %(batch)s
       FOR UPDATE OF d SKIP LOCKED
)
UPDATE __SCHEMA__.delivery d
   SET state = 'pending',
       attempts = 0,
       next_attempt_at = coalesce(%(now)s::timestamptz, now()),
       locked_by = NULL,
       locked_until = NULL,
       updated_at = now()
  FROM pick
 WHERE d.id = pick.id
RETURNING d.id;

-- name: replay_fan_out
-- Replaying events by id also fans them out again to the URLs configured now: a delivery row is
-- created for each (event, subscribed URL) pair that has none. %(sub_types)s/%(sub_urls)s are
-- parallel arrays of the current subscriptions.
INSERT INTO __SCHEMA__.delivery (event_id, url, state, next_attempt_at)
SELECT e.id, s.url, 'pending', coalesce(%(now)s::timestamptz, now())
  FROM __SCHEMA__.event e
  JOIN unnest(%(sub_types)s::text[], %(sub_urls)s::text[]) AS s(event_type, url)
    ON s.event_type = e.event_type
 WHERE e.event_id = ANY (%(event_ids)s::uuid[])
   AND (%(urls)s::text[] IS NULL OR s.url = ANY (%(urls)s::text[]))
ON CONFLICT (event_id, url) DO NOTHING
RETURNING id;

-- name: known_event_ids
SELECT event_id FROM __SCHEMA__.event WHERE event_id = ANY (%(event_ids)s::uuid[]);

-- name: wake_daemons
SELECT pg_notify(%(channel)s, '');

-- name: prune_bound
-- Where a prune run stops: the first event (by id) captured at or after the cutoff (schema
-- version 4 dropped the index on event.created_at, which every captured change paid for; ids
-- follow capture order). An event of a transaction that began before the cutoff but wrote it
-- after that one is pruned by a later run.
SELECT coalesce(
    (SELECT e.id FROM __SCHEMA__.event e
      WHERE e.created_at >= coalesce(%(now)s::timestamptz, now())
                            - make_interval(secs => %(older_than)s::float8)
      ORDER BY e.id
      LIMIT 1),
    (SELECT max(e.id) + 1 FROM __SCHEMA__.event e),
    0) AS bound;

-- name: prune_events
-- Delete up to %(batch)s events older than %(older_than)s seconds whose deliveries are all
-- delivered or skipped (or that have none), oldest first, with ids after %(after_id)s and
-- before %(bound)s (prune_bound). Their deliveries go with them (ON DELETE CASCADE). Events
-- not fanned out yet are never touched; rows another session has locked are skipped, so
-- writers never wait. Walks the primary key.
WITH doomed AS (
    SELECT e.id
      FROM __SCHEMA__.event e
     WHERE e.id > %(after_id)s::bigint
       AND e.id < %(bound)s::bigint
       AND e.created_at < coalesce(%(now)s::timestamptz, now())
                          - make_interval(secs => %(older_than)s::float8)
       AND e.fanned_out
       AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.delivery d
                        WHERE d.event_id = e.id AND d.state IN ('pending', 'failed'))
     ORDER BY e.id
     LIMIT %(batch)s
       FOR UPDATE OF e SKIP LOCKED
)
DELETE FROM __SCHEMA__.event e
 USING doomed
 WHERE e.id = doomed.id
RETURNING e.id;

-- name: prune_logs
-- Delete up to %(batch)s attempt_log rows older than %(older_than)s seconds, oldest first.
WITH doomed AS (
    SELECT a.id
      FROM __SCHEMA__.attempt_log a
     WHERE a.started_at < coalesce(%(now)s::timestamptz, now())
                          - make_interval(secs => %(older_than)s::float8)
     ORDER BY a.started_at
     LIMIT %(batch)s
)
DELETE FROM __SCHEMA__.attempt_log a
 USING doomed
 WHERE a.id = doomed.id
RETURNING 1;
