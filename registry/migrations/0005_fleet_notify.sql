-- The ingest worker keeps the fleet (machine -> type) in memory and learns changes at runtime:
-- every statement that inserts, updates or deletes machines sends one NOTIFY on ironlink_fleet
-- per tenant it touched, with the tenant id as payload (at most 32 characters: far below
-- NOTIFY's 8000-byte limit). Statement triggers with transition tables, so a bulk import of
-- 50,000 machines is a handful of notifications, not 50,000. A removed site or tenant removes
-- its machines by ON DELETE CASCADE, which fires these triggers too, so sites and tenants need
-- none of their own. Notifications are sent at commit, and only to listeners connected then: a
-- listener that reconnects must re-read everything (ingest/fleet.py does).

CREATE FUNCTION fleet_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    tenant text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        FOR tenant IN SELECT DISTINCT tenant_id FROM new_rows LOOP
            PERFORM pg_notify('ironlink_fleet', tenant);
        END LOOP;
    ELSIF TG_OP = 'DELETE' THEN
        FOR tenant IN SELECT DISTINCT tenant_id FROM old_rows LOOP
            PERFORM pg_notify('ironlink_fleet', tenant);
        END LOOP;
    ELSE
        FOR tenant IN SELECT tenant_id FROM old_rows UNION SELECT tenant_id FROM new_rows LOOP
            PERFORM pg_notify('ironlink_fleet', tenant);
        END LOOP;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER machines_fleet_inserted AFTER INSERT ON machines
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION fleet_notify();
CREATE TRIGGER machines_fleet_updated AFTER UPDATE ON machines
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION fleet_notify();
CREATE TRIGGER machines_fleet_deleted AFTER DELETE ON machines
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION fleet_notify();
