"""Gap records in the registry (migration ``0007_telemetry_gaps.sql``): what gateways dropped.

The ingest worker stores each gap record it accepts (contract v4, ``"kind": "gap"``) with
:func:`upsert_gaps` before it confirms it to the gateway; the API reads them with :func:`list_gaps`.
A gateway resends a gap until it is confirmed, with the same or a grown count, so the upsert is
idempotent: the same count changes nothing, a larger one updates the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
from psycopg.rows import class_row

_COLUMNS = (
    "tenant_id, site_id, machine_id, gateway, boot, first_n, last_n, reason, count,"
    " first_ts, last_ts, received_at"
)
_KEY = (
    "tenant_id = %(tenant_id)s AND site_id = %(site_id)s AND machine_id = %(machine_id)s"
    " AND gateway = %(gateway)s AND boot = %(boot)s AND first_n = %(first_n)s AND reason = %(reason)s"
)
# ``before`` reads the row as it was when the statement started: the difference is what is new.
_UPSERT = f"""
WITH before AS (SELECT count FROM telemetry_gaps WHERE {_KEY})
INSERT INTO telemetry_gaps ({_COLUMNS})
VALUES (%(tenant_id)s, %(site_id)s, %(machine_id)s, %(gateway)s, %(boot)s, %(first_n)s, %(last_n)s,
        %(reason)s, %(count)s, %(first_ts)s, %(last_ts)s, %(received_at)s)
ON CONFLICT ON CONSTRAINT telemetry_gaps_pkey DO UPDATE SET
    last_n = greatest(telemetry_gaps.last_n, excluded.last_n),
    count = excluded.count,
    first_ts = least(telemetry_gaps.first_ts, excluded.first_ts),
    last_ts = greatest(telemetry_gaps.last_ts, excluded.last_ts),
    received_at = excluded.received_at
WHERE excluded.count > telemetry_gaps.count
RETURNING count - coalesce((SELECT count FROM before), 0)
"""


@dataclass(frozen=True)
class GapRow:
    """One row of ``telemetry_gaps``: the gap's machine, its gateway's seq range, why and how many."""

    tenant_id: str
    site_id: str
    machine_id: str
    gateway: str
    boot: int
    first_n: int
    last_n: int
    reason: str
    count: int
    first_ts: datetime
    last_ts: datetime
    received_at: datetime


def epoch(seconds: float) -> datetime:
    """A payload's epoch seconds as the timestamptz the table keeps."""
    return datetime.fromtimestamp(seconds, UTC)


def upsert_gaps(conn: psycopg.Connection, gaps: Sequence[GapRow]) -> list[int]:
    """Store gap records in the caller's transaction; per record, the readings it adds to what
    the table said before (its count for a new gap, the growth for a grown one, 0 for a resend)."""
    added = []
    with conn.cursor() as cursor:
        for gap in gaps:
            cursor.execute(_UPSERT, vars(gap))
            row = cursor.fetchone()
            added.append(int(row[0]) if row is not None else 0)
    return added


def list_gaps(
    conn: psycopg.Connection, tenant_id: str, site_id: str | None = None, machine_id: str | None = None
) -> list[GapRow]:
    """A tenant's gaps (or one site's, one machine's), newest first."""
    where, params = ["tenant_id = %s"], [tenant_id]
    for column, value in (("site_id", site_id), ("machine_id", machine_id)):
        if value is not None:
            where.append(f"{column} = %s")
            params.append(value)
    query = (
        f"SELECT {_COLUMNS} FROM telemetry_gaps WHERE {' AND '.join(where)}"
        " ORDER BY last_ts DESC, machine_id, gateway, boot, first_n"
    )
    with conn.cursor(row_factory=class_row(GapRow)) as cursor:
        cursor.execute(query, params)
        return cursor.fetchall()
