-- Alerts and their notification routing live in the registry (issue 13, architecture §4.4.2):
-- every Grafana org posts its alerts to one webhook of the API, which stores each event once,
-- matches it against its tenant's routes and records every delivery attempt. Routing is edited
-- through the API and `ironlink alerts route ...`, never by a Pulumi update (registry/alerts.py).

-- Who may post alerts: one row per Grafana contact point. Its bearer token is stored only as a
-- SHA-256 digest (the token is random, 32+ characters: a slow hash adds nothing). tenant_id names
-- the one tenant the source speaks for; NULL is the shared org's source, which speaks for the
-- tenant each alert's `tenant` label names, and only for tenants of isolation level 1 (the ones
-- living in the shared org). Written by the tenant stack (registry.alerts.upsert_webhook_source).
CREATE TABLE alert_webhook_sources (
    id           text PRIMARY KEY CONSTRAINT alert_webhook_sources_id_format
                 CHECK (id ~ '^[a-z0-9]([a-z0-9-]*[a-z0-9])?$' AND length(id) <= 63),
    tenant_id    text REFERENCES tenants (id) ON DELETE CASCADE,
    token_sha256 bytea NOT NULL CONSTRAINT alert_webhook_sources_token_size CHECK (octet_length(token_sha256) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT alert_webhook_sources_token_unique UNIQUE (token_sha256)
);

-- A tenant's routing rules. NULL site_id, severities or hours: any. hours is a JSON array of
-- {"days": ["mon", ...], "start": "HH:MM", "end": "HH:MM"} windows read in time_zone (an IANA
-- name, checked by the writer). A removed site takes its routes with it.
CREATE TABLE alert_routes (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id     text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name          text NOT NULL CONSTRAINT alert_routes_name_size CHECK (length(name) BETWEEN 1 AND 64),
    site_id       text,
    severities    text[] CONSTRAINT alert_routes_severities_size
                  CHECK (cardinality(severities) BETWEEN 1 AND 8),
    hours         jsonb CONSTRAINT alert_routes_hours_shape
                  CHECK (jsonb_typeof(hours) = 'array' AND jsonb_array_length(hours) BETWEEN 1 AND 14),
    time_zone     text NOT NULL DEFAULT 'UTC'
                  CONSTRAINT alert_routes_time_zone_size CHECK (length(time_zone) BETWEEN 1 AND 64),
    channel       text NOT NULL
                  CONSTRAINT alert_routes_channel CHECK (channel IN ('email', 'slack', 'teams', 'webhook')),
    target        text NOT NULL CONSTRAINT alert_routes_target_size CHECK (length(target) BETWEEN 1 AND 2048),
    -- The generic webhook's Authorization header value (an SMS provider's key); secret.
    authorization_header text CONSTRAINT alert_routes_authorization_size
                  CHECK (authorization_header IS NULL
                         OR (length(authorization_header) BETWEEN 1 AND 1024 AND channel = 'webhook')),
    send_resolved boolean NOT NULL DEFAULT true,
    enabled       boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT alert_routes_name_unique UNIQUE (tenant_id, name),
    FOREIGN KEY (tenant_id, site_id) REFERENCES sites (tenant_id, id) ON DELETE CASCADE
);

-- One row per alert of a webhook payload. (fingerprint, starts_at, status) is Grafana's identity
-- of one state of one alert instance: a resend (Grafana's repeat_interval, a retry) is the same row.
-- occurred_at is when the state began: starts_at when firing, ends_at when resolved.
CREATE TABLE alert_events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    source_id    text NOT NULL,
    fingerprint  text NOT NULL CONSTRAINT alert_events_fingerprint_size CHECK (length(fingerprint) BETWEEN 1 AND 64),
    status       text NOT NULL CONSTRAINT alert_events_status CHECK (status IN ('firing', 'resolved')),
    starts_at    timestamptz NOT NULL,
    ends_at      timestamptz,
    occurred_at  timestamptz NOT NULL,
    alertname    text NOT NULL CONSTRAINT alert_events_alertname_size CHECK (length(alertname) <= 256),
    severity     text CONSTRAINT alert_events_severity_size CHECK (length(severity) <= 64),
    site_id      text CONSTRAINT alert_events_site_size CHECK (length(site_id) <= 64),
    machine_id   text CONSTRAINT alert_events_machine_size CHECK (length(machine_id) <= 64),
    labels       jsonb NOT NULL,
    annotations  jsonb NOT NULL,
    metric_values jsonb,
    links        jsonb NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT alert_events_identity UNIQUE (tenant_id, fingerprint, starts_at, status)
);
CREATE INDEX alert_events_history ON alert_events (tenant_id, occurred_at, id);

-- One row per delivery attempt. The dispatcher claims due 'pending' rows (FOR UPDATE SKIP
-- LOCKED, so replicas never share one), marks them 'sending', and finishes each as 'delivered'
-- or 'failed' (with next_retry_at when another attempt is queued as a new 'pending' row) or
-- 'canceled' (its route was removed or disabled). Pending rows survive a restart; a row left
-- 'sending' by a dispatcher that died is failed and retried after the lease (registry/alerts.py).
CREATE TABLE alert_deliveries (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      bigint NOT NULL REFERENCES alert_events (id) ON DELETE CASCADE,
    tenant_id     text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    route_id      bigint REFERENCES alert_routes (id) ON DELETE SET NULL,
    channel       text NOT NULL
                  CONSTRAINT alert_deliveries_channel CHECK (channel IN ('email', 'slack', 'teams', 'webhook')),
    target        text NOT NULL CONSTRAINT alert_deliveries_target_size CHECK (length(target) <= 2048),
    attempt       integer NOT NULL CONSTRAINT alert_deliveries_attempt_range CHECK (attempt BETWEEN 1 AND 100),
    status        text NOT NULL DEFAULT 'pending' CONSTRAINT alert_deliveries_status
                  CHECK (status IN ('pending', 'sending', 'delivered', 'failed', 'canceled')),
    due_at        timestamptz NOT NULL,
    claimed_at    timestamptz,
    finished_at   timestamptz,
    error         text CONSTRAINT alert_deliveries_error_size CHECK (length(error) <= 2000),
    next_retry_at timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT alert_deliveries_attempt_unique UNIQUE (event_id, route_id, attempt)
);
CREATE INDEX alert_deliveries_due ON alert_deliveries (due_at) WHERE status = 'pending';
CREATE INDEX alert_deliveries_sending ON alert_deliveries (claimed_at) WHERE status = 'sending';
CREATE INDEX alert_deliveries_event ON alert_deliveries (event_id, id);

-- Tokens, webhook URLs and provider keys are secrets: the broker's read-only role must not read them.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'emqx') THEN
        REVOKE ALL ON alert_webhook_sources, alert_routes, alert_events, alert_deliveries FROM emqx;
    END IF;
END;
$$;
