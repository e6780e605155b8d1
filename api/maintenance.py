"""The maintenance log (``/v1/maintenance``): events, work orders and notes per machine.

Create, read, list (newest first, cursor ``next``), update and close; every change is audited
(``registry/maintenance.py``). An entry's ``version`` is its ETag: ``If-Match`` on an update or a
close refuses with 412 when someone changed the entry in between. A site key reaches only its
site's machines and entries; an entry outside the key's scope is 404 like one that does not exist.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Header, Path, Query, Request, Response
from psycopg_pool import ConnectionPool
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from api.deps import PoolDep, SettingsDep
from api.errors import ApiError, Problem, bad_parameter
from api.limits import InRange
from api.ratelimit import MeterDep
from api.scope import actor_of, site_filter
from infra.config import MachineId, SiteId
from registry import maintenance
from registry.maintenance import (
    ASSIGNEE_MAX_CHARS,
    BODY_MAX_CHARS,
    RESOLUTION_MAX_CHARS,
    TITLE_MAX_CHARS,
    Kind,
    MaintenanceError,
    Priority,
    Status,
)

router = APIRouter(prefix="/v1/maintenance", tags=["maintenance"])
_STATUS = {
    "machine_unknown": 404,
    "entry_unknown": 404,
    "entry_closed": 409,
    "log_full": 409,
    "version_mismatch": 412,
    "invalid_entry": 422,
}
_CHANGE_RESPONSES: dict[int | str, dict[str, Any]] = {412: {"model": Problem}}
Title = Annotated[str, Field(min_length=1, max_length=TITLE_MAX_CHARS, pattern=r"\S")]
Body = Annotated[str, Field(max_length=BODY_MAX_CHARS)]
Assignee = Annotated[str, Field(min_length=1, max_length=ASSIGNEE_MAX_CHARS)]
EntryId = Annotated[int, Path(ge=1, le=2**63 - 1)]
Moment = Annotated[AwareDatetime, InRange]
IfMatch = Annotated[
    str | None,
    Header(
        alias="If-Match",
        max_length=32,
        description='The entry\'s ETag ("<version>"): refused with 412 if the entry changed since.',
    ),
]


class EntryCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    site_id: SiteId
    machine_id: MachineId
    kind: Kind
    title: Title
    body: Body = ""
    priority: Priority = "normal"
    assignee: Assignee | None = Field(default=None, description="Work orders only.")
    due_at: Moment | None = Field(default=None, description="Work orders only.")
    occurred_at: Moment | None = Field(default=None, description="When it happened; default now.")
    ended_at: Moment | None = Field(default=None, description="Events only; not before occurred_at.")

    @field_validator("assignee", "due_at")
    @classmethod
    def _work_orders_only(cls, value: object, info: ValidationInfo) -> object:
        if value is not None and info.data.get("kind") != "work_order":
            raise ValueError("only a work order has an assignee or a due date")
        return value

    @field_validator("ended_at")
    @classmethod
    def _events_only(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        if value is not None and info.data.get("kind") != "event":
            raise ValueError("only an event has an end")
        occurred = info.data.get("occurred_at")
        if value is not None and occurred is not None and value < occurred:
            raise ValueError("must not be before occurred_at")
        return value


class EntryUpdate(BaseModel):
    """The fields to change; ``null`` clears assignee, due_at or ended_at."""

    model_config = ConfigDict(extra="forbid")

    status: Status | None = Field(default=None, description="open or in_progress (close: POST .../close).")
    title: Title | None = None
    body: Body | None = None
    priority: Priority | None = None
    assignee: Assignee | None = None
    due_at: Moment | None = None
    occurred_at: Moment | None = None
    ended_at: Moment | None = None

    @field_validator("status", "title", "body", "priority", "occurred_at")
    @classmethod
    def _not_null(cls, value: object, info: ValidationInfo) -> object:
        if value is None:
            raise ValueError(f"{info.field_name} cannot be cleared")
        if value == "closed":
            raise ValueError("an entry is closed with POST /v1/maintenance/{entry_id}/close")
        return value

    def changes(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in sorted(self.model_fields_set)}


class EntryClose(BaseModel):
    model_config = ConfigDict(extra="forbid")

    resolution: Annotated[str, Field(max_length=RESOLUTION_MAX_CHARS)] | None = None


class EntryOut(BaseModel):
    id: int
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

    @classmethod
    def of(cls, entry: maintenance.Entry) -> EntryOut:
        fields = {name: getattr(entry, name) for name in cls.model_fields}
        return cls(**fields)


class EntryPage(BaseModel):
    entries: list[EntryOut]
    next: str | None = Field(description="The next (older) page's URL; null on the last page.")


@contextmanager
def _registry(pool: ConnectionPool) -> Iterator[psycopg.Connection]:
    """A registry connection; the maintenance log's refusal, as the API error its code maps to."""
    try:
        with pool.connection() as conn:
            yield conn
    except MaintenanceError as error:
        raise ApiError(_STATUS.get(error.code, 400), error.code, error.detail) from error


def _etag(entry: maintenance.Entry, response: Response) -> EntryOut:
    response.headers["ETag"] = f'"{entry.version}"'
    return EntryOut.of(entry)


def _expected_version(if_match: str | None) -> int | None:
    if if_match is None or if_match.strip() == "*":
        return None
    text = if_match.strip().removeprefix("W/").strip('"')
    if not text.isdigit():
        raise bad_parameter("If-Match", if_match, 'is not an entry ETag ("<version>")')
    return int(text)


@router.post("", status_code=201)
def create_entry(
    body: EntryCreate, meter: MeterDep, pool: PoolDep, settings: SettingsDep, response: Response
) -> EntryOut:
    new = maintenance.NewEntry(**body.model_dump())
    with _registry(pool) as conn:
        entry = maintenance.create_entry(
            conn,
            meter.caller.tenant_id,
            new,
            site_scope=meter.caller.site_id,
            actor=actor_of(meter.caller),
            max_per_machine=settings.maintenance_max_entries_per_machine,
        )
    return _etag(entry, response)


@router.get("")
def list_entries(
    request: Request,
    meter: MeterDep,
    pool: PoolDep,
    site_id: Annotated[SiteId | None, Query()] = None,
    machine_id: Annotated[MachineId | None, Query()] = None,
    kind: Annotated[Kind | None, Query()] = None,
    status: Annotated[Status | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[
        str | None, Query(max_length=19, pattern=r"^[1-9][0-9]*$", description="From a previous page's next.")
    ] = None,
) -> EntryPage:
    """Entries newest first, ``limit`` a page; ``next`` is the following page's URL."""
    site = site_filter(meter.caller, site_id)
    with pool.connection() as conn:
        entries = maintenance.list_entries(
            conn,
            meter.caller.tenant_id,
            site_scope=meter.caller.site_id,
            limit=limit + 1,
            before_id=int(cursor) if cursor else None,
            site_id=site,
            machine_id=machine_id,
            kind=kind,
            status=status,
        )
    page = entries[:limit]
    more = len(entries) > limit
    next_url = str(request.url.include_query_params(cursor=page[-1].id)) if more else None
    return EntryPage(entries=[EntryOut.of(e) for e in page], next=next_url)


@router.get("/{entry_id}")
def get_entry(entry_id: EntryId, meter: MeterDep, pool: PoolDep, response: Response) -> EntryOut:
    with _registry(pool) as conn:
        entry = maintenance.get_entry(conn, meter.caller.tenant_id, entry_id, site_scope=meter.caller.site_id)
    return _etag(entry, response)


@router.patch("/{entry_id}", responses=_CHANGE_RESPONSES)
def update_entry(
    entry_id: EntryId,
    body: EntryUpdate,
    meter: MeterDep,
    pool: PoolDep,
    response: Response,
    if_match: IfMatch = None,
) -> EntryOut:
    expected = _expected_version(if_match)
    with _registry(pool) as conn:
        entry = maintenance.update_entry(
            conn,
            meter.caller.tenant_id,
            entry_id,
            body.changes(),
            site_scope=meter.caller.site_id,
            actor=actor_of(meter.caller),
            expected_version=expected,
        )
    return _etag(entry, response)


@router.post("/{entry_id}/close", responses=_CHANGE_RESPONSES)
def close_entry(
    entry_id: EntryId,
    meter: MeterDep,
    pool: PoolDep,
    response: Response,
    body: EntryClose | None = None,
    if_match: IfMatch = None,
) -> EntryOut:
    """Close the entry for good (an event without an end ends now)."""
    expected = _expected_version(if_match)
    with _registry(pool) as conn:
        entry = maintenance.close_entry(
            conn,
            meter.caller.tenant_id,
            entry_id,
            resolution=body.resolution if body else None,
            site_scope=meter.caller.site_id,
            actor=actor_of(meter.caller),
            expected_version=expected,
        )
    return _etag(entry, response)
