-- Dead letters: every message the ingest worker rejected, as the dead-letter consumer
-- (python -m ingest.deadletters) read it from dlq/<original topic>, kept per tenant for the
-- tier's dead-letter retention and replayable through replay/<original topic>.
--
-- tenant_id is the tenant the original topic names when the registry knows it, else NULL (a
-- device's topic claiming a tenant that does not exist, a topic naming none): a dead letter must
-- be stored even then, and a foreign key cannot point at a tenant that is not there. A removed
-- tenant takes its dead letters with it, like its sites and machines; the audit trail keeps what
-- happened to them.

-- svc.deadletters is the dead-letter consumer's identity: no tenant may be called 'deadletters'.
ALTER TABLE tenants ADD CONSTRAINT tenants_id_reserved_dead_letters CHECK (id <> 'deadletters');

CREATE TABLE dead_letters (
    id             bigserial PRIMARY KEY,
    tenant_id      text REFERENCES tenants (id) ON DELETE CASCADE,
    reason         text NOT NULL CONSTRAINT dead_letters_reason_format CHECK (reason ~ '^[a-z_]{1,64}$'),
    detail         text NOT NULL CONSTRAINT dead_letters_detail_size CHECK (length(detail) <= 2000),
    topic          text NOT NULL CONSTRAINT dead_letters_topic_size CHECK (length(topic) BETWEEN 1 AND 1024),
    received_at    timestamptz NOT NULL,
    stored_at      timestamptz NOT NULL DEFAULT now(),
    -- The original payload's first bytes (the worker's dead_letter_payload_bytes, at most 64 KiB
    -- here); payload_bytes is the whole payload's size, truncated says whether the sample is cut.
    payload        bytea NOT NULL CONSTRAINT dead_letters_payload_size CHECK (octet_length(payload) <= 65536),
    payload_bytes  integer NOT NULL CONSTRAINT dead_letters_payload_bytes CHECK (payload_bytes >= 0),
    truncated      boolean NOT NULL,
    -- sha256 of topic, received_at and payload: a redelivered dead letter is the same row.
    fingerprint    bytea NOT NULL CONSTRAINT dead_letters_fingerprint UNIQUE
                   CONSTRAINT dead_letters_fingerprint_size CHECK (octet_length(fingerprint) = 32),
    replay_requested_at timestamptz,
    replayed_at    timestamptz,
    CONSTRAINT dead_letters_replayed_after_request
        CHECK (replayed_at IS NULL OR replay_requested_at IS NOT NULL)
);

-- Listing per tenant by time (newest first), and purging by age.
CREATE INDEX dead_letters_tenant_time ON dead_letters (tenant_id, received_at DESC, id DESC);
-- The consumer's poll: requested and not replayed yet (small, so a partial index).
CREATE INDEX dead_letters_replay_pending ON dead_letters (replay_requested_at, id)
    WHERE replay_requested_at IS NOT NULL AND replayed_at IS NULL;
