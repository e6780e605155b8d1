"""The maintenance log's SQL (migration ``0009_maintenance_log.sql``): events, work orders and notes
per machine, created, read, listed newest first, updated and closed.

Every function takes the caller's tenant, and a site key's site as ``site_scope``, and puts both
in its WHERE clause: an entry of another tenant or site is simply not found, whatever id is
asked for. Each change bumps the entry's ``version`` and appends an audit event
(``maintenance.created|updated|closed``) in the same transaction. A refusal is a
:class:`MaintenanceError` with a machine-readable code and a sentence naming the field.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from registry.store import record_event

Kind = Literal["event", "work_order", "note"]
Status = Literal["open", "in_progress", "closed"]
Priority = Literal["low", "normal", "high", "urgent"]
TITLE_MAX_CHARS = 200
BODY_MAX_CHARS = 10_000
ASSIGNEE_MAX_CHARS = 128
RESOLUTION_MAX_CHARS = 4_000
EDITABLE = ("status", "title", "body", "priority", "assignee", "due_at", "occurred_at", "ended_at")
"""What an update may change (closing has its own call: a closed entry is final)."""

_COLUMNS = (
    "id, tenant_id, site_id, machine_id, kind, status, title, body, priority, assignee, due_at,"
    " occurred_at, ended_at, resolution, created_by, created_at, updated_by, updated_at, closed_by,"
    " closed_at, version"
)
# The table's constraints a valid request can still break (a combination of old and new fields).
_CONSTRAINTS: dict[str, tuple[str, str]] = {
    "maintenance_entries_work_order_fields": ("assignee", "only a work order has an assignee or a due date"),
    "maintenance_entries_event_fields": ("ended_at", "only an event has an end"),
    "maintenance_entries_ended_after": ("ended_at", "must not be before occurred_at"),
    "maintenance_entries_title_size": ("title", f"must hold 1 to {TITLE_MAX_CHARS} characters"),
}


class MaintenanceError(Exception):
    """A maintenance request refused: ``code`` for machines, ``detail`` for people."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


@dataclass(frozen=True)
class Entry:
    id: int
    tenant_id: str
    site_id: str
    machine_id: str
    kind: Kind
    status: Status
    title: str
    body: str
    priority: Priority
    assignee: str | None
    due_at: datetime | None
    occurred_at: datetime
    ended_at: datetime | None
    resolution: str | None
    created_by: str
    created_at: datetime
    updated_by: str
    updated_at: datetime
    closed_by: str | None
    closed_at: datetime | None
    version: int


@dataclass(frozen=True)
class NewEntry:
    site_id: str
    machine_id: str
    kind: Kind
    title: str
    body: str = ""
    priority: Priority = "normal"
    assignee: str | None = None
    due_at: datetime | None = None
    occurred_at: datetime | None = None
    """None: now."""
    ended_at: datetime | None = None


@contextmanager
def _refusals() -> Iterator[None]:
    try:
        yield
    except psycopg.errors.CheckViolation as error:
        field, why = _CONSTRAINTS.get(
            error.diag.constraint_name or "", ("entry", str(error.diag.message_primary))
        )
        raise MaintenanceError("invalid_entry", f"{field}: {why}") from error


def _scope(site_scope: str | None) -> sql.Composable:
    return sql.SQL("") if site_scope is None else sql.SQL(" AND site_id = {}").format(site_scope)


def _subject(entry: Entry) -> str:
    return f"maintenance/{entry.id}"


def create_entry(
    conn: psycopg.Connection,
    tenant_id: str,
    new: NewEntry,
    *,
    site_scope: str | None,
    actor: str,
    max_per_machine: int,
) -> Entry:
    """A new open entry of one of the tenant's machines (``machine_unknown`` when the tenant, or
    the key's site, has no such machine; ``log_full`` at ``max_per_machine`` entries)."""
    where = f"{new.site_id}/{new.machine_id}"
    with conn.transaction():
        machine = conn.execute(
            sql.SQL(
                "SELECT 1 FROM machines WHERE tenant_id = %s AND site_id = %s AND id = %s{}"
                " FOR NO KEY UPDATE"  # creates of one machine take turns: the bound below holds
            ).format(_scope(site_scope)),
            (tenant_id, new.site_id, new.machine_id),
        ).fetchone()
        if machine is None:
            raise MaintenanceError(
                "machine_unknown", f"machine {where!r} is not a machine of this key's scope"
            )
        count = conn.execute(
            "SELECT count(*) FROM maintenance_entries"
            " WHERE tenant_id = %s AND site_id = %s AND machine_id = %s",
            (tenant_id, new.site_id, new.machine_id),
        ).fetchone()
        if count is not None and count[0] >= max_per_machine:
            raise MaintenanceError(
                "log_full",
                f"machine {where!r} already has {count[0]} maintenance entries (at most {max_per_machine})",
            )
        with _refusals(), conn.cursor(row_factory=class_row(Entry)) as cursor:
            entry = cursor.execute(
                "INSERT INTO maintenance_entries (tenant_id, site_id, machine_id, kind, title, body,"
                " priority, assignee, due_at, occurred_at, ended_at, created_by, updated_by)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, coalesce(%s, now()), %s, %s, %s)"
                f" RETURNING {_COLUMNS}",
                (
                    tenant_id,
                    new.site_id,
                    new.machine_id,
                    new.kind,
                    new.title,
                    new.body,
                    new.priority,
                    new.assignee,
                    new.due_at,
                    new.occurred_at,
                    new.ended_at,
                    actor,
                    actor,
                ),
            ).fetchone()
        assert entry is not None
        record_event(
            conn,
            actor=actor,
            action="maintenance.created",
            subject=_subject(entry),
            tenant_id=tenant_id,
            details={"machine": where, "kind": entry.kind, "title": entry.title},
        )
    return entry


def get_entry(conn: psycopg.Connection, tenant_id: str, entry_id: int, *, site_scope: str | None) -> Entry:
    return _select(conn, tenant_id, entry_id, site_scope, lock=False)


def _select(
    conn: psycopg.Connection, tenant_id: str, entry_id: int, site_scope: str | None, *, lock: bool
) -> Entry:
    """The entry, if in scope (else ``entry_unknown``: out of scope looks like absent)."""
    query = sql.SQL("SELECT {} FROM maintenance_entries WHERE tenant_id = %s AND id = %s{}{}").format(
        sql.SQL(_COLUMNS), _scope(site_scope), sql.SQL(" FOR UPDATE" if lock else "")
    )
    with conn.cursor(row_factory=class_row(Entry)) as cursor:
        entry = cursor.execute(query, (tenant_id, entry_id)).fetchone()
    if entry is None:
        raise MaintenanceError("entry_unknown", f"maintenance entry {entry_id} is not in this key's scope")
    return entry


def list_entries(
    conn: psycopg.Connection,
    tenant_id: str,
    *,
    site_scope: str | None,
    limit: int,
    before_id: int | None = None,
    site_id: str | None = None,
    machine_id: str | None = None,
    kind: Kind | None = None,
    status: Status | None = None,
) -> list[Entry]:
    """At most ``limit`` entries newest first, older than ``before_id`` when given (the cursor)."""
    filters = [sql.SQL("tenant_id = {}").format(tenant_id)]
    for column, value in (
        ("site_id", site_scope),
        ("site_id", site_id),
        ("machine_id", machine_id),
        ("kind", kind),
        ("status", status),
    ):
        if value is not None:
            filters.append(sql.SQL("{} = {}").format(sql.Identifier(column), value))
    if before_id is not None:
        filters.append(sql.SQL("id < {}").format(before_id))
    query = sql.SQL("SELECT {} FROM maintenance_entries WHERE {} ORDER BY id DESC LIMIT {}").format(
        sql.SQL(_COLUMNS), sql.SQL(" AND ").join(filters), limit
    )
    with conn.cursor(row_factory=class_row(Entry)) as cursor:
        return cursor.execute(query).fetchall()


def _open_for_change(
    conn: psycopg.Connection,
    tenant_id: str,
    entry_id: int,
    site_scope: str | None,
    expected_version: int | None,
) -> Entry:
    entry = _select(conn, tenant_id, entry_id, site_scope, lock=True)
    if entry.status == "closed":
        raise MaintenanceError(
            "entry_closed", f"maintenance entry {entry_id} was closed at {entry.closed_at}"
        )
    if expected_version is not None and expected_version != entry.version:
        raise MaintenanceError(
            "version_mismatch",
            f"maintenance entry {entry_id} is at version {entry.version}, not {expected_version}",
        )
    return entry


def update_entry(
    conn: psycopg.Connection,
    tenant_id: str,
    entry_id: int,
    changes: Mapping[str, Any],
    *,
    site_scope: str | None,
    actor: str,
    expected_version: int | None = None,
) -> Entry:
    """Change the fields in ``changes`` (names from :data:`EDITABLE`; ``status`` open or
    in_progress). Fields whose value does not change are ignored; nothing changed, nothing written."""
    unknown = sorted(set(changes) - set(EDITABLE))
    if unknown or changes.get("status") == "closed":
        raise MaintenanceError(
            "invalid_entry", f"{(unknown or ['status'])[0]}: cannot be changed by an update"
        )
    with conn.transaction():
        entry = _open_for_change(conn, tenant_id, entry_id, site_scope, expected_version)
        changed = {name: value for name, value in changes.items() if getattr(entry, name) != value}
        if not changed:
            return entry
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(name), sql.Placeholder(name)) for name in changed
        )
        query = sql.SQL(
            "UPDATE maintenance_entries SET {}, version = version + 1, updated_by = %(actor)s,"
            " updated_at = now() WHERE id = %(id)s RETURNING {}"
        ).format(assignments, sql.SQL(_COLUMNS))
        with _refusals(), conn.cursor(row_factory=class_row(Entry)) as cursor:
            updated = cursor.execute(query, {**changed, "actor": actor, "id": entry_id}).fetchone()
        assert updated is not None
        record_event(
            conn,
            actor=actor,
            action="maintenance.updated",
            subject=_subject(updated),
            tenant_id=tenant_id,
            details={"changed": sorted(changed), "version": updated.version},
        )
    return updated


def close_entry(
    conn: psycopg.Connection,
    tenant_id: str,
    entry_id: int,
    *,
    resolution: str | None,
    site_scope: str | None,
    actor: str,
    expected_version: int | None = None,
) -> Entry:
    """Close an entry for good; an event still without an end ends now (never before it began)."""
    with conn.transaction():
        _open_for_change(conn, tenant_id, entry_id, site_scope, expected_version)
        with _refusals(), conn.cursor(row_factory=class_row(Entry)) as cursor:
            closed = cursor.execute(
                "UPDATE maintenance_entries SET status = 'closed', resolution = %s, closed_by = %s,"
                " closed_at = now(), ended_at = CASE WHEN kind = 'event'"
                " THEN coalesce(ended_at, greatest(now(), occurred_at)) END,"
                " version = version + 1, updated_by = %s, updated_at = now()"
                f" WHERE id = %s RETURNING {_COLUMNS}",
                (resolution, actor, actor, entry_id),
            ).fetchone()
        assert closed is not None
        record_event(
            conn,
            actor=actor,
            action="maintenance.closed",
            subject=_subject(closed),
            tenant_id=tenant_id,
            details={"version": closed.version, "resolution": bool(resolution)},
        )
    return closed
