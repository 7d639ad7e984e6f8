-- qlm-webhook-bridge schema, version 1.
-- Rendered by bridge/install.py: __SCHEMA__ is the quoted bridge schema name.
-- Applied once, inside the installer's transaction; later versions add migrate_vN.sql files.

CREATE SCHEMA IF NOT EXISTS __SCHEMA__;
REVOKE ALL ON SCHEMA __SCHEMA__ FROM PUBLIC;

-- Which schema versions are applied (upgrade in place reads max(version)).
CREATE TABLE __SCHEMA__.version (
    version     integer PRIMARY KEY,
    installed_at timestamptz NOT NULL DEFAULT now()
);

-- The durable outbox: one row per captured change, written by the capture triggers in the same
-- transaction as the change. row_data is the row after the change (before it, for DELETE);
-- previous holds the old values of the columns an UPDATE changed.
CREATE TABLE __SCHEMA__.event (
    id           bigserial PRIMARY KEY,
    event_id     uuid        NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    event_type   text        NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('license', 'customer')),
    source_table text        NOT NULL,
    op           text        NOT NULL CHECK (op IN ('INSERT', 'UPDATE', 'DELETE')),
    row_data     jsonb       NOT NULL,
    previous     jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    fanned_out   boolean     NOT NULL DEFAULT false
);
-- The daemon's fan-out scans only events it has not fanned out yet: keep that index tiny.
CREATE INDEX event_pending_idx ON __SCHEMA__.event (id) WHERE NOT fanned_out;
CREATE INDEX event_created_idx ON __SCHEMA__.event (created_at);

-- One row per (event, URL): the retry queue. A claimed row carries an owner and a lease
-- (locked_until); a lease that expires makes the row claimable again by any daemon.
CREATE TABLE __SCHEMA__.delivery (
    id              bigserial PRIMARY KEY,
    event_id        bigint      NOT NULL REFERENCES __SCHEMA__.event (id) ON DELETE CASCADE,
    url             text        NOT NULL,
    state           text        NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'failed', 'skipped')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    locked_by       text,
    locked_until    timestamptz,
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (event_id, url)
) WITH (fillfactor = 80);
-- Only pending rows are indexed for claiming, and no index covers the columns a claim sets
-- (lease, owner, attempts), so claims are HOT updates that leave the indexes alone.
CREATE INDEX delivery_due_idx ON __SCHEMA__.delivery (next_attempt_at, id) WHERE state = 'pending';
-- The per-URL claim: the next due rows of one URL, whatever the backlog of the others.
CREATE INDEX delivery_url_due_idx ON __SCHEMA__.delivery (url, next_attempt_at, id)
    WHERE state = 'pending';

-- QLM's log table: one row per HTTP invocation.
CREATE TABLE __SCHEMA__.attempt_log (
    id            bigserial PRIMARY KEY,
    delivery_id   bigint,
    event_id      uuid        NOT NULL,
    event_type    text        NOT NULL,
    url           text        NOT NULL,
    attempt       integer     NOT NULL,
    started_at    timestamptz NOT NULL,
    duration_ms   double precision NOT NULL,
    http_status   integer,
    error         text,
    response_body text,
    daemon_id     text
);
CREATE INDEX attempt_log_started_idx ON __SCHEMA__.attempt_log (started_at);
CREATE INDEX attempt_log_event_idx ON __SCHEMA__.attempt_log (event_id);

-- Daemons seen, with their heartbeat (for `status`).
CREATE TABLE __SCHEMA__.daemon (
    id           text PRIMARY KEY,
    hostname     text NOT NULL,
    pid          integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    config_hash  text
);

-- One row of runtime switches read by the capture triggers:
--   sleeping: some daemon may be idle, so writers NOTIFY (while every daemon drains, they skip the
--             NOTIFY and its cluster-wide commit lock);
--   sleeping_until: the idle daemon renews this every poll; once it has passed (the daemon died)
--             writers stop notifying, so a crashed daemon does not leave every commit paying
--             for NOTIFY. NULL means no expiry.
--   capture_modified: a URL subscribes to license_modified, so plain license UPDATEs are captured.
CREATE TABLE __SCHEMA__.runtime (
    id               integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    sleeping         boolean NOT NULL DEFAULT true,
    sleeping_until   timestamptz,
    capture_modified boolean NOT NULL DEFAULT false
);
INSERT INTO __SCHEMA__.runtime (id) VALUES (1);

-- Column -> payload field names. field_name is the default (naming rule, then QLM's names),
-- written by install; override is `webhooks.field_names`, written by install and by every daemon
-- start or reload (an override removed from the config is cleared). Columns missing here fall
-- back to field_name_v1() below.
CREATE TABLE __SCHEMA__.field_map (
    kind        text NOT NULL CHECK (kind IN ('license', 'customer')),
    column_name text NOT NULL,
    field_name  text NOT NULL,
    override    text,
    position    integer,  -- the column's place in its table: payload fields keep table order
    PRIMARY KEY (kind, column_name)
);

-- The naming rule of bridge/events.py in SQL: computer_id -> ComputerID.
CREATE FUNCTION __SCHEMA__.field_name_v1(col text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $qlm_bridge$
    SELECT coalesce(string_agg(CASE WHEN p IN ('id', 'url', 'uuid', 'ip') THEN upper(p)
                                    ELSE upper(left(p, 1)) || substr(p, 2) END, '' ORDER BY n), col)
      FROM unnest(string_to_array(col, '_')) WITH ORDINALITY AS t(p, n)
     WHERE p <> ''
$qlm_bridge$;

INSERT INTO __SCHEMA__.version (version) VALUES (1);
