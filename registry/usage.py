"""Usage per tenant in the registry (migration ``0011_usage.sql``): idempotent usage events, their
hourly rollup, and the monthly quota's flags.

The ingest worker (``ingest/usage.py``) hands :func:`record_usage` batches of events, one per
stored point, identified like the point in the store: (tenant, site, machine, ts in ms). One
statement inserts them into the dedupe table and adds *only the newly inserted ones* to
``usage_hourly`` and to the hour's active machines and sites, so a copy counted before (by this
replica or another, in this batch or an earlier one) adds nothing, and the rollup never has to be
recomputed from raw rows: those are pruned by :func:`prune_usage` once older than the dedupe
horizon. The API reads :func:`hourly_usage` and :func:`quota_flags`.

The worker's image holds this module: it imports nothing of ``registry.store``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Literal

import psycopg
from psycopg import sql

SOFT_QUOTA_RATIO = 0.8
"""Share of the monthly message quota at which a tenant is warned (the hard limit is 1.0)."""
QuotaLevel = Literal["soft", "hard"]


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One stored point: its identity, the hour its copy arrived in, and what its message weighed.

    A message carrying several points (a batch) counts as one message on its first point only:
    ``message`` 1 and ``bytes`` its payload size there, 0 on the others."""

    tenant_id: str
    site_id: str
    machine_id: str
    ts_ms: int
    hour: int
    """Arrival hour, epoch seconds (a multiple of 3600)."""
    message: int
    bytes: int

    @property
    def identity(self) -> tuple[str, str, str, int]:
        return (self.tenant_id, self.site_id, self.machine_id, self.ts_ms)


@dataclass(frozen=True, slots=True)
class UsageHour:
    """One row of ``usage_hourly``."""

    tenant_id: str
    hour: datetime
    messages: int
    bytes: int
    points: int
    active_machines: int
    active_sites: int


_RECORD = """
WITH incoming (tenant_id, site_id, machine_id, ts_ms, hour, message, bytes) AS (
    SELECT * FROM unnest(
        %(tenant)s::text[], %(site)s::text[], %(machine)s::text[], %(ts)s::bigint[],
        %(hour)s::timestamptz[], %(message)s::int[], %(bytes)s::bigint[]
    )
), fresh AS (
    INSERT INTO usage_points (tenant_id, site_id, machine_id, ts_ms, hour)
    SELECT tenant_id, site_id, machine_id, ts_ms, hour FROM incoming ORDER BY 1, 2, 3, 4
    ON CONFLICT DO NOTHING
    RETURNING tenant_id, site_id, machine_id, ts_ms
), counted AS (
    SELECT incoming.* FROM fresh JOIN incoming USING (tenant_id, site_id, machine_id, ts_ms)
), machines AS (
    INSERT INTO usage_active_machines (tenant_id, hour, site_id, machine_id)
    SELECT DISTINCT tenant_id, hour, site_id, machine_id FROM counted ORDER BY 1, 2, 3, 4
    ON CONFLICT DO NOTHING
    RETURNING tenant_id, hour
), sites AS (
    INSERT INTO usage_active_sites (tenant_id, hour, site_id)
    SELECT DISTINCT tenant_id, hour, site_id FROM counted ORDER BY 1, 2, 3
    ON CONFLICT DO NOTHING
    RETURNING tenant_id, hour
), totals AS (
    SELECT tenant_id, hour, sum(message) AS messages, sum(bytes) AS bytes, count(*) AS points
    FROM counted GROUP BY tenant_id, hour
), rolled AS (
    INSERT INTO usage_hourly AS h (tenant_id, hour, messages, bytes, points, active_machines, active_sites)
    SELECT t.tenant_id, t.hour, t.messages, t.bytes, t.points,
           (SELECT count(*) FROM machines m WHERE m.tenant_id = t.tenant_id AND m.hour = t.hour),
           (SELECT count(*) FROM sites s WHERE s.tenant_id = t.tenant_id AND s.hour = t.hour)
    FROM totals t ORDER BY t.tenant_id, t.hour
    ON CONFLICT (tenant_id, hour) DO UPDATE SET
        messages = h.messages + EXCLUDED.messages,
        bytes = h.bytes + EXCLUDED.bytes,
        points = h.points + EXCLUDED.points,
        active_machines = h.active_machines + EXCLUDED.active_machines,
        active_sites = h.active_sites + EXCLUDED.active_sites
)
SELECT count(*) FROM counted
"""


def _hour(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def record_usage(conn: psycopg.Connection, events: Iterable[UsageEvent]) -> int:
    """Count ``events`` once each, ever (within the dedupe horizon); returns how many points
    were new. Idempotent: recording the same events again adds nothing. One transaction."""
    unique: dict[tuple[str, str, str, int], UsageEvent] = {}
    for event in events:
        unique.setdefault(event.identity, event)  # the first copy's hour and message
    if not unique:
        return 0
    rows = list(unique.values())
    params = {
        "tenant": [e.tenant_id for e in rows],
        "site": [e.site_id for e in rows],
        "machine": [e.machine_id for e in rows],
        "ts": [e.ts_ms for e in rows],
        "hour": [_hour(e.hour) for e in rows],
        "message": [e.message for e in rows],
        "bytes": [e.bytes for e in rows],
    }
    with conn.transaction():
        row = conn.execute(_RECORD, params).fetchone()
    return int(row[0]) if row else 0


def prune_usage(conn: psycopg.Connection, keep: timedelta) -> int:
    """Forget point identities (and active machines and sites) of hours older than ``keep``:
    ``usage_hourly`` has counted them already. Returns the identities removed."""
    cutoff = datetime.now(UTC) - keep
    with conn.transaction():
        removed = conn.execute("DELETE FROM usage_points WHERE hour < %s", (cutoff,)).rowcount
        conn.execute("DELETE FROM usage_active_machines WHERE hour < %s", (cutoff,))
        conn.execute("DELETE FROM usage_active_sites WHERE hour < %s", (cutoff,))
    return removed


def month_start(at: datetime) -> date:
    """The first day of ``at``'s month, in UTC: quotas count calendar months in UTC."""
    return at.astimezone(UTC).date().replace(day=1)


def _next_month(month: date) -> date:
    return (month + timedelta(days=32)).replace(day=1)


def month_messages(conn: psycopg.Connection, month: date) -> dict[str, int]:
    """Every tenant's messages counted so far in ``month`` (its first day)."""
    begin = datetime(month.year, month.month, 1, tzinfo=UTC)
    end = datetime.combine(_next_month(month), datetime.min.time(), UTC)
    rows = conn.execute(
        "SELECT tenant_id, sum(messages) FROM usage_hourly WHERE hour >= %s AND hour < %s GROUP BY tenant_id",
        (begin, end),
    )
    return {tenant: int(total) for tenant, total in rows}


def flag_quota(conn: psycopg.Connection, tenant_id: str, month: date, limit: int, level: QuotaLevel) -> bool:
    """Mark that ``tenant_id`` reached the ``level`` of its quota in ``month``; True when this
    call set the flag (the replica that does logs the event), False when it was set already."""
    column = sql.Identifier(f"{level}_reached_at")
    query = sql.SQL(
        "INSERT INTO usage_quota_flags AS f (tenant_id, month, messages_limit, {column})"
        " VALUES (%s, %s, %s, now())"
        " ON CONFLICT (tenant_id, month)"
        " DO UPDATE SET {column} = now(), messages_limit = EXCLUDED.messages_limit"
        " WHERE f.{column} IS NULL RETURNING 1"
    ).format(column=column)
    with conn.transaction():
        return conn.execute(query, (tenant_id, month, limit)).fetchone() is not None


@dataclass(frozen=True, slots=True)
class QuotaFlags:
    """A tenant's quota in one month, as the API shows it."""

    month: date
    messages_limit: int
    soft_reached_at: datetime | None
    hard_reached_at: datetime | None


def quota_flags(conn: psycopg.Connection, tenant_id: str, month: date) -> QuotaFlags | None:
    """The flags of ``tenant_id``'s quota in ``month`` (None: neither level reached)."""
    row = conn.execute(
        "SELECT month, messages_limit, soft_reached_at, hard_reached_at FROM usage_quota_flags"
        " WHERE tenant_id = %s AND month = %s",
        (tenant_id, month),
    ).fetchone()
    return None if row is None else QuotaFlags(*row)


def hourly_usage(conn: psycopg.Connection, tenant_id: str, start: datetime, end: datetime) -> list[UsageHour]:
    """``tenant_id``'s hours in ``[start, end)``, oldest first (hours without usage have no row)."""
    rows = conn.execute(
        "SELECT tenant_id, hour, messages, bytes, points, active_machines, active_sites"
        " FROM usage_hourly WHERE tenant_id = %s AND hour >= %s AND hour < %s ORDER BY hour",
        (tenant_id, start, end),
    )
    return [UsageHour(*row) for row in rows]


def quota_levels(used: int, limit: int) -> Sequence[QuotaLevel]:
    """The levels ``used`` messages reach of a ``limit``: none, soft (>= 80 %), or both."""
    levels: list[QuotaLevel] = []
    if used >= SOFT_QUOTA_RATIO * limit:
        levels.append("soft")
    if used >= limit:
        levels.append("hard")
    return levels
