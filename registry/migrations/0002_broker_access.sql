-- Broker identities and topic rules, read by EMQX's PostgreSQL authenticator and authorizer
-- through the views mqtt_users and mqtt_acl (queries in registry/queries.py).
--
-- A credential is stored once, in Mosquitto's form '$7$101$<b64 salt>$<b64 sha512 digest>'; the
-- columns EMQX reads are generated from it: password_hash (lowercase hex digest) and salt (raw
-- bytes). EMQX is configured with 101 iterations, hence the fixed iteration count.

CREATE TABLE devices (
    username      text PRIMARY KEY,
    tenant_id     text NOT NULL,
    site_id       text NOT NULL,
    machine_id    text NOT NULL,
    credential    text NOT NULL CONSTRAINT devices_credential_format
                  CHECK (credential ~ '^\$7\$101\$[A-Za-z0-9+/]+={0,2}\$[A-Za-z0-9+/]{86}==$'),
    password_hash text GENERATED ALWAYS AS (encode(decode(split_part(credential, '$', 5), 'base64'), 'hex')) STORED,
    salt          bytea GENERATED ALWAYS AS (decode(split_part(credential, '$', 4), 'base64')) STORED,
    is_superuser  boolean NOT NULL DEFAULT false CONSTRAINT devices_never_superuser CHECK (NOT is_superuser),
    issued_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    CONSTRAINT devices_one_per_machine UNIQUE (tenant_id, site_id, machine_id),
    FOREIGN KEY (tenant_id, site_id, machine_id) REFERENCES machines (tenant_id, site_id, id) ON DELETE CASCADE
);

-- Read-only services: svc.ingest (no tenant) and svc.<tenant>.
CREATE TABLE service_accounts (
    username      text PRIMARY KEY CONSTRAINT service_accounts_username_format
                  CHECK (username ~ '^svc\.[a-z0-9]([a-z0-9-]*[a-z0-9])?$'),
    tenant_id     text REFERENCES tenants (id) ON DELETE CASCADE,
    credential    text NOT NULL CONSTRAINT service_accounts_credential_format
                  CHECK (credential ~ '^\$7\$101\$[A-Za-z0-9+/]+={0,2}\$[A-Za-z0-9+/]{86}==$'),
    password_hash text GENERATED ALWAYS AS (encode(decode(split_part(credential, '$', 5), 'base64'), 'hex')) STORED,
    salt          bytea GENERATED ALWAYS AS (decode(split_part(credential, '$', 4), 'base64')) STORED,
    is_superuser  boolean NOT NULL DEFAULT false CONSTRAINT service_accounts_never_superuser CHECK (NOT is_superuser),
    issued_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);

-- Allow rules rendered by registry/access.py; EMQX denies whatever matches none (no_match = deny).
CREATE TABLE acl_rules (
    id          bigserial PRIMARY KEY,
    username    text NOT NULL,
    tenant_id   text REFERENCES tenants (id) ON DELETE CASCADE,
    permission  text NOT NULL DEFAULT 'allow' CONSTRAINT acl_rules_permission CHECK (permission IN ('allow', 'deny')),
    action      text NOT NULL CONSTRAINT acl_rules_action CHECK (action IN ('publish', 'subscribe', 'all')),
    topic       text NOT NULL CONSTRAINT acl_rules_topic_present CHECK (topic <> ''),
    CONSTRAINT acl_rules_unique UNIQUE (username, action, topic)
);

CREATE VIEW mqtt_users AS
    SELECT username, 'device'::text AS kind, password_hash, salt, is_superuser
      FROM devices WHERE revoked_at IS NULL
    UNION ALL
    SELECT username, 'service'::text AS kind, password_hash, salt, is_superuser
      FROM service_accounts WHERE revoked_at IS NULL;

CREATE VIEW mqtt_acl AS
    SELECT username, permission, action, topic FROM acl_rules;
