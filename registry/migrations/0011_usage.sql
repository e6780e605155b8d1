-- Usage metering (issue 13 item 4): what each tenant sent, per hour, for usage-based pricing, and
-- its monthly message quota. Written by the ingest worker (ingest/usage.py through
-- registry/usage.py), read by the API (api/usage.py).
--
-- A stored point is one idempotent usage event, identified like the point in the store:
-- (tenant, site, machine, ts in ms). A message delivered twice, a redelivery after a worker was
-- killed, or a gateway's replay is the same identity again and is counted once. The hour an event
-- counts in is the hour its first copy arrived at a worker.
--
-- The rollup is incremental: one statement inserts a batch of events into the dedupe tables and
-- adds exactly the newly inserted ones to usage_hourly, so usage_hourly never needs the raw rows
-- again and they are kept only as the dedupe memory: pruned once older than the worker's
-- usage_dedupe_hours (a copy arriving later than that after its first is counted again).

CREATE TABLE usage_hourly (
    tenant_id       text NOT NULL,
    hour            timestamptz NOT NULL
                    CONSTRAINT usage_hourly_whole_hour CHECK (extract(epoch FROM hour) % 3600 = 0),
    messages        bigint NOT NULL DEFAULT 0 CONSTRAINT usage_hourly_messages_not_negative CHECK (messages >= 0),
    bytes           bigint NOT NULL DEFAULT 0 CONSTRAINT usage_hourly_bytes_not_negative CHECK (bytes >= 0),
    points          bigint NOT NULL DEFAULT 0 CONSTRAINT usage_hourly_points_not_negative CHECK (points >= 0),
    active_machines int NOT NULL DEFAULT 0 CONSTRAINT usage_hourly_machines_not_negative CHECK (active_machines >= 0),
    active_sites    int NOT NULL DEFAULT 0 CONSTRAINT usage_hourly_sites_not_negative CHECK (active_sites >= 0),
    PRIMARY KEY (tenant_id, hour)
);
-- No foreign key to tenants: a removed tenant's usage is still what it is billed for.

-- The dedupe memory: one row per point identity, with the hour its first copy counted in.
CREATE TABLE usage_points (
    tenant_id  text NOT NULL,
    site_id    text NOT NULL,
    machine_id text NOT NULL,
    ts_ms      bigint NOT NULL,
    hour       timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, site_id, machine_id, ts_ms)
);
CREATE INDEX usage_points_hour ON usage_points (hour);

-- Which machines and sites were active in an hour: a new event adds a machine (site) to its hour
-- only once, so active_machines / active_sites are distinct counts across every worker replica.
CREATE TABLE usage_active_machines (
    tenant_id  text NOT NULL,
    hour       timestamptz NOT NULL,
    site_id    text NOT NULL,
    machine_id text NOT NULL,
    PRIMARY KEY (tenant_id, hour, site_id, machine_id)
);
CREATE INDEX usage_active_machines_hour ON usage_active_machines (hour);
CREATE TABLE usage_active_sites (
    tenant_id text NOT NULL,
    hour      timestamptz NOT NULL,
    site_id   text NOT NULL,
    PRIMARY KEY (tenant_id, hour, site_id)
);
CREATE INDEX usage_active_sites_hour ON usage_active_sites (hour);

-- The monthly quota as the API shows it: when a tenant passed 80 % (soft: a warning) and 100 %
-- (hard: its further messages are dead-lettered monthly_quota_exceeded) of its month's messages.
-- Set once per month by whichever worker replica sees it first.
CREATE TABLE usage_quota_flags (
    tenant_id       text NOT NULL,
    month           date NOT NULL CONSTRAINT usage_quota_flags_first_of_month CHECK (extract(day FROM month) = 1),
    messages_limit  bigint NOT NULL CONSTRAINT usage_quota_flags_limit_positive CHECK (messages_limit > 0),
    soft_reached_at timestamptz,
    hard_reached_at timestamptz,
    PRIMARY KEY (tenant_id, month)
);

-- The tier's monthly message quota, carried to the worker with the tenant's route (NULL: none).
ALTER TABLE tenant_store_routes
    ADD COLUMN messages_per_month bigint
    CONSTRAINT tenant_store_routes_monthly_quota_positive CHECK (messages_per_month > 0);
