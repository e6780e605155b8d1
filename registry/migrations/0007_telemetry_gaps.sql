-- Gap records (contract v4, "kind": "gap"): readings an edge gateway had to drop before the
-- platform confirmed them (a cap of its store: max_bytes, disk_headroom, max_age), so that a loss
-- is visible rather than silent. Written by the ingest worker (registry/gaps.py), which confirms
-- each one on the machine's receipts topic so the gateway can forget it; read by the API.
--
-- One row per gap: the gateway, the boot epoch and the seq counter of its first dropped reading,
-- and the reason. The gateway resends a gap until it is confirmed, its count growing while it
-- drops more: a resend with the same count changes nothing (idempotent), a grown one updates
-- count, last_n, the time range and received_at. A removed machine takes its gaps with it.

CREATE TABLE telemetry_gaps (
    tenant_id   text NOT NULL,
    site_id     text NOT NULL,
    machine_id  text NOT NULL,
    gateway     text NOT NULL
                CONSTRAINT telemetry_gaps_gateway_format
                CHECK (gateway ~ '^[a-z0-9]([a-z0-9-]*[a-z0-9])?$' AND length(gateway) <= 63),
    boot        bigint NOT NULL CONSTRAINT telemetry_gaps_boot_range CHECK (boot >= 0),
    first_n     bigint NOT NULL CONSTRAINT telemetry_gaps_first_n_range CHECK (first_n >= 0),
    last_n      bigint NOT NULL,
    reason      text NOT NULL CONSTRAINT telemetry_gaps_reason_format CHECK (reason ~ '^[a-z_]{1,64}$'),
    count       bigint NOT NULL,
    first_ts    timestamptz NOT NULL,
    last_ts     timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    CONSTRAINT telemetry_gaps_pkey PRIMARY KEY (tenant_id, site_id, machine_id, gateway, boot, first_n, reason),
    CONSTRAINT telemetry_gaps_seq_order CHECK (last_n >= first_n),
    CONSTRAINT telemetry_gaps_count_range CHECK (count >= 1 AND count <= last_n - first_n + 1),
    CONSTRAINT telemetry_gaps_time_order CHECK (last_ts >= first_ts),
    FOREIGN KEY (tenant_id, site_id, machine_id)
        REFERENCES machines (tenant_id, site_id, id) ON DELETE CASCADE
);

-- The API's question: a machine's gaps overlapping a time range, newest first.
CREATE INDEX telemetry_gaps_machine_time ON telemetry_gaps (tenant_id, site_id, machine_id, last_ts DESC);
