"""Fleet uptime and downtime over a range (``/v1/uptime``, ``/v1/uptime/machines``): the SLA numbers.

Counted from each machine's ``status_code`` (0 stopped, 1 running, 2 fault) in buckets of the
answer's ``resolution_s`` (``api/timeline.py``): running is uptime, stopped and fault are
downtime, and time without a report (silent longer than ``hold_s``, or reported lost by an edge
gateway in ``telemetry_gaps``) is *unknown*, counted on its own and never as down.
``availability`` is uptime over the known time, ``coverage`` the known share of the range. The
fleet is the registry's: a registered machine that sent nothing is unknown throughout.

The range ``[from, to)`` is required and bounded (``uptime_max_range_days``; a ``to`` in the
future is cut to now); the server picks the finest resolution that keeps machines x buckets under
``uptime_max_points`` and states it. A request costs the status samples the store scanned.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, Field

from api.auth import Caller
from api.deps import PoolDep, SettingsDep, StoreDep
from api.errors import ApiError, store_unavailable
from api.fleet import AfterQuery, MachineQuery, SiteQuery
from api.limits import InRange
from api.ratelimit import Meter, MeterDep
from api.scope import site_filter
from api.settings import ApiSettings
from api.stores import StatusQuery, StoreError, TelemetryStore
from api.timeline import DownState, MachineTimeline, Tally, build_timeline, step_for

router = APIRouter(prefix="/v1/uptime", tags=["uptime"])
PAGE_MAX = 100
FLEET_MAX_MACHINES = 100_000
"""Most machines one fleet answer adds up (more: ask per site)."""
From = Annotated[
    datetime, Query(alias="from", description="Range start (inclusive), RFC 3339 with zone."), InRange
]
To = Annotated[
    datetime, Query(alias="to", description="Range end (exclusive), RFC 3339 with zone; cut to now."), InRange
]


class StateTimes(BaseModel):
    running_s: float = Field(description="Uptime.")
    stopped_s: float
    fault_s: float
    unknown_s: float = Field(description="No status (silent longer than hold_s, or lost at the edge).")
    gap_s: float = Field(description="The part of unknown_s that edge gateways reported lost.")
    downtime_s: float = Field(description="stopped_s + fault_s.")
    availability: float | None = Field(description="running_s / known time; null when nothing is known.")
    coverage: float = Field(description="Known time / the range.")

    @classmethod
    def of(cls, tally: Tally) -> dict[str, float | None]:
        known = tally.running_s + tally.stopped_s + tally.fault_s
        total = known + tally.unknown_s
        return {
            "running_s": tally.running_s,
            "stopped_s": tally.stopped_s,
            "fault_s": tally.fault_s,
            "unknown_s": tally.unknown_s,
            "gap_s": tally.gap_s,
            "downtime_s": tally.stopped_s + tally.fault_s,
            "availability": round(tally.running_s / known, 6) if known else None,
            "coverage": round(known / total, 6) if total else 0.0,
        }


class FleetTimes(StateTimes):
    machines: int


class SiteUptime(FleetTimes):
    site_id: str


class Downtime(BaseModel):
    state: DownState
    start: datetime
    end: datetime
    duration_s: float


class MachineUptime(StateTimes):
    site_id: str
    machine_id: str
    type: str
    downtime: list[Downtime] = Field(
        description="Downtime intervals, oldest first (at most uptime_max_intervals)."
    )
    downtime_count: int = Field(description="All downtime intervals in the range (listed or not).")


class Report(BaseModel):
    tenant_id: str
    site_id: str | None
    from_: datetime = Field(alias="from")
    to: datetime
    resolution_s: int = Field(description="Bucket size: transitions are placed to within this.")
    hold_s: int = Field(description="How long a reported status holds without a new one.")
    points_scanned: int


class FleetReport(Report):
    total: FleetTimes
    sites: list[SiteUptime]


class MachinesReport(Report):
    machines: list[MachineUptime]
    next: str | None = Field(description="The next page's URL; null on the last page.")


def _range(start: datetime, end: datetime, settings: ApiSettings) -> tuple[datetime, datetime]:
    """``[from, to)`` checked (all problems at once), ``to`` cut to now."""
    problems = [
        f"{name}: {value.isoformat()!r} needs a time zone (e.g. Z or +00:00)"
        for name, value in (("from", start), ("to", end))
        if value.tzinfo is None
    ]
    now = datetime.now(UTC)
    if not problems:
        if start >= end:
            problems.append(f"from: {start.isoformat()!r} must be before to ({end.isoformat()!r})")
        elif start >= now:
            problems.append(f"from: {start.isoformat()!r} is in the future")
        elif end - start > timedelta(days=settings.uptime_max_range_days):
            days = settings.uptime_max_range_days
            problems.append(
                f"to: {end.isoformat()!r} is more than {days} days after from ({start.isoformat()!r})"
            )
    if problems:
        raise ApiError(422, "invalid_parameter", "; ".join(problems))
    return start, min(end, now)


def _machines(
    pool: ConnectionPool,
    caller: Caller,
    site: str | None,
    machine_id: str | None,
    after: tuple[str, str],
    limit: int,
) -> list[tuple[str, str, str]]:
    """(site, machine, type) of the registry's machines in scope, ordered, after ``after``."""
    with pool.connection() as conn:
        if site is not None:
            query = "SELECT 1 FROM sites WHERE tenant_id = %s AND id = %s"
            found = conn.execute(query, (caller.tenant_id, site))
            if found.fetchone() is None:
                raise ApiError(404, "site_unknown", f"site {site!r} is not a site of this key's scope")
        rows = conn.execute(
            "SELECT site_id, id, type FROM machines WHERE tenant_id = %s"
            " AND (%s::text IS NULL OR site_id = %s) AND (%s::text IS NULL OR id = %s)"
            " AND (site_id, id) > (%s, %s) ORDER BY site_id, id LIMIT %s",
            (caller.tenant_id, site, site, machine_id, machine_id, *after, limit),
        ).fetchall()
    return [(row[0], row[1], row[2]) for row in rows]


def _gaps(
    pool: ConnectionPool, caller: Caller, site: str | None, start: datetime, end: datetime
) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """Each machine's spans its edge gateways reported lost, overlapping ``[start, end)``."""
    spans: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT site_id, machine_id, first_ts, last_ts FROM telemetry_gaps WHERE tenant_id = %s"
            " AND (%s::text IS NULL OR site_id = %s) AND last_ts >= %s AND first_ts < %s",
            (caller.tenant_id, site, site, start, end),
        )
        for site_id, machine_id, first_ts, last_ts in rows:
            spans[(site_id, machine_id)].append((first_ts.timestamp(), last_ts.timestamp()))
    return spans


def _timelines(
    store: TelemetryStore,
    pool: ConnectionPool,
    meter: Meter,
    settings: ApiSettings,
    machines: Sequence[tuple[str, str, str]],
    site: str | None,
    start: datetime,
    end: datetime,
    only_listed: bool,
) -> tuple[int, int, dict[tuple[str, str], MachineTimeline]]:
    """(resolution, samples scanned, each machine's timeline) over ``[start, end)``."""
    hold = settings.uptime_hold_s
    span_s = (end - start).total_seconds() + hold
    per_machine = max(
        1, min(settings.uptime_max_buckets, settings.uptime_max_points // max(1, len(machines)))
    )
    step = step_for(span_s, per_machine)
    begin, finish = start.timestamp(), end.timestamp()
    query = StatusQuery(
        tenant_id=meter.caller.tenant_id,
        site_id=site,
        machine_ids=tuple(sorted({m[1] for m in machines})) if only_listed else (),
        first_end=math.floor(begin - hold) // step * step,
        last_end=(math.ceil(finish) - 1) // step * step,
        step_s=step,
    )
    try:
        found = store.status_buckets(query) if machines else None
    except StoreError as error:
        raise store_unavailable(error) from error
    scanned = found.scanned if found else 0
    meter.charge(scanned)
    gaps = _gaps(pool, meter.caller, site, start, end) if machines else {}
    timelines = {
        (site_id, machine_id): build_timeline(
            found.reports.get((site_id, machine_id), {}) if found else {},
            start=begin,
            end=finish,
            step=step,
            hold_s=hold,
            gaps=gaps.get((site_id, machine_id), ()),
        )
        for site_id, machine_id, _type in machines
    }
    return step, scanned, timelines


def _report(
    caller: Caller, site: str | None, start: datetime, end: datetime, step: int, scanned: int, hold_s: int
) -> dict[str, object]:
    return {
        "tenant_id": caller.tenant_id,
        "site_id": site,
        "from": start,
        "to": end,
        "resolution_s": step,
        "hold_s": hold_s,
        "points_scanned": scanned,
    }


@router.get("")
def fleet_uptime(
    meter: MeterDep,
    pool: PoolDep,
    store: StoreDep,
    settings: SettingsDep,
    start: From,
    end: To,
    site_id: SiteQuery = None,
) -> FleetReport:
    """Uptime of the tenant's fleet (or one site's) over ``[from, to)``, in total and per site."""
    start, end = _range(start, end, settings)
    site = site_filter(meter.caller, site_id)
    machines = _machines(pool, meter.caller, site, None, ("", ""), FLEET_MAX_MACHINES + 1)
    if len(machines) > FLEET_MAX_MACHINES:
        detail = f"the fleet has more than {FLEET_MAX_MACHINES} machines: ask per site (site_id)"
        raise ApiError(422, "fleet_too_large", detail)
    step, scanned, timelines = _timelines(store, pool, meter, settings, machines, site, start, end, False)
    total, per_site = Tally(), defaultdict[str, Tally](Tally)
    for (site_of, _machine), timeline in timelines.items():
        total.add(timeline.tally)
        per_site[site_of].add(timeline.tally)
    return FleetReport.model_validate(
        {
            **_report(meter.caller, site, start, end, step, scanned, settings.uptime_hold_s),
            "total": {**StateTimes.of(total), "machines": total.machines},
            "sites": [
                {**StateTimes.of(tally), "machines": tally.machines, "site_id": site_of}
                for site_of, tally in sorted(per_site.items())
            ],
        }
    )


@router.get("/machines")
def machines_uptime(
    request: Request,
    meter: MeterDep,
    pool: PoolDep,
    store: StoreDep,
    settings: SettingsDep,
    start: From,
    end: To,
    site_id: SiteQuery = None,
    machine_id: MachineQuery = None,
    after: AfterQuery = None,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 20,
) -> MachinesReport:
    """Each machine's uptime over ``[from, to)`` with its downtime intervals, a page at a time."""
    start, end = _range(start, end, settings)
    site = site_filter(meter.caller, site_id)
    after_key = (after.split("/")[0], after.split("/")[1]) if after else ("", "")
    rows = _machines(pool, meter.caller, site, machine_id, after_key, limit + 1)
    if machine_id is not None and not rows and after is None:
        detail = f"machine {machine_id!r} is not a machine of this key's scope"
        raise ApiError(404, "machine_unknown", detail)
    page = rows[:limit]
    step, scanned, timelines = _timelines(store, pool, meter, settings, page, site, start, end, True)
    listed = settings.uptime_max_intervals
    machines = []
    for site_of, machine, machine_type in page:
        timeline = timelines[(site_of, machine)]
        downtime = timeline.downtime()
        machines.append(
            {
                **StateTimes.of(timeline.tally),
                "site_id": site_of,
                "machine_id": machine,
                "type": machine_type,
                "downtime_count": len(downtime),
                "downtime": [
                    {
                        "state": interval.state,
                        "start": datetime.fromtimestamp(interval.start, UTC),
                        "end": datetime.fromtimestamp(interval.end, UTC),
                        "duration_s": interval.seconds,
                    }
                    for interval in downtime[:listed]
                ],
            }
        )
    next_url = None
    if len(rows) > limit:
        last = page[-1]
        next_url = str(request.url.include_query_params(after=f"{last[0]}/{last[1]}"))
    return MachinesReport.model_validate(
        {
            **_report(meter.caller, site, start, end, step, scanned, settings.uptime_hold_s),
            "machines": machines,
            "next": next_url,
        }
    )
