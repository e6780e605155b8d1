-- API keys of the Ironlink API (api/, issue 13), and each tenant's store read token.
--
-- A key is shown once when created; only the SHA-256 of its secret is stored. A key is scoped to
-- one tenant, or to one site of it (site_id not NULL), expires, and can be revoked; creating and
-- revoking it are audit events (registry/api_keys.py). A removed tenant or site takes its keys
-- with it.

CREATE TABLE api_keys (
    id            text PRIMARY KEY CONSTRAINT api_keys_id_format CHECK (id ~ '^[0-9a-f]{16}$'),
    tenant_id     text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    site_id       text,
    label         text NOT NULL DEFAULT '' CONSTRAINT api_keys_label_size CHECK (length(label) <= 128),
    secret_sha256 bytea NOT NULL CONSTRAINT api_keys_digest_size CHECK (length(secret_sha256) = 32),
    created_by    text NOT NULL CONSTRAINT api_keys_created_by_present CHECK (created_by <> ''),
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    revoked_at    timestamptz,
    CONSTRAINT api_keys_expiry_after_creation CHECK (expires_at > created_at),
    FOREIGN KEY (tenant_id, site_id) REFERENCES sites (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id, created_at);

-- The tenant's read-only store token, which the API queries InfluxDB with ('' where the store
-- takes none: VictoriaMetrics, whose queries the API binds to the tenant with a label filter).
ALTER TABLE tenant_store_routes
    ADD COLUMN read_token text NOT NULL DEFAULT ''
    CONSTRAINT tenant_store_routes_read_token_size CHECK (length(read_token) <= 4096);

-- Digests of secrets are still secrets' kin: the broker's role (granted SELECT on every table by
-- default privileges, components/render/postgres.py) must not read them.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'emqx') THEN
        REVOKE ALL ON api_keys FROM emqx;
    END IF;
END;
$$;
