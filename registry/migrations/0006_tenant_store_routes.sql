-- Where each tenant's telemetry goes, for the platform's services to learn at runtime (issue 10:
-- whatever a platform resource must know about all tenants comes from the registry, not from a
-- list in the platform stack). One row per tenant, written by the tenant's own stack (or
-- `ironlink dev`) through registry/tenant_routes.py; read by the ingest worker (routes, store
-- URL, write token, quota, max age) and the dead-letter consumer (retention). A removed tenant
-- takes its row with it (ON DELETE CASCADE), which the worker sees as the tenant gone.

CREATE TABLE tenant_store_routes (
    tenant_id   text PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    instance    text NOT NULL
                CONSTRAINT tenant_store_routes_instance_format
                CHECK (instance ~ '^[a-z0-9]([a-z0-9-]*[a-z0-9])?$' AND length(instance) <= 63),
    url         text NOT NULL
                CONSTRAINT tenant_store_routes_url_format CHECK (url ~ '^https?://\S+$' AND length(url) <= 2048),
    org         text NOT NULL CONSTRAINT tenant_store_routes_org_present CHECK (org <> '' AND length(org) <= 256),
    bucket      text NOT NULL
                CONSTRAINT tenant_store_routes_bucket_present CHECK (bucket <> '' AND length(bucket) <= 256),
    -- The tenant's write-only store token ('' where the store takes none: VictoriaMetrics).
    token       text NOT NULL DEFAULT '' CONSTRAINT tenant_store_routes_token_size CHECK (length(token) <= 4096),
    messages_per_second double precision
                CONSTRAINT tenant_store_routes_quota_positive CHECK (messages_per_second > 0 AND messages_per_second < 'Infinity'),
    max_age_s   bigint CONSTRAINT tenant_store_routes_max_age_positive CHECK (max_age_s >= 1),
    dead_letter_retention_s bigint
                CONSTRAINT tenant_store_routes_retention_not_negative CHECK (dead_letter_retention_s >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The worker follows changes like the fleet's (0005): one NOTIFY per statement and tenant, on
-- its own channel, the tenant id as payload; the channel is the trigger's argument.
CREATE FUNCTION tenant_ids_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    tenant text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        FOR tenant IN SELECT DISTINCT tenant_id FROM new_rows LOOP
            PERFORM pg_notify(TG_ARGV[0], tenant);
        END LOOP;
    ELSIF TG_OP = 'DELETE' THEN
        FOR tenant IN SELECT DISTINCT tenant_id FROM old_rows LOOP
            PERFORM pg_notify(TG_ARGV[0], tenant);
        END LOOP;
    ELSE
        FOR tenant IN SELECT tenant_id FROM old_rows UNION SELECT tenant_id FROM new_rows LOOP
            PERFORM pg_notify(TG_ARGV[0], tenant);
        END LOOP;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER tenant_store_routes_inserted AFTER INSERT ON tenant_store_routes
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION tenant_ids_notify('ironlink_tenant_routes');
CREATE TRIGGER tenant_store_routes_updated AFTER UPDATE ON tenant_store_routes
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION tenant_ids_notify('ironlink_tenant_routes');
CREATE TRIGGER tenant_store_routes_deleted AFTER DELETE ON tenant_store_routes
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
    EXECUTE FUNCTION tenant_ids_notify('ironlink_tenant_routes');

-- Write tokens are secrets. The registry's owner (the worker, the dead-letter consumer, the
-- Pulumi provider log in as it) reads them; the broker's role, which components/render/postgres.py
-- grants SELECT on every table by default privileges, must not.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'emqx') THEN
        REVOKE ALL ON tenant_store_routes FROM emqx;
    END IF;
END;
$$;
