"""A machine's telemetry over a bounded range (``/v1/machines/{machine_id}/series``).

``from`` and ``to`` are required (with a time zone), ``to - from`` at most
``series_max_range_days``. The store downsamples: each point summarises the window
``(ts - resolution_s, ts]`` (``api.stores``), windows counted from ``from``, the last one
ending at or after ``to``. Without ``step`` the server picks the finest
resolution of :data:`RESOLUTIONS` that fits the range into one page of ``limit`` points and says
so (``resolution_chosen_by``); with ``step`` the range is cut into pages of ``limit`` points, and
``next`` is the URL of the following page (None on the last). Each page carries the edge gateways'
gaps (readings they had to drop, ``telemetry_gaps``) that overlap it, and flags points holding
backfilled (``historical``) readings. A page costs the samples the store scanned.
"""

from __future__ import annotations

import base64
import binascii
import math
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, Field

from api.deps import PoolDep, SettingsDep, StoreDep
from api.errors import ApiError, bad_parameter, store_unavailable
from api.fleet import SiteQuery, find_machine
from api.limits import InRange
from api.ratelimit import MeterDep
from api.stores import SeriesQuery, StoreError

router = APIRouter(prefix="/v1", tags=["telemetry"])
RESOLUTIONS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
"""Seconds the server picks from when the request gives no ``step``."""
METRICS_MAX = 32
GAPS_MAX = 1000
_CURSOR_PREFIX = "v1:"
MetricName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]


class Point(BaseModel):
    ts: datetime = Field(description="End of the window this point summarises.")
    values: dict[str, float] = Field(description="Each metric's mean over the window.")
    status_code: int | None = Field(
        description="The worst status in the window (0 stopped, 1 running, 2 fault)."
    )
    samples: int = Field(description="Telemetry points in the window.")
    historical: bool = Field(description="Some of them were backfilled from an edge gateway's history.")


class Gap(BaseModel):
    gateway: str
    reason: str
    count: int = Field(description="Readings the gateway dropped.")
    first_ts: datetime
    last_ts: datetime


class Series(BaseModel):
    site_id: str
    machine_id: str
    from_: datetime = Field(alias="from", description="This page's start (exclusive).")
    to: datetime = Field(
        description="This page's end (inclusive): the last page's is ``to`` rounded up to a whole window."
    )
    resolution_s: int
    resolution_chosen_by: Literal["server", "request"]
    resolution: str = Field(description="What one point is.")
    points: list[Point]
    gaps: list[Gap] = Field(description=f"Gaps overlapping this page, oldest first (at most {GAPS_MAX}).")
    points_scanned: int = Field(description="Samples the store read for this page (what it cost).")
    next: str | None = Field(description="The next page's URL; None on the last page.")


def auto_resolution(span_s: float, limit: int) -> int:
    """The finest of :data:`RESOLUTIONS` giving at most ``limit`` points over ``span_s``."""
    needed = math.ceil(span_s / limit)
    return next((step for step in RESOLUTIONS if step >= needed), needed)


def encode_cursor(page_start: datetime) -> str:
    text = f"{_CURSOR_PREFIX}{round(page_start.timestamp() * 1000)}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, start: datetime, end: datetime, step_s: int) -> datetime:
    """The page start a cursor stands for: within the range, on a window boundary; else 422."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not text.startswith(_CURSOR_PREFIX):
            raise ValueError(text)
        page_start = datetime.fromtimestamp(int(text.removeprefix(_CURSOR_PREFIX)) / 1000, UTC)
    except (ValueError, binascii.Error, UnicodeDecodeError, OverflowError, OSError) as error:
        raise bad_parameter("cursor", cursor, "is not a cursor this API gave") from error
    offset_ms = round((page_start - start).total_seconds() * 1000)
    if not start < page_start < end or offset_ms % (step_s * 1000):
        raise bad_parameter("cursor", cursor, "does not belong to this from, to and step")
    return page_start


def _bounded(start: datetime, end: datetime, max_days: int) -> None:
    problems = [
        f"{name}: {value.isoformat()!r} needs a time zone (e.g. Z or +00:00)"
        for name, value in (("from", start), ("to", end))
        if value.tzinfo is None
    ]
    if not problems and start >= end:
        problems.append(f"from: {start.isoformat()!r} must be before to ({end.isoformat()!r})")
    if not problems and end - start > timedelta(days=max_days):
        problems.append(
            f"to: {end.isoformat()!r} is more than {max_days} days after from ({start.isoformat()!r})"
        )
    if problems:
        raise ApiError(422, "invalid_parameter", "; ".join(problems))


@router.get("/machines/{machine_id}/series")
def series(
    request: Request,
    meter: MeterDep,
    pool: PoolDep,
    store: StoreDep,
    settings: SettingsDep,
    machine_id: Annotated[str, Path(pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length=48)],
    start: Annotated[
        datetime, Query(alias="from", description="Range start (exclusive), RFC 3339 with zone."), InRange
    ],
    end: Annotated[
        datetime, Query(alias="to", description="Range end (inclusive), RFC 3339 with zone."), InRange
    ],
    site_id: SiteQuery = None,
    metrics: Annotated[
        list[MetricName] | None,
        Query(max_length=METRICS_MAX, description="Metrics to return (repeat); default: all it has."),
    ] = None,
    step: Annotated[
        int | None, Query(ge=1, le=86_400, description="Resolution in seconds; default: chosen.")
    ] = None,
    limit: Annotated[
        int | None, Query(ge=1, description="Points per page; default and most: the server's cap.")
    ] = None,
    cursor: Annotated[str | None, Query(max_length=64, description="From a previous page's next.")] = None,
) -> Series:
    """One machine's points in ``(from, to]``, downsampled in the store, a page at a time."""
    _bounded(start, end, settings.series_max_range_days)
    cap = settings.series_max_points
    if limit is not None and limit > cap:
        raise bad_parameter("limit", limit, f"is above this API's cap of {cap} points a page")
    page_points = limit or cap
    span_s = (end - start).total_seconds()
    step_s = step if step is not None else auto_resolution(span_s, page_points)
    # Whole windows only: the last one ends at or after ``to`` (its points after ``to`` included).
    end = start + timedelta(seconds=step_s * math.ceil(span_s / step_s))
    page_start = start if cursor is None else decode_cursor(cursor, start, end, step_s)
    page_end = min(end, page_start + timedelta(seconds=step_s * page_points))
    with pool.connection() as conn:
        machine = find_machine(conn, meter.caller, machine_id, site_id)
        gaps = conn.execute(
            "SELECT gateway, reason, count, first_ts, last_ts FROM telemetry_gaps"
            " WHERE tenant_id = %s AND site_id = %s AND machine_id = %s AND last_ts > %s AND first_ts <= %s"
            " ORDER BY first_ts, gateway LIMIT %s",
            (meter.caller.tenant_id, machine.site_id, machine.id, page_start, page_end, GAPS_MAX),
        ).fetchall()
    query = SeriesQuery(
        tenant_id=meter.caller.tenant_id,
        site_id=machine.site_id,
        machine_id=machine.id,
        metrics=tuple(dict.fromkeys(metrics or ())),
        start=page_start,
        end=page_end,
        step_s=step_s,
    )
    try:
        result = store.series(query)
    except StoreError as error:
        raise store_unavailable(error) from error
    meter.charge(result.scanned)
    next_url = None
    if page_end < end:
        next_url = str(request.url.include_query_params(cursor=encode_cursor(page_end)))
    return Series.model_validate(
        {
            "site_id": machine.site_id,
            "machine_id": machine.id,
            "from": page_start,
            "to": page_end,
            "resolution_s": step_s,
            "resolution_chosen_by": "request" if step is not None else "server",
            "resolution": f"each point summarises ({step_s} s before ts, ts]: metrics averaged,"
            " status_code the maximum, samples counted",
            "points": [Point(**vars(window)) for window in result.windows],
            "gaps": [Gap(gateway=g[0], reason=g[1], count=g[2], first_ts=g[3], last_ts=g[4]) for g in gaps],
            "points_scanned": result.scanned,
            "next": next_url,
        }
    )
