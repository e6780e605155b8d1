"""Sites, machines, and each machine's latest status and last-seen time (``/v1/sites``,
``/v1/machines``, ``/v1/machines/{machine_id}``).

The fleet comes from the registry, the status from the store; both are read for the caller's
tenant (and a site key's site) only: a machine of another tenant is as unknown as a missing one.
Machine ids are unique within a site; where two sites of the tenant share one, ``site_id`` says
which (409 ``machine_ambiguous`` without it). Answers carry an ``ETag``; ``If-None-Match`` with
it gets 304.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from api.auth import Caller
from api.deps import PoolDep, SettingsDep, StoreDep
from api.errors import ApiError, store_unavailable
from api.ratelimit import MeterDep
from api.scope import site_filter
from api.stores import Latest, StoreError, TelemetryStore, latest_by_machine
from ingest.points import STATUS_CODES

router = APIRouter(prefix="/v1", tags=["fleet"])
STATUS_NAMES = {code: name for name, code in STATUS_CODES.items()}
LIST_MAX = 1000
_ID = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"
Id = Annotated[str, Field(pattern=_ID, max_length=48)]
SiteQuery = Annotated[str | None, Query(pattern=_ID, max_length=32, description="Only this site.")]
MachineQuery = Annotated[str | None, Query(pattern=_ID, max_length=48, description="Only this one.")]
AfterQuery = Annotated[
    str | None,
    Query(
        pattern=r"^[a-z0-9-]+/[a-z0-9-]+$",
        max_length=81,
        description="<site_id>/<machine_id> of the last row.",
    ),
]
"""A page's cursor: the last row's machine."""
NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "Not modified: the If-None-Match ETag is current."}
}


class SiteOut(BaseModel):
    id: str
    name: str | None


class Sites(BaseModel):
    sites: list[SiteOut]


class MachineOut(BaseModel):
    site_id: str
    id: str
    type: str
    status: str | None = Field(description="stopped, running or fault; None: not seen within the lookback.")
    status_code: int | None
    last_seen: datetime | None = Field(description="Time of the machine's newest point in the store.")


class Machines(BaseModel):
    machines: list[MachineOut]
    next: str | None = Field(description="The next page's URL; None on the last page.")


class MachineRow(BaseModel):
    site_id: str
    id: str
    type: str


def conditional(request: Request, model: BaseModel) -> Response:
    """``model`` as JSON with a strong ETag of its bytes, or 304 when ``If-None-Match`` has it."""
    body = model.model_dump_json().encode()
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    presented = request.headers.get("if-none-match", "")
    if etag in {tag.strip().removeprefix("W/") for tag in presented.split(",")} or presented.strip() == "*":
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


def store_latest(
    store: TelemetryStore, caller: Caller, site_id: str | None, lookback_s: int, machine_id: str | None = None
) -> list[Latest]:
    try:
        return store.latest(caller.tenant_id, site_id, timedelta(seconds=lookback_s), machine_id)
    except StoreError as error:
        raise store_unavailable(error) from error


def _machine_out(row: MachineRow, latest: Latest | None) -> MachineOut:
    code = None if latest is None else latest.status_code
    return MachineOut(
        site_id=row.site_id,
        id=row.id,
        type=row.type,
        status=None if code is None else STATUS_NAMES.get(code),
        status_code=code,
        last_seen=None if latest is None else latest.last_seen,
    )


def find_machine(
    conn: psycopg.Connection, caller: Caller, machine_id: str, site_id: str | None
) -> MachineRow:
    """The caller's machine ``machine_id`` (in ``site_id`` when given), or 404 / 409."""
    site = site_filter(caller, site_id)
    rows = conn.execute(
        "SELECT site_id, id, type FROM machines WHERE tenant_id = %s AND id = %s"
        " AND (%s::text IS NULL OR site_id = %s) ORDER BY site_id LIMIT 2",
        (caller.tenant_id, machine_id, site, site),
    ).fetchall()
    if not rows:
        where = f" in site {site!r}" if site else ""
        raise ApiError(
            404, "machine_unknown", f"machine {machine_id!r}{where} is not a machine of this key's scope"
        )
    if len(rows) > 1:
        sites = ", ".join(row[0] for row in rows)
        raise ApiError(
            409,
            "machine_ambiguous",
            f"machine {machine_id!r} exists in several sites ({sites}): give site_id",
        )
    return MachineRow(site_id=rows[0][0], id=rows[0][1], type=rows[0][2])


@router.get("/sites", response_model=Sites, responses=NOT_MODIFIED)
def sites(request: Request, meter: MeterDep, pool: PoolDep) -> Response:
    """The tenant's sites (a site key: its own)."""
    caller = meter.caller
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT id, name FROM sites WHERE tenant_id = %s AND (%s::text IS NULL OR id = %s) ORDER BY id",
            (caller.tenant_id, caller.site_id, caller.site_id),
        ).fetchall()
    return conditional(request, Sites(sites=[SiteOut(id=row[0], name=row[1]) for row in rows]))


@router.get("/machines", response_model=Machines, responses=NOT_MODIFIED)
def machines(
    request: Request,
    meter: MeterDep,
    pool: PoolDep,
    store: StoreDep,
    settings: SettingsDep,
    site_id: SiteQuery = None,
    after: AfterQuery = None,
    limit: Annotated[int, Query(ge=1, le=LIST_MAX)] = 500,
) -> Response:
    """The tenant's machines with their latest status, ordered by site then id, ``limit`` a page.
    Each machine of the page costs one point, or each machine of the scope the store reported on
    when more (the latest status is read for the whole scope)."""
    caller = meter.caller
    site = site_filter(caller, site_id)
    after_site, after_machine = after.split("/") if after else ("", "")
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT site_id, id, type FROM machines WHERE tenant_id = %s"
            " AND (%s::text IS NULL OR site_id = %s) AND (site_id, id) > (%s, %s)"
            " ORDER BY site_id, id LIMIT %s",
            (caller.tenant_id, site, site, after_site, after_machine, limit + 1),
        ).fetchall()
    page = [MachineRow(site_id=r[0], id=r[1], type=r[2]) for r in rows[:limit]]
    found = store_latest(store, caller, site, settings.latest_lookback_s) if page else []
    latest = latest_by_machine(found)
    meter.charge(max(len(page), len(found)))  # the store read every machine of the scope, not the page
    next_url = None
    if len(rows) > limit:
        last = page[-1]
        next_url = str(request.url.include_query_params(after=f"{last.site_id}/{last.id}"))
    out = [_machine_out(row, latest.get((row.site_id, row.id))) for row in page]
    return conditional(request, Machines(machines=out, next=next_url))


@router.get("/machines/{machine_id}", response_model=MachineOut, responses=NOT_MODIFIED)
def machine(
    request: Request,
    meter: MeterDep,
    pool: PoolDep,
    store: StoreDep,
    settings: SettingsDep,
    machine_id: Annotated[str, Path(pattern=_ID, max_length=48)],
    site_id: SiteQuery = None,
) -> Response:
    """One machine with its latest status and when it was last seen."""
    with pool.connection() as conn:
        row = find_machine(conn, meter.caller, machine_id, site_id)
    meter.charge(1)
    found = store_latest(store, meter.caller, row.site_id, settings.latest_lookback_s, row.id)
    latest = latest_by_machine(found).get((row.site_id, row.id))
    return conditional(request, _machine_out(row, latest))
