-- Runtime queries of the daemon and the operator commands, one named block each.
-- __SCHEMA__ is the quoted bridge schema. $n parameters are asyncpg's.
-- Time is injectable for tests: coalesce($n::timestamptz, now()).

-- name: produce
-- Fan out up to $1 new events and claim some of the new deliveries in the same statement (one
-- round trip and no claim UPDATE for a delivery that is sent at once):
--   $2/$3: parallel arrays (event_type, url) of the subscriptions at this moment;
--   $4: webhooks enabled (when false, deliveries are recorded as 'skipped', replayable later);
--   $5/$6: (url, n) how many new deliveries of each URL this daemon has room to start now: the
--          first n of that URL in event order are inserted already claimed by owner $7 with a
--          lease of $8 seconds and attempt 1; the rest are inserted pending for any claimer;
--   $9: URLs delivered in order per key: their rows carry the event's key (event.key; for
--       events captured before schema version 4, $10/$11: the key columns of license and
--       customer rows) and are never claimed here (claim checks order).
-- Returns the claimed rows (as `claim` does) and, in rows whose id is NULL, how many events of
-- each type were fanned out (for the metrics and to know whether more are waiting).
WITH ev AS (
    SELECT e.id, e.event_type, e.kind, coalesce(e.row_data, e.row_data_v1::json) AS row_data,
           e.key
      FROM __SCHEMA__.event e
     WHERE NOT e.fanned_out
     ORDER BY e.id
     LIMIT $1
       FOR UPDATE SKIP LOCKED
), marked AS (
    -- No need to wait for the WAL flush at commit: if the server crashes before it, the
    -- events are fanned out again (a request already sent is at most a duplicate, and any
    -- acknowledgement that depends on these rows is itself durable, which flushes them too).
    -- By primary key, as an array: joined to `ev`, the planner sized the join by LIMIT $1
    -- and scanned the whole event table on every pass (latency grew with the table).
    UPDATE __SCHEMA__.event e SET fanned_out = true
     WHERE e.id = ANY (ARRAY(SELECT ev.id FROM ev))
    RETURNING e.id, set_config('synchronous_commit', 'off', true)
), fan AS (
    SELECT ev.id AS event_id, s.url, ev.kind, ev.row_data, ev.key,
           s.url = ANY ($9::text[]) AS ordered,
           row_number() OVER (PARTITION BY s.url ORDER BY ev.id) AS rn
      FROM ev JOIN unnest($2::text[], $3::text[]) AS s(event_type, url)
        ON s.event_type = ev.event_type
), rows AS (
    SELECT fan.event_id, fan.url,
           $4::boolean AND NOT fan.ordered AND fan.rn <= coalesce(room.n, 0) AS mine,
           -- event.key (schema version 4, bridge/keys.py); events captured before have none
           -- and get the same form from their JSON row
           CASE WHEN fan.ordered THEN coalesce(fan.key, fan.kind || ':' || (
               SELECT string_agg(coalesce(fan.row_data ->> k.col, ''), '|' ORDER BY k.n)
                 FROM unnest(CASE fan.kind WHEN 'license' THEN $10::text[] ELSE $11::text[] END)
                      WITH ORDINALITY AS k(col, n)))
           END AS key
      FROM fan LEFT JOIN unnest($5::text[], $6::int[]) AS room(url, n) ON room.url = fan.url
), ins AS (
    INSERT INTO __SCHEMA__.delivery (event_id, url, state, key, attempts, locked_by,
                                     locked_until)
    SELECT rows.event_id, rows.url, CASE WHEN $4::boolean THEN 'pending' ELSE 'skipped' END,
           rows.key, CASE WHEN rows.mine THEN 1 ELSE 0 END,
           CASE WHEN rows.mine THEN $7 END,
           CASE WHEN rows.mine THEN now() + make_interval(secs => $8::float8) END
      FROM rows
     ORDER BY rows.event_id, rows.url
    ON CONFLICT (event_id, url) DO NOTHING
    RETURNING id, url, attempts, event_id, locked_by
), claimed AS (
    SELECT ins.id, ins.url, ins.attempts, ins.event_id FROM ins WHERE ins.locked_by = $7
)
__CLAIMED_ROWS__
UNION ALL
SELECT NULL, NULL, count(*)::int, NULL, ev.event_type, NULL, NULL, NULL, NULL, NULL
  FROM ev GROUP BY ev.event_type;

-- name: claimed_rows
-- The tail shared by `produce` and `claim`: what a daemon needs to send each claimed row
-- (CTE `claimed`: id, url, attempts, event_id). The row is returned as captured
-- (row_to_json text; jsonb text for events captured before schema version 3) and the daemon
-- renders the payload (bridge/render.py): rendering here cost ~100 us of server CPU per row.
SELECT c.id, c.url, c.attempts, e.event_id, e.event_type, e.kind, e.created_at,
       coalesce(e.row_data, e.row_data_v1::json) AS row_data, e.old_data,
       e.previous_v1::text AS previous_v1
  FROM claimed c JOIN __SCHEMA__.event e ON e.id = c.event_id

-- name: claim
-- Claim due deliveries for owner $3 with a lease of $4 seconds, in one statement: up to $2[i]
-- rows of URL $1[i] (the daemon asks only for what it has room for). Each URL's rows come from
-- its own index range, so a long backlog for one URL costs the others nothing. Rows locked by
-- another claimer are skipped; a row whose lease expired is claimable again (a crashed
-- daemon's work is reclaimed).
-- Rows with a key (URLs delivered in order per key) are claimable only at the head of their
-- key: no earlier delivery of the same URL and key is still pending (in flight or waiting for a
-- retry), and every earlier event has been fanned out (so none can still appear before it).
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
           AND (d.key IS NULL OR (
                NOT EXISTS (SELECT 1 FROM __SCHEMA__.delivery p
                             WHERE p.url = d.url AND p.key = d.key AND p.state = 'pending'
                               AND p.event_id < d.event_id)
                -- the oldest event not fanned out yet, looked up once per statement in
                -- event_pending_idx (as NOT EXISTS per row, the planner scanned the table)
                AND d.event_id < coalesce((SELECT u.id FROM __SCHEMA__.event u
                                            WHERE NOT u.fanned_out ORDER BY u.id LIMIT 1),
                                          d.event_id + 1)))
         ORDER BY d.next_attempt_at, d.id
         LIMIT want.n
           FOR UPDATE SKIP LOCKED
     ) AS pick
), claimed AS (
    UPDATE __SCHEMA__.delivery d
       SET locked_by = $3,
           locked_until = coalesce($5::timestamptz, now()) + make_interval(secs => $4::float8),
           attempts = d.attempts + 1,
           updated_at = now()
      FROM due
     WHERE d.id = due.id
    -- a claim lost in a crash is only claimed again (see produce)
    RETURNING d.id, d.url, d.attempts, d.event_id, set_config('synchronous_commit', 'off', true)
)
__CLAIMED_ROWS__;

-- name: pending_urls
-- Every URL with pending deliveries (also URLs no longer in the config: what was fanned out to
-- them is still delivered). A skip scan of delivery_url_due_idx: one index probe per URL, not
-- one row per pending delivery, however long the backlog.
WITH RECURSIVE u(url) AS (
    (SELECT d.url FROM __SCHEMA__.delivery d WHERE d.state = 'pending' ORDER BY d.url LIMIT 1)
    UNION ALL
    SELECT (SELECT d.url FROM __SCHEMA__.delivery d
             WHERE d.state = 'pending' AND d.url > u.url ORDER BY d.url LIMIT 1)
      FROM u WHERE u.url IS NOT NULL
)
SELECT url FROM u WHERE url IS NOT NULL;

-- name: ack
-- Record a batch of finished attempts in one round trip: update each delivery (only if this
-- daemon still holds it at that attempt) and append one attempt_log row per attempt.
-- retry_in: seconds until the next attempt (state 'pending'), NULL otherwise.
-- $14 true marks a re-sent batch (the first try's commit may have happened, unseen: the
-- connection died after the commit and before the reply). Then an attempt whose delivery this
-- daemon no longer holds is logged only if the first try did not log it, so every HTTP attempt
-- has exactly one log row. The check uses attempt_log_event_idx and runs only on re-sends.
WITH r AS (
    SELECT *
      FROM unnest($1::bigint[], $2::int[], $3::text[], $4::float8[], $5::int[], $6::text[],
                  $7::uuid[], $8::text[], $9::text[], $10::timestamptz[], $11::float8[],
                  $12::text[])
        AS r(id, attempt, state, retry_in, http_status, error,
             event_id, event_type, url, started_at, duration_ms, response_body)
), done AS (
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
     -- `d.id = ANY ($1)` lets the planner find the rows by primary key: joined to r alone,
     -- it may hash the whole delivery table for a large batch
     WHERE d.id = r.id AND d.id = ANY ($1::bigint[]) AND d.attempts = r.attempt
       AND d.locked_by = $13
    RETURNING d.id
)
INSERT INTO __SCHEMA__.attempt_log
    (delivery_id, event_id, event_type, url, attempt, started_at, duration_ms,
     http_status, error, response_body, daemon_id)
SELECT r.id, r.event_id, r.event_type, r.url, r.attempt, r.started_at, r.duration_ms,
       r.http_status, r.error, r.response_body, $13
  FROM r
 WHERE NOT $14::boolean
    OR EXISTS (SELECT 1 FROM done WHERE done.id = r.id)
    OR NOT EXISTS (SELECT 1 FROM __SCHEMA__.attempt_log a
                    WHERE a.event_id = r.event_id AND a.url = r.url
                      AND a.attempt = r.attempt AND a.started_at = r.started_at
                      AND a.daemon_id = $13);

-- name: release
-- Give back claimed deliveries that were never attempted (graceful shutdown, expired or paused
-- queues): $1/$2 (id, attempt) pairs. Only a row this daemon still holds at that attempt: if
-- its lease ran out and it was claimed again meanwhile (by another daemon, or by this one at
-- the next attempt), that later claim is left alone.
UPDATE __SCHEMA__.delivery d
   SET locked_by = NULL, locked_until = NULL, attempts = d.attempts - 1, updated_at = now()
  FROM unnest($1::bigint[], $2::int[]) AS r(id, attempt)
 WHERE d.id = r.id AND d.id = ANY ($1::bigint[]) AND d.attempts = r.attempt
   AND d.locked_by = $3;

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
-- $5: this daemon's heartbeat interval: other daemons count it dead after three missed beats.
-- Returns true when another daemon had marked this one gone (it was cut off long enough for
-- its leases to be ended: what it still holds may be sent by others now).
WITH prev AS (SELECT d.gone_at FROM __SCHEMA__.daemon d WHERE d.id = $1)
INSERT INTO __SCHEMA__.daemon (id, hostname, pid, config_hash, heartbeat_interval)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), config_hash = EXCLUDED.config_hash,
                               heartbeat_interval = EXCLUDED.heartbeat_interval, gone_at = NULL
RETURNING coalesce((SELECT prev.gone_at IS NOT NULL FROM prev), false) AS was_gone;

-- name: daemon_gone
DELETE FROM __SCHEMA__.daemon WHERE id = $1;

-- name: reap_daemons
-- Daemons that missed three heartbeats (killed, or cut off) are marked gone, and what they held
-- is released at once: their claimed deliveries (the lease is ended, so any daemon claims them
-- again) and their circuit-breaker probes. Rows of daemons gone for a day are deleted. Returns
-- the daemons found gone now. $1 = this daemon (never reaped by itself).
WITH gone AS (
    UPDATE __SCHEMA__.daemon g SET gone_at = now()
     WHERE g.id <> $1 AND g.gone_at IS NULL
       AND g.heartbeat_at < now() - make_interval(secs => 3 * coalesce(g.heartbeat_interval, 5))
    RETURNING g.id, g.hostname, g.pid, g.heartbeat_at
), freed AS (
    UPDATE __SCHEMA__.delivery d SET locked_until = now()
      FROM gone
     WHERE d.state = 'pending' AND d.locked_by = gone.id AND d.locked_until > now()
    RETURNING d.id
), probes AS (
    UPDATE __SCHEMA__.endpoint p SET probe_by = NULL, probe_until = NULL
      FROM gone WHERE p.probe_by = gone.id
), forgotten AS (
    DELETE FROM __SCHEMA__.daemon o WHERE o.gone_at < now() - interval '1 day'
)
SELECT gone.id, gone.hostname, gone.pid,
       extract(epoch FROM now() - gone.heartbeat_at)::float8 AS silent,
       (SELECT count(*) FROM freed)::int AS released
  FROM gone;

-- name: conflicting_daemons
-- Live daemons, registered before daemon $1, whose subscriptions (webhooks.events + enabled)
-- differ from $2 (of two started at once, the later one gives way).
SELECT o.id, o.hostname, o.pid
  FROM __SCHEMA__.daemon o, __SCHEMA__.daemon me
 WHERE me.id = $1 AND o.id <> $1
   AND o.gone_at IS NULL
   AND o.heartbeat_at > now() - make_interval(secs => $3::float8)
   AND o.config_hash IS DISTINCT FROM $2
   AND (o.started_at, o.id) < (me.started_at, me.id);

-- name: other_daemons_alive
SELECT count(*) FROM __SCHEMA__.daemon
 WHERE id <> $1 AND gone_at IS NULL AND heartbeat_at > now() - make_interval(secs => $2::float8);

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

-- name: field_map
-- What the daemon renders payloads with (bridge/render.py): each known column's payload field
-- name (override, QLM's name, then the naming rule), its place in the table and its type.
SELECT m.kind, m.column_name, coalesce(m.override, m.field_name) AS field, m.position,
       m.type_name
  FROM __SCHEMA__.field_map m;

-- name: field_names
-- The naming rule for columns of captured rows that field_map does not know (added after the
-- last install): $1 column names.
SELECT c.col, __SCHEMA__.field_name_v1(c.col) AS field FROM unnest($1::text[]) AS c(col);

-- name: schema_version
SELECT max(version) FROM __SCHEMA__.version;

-- name: queue_stats
-- Pending deliveries and the age of the oldest one (seconds), for the metrics gauges. An event
-- not fanned out yet counts as one pending delivery: a daemon fans out only as many events as
-- it can start (producer.py), so a backlog waits there (event_pending_idx).
WITH d AS (
    SELECT count(*) AS n, min(d.created_at) AS oldest
      FROM __SCHEMA__.delivery d WHERE d.state = 'pending'
), e AS (
    SELECT count(*) AS n, min(e.created_at) AS oldest
      FROM __SCHEMA__.event e WHERE NOT e.fanned_out
)
SELECT d.n + e.n AS pending,
       coalesce(extract(epoch FROM now() - least(d.oldest, e.oldest)), 0)::float8 AS oldest
  FROM d, e;

-- name: endpoints_init
-- Make sure every endpoint with a rate limit or a breaker has its shared row ($1: URLs; $2:
-- their token bucket sizes, which a new row starts full with).
INSERT INTO __SCHEMA__.endpoint (url, tokens)
SELECT u.url, u.burst FROM unnest($1::text[], $2::float8[]) AS u(url, burst)
ON CONFLICT (url) DO NOTHING;

-- name: admit
-- How many requests each shared-state endpoint may start now, across every daemon, in one
-- statement: per URL $1[i], at most $2[i] wanted; $3/$4: rate (requests/s, NULL: no limit) and
-- bucket size; $5 = this daemon, $6: seconds a breaker probe may take.
-- Token bucket: tokens refill at `rate` up to `burst`; each admitted request takes one.
-- Breaker: while open_until is ahead nothing is admitted; once it has passed, exactly one probe
-- (held by this daemon until probe_until), then nothing until the probe's outcome is recorded.
-- Returns per URL: granted, and wait = seconds until something could be admitted again.
WITH w AS (
    SELECT * FROM unnest($1::text[], $2::int[], $3::float8[], $4::float8[])
        AS w(url, want, rate, burst)
), cur AS (
    SELECT e.url, w.want, w.rate,
           CASE WHEN w.rate IS NULL THEN NULL
                ELSE least(w.burst, e.tokens + w.rate * extract(epoch FROM now() - e.refilled_at))
           END AS avail,
           e.open_until IS NOT NULL AND e.open_until > now() AS open,
           e.open_until IS NOT NULL AND e.open_until <= now()
               AND e.probe_until IS NOT NULL AND e.probe_until > now() AS probing,
           e.open_until IS NOT NULL AND e.open_until <= now()
               AND (e.probe_until IS NULL OR e.probe_until <= now()) AS half_open,
           extract(epoch FROM e.open_until - now())::float8 AS open_for,
           extract(epoch FROM e.probe_until - now())::float8 AS probe_for
      FROM __SCHEMA__.endpoint e JOIN w ON w.url = e.url
       FOR UPDATE OF e
), g AS (
    SELECT cur.*,
           CASE WHEN cur.open OR cur.probing THEN 0
                ELSE least(cur.want, CASE WHEN cur.half_open THEN 1 ELSE cur.want END,
                           coalesce(floor(cur.avail)::int, cur.want))
           END AS granted
      FROM cur
)
UPDATE __SCHEMA__.endpoint e
   SET tokens = CASE WHEN g.rate IS NULL THEN e.tokens ELSE g.avail - g.granted END,
       refilled_at = now(),
       probe_by = CASE WHEN g.half_open AND g.granted > 0 THEN $5 ELSE e.probe_by END,
       probe_until = CASE WHEN g.half_open AND g.granted > 0
                          THEN now() + make_interval(secs => $6::float8) ELSE e.probe_until END,
       updated_at = now()
  FROM g
 WHERE e.url = g.url
RETURNING e.url, g.granted,
          CASE WHEN g.open THEN g.open_for
               WHEN g.probing THEN g.probe_for
               WHEN g.rate IS NOT NULL AND g.granted < g.want
                    THEN (1 - (g.avail - g.granted)) / g.rate
          END AS wait;

-- name: refund
-- Give back what `admit` granted and `claim` did not use ($2[i] tokens of URL $1[i]; $3[i]
-- true when that URL's probe went unused), so an idle endpoint does not eat its own rate.
UPDATE __SCHEMA__.endpoint e
   SET tokens = e.tokens + r.n,
       probe_by = CASE WHEN r.probe AND e.probe_by = $4 THEN NULL ELSE e.probe_by END,
       probe_until = CASE WHEN r.probe AND e.probe_by = $4 THEN NULL ELSE e.probe_until END
  FROM unnest($1::text[], $2::float8[], $3::boolean[]) AS r(url, n, probe)
 WHERE e.url = r.url;

-- name: breaker_outcomes
-- Record what a batch of attempts did to each breaker endpoint, shared by every daemon:
-- $1[i] URL, $2[i] whether any attempt succeeded, $3[i] failures after the last success (all
-- of them when none succeeded), $4[i]/$5[i] the breaker's failures threshold and cooldown.
-- A success closes the breaker; reaching the threshold opens it for the cooldown (once open it
-- is not extended by requests that were already in flight); the probe is over either way.
-- Returns the URLs whose breaker opened or closed, with the new state.
WITH o AS (
    SELECT * FROM unnest($1::text[], $2::boolean[], $3::int[], $4::int[], $5::float8[])
        AS o(url, ok, tail, threshold, cooldown)
), cur AS (
    SELECT e.url, e.open_until IS NOT NULL AS was_open, e.open_until > now() AS cooling,
           CASE WHEN o.ok THEN o.tail ELSE e.failures + o.tail END AS failures,
           o.threshold, o.cooldown, o.ok
      FROM __SCHEMA__.endpoint e JOIN o ON o.url = e.url
       FOR UPDATE OF e
), nxt AS (
    SELECT cur.*,
           CASE WHEN cur.failures >= cur.threshold AND cur.cooling THEN 'open'
                WHEN cur.failures >= cur.threshold THEN 'opens'
                WHEN cur.ok THEN 'closed'
                ELSE CASE WHEN cur.was_open THEN 'open' ELSE 'closed' END
           END AS state
      FROM cur
)
UPDATE __SCHEMA__.endpoint e
   SET failures = nxt.failures,
       open_until = CASE nxt.state WHEN 'opens' THEN now() + make_interval(secs => nxt.cooldown)
                                   WHEN 'closed' THEN NULL ELSE e.open_until END,
       opened_at = CASE nxt.state WHEN 'opens' THEN now() WHEN 'closed' THEN NULL
                                  ELSE e.opened_at END,
       probe_by = NULL, probe_until = NULL,
       updated_at = now()
  FROM nxt
 WHERE e.url = nxt.url
RETURNING e.url, nxt.state, nxt.was_open, nxt.failures;

-- name: endpoint_states
-- The shared state of every endpoint row, for status and the logs.
SELECT e.url, e.tokens, e.failures, e.open_until, e.opened_at, e.probe_by,
       e.open_until IS NOT NULL AND e.open_until > now() AS open
  FROM __SCHEMA__.endpoint e ORDER BY e.url;
