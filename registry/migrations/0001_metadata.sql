-- Tenants, sites and machines (the stack config's model) and the append-only audit trail.
-- Ids follow infra/config.py: DNS labels (lowercase letters, digits, '-'), tenants and sites at most
-- 32 characters, machines at most 48. Constraint names are mapped to messages in registry/store.py.

CREATE TABLE tenants (
    id          text PRIMARY KEY
                CONSTRAINT tenants_id_format CHECK (id ~ '^[a-z0-9]([a-z0-9-]*[a-z0-9])?$' AND length(id) <= 32)
                -- svc.<tenant> must never be the worker's identity svc.ingest
                CONSTRAINT tenants_id_reserved CHECK (id <> 'ingest'),
    name        text NOT NULL CONSTRAINT tenants_name_present CHECK (btrim(name) <> ''),
    tier        text NOT NULL CONSTRAINT tenants_tier_present CHECK (tier <> ''),
    isolation   smallint NOT NULL CONSTRAINT tenants_isolation_level CHECK (isolation BETWEEN 1 AND 3),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sites (
    tenant_id   text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id          text NOT NULL
                CONSTRAINT sites_id_format CHECK (id ~ '^[a-z0-9]([a-z0-9-]*[a-z0-9])?$' AND length(id) <= 32),
    name        text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT sites_pkey PRIMARY KEY (tenant_id, id)
);

CREATE TABLE machines (
    tenant_id   text NOT NULL,
    site_id     text NOT NULL,
    id          text NOT NULL
                CONSTRAINT machines_id_format CHECK (id ~ '^[a-z0-9]([a-z0-9-]*[a-z0-9])?$' AND length(id) <= 48),
    type        text NOT NULL CONSTRAINT machines_type_format CHECK (type ~ '^[a-z0-9_]+$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT machines_pkey PRIMARY KEY (tenant_id, site_id, id),
    FOREIGN KEY (tenant_id, site_id) REFERENCES sites (tenant_id, id) ON DELETE CASCADE
);

-- No foreign key to tenants: the trail must outlive what it describes.
CREATE TABLE audit_events (
    id          bigserial PRIMARY KEY,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL CONSTRAINT audit_events_actor_present CHECK (actor <> ''),
    action      text NOT NULL CONSTRAINT audit_events_action_format CHECK (action ~ '^[a-z_]+\.[a-z_]+$'),
    tenant_id   text,
    subject     text NOT NULL,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_events_tenant_time ON audit_events (tenant_id, occurred_at);

CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only (% refused)', TG_OP;
END;
$$;
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
