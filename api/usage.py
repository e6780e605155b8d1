"""Usage of the caller's tenant per period (``/v1/usage``): what usage-based pricing bills.

Read from the registry's hourly rollup (``usage_hourly``, written by the ingest worker through
``registry/usage.py``): messages, bytes and points are counted once per point identity, so a
duplicate or an edge gateway's replay is not billed twice. Periods are UTC hours, days or
calendar months; every period of the range is listed, empty ones as zeros. Distinct machines
and sites are known per hour only: a day or month reports the busiest hour's
(``peak_active_machines``, ``peak_active_sites``). The answer also carries the current month's
quota: the tier's monthly message limit, what is used of it, and when 80 % and 100 % were reached.
Usage is the whole tenant's: a site key is refused (403).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import AwareDatetime, BaseModel, Field

from api.deps import PoolDep, SettingsDep
from api.errors import bad_parameter
from api.limits import InRange
from api.ratelimit import MeterDep
from api.scope import require_tenant_key
from registry import usage
from registry.tenant_routes import tenant_routes

router = APIRouter(prefix="/v1", tags=["usage"])
Period = Literal["hour", "day", "month"]


class PeriodUsage(BaseModel):
    start: datetime
    end: datetime
    messages: int
    bytes: int
    points: int
    peak_active_machines: int = Field(description="Distinct machines of the period's busiest hour.")
    peak_active_sites: int


class MonthQuota(BaseModel):
    month: date
    messages: int = Field(description="Messages counted so far this month.")
    messages_limit: int | None = Field(description="The tier's monthly limit; null: none.")
    used_ratio: float | None
    soft_reached_at: datetime | None = Field(description="When 80 % was passed (a warning).")
    hard_reached_at: datetime | None = Field(
        description="When 100 % was passed (further messages dead-lettered)."
    )


class UsageReport(BaseModel):
    tenant_id: str
    start: datetime
    end: datetime
    period: Period
    periods: list[PeriodUsage]
    total: PeriodUsage
    quota: MonthQuota


def period_start(at: datetime, period: Period) -> datetime:
    """The start of the UTC period holding ``at``."""
    at = at.astimezone(UTC)
    if period == "hour":
        return at.replace(minute=0, second=0, microsecond=0)
    if period == "day":
        return at.replace(hour=0, minute=0, second=0, microsecond=0)
    return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_period(start: datetime, period: Period) -> datetime:
    if period == "hour":
        return start + timedelta(hours=1)
    if period == "day":
        return start + timedelta(days=1)
    return (start + timedelta(days=32)).replace(day=1)


def _whole_hour(name: str, value: datetime) -> datetime:
    """``value`` in UTC; 422 unless a whole UTC hour (an offset of +05:30 makes 00:00 18:30 UTC)."""
    utc = value.astimezone(UTC)
    if utc.minute or utc.second or utc.microsecond:
        raise bad_parameter(name, value.isoformat(), "is not a whole UTC hour (usage is counted per hour)")
    return utc


def rollup(hours: list[usage.UsageHour], start: datetime, end: datetime, period: Period) -> list[PeriodUsage]:
    """The hours summed per period of ``[start, end)`` (periods cut at both ends), empty ones as zeros."""
    rows: list[PeriodUsage] = []
    cursor, index = start, 0
    while cursor < end:
        period_end = min(next_period(period_start(cursor, period), period), end)
        row = PeriodUsage(
            start=cursor,
            end=period_end,
            messages=0,
            bytes=0,
            points=0,
            peak_active_machines=0,
            peak_active_sites=0,
        )
        while index < len(hours) and hours[index].hour < period_end:
            hour = hours[index]
            row.messages += hour.messages
            row.bytes += hour.bytes
            row.points += hour.points
            row.peak_active_machines = max(row.peak_active_machines, hour.active_machines)
            row.peak_active_sites = max(row.peak_active_sites, hour.active_sites)
            index += 1
        rows.append(row)
        cursor = period_end
    return rows


def period_count(start: datetime, end: datetime, period: Period) -> int:
    """How many periods ``[start, end)`` touches."""
    first, last = period_start(start, period), period_start(end - timedelta(microseconds=1), period)
    if period == "month":
        return (last.year - first.year) * 12 + last.month - first.month + 1
    return int((last - first).total_seconds()) // (3600 if period == "hour" else 86400) + 1


@router.get("/usage")
def tenant_usage(
    meter: MeterDep,
    pool: PoolDep,
    settings: SettingsDep,
    start: Annotated[
        AwareDatetime, Query(alias="from", description="A whole hour (UTC offset allowed)."), InRange
    ],
    end: Annotated[AwareDatetime, Query(alias="to", description="A whole hour, after from."), InRange],
    period: Annotated[Period, Query()] = "day",
) -> UsageReport:
    """Messages, bytes, points and peak active machines and sites per period of ``[from, to)``."""
    require_tenant_key(meter.caller, "usage")
    start, end = _whole_hour("from", start), _whole_hour("to", end)
    if end <= start:
        raise bad_parameter("to", end.isoformat(), f"must be after from ({start.isoformat()})")
    if end - start > timedelta(days=settings.usage_max_range_days):
        raise bad_parameter(
            "to", end.isoformat(), f"is more than {settings.usage_max_range_days} days after from"
        )
    periods = period_count(start, end, period)
    if periods > settings.usage_max_periods:
        raise bad_parameter(
            "period",
            period,
            f"splits the range into {periods} periods, more than {settings.usage_max_periods}:"
            " use a longer period or a shorter range",
        )
    now = datetime.now(UTC)
    month = usage.month_start(now)
    month_begin = datetime(month.year, month.month, 1, tzinfo=UTC)
    with pool.connection() as conn:
        hours = usage.hourly_usage(conn, meter.caller.tenant_id, start, end)
        month_hours = usage.hourly_usage(
            conn, meter.caller.tenant_id, month_begin, next_period(month_begin, "month")
        )
        flags = usage.quota_flags(conn, meter.caller.tenant_id, month)
        route = tenant_routes(conn, meter.caller.tenant_id).get(meter.caller.tenant_id)
    rows = rollup(hours, start, end, period)
    month_messages = sum(h.messages for h in month_hours)
    limit = route.messages_per_month if route is not None else None
    return UsageReport(
        tenant_id=meter.caller.tenant_id,
        start=start,
        end=end,
        period=period,
        periods=rows,
        total=PeriodUsage(
            start=start,
            end=end,
            messages=sum(h.messages for h in hours),
            bytes=sum(h.bytes for h in hours),
            points=sum(h.points for h in hours),
            peak_active_machines=max((h.active_machines for h in hours), default=0),
            peak_active_sites=max((h.active_sites for h in hours), default=0),
        ),
        quota=MonthQuota(
            month=month,
            messages=month_messages,
            messages_limit=limit,
            used_ratio=round(month_messages / limit, 4) if limit else None,
            soft_reached_at=flags.soft_reached_at if flags else None,
            hard_reached_at=flags.hard_reached_at if flags else None,
        ),
    )
