-- Provisioning at runtime (python -m provisioning): admin tokens, claim tokens and their claims,
-- issued device certificates, and machines that can be disabled without being removed.
--
-- Secrets are stored only as SHA-256 digests of their random part (tokens carry 256 bits, so a
-- slow hash adds nothing); the plaintext is shown once, when it is created.

-- Operators' bearer tokens: tenant_id NULL means platform scope (every tenant).
CREATE TABLE admin_tokens (
    id          text PRIMARY KEY CONSTRAINT admin_tokens_id_format CHECK (id ~ '^[0-9a-f]{16}$'),
    tenant_id   text REFERENCES tenants (id) ON DELETE CASCADE,
    label       text NOT NULL CONSTRAINT admin_tokens_label_size CHECK (length(label) BETWEEN 1 AND 128),
    secret_sha256 bytea NOT NULL CONSTRAINT admin_tokens_secret_size CHECK (octet_length(secret_sha256) = 32),
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz
);

-- A device certificate identity has no password: credential is NULL and auth says which one.
ALTER TABLE devices ALTER COLUMN credential DROP NOT NULL;
ALTER TABLE devices ADD COLUMN auth text NOT NULL DEFAULT 'password'
    CONSTRAINT devices_auth_method CHECK (auth IN ('password', 'certificate'));
ALTER TABLE devices ADD CONSTRAINT devices_password_has_credential
    CHECK (auth <> 'password' OR credential IS NOT NULL);

-- A disabled machine keeps its rows; its device cannot log in until it is enabled again.
ALTER TABLE machines ADD COLUMN disabled_at timestamptz;

CREATE OR REPLACE VIEW mqtt_users AS
    SELECT d.username, 'device'::text AS kind, d.password_hash, d.salt, d.is_superuser
      FROM devices d
      JOIN machines m ON (m.tenant_id, m.site_id, m.id) = (d.tenant_id, d.site_id, d.machine_id)
     WHERE d.revoked_at IS NULL AND m.disabled_at IS NULL
    UNION ALL
    SELECT username, 'service'::text AS kind, password_hash, salt, is_superuser
      FROM service_accounts WHERE revoked_at IS NULL;

-- Claim tokens: a device presenting one registers itself as a new machine of the token's site.
CREATE TABLE claim_tokens (
    id           text PRIMARY KEY CONSTRAINT claim_tokens_id_format CHECK (id ~ '^[0-9a-f]{16}$'),
    tenant_id    text NOT NULL,
    site_id      text NOT NULL,
    machine_type text CONSTRAINT claim_tokens_machine_type_format CHECK (machine_type ~ '^[a-z0-9_]+$'),
    secret_sha256 bytea NOT NULL CONSTRAINT claim_tokens_secret_size CHECK (octet_length(secret_sha256) = 32),
    uses         integer NOT NULL CONSTRAINT claim_tokens_uses_range CHECK (uses BETWEEN 1 AND 100000),
    uses_left    integer NOT NULL CONSTRAINT claim_tokens_uses_left_range CHECK (uses_left BETWEEN 0 AND uses),
    created_by   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz,
    FOREIGN KEY (tenant_id, site_id) REFERENCES sites (tenant_id, id) ON DELETE CASCADE
);

-- One row per machine a token registered: the same token, machine and public key again is the
-- same claim (a device that crashed before storing its certificate resumes).
CREATE TABLE claims (
    token_id          text NOT NULL REFERENCES claim_tokens (id) ON DELETE CASCADE,
    machine_id        text NOT NULL,
    username          text NOT NULL,
    public_key_sha256 bytea CONSTRAINT claims_key_size CHECK (octet_length(public_key_sha256) = 32),
    certificate_serial text,
    claimed_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT claims_pkey PRIMARY KEY (token_id, machine_id)
);

-- Every certificate the service signed; revoked_at feeds the CRL. No foreign key: a removed
-- machine's certificates must stay listed as revoked until they expire.
CREATE TABLE device_certificates (
    serial            text PRIMARY KEY CONSTRAINT device_certificates_serial_format CHECK (serial ~ '^[0-9a-f]{1,40}$'),
    username          text NOT NULL,
    tenant_id         text NOT NULL,
    issuer            text NOT NULL,
    public_key_sha256 bytea NOT NULL,
    not_before        timestamptz NOT NULL,
    not_after         timestamptz NOT NULL,
    pem               text NOT NULL CONSTRAINT device_certificates_pem_size CHECK (length(pem) <= 8192),
    issued_at         timestamptz NOT NULL DEFAULT now(),
    revoked_at        timestamptz
);
CREATE INDEX device_certificates_username ON device_certificates (username);
CREATE INDEX device_certificates_revoked ON device_certificates (issuer, revoked_at) WHERE revoked_at IS NOT NULL;
