-- qlm-webhook-bridge schema: the delivery engine v2 (per-key ordering, endpoint policies).
-- Rendered by bridge/install.py: __SCHEMA__ is the quoted bridge schema name. Applied once, in
-- the installer's transaction, on top of the previous version: every existing row (pending,
-- retrying, failed, delivered, the log) stays as it is.

-- The entity a delivery belongs to ('license:<ActivationKey>' or 'customer:<CustomerID>'), set
-- only for URLs delivered in order per key (webhooks.ordering: per_key). NULL elsewhere, so the
-- ordering index below costs nothing to deliveries without ordering.
ALTER TABLE __SCHEMA__.delivery ADD COLUMN key text;
-- Claims go by URL (delivery_url_due_idx); the index over every URL's due rows is not read any
-- more, and each one less is one index entry less per delivery row written.
DROP INDEX __SCHEMA__.delivery_due_idx;
CREATE INDEX delivery_key_order_idx ON __SCHEMA__.delivery (url, key, event_id)
    WHERE state = 'pending' AND key IS NOT NULL;

-- Shared state of each endpoint that has a rate limit or a circuit breaker, so every daemon on
-- this schema enforces one limit and sees one breaker.
--   tokens/refilled_at: token bucket of webhooks.endpoints.<url>.rate_limit;
--   failures: consecutive failed attempts; open_until: the breaker is open until then (NULL:
--   closed); once it has passed, one probe may be claimed (probe_by holds it until probe_until).
CREATE TABLE __SCHEMA__.endpoint (
    url          text PRIMARY KEY,
    tokens       double precision NOT NULL DEFAULT 0,
    refilled_at  timestamptz NOT NULL DEFAULT now(),
    failures     integer NOT NULL DEFAULT 0,
    open_until   timestamptz,
    opened_at    timestamptz,
    probe_by     text,
    probe_until  timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- A daemon that misses three heartbeats is marked gone (shown by `status`) and its claimed
-- deliveries are released at once, rather than after their lease.
ALTER TABLE __SCHEMA__.daemon ADD COLUMN gone_at timestamptz;
ALTER TABLE __SCHEMA__.daemon ADD COLUMN heartbeat_interval double precision;

INSERT INTO __SCHEMA__.version (version) VALUES (2);
