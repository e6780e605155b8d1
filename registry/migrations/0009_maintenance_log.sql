-- The maintenance log (the API's /v1/maintenance, registry/maintenance.py): per machine, events
-- (something that happened, from occurred_at to ended_at), work orders (work to do: priority,
-- assignee, due date) and notes. Every entry is open, in progress or closed; a closed entry is
-- final (its resolution says how it ended). Each change bumps `version` (the API's ETag) and is
-- recorded in audit_events; the rows keep only the latest state.
--
-- An entry belongs to its machine: a machine moved to another site takes its log along
-- (ON UPDATE CASCADE); a removed machine or tenant takes its log with it, the audit trail keeps
-- what happened. Sizes are bounded here as well as in the API, so no writer can store more.

CREATE TABLE maintenance_entries (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   text NOT NULL,
    site_id     text NOT NULL,
    machine_id  text NOT NULL,
    kind        text NOT NULL
                CONSTRAINT maintenance_entries_kind CHECK (kind IN ('event', 'work_order', 'note')),
    status      text NOT NULL DEFAULT 'open'
                CONSTRAINT maintenance_entries_status CHECK (status IN ('open', 'in_progress', 'closed')),
    title       text NOT NULL
                CONSTRAINT maintenance_entries_title_size CHECK (length(btrim(title)) BETWEEN 1 AND 200),
    body        text NOT NULL DEFAULT ''
                CONSTRAINT maintenance_entries_body_size CHECK (length(body) <= 10000),
    priority    text NOT NULL DEFAULT 'normal'
                CONSTRAINT maintenance_entries_priority CHECK (priority IN ('low', 'normal', 'high', 'urgent')),
    assignee    text CONSTRAINT maintenance_entries_assignee_size CHECK (length(assignee) BETWEEN 1 AND 128),
    due_at      timestamptz,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    ended_at    timestamptz,
    resolution  text CONSTRAINT maintenance_entries_resolution_size CHECK (length(resolution) <= 4000),
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_by  text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    closed_by   text,
    closed_at   timestamptz,
    version     integer NOT NULL DEFAULT 1,
    -- Only a work order is assigned or due; only an event has an end.
    CONSTRAINT maintenance_entries_work_order_fields
        CHECK (kind = 'work_order' OR (assignee IS NULL AND due_at IS NULL)),
    CONSTRAINT maintenance_entries_event_fields CHECK (kind = 'event' OR ended_at IS NULL),
    CONSTRAINT maintenance_entries_ended_after CHECK (ended_at IS NULL OR ended_at >= occurred_at),
    CONSTRAINT maintenance_entries_closed CHECK ((status = 'closed') = (closed_at IS NOT NULL)),
    FOREIGN KEY (tenant_id, site_id, machine_id) REFERENCES machines (tenant_id, site_id, id)
        ON DELETE CASCADE ON UPDATE CASCADE
);

-- Listing newest first, per tenant and per machine (the cursor is the last id seen).
CREATE INDEX maintenance_entries_tenant ON maintenance_entries (tenant_id, id DESC);
CREATE INDEX maintenance_entries_machine ON maintenance_entries (tenant_id, site_id, machine_id, id DESC);
