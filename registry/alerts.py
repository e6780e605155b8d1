"""Alerts in the registry (migration ``0010_alerts.sql``): who may post them, each tenant's
routing rules, the alert events, and one record per delivery attempt.

- **Webhook sources**: a Grafana contact point authenticates with a bearer token the registry
  keeps only as a SHA-256 digest. A source speaks for one tenant, or (``tenant_id=None``, the
  shared org's source) for the tenant each alert's ``tenant`` label names, if that tenant lives
  in the shared org (isolation level 1). The tenant stack writes its source with
  :func:`upsert_webhook_source` (:func:`tenant_source_id` names it).
- **Routes**: match an alert on site, severity and hours of the week in a time zone, and name a
  channel (email, Slack, Teams, a generic webhook) with its target. :class:`RouteSpec` is the one
  validation the API and the CLI share.
- **Events**: :func:`record_alerts` stores each alert once (Grafana's fingerprint, ``startsAt``
  and status: a resend is the same row) and queues one delivery per matching route (routes with
  the same channel and target collapse into one), in one transaction.
- **Deliveries**: :func:`claim_due`, :func:`finish_delivery` and :func:`reclaim_stale` are the
  dispatcher's queue (``api/notify``): every attempt is a row; pending ones survive a restart.

Changes to sources and routes are audited (``registry.store.record_event``); the audit trail never
holds a token, a provider key or a webhook URL's secret part.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from infra.config import SiteId
from registry.store import RegistryError, record_event

TENANT_LABEL = "tenant"
"""The label naming an alert's tenant (``dashboards/alerts.py`` puts it on every rule)."""
SITE_LABEL, MACHINE_LABEL, SEVERITY_LABEL = "site_id", "machine_id", "severity"
SHARED_SOURCE_ID = "grafana-shared"
SHARED_ORG_ISOLATION = 1
TOKEN_MIN_CHARS, TOKEN_MAX_CHARS = 32, 256
MAX_ROUTES_PER_TENANT = 100
MAX_EMAIL_RECIPIENTS = 10
ERROR_MAX_CHARS = 2000
Channel = Literal["email", "slack", "teams", "webhook"]
Severity = Literal["info", "warning", "critical"]
DeliveryStatus = Literal["pending", "sending", "delivered", "failed", "canceled"]
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_EMAIL = re.compile(r"^[^@\s,;<>]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}$")
_CLOCK = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$|^24:00$")


class RouteRefused(RegistryError):
    """A route write refused; ``conflict``: by the tenant's other routes (a name taken, the cap)
    rather than by the route itself."""

    def __init__(self, message: str, *, conflict: bool) -> None:
        super().__init__(message)
        self.conflict = conflict


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


# ------------------------------------------------------------------------------ webhook sources
@dataclass(frozen=True)
class WebhookSource:
    id: str
    tenant_id: str | None
    """None: the shared org's source (speaks for the tenant each alert's label names)."""


def tenant_source_id(tenant_id: str) -> str:
    """The webhook source of a tenant's own contact point: ``grafana-<tenant>``."""
    return f"grafana-{tenant_id}"


def _check_token(where: str, token: str) -> None:
    if not TOKEN_MIN_CHARS <= len(token) <= TOKEN_MAX_CHARS or any(c.isspace() for c in token):
        raise RegistryError(
            f"{where}.token: must be {TOKEN_MIN_CHARS} to {TOKEN_MAX_CHARS} characters without spaces"
            f" (got {len(token)})"
        )


def upsert_webhook_source(
    conn: psycopg.Connection, source_id: str, token: str, *, tenant_id: str | None, actor: str
) -> bool:
    """Make ``source_id`` accept ``token`` (kept as its SHA-256) for ``tenant_id`` (None: the shared
    org). Idempotent: False when the registry already held exactly this. Audited as
    ``alert_source.created`` / ``alert_source.updated`` (``token_rotated``), never the token."""
    where = f"alert_sources[{source_id}]"
    _check_token(where, token)
    digest = token_digest(token)
    with conn.transaction():
        found = conn.execute(
            "SELECT tenant_id, token_sha256 FROM alert_webhook_sources WHERE id = %s FOR UPDATE", (source_id,)
        ).fetchone()
        if found is not None and found[0] == tenant_id and bytes(found[1]) == digest:
            return False
        try:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO alert_webhook_sources (id, tenant_id, token_sha256) VALUES (%s, %s, %s)"
                    " ON CONFLICT (id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id,"
                    " token_sha256 = EXCLUDED.token_sha256, updated_at = now()",
                    (source_id, tenant_id, digest),
                )
        except psycopg.errors.ForeignKeyViolation as error:
            raise RegistryError(f"{where}.tenant_id: {tenant_id!r} is not in the registry") from error
        except psycopg.errors.UniqueViolation as error:
            raise RegistryError(f"{where}.token: another source already uses this token") from error
        except psycopg.errors.CheckViolation as error:
            raise RegistryError(f"{where}.id: {source_id!r} is not a source id (a DNS label)") from error
        details: dict[str, Any] = {"scope": tenant_id or "shared org"}
        if found is not None:
            details["token_rotated"] = bytes(found[1]) != digest
        record_event(
            conn,
            actor=actor,
            action="alert_source.created" if found is None else "alert_source.updated",
            subject=source_id,
            tenant_id=tenant_id,
            details=details,
        )
    return True


def delete_webhook_source(conn: psycopg.Connection, source_id: str, *, actor: str) -> bool:
    """Stop accepting ``source_id``'s token; False when there was no such source."""
    with conn.transaction():
        row = conn.execute(
            "DELETE FROM alert_webhook_sources WHERE id = %s RETURNING tenant_id", (source_id,)
        ).fetchone()
        if row is None:
            return False
        record_event(conn, actor=actor, action="alert_source.removed", subject=source_id, tenant_id=row[0])
    return True


def webhook_source(conn: psycopg.Connection, token: str) -> WebhookSource | None:
    """The source presenting ``token``, or None (the token is random: looking its digest up is safe)."""
    if not TOKEN_MIN_CHARS <= len(token) <= TOKEN_MAX_CHARS:
        return None
    row = conn.execute(
        "SELECT id, tenant_id FROM alert_webhook_sources WHERE token_sha256 = %s", (token_digest(token),)
    ).fetchone()
    return None if row is None else WebhookSource(row[0], row[1])


def shared_org_tenants(conn: psycopg.Connection, tenant_ids: Iterable[str]) -> set[str]:
    """Which of ``tenant_ids`` are registry tenants living in the shared org (isolation 1)."""
    rows = conn.execute(
        "SELECT id FROM tenants WHERE id = ANY(%s) AND isolation = %s",
        (list(set(tenant_ids)), SHARED_ORG_ISOLATION),
    )
    return {row[0] for row in rows}


def known_tenants(conn: psycopg.Connection, tenant_ids: Iterable[str]) -> set[str]:
    rows = conn.execute("SELECT id FROM tenants WHERE id = ANY(%s)", (list(set(tenant_ids)),))
    return {row[0] for row in rows}


# ---------------------------------------------------------------------------------------- routes
class HourWindow(BaseModel):
    """Days of the week and a time span within each (``end`` after ``start``; ``24:00`` is midnight
    at the end of the day). A night shift across midnight is two windows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    days: list[Day] = Field(min_length=1, max_length=7)
    start: str = Field(pattern=_CLOCK.pattern, examples=["08:00"])
    end: str = Field(pattern=_CLOCK.pattern, examples=["18:00"])

    @model_validator(mode="after")
    def _ordered(self) -> HourWindow:
        if len(set(self.days)) != len(self.days):
            raise ValueError(f"days: {self.days} names a day twice")
        if _minutes(self.end) <= _minutes(self.start):
            raise ValueError(f"end: {self.end!r} is not after start {self.start!r}")
        return self

    def holds(self, local: datetime) -> bool:
        minute = local.hour * 60 + local.minute
        return DAYS[local.weekday()] in self.days and _minutes(self.start) <= minute < _minutes(self.end)


def _minutes(clock: str) -> int:
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


def parse_hours(text: str) -> HourWindow:
    """``mon-fri 08:00-18:00``, ``sat,sun 00:00-24:00`` or ``daily 22:00-24:00`` (the CLI's form);
    ValueError saying what is wrong."""
    parts = text.split()
    if len(parts) != 2 or parts[1].count("-") != 1:
        raise ValueError(f"{text[:80]!r} is not '<days> HH:MM-HH:MM' (e.g. 'mon-fri 08:00-18:00')")
    days: list[str] = []
    for item in ["mon-sun"] if parts[0] == "daily" else parts[0].split(","):
        first, _, last = item.partition("-")
        if first not in DAYS or (last and last not in DAYS):
            raise ValueError(f"{item!r} is not a day or range of days (mon, tue, ... sun; mon-fri)")
        low, high = DAYS.index(first), DAYS.index(last or first)
        if high < low:
            raise ValueError(f"{item!r}: a range goes forward within the week (mon-fri, not fri-mon)")
        days += [day for day in DAYS[low : high + 1] if day not in days]
    start, end = parts[1].split("-")
    return HourWindow.model_validate({"days": days, "start": start, "end": end})


def _is_http_url(text: str) -> bool:
    parts = urlsplit(text)
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not any(c.isspace() for c in text)


class RouteSpec(BaseModel):
    """A routing rule as a tenant writes it (API body, CLI flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, description="Unique within the tenant.")
    site_id: SiteId | None = Field(default=None, description="Only alerts of this site; None: any site.")
    severities: list[Severity] | None = Field(
        default=None, min_length=1, max_length=3, description="Only these severities; None: any."
    )
    hours: list[HourWindow] | None = Field(
        default=None, min_length=1, max_length=14, description="Only within these windows; None: always."
    )
    time_zone: str = Field(default="UTC", max_length=64, description="IANA zone the hours are read in.")
    channel: Channel
    target: str = Field(
        min_length=1,
        max_length=2048,
        description="email: addresses, comma-separated (at most 10); slack, teams, webhook: the URL.",
    )
    authorization: SecretStr | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="webhook only: the Authorization header sent (an SMS provider's key).",
    )
    send_resolved: bool = Field(default=True, description="Notify when the alert resolves too.")
    enabled: bool = True

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise ValueError(f"{value[:64]!r} is not an IANA time zone (e.g. Europe/Berlin)") from error
        return value

    @model_validator(mode="after")
    def _target(self) -> RouteSpec:
        if self.channel == "email":
            addresses = self.recipients()
            bad = [address for address in addresses if not _EMAIL.match(address)]
            if bad or not addresses or len(addresses) > MAX_EMAIL_RECIPIENTS:
                raise ValueError(
                    f"target: {self.target[:120]!r} is not 1 to {MAX_EMAIL_RECIPIENTS} email addresses"
                    + (f" ({bad[0][:80]!r} is not one)" if bad else "")
                )
        elif not _is_http_url(self.target):
            raise ValueError(
                f"target: {self.target[:120]!r} is not an http(s) URL for channel {self.channel}"
            )
        if self.authorization is not None and self.channel != "webhook":
            raise ValueError(f"authorization: only the webhook channel sends one (channel is {self.channel})")
        if self.severities is not None and len(set(self.severities)) != len(self.severities):
            raise ValueError(f"severities: {self.severities} names a severity twice")
        return self

    def recipients(self) -> list[str]:
        return [address.strip() for address in self.target.split(",") if address.strip()]


@dataclass(frozen=True)
class Route:
    id: int
    tenant_id: str
    spec: RouteSpec
    created_at: datetime
    updated_at: datetime

    def matches(self, alert: NewAlertEvent, at: datetime) -> bool:
        """Whether an alert in this state, received at ``at``, goes through this route."""
        spec = self.spec
        if not spec.enabled or (alert.status == "resolved" and not spec.send_resolved):
            return False
        if spec.site_id is not None and alert.site_id != spec.site_id:
            return False
        if spec.severities is not None and alert.severity not in spec.severities:
            return False
        if spec.hours is None:
            return True
        local = at.astimezone(ZoneInfo(spec.time_zone))
        return any(window.holds(local) for window in spec.hours)


def shown_target(channel: str, target: str) -> str:
    """A target as lists and records show it: email addresses whole; a URL's scheme and host, its
    secret path elided but for the last 4 characters (Slack and Teams URLs are credentials)."""
    if channel == "email":
        return target
    parts = urlsplit(target)
    return f"{parts.scheme}://{parts.hostname}/…{target[-4:]}"


_SPEC_COLUMNS = {
    "name": "name",
    "site_id": "site_id",
    "severities": "severities",
    "hours": "hours",
    "time_zone": "time_zone",
    "channel": "channel",
    "target": "target",
    "authorization": "authorization_header",
    "send_resolved": "send_resolved",
    "enabled": "enabled",
}
"""RouteSpec field -> its alert_routes column."""
_ROUTE_COLUMNS = ", ".join(["id", "tenant_id", *_SPEC_COLUMNS.values(), "created_at", "updated_at"])


def _route(row: tuple[Any, ...]) -> Route:
    route_id, tenant_id, *values, created_at, updated_at = row
    spec = RouteSpec.model_validate(dict(zip(_SPEC_COLUMNS, values, strict=True)))
    return Route(int(route_id), tenant_id, spec, created_at, updated_at)


def _route_row(spec: RouteSpec) -> dict[str, Any]:
    """``spec`` as alert_routes column values."""
    values = {
        **spec.model_dump(exclude={"authorization", "hours"}),
        "hours": None if spec.hours is None else Jsonb([w.model_dump() for w in spec.hours]),
        "authorization": None if spec.authorization is None else spec.authorization.get_secret_value(),
    }
    return {column: values[field] for field, column in _SPEC_COLUMNS.items()}


def _audited(spec: RouteSpec) -> dict[str, Any]:
    """A route as the audit trail keeps it: no provider key, the URL's secret part elided."""
    document = spec.model_dump(mode="json", exclude={"authorization", "target"})
    return {
        **document,
        "target": shown_target(spec.channel, spec.target),
        "authorization": spec.authorization is not None,
    }


def _lock_tenant(conn: psycopg.Connection, where: str, tenant_id: str) -> None:
    """Serialise route writes of one tenant (the route cap), refusing an unknown tenant."""
    if conn.execute("SELECT 1 FROM tenants WHERE id = %s FOR UPDATE", (tenant_id,)).fetchone() is None:
        raise RouteRefused(f"{where}: tenant {tenant_id!r} is not in the registry", conflict=False)


def _write_route(
    conn: psycopg.Connection, where: str, statement: str, params: dict[str, Any]
) -> Route | None:
    try:
        with conn.transaction():
            row = conn.execute(statement, params).fetchone()
    except psycopg.errors.UniqueViolation as error:
        raise RouteRefused(
            f"{where}.name: {params['name']!r} is already a route of this tenant", conflict=True
        ) from error
    except psycopg.errors.ForeignKeyViolation as error:
        raise RouteRefused(
            f"{where}.site_id: {params['site_id']!r} is not a site of this tenant", conflict=False
        ) from error
    return None if row is None else _route(row)


def create_route(conn: psycopg.Connection, tenant_id: str, spec: RouteSpec, *, actor: str) -> Route:
    """Add a route (at most :data:`MAX_ROUTES_PER_TENANT` per tenant); audited ``alert_route.created``."""
    where = f"alert_routes[{tenant_id}]"
    with conn.transaction():
        _lock_tenant(conn, where, tenant_id)
        (count,) = conn.execute(
            "SELECT count(*) FROM alert_routes WHERE tenant_id = %s", (tenant_id,)
        ).fetchone() or (0,)
        if count >= MAX_ROUTES_PER_TENANT:
            raise RouteRefused(f"{where}: the tenant has {count} routes, the most it may have", conflict=True)
        params = {"tenant_id": tenant_id, **_route_row(spec)}
        columns = ", ".join(params)
        values = ", ".join(f"%({column})s" for column in params)
        route = _write_route(
            conn,
            where,
            f"INSERT INTO alert_routes ({columns}) VALUES ({values}) RETURNING {_ROUTE_COLUMNS}",
            params,
        )
        assert route is not None
        record_event(
            conn,
            actor=actor,
            action="alert_route.created",
            subject=str(route.id),
            tenant_id=tenant_id,
            details=_audited(spec),
        )
    return route


def replace_route(
    conn: psycopg.Connection, tenant_id: str, route_id: int, spec: RouteSpec, *, actor: str
) -> Route | None:
    """Replace a route of ``tenant_id`` with ``spec``; None when the tenant has no such route."""
    where = f"alert_routes[{tenant_id}][{route_id}]"
    with conn.transaction():
        before = route_of(conn, tenant_id, route_id)
        if before is None:
            return None
        if before.spec == spec:
            return before
        params = {"tenant_id": tenant_id, "id": route_id, **_route_row(spec)}
        assignments = ", ".join(f"{column} = %({column})s" for column in _route_row(spec))
        route = _write_route(
            conn,
            where,
            f"UPDATE alert_routes SET {assignments}, updated_at = now()"
            f" WHERE tenant_id = %(tenant_id)s AND id = %(id)s RETURNING {_ROUTE_COLUMNS}",
            params,
        )
        record_event(
            conn,
            actor=actor,
            action="alert_route.updated",
            subject=str(route_id),
            tenant_id=tenant_id,
            details={"before": _audited(before.spec), "after": _audited(spec)},
        )
    return route


def delete_route(conn: psycopg.Connection, tenant_id: str, route_id: int, *, actor: str) -> bool:
    """Remove a route of ``tenant_id`` (its pending deliveries are then canceled); False if none."""
    with conn.transaction():
        row = conn.execute(
            "DELETE FROM alert_routes WHERE tenant_id = %s AND id = %s RETURNING name", (tenant_id, route_id)
        ).fetchone()
        if row is None:
            return False
        record_event(
            conn,
            actor=actor,
            action="alert_route.removed",
            subject=str(route_id),
            tenant_id=tenant_id,
            details={"name": row[0]},
        )
    return True


def routes_of(conn: psycopg.Connection, tenant_id: str, *, site_id: str | None = None) -> list[Route]:
    """A tenant's routes by id; with ``site_id``, only the routes of that site."""
    query = f"SELECT {_ROUTE_COLUMNS} FROM alert_routes WHERE tenant_id = %s"
    params: tuple[Any, ...] = (tenant_id,)
    if site_id is not None:
        query, params = query + " AND site_id = %s", (tenant_id, site_id)
    return [_route(row) for row in conn.execute(query + " ORDER BY id", params)]


def route_of(conn: psycopg.Connection, tenant_id: str, route_id: int) -> Route | None:
    row = conn.execute(
        f"SELECT {_ROUTE_COLUMNS} FROM alert_routes WHERE tenant_id = %s AND id = %s", (tenant_id, route_id)
    ).fetchone()
    return None if row is None else _route(row)


# ---------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class NewAlertEvent:
    """One alert of a webhook payload, its tenant already decided."""

    tenant_id: str
    source_id: str
    fingerprint: str
    status: Literal["firing", "resolved"]
    starts_at: datetime
    ends_at: datetime | None
    alertname: str
    severity: str | None
    site_id: str | None
    machine_id: str | None
    labels: dict[str, str]
    annotations: dict[str, str]
    metric_values: dict[str, float | None] | None
    links: dict[str, str]

    @property
    def occurred_at(self) -> datetime:
        """When this state began: the start when firing, the end when resolved."""
        return self.ends_at if self.status == "resolved" and self.ends_at is not None else self.starts_at


@dataclass(frozen=True)
class Recorded:
    stored: int
    """Alerts new to the registry."""
    duplicates: int
    """Alerts it already held (a resend)."""
    deliveries: int
    """Deliveries queued for the new ones."""


_INSERT_EVENT = (
    "INSERT INTO alert_events (tenant_id, source_id, fingerprint, status, starts_at, ends_at, occurred_at,"
    " alertname, severity, site_id, machine_id, labels, annotations, metric_values, links)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT ON CONSTRAINT alert_events_identity DO NOTHING RETURNING id"
)
_INSERT_DELIVERY = (
    "INSERT INTO alert_deliveries (event_id, tenant_id, route_id, channel, target, attempt, due_at)"
    " VALUES (%s, %s, %s, %s, %s, 1, %s)"
)


def record_alerts(conn: psycopg.Connection, alerts: Sequence[NewAlertEvent], *, now: datetime) -> Recorded:
    """Store each alert once and queue its deliveries (due ``now``), in one transaction."""
    stored = deliveries = 0
    routes: dict[str, list[Route]] = {}
    with conn.transaction():
        for alert in alerts:
            row = conn.execute(
                _INSERT_EVENT,
                (
                    alert.tenant_id,
                    alert.source_id,
                    alert.fingerprint,
                    alert.status,
                    alert.starts_at,
                    alert.ends_at,
                    alert.occurred_at,
                    alert.alertname,
                    alert.severity,
                    alert.site_id,
                    alert.machine_id,
                    Jsonb(alert.labels),
                    Jsonb(alert.annotations),
                    None if alert.metric_values is None else Jsonb(alert.metric_values),
                    Jsonb(alert.links),
                ),
            ).fetchone()
            if row is None:
                continue
            stored += 1
            if alert.tenant_id not in routes:
                routes[alert.tenant_id] = routes_of(conn, alert.tenant_id)
            queued: dict[tuple[str, str], int] = {}
            for route in routes[alert.tenant_id]:
                if route.matches(alert, now):
                    queued.setdefault((route.spec.channel, route.spec.target), route.id)
            with conn.cursor() as cursor:
                cursor.executemany(
                    _INSERT_DELIVERY,
                    [
                        (row[0], alert.tenant_id, route_id, channel, target, now)
                        for (channel, target), route_id in queued.items()
                    ],
                )
            deliveries += len(queued)
    return Recorded(stored, len(alerts) - stored, deliveries)


@dataclass(frozen=True)
class AlertEvent(NewAlertEvent):
    """A stored event (its ``occurred_at`` is the column's: stored as the property computes it)."""

    id: int
    received_at: datetime


_EVENT_COLUMNS = (
    "id, tenant_id, source_id, fingerprint, status, starts_at, ends_at, alertname, severity,"
    " site_id, machine_id, labels, annotations, metric_values, links, received_at"
)


def alert_history(
    conn: psycopg.Connection,
    tenant_id: str,
    *,
    start: datetime,
    end: datetime,
    after: tuple[datetime, int] | None = None,
    site_id: str | None = None,
    status: str | None = None,
    limit: int = 100,
) -> list[AlertEvent]:
    """A tenant's events with ``start <= occurred_at < end`` in (occurred_at, id) order, after the
    cursor ``after``; at most ``limit``."""
    query = (
        f"SELECT {_EVENT_COLUMNS} FROM alert_events"
        " WHERE tenant_id = %s AND occurred_at >= %s AND occurred_at < %s"
    )
    params: list[Any] = [tenant_id, start, end]
    for column, value in (("site_id", site_id), ("status", status)):
        if value is not None:
            query += f" AND {column} = %s"
            params.append(value)
    if after is not None:
        query += " AND (occurred_at, id) > (%s, %s)"
        params += list(after)
    with conn.cursor(row_factory=class_row(AlertEvent)) as cursor:
        return cursor.execute(query + " ORDER BY occurred_at, id LIMIT %s", [*params, limit]).fetchall()


def alert_event(conn: psycopg.Connection, tenant_id: str, event_id: int) -> AlertEvent | None:
    with conn.cursor(row_factory=class_row(AlertEvent)) as cursor:
        return cursor.execute(
            f"SELECT {_EVENT_COLUMNS} FROM alert_events WHERE tenant_id = %s AND id = %s",
            (tenant_id, event_id),
        ).fetchone()


# ------------------------------------------------------------------------------------ deliveries
@dataclass(frozen=True)
class Delivery:
    """One attempt, as records show it."""

    id: int
    event_id: int
    tenant_id: str
    route_id: int | None
    channel: str
    target: str
    attempt: int
    status: str
    due_at: datetime
    claimed_at: datetime | None
    finished_at: datetime | None
    error: str | None
    next_retry_at: datetime | None


_DELIVERY_COLUMNS = (
    "id, event_id, tenant_id, route_id, channel, target, attempt, status, due_at, claimed_at, finished_at,"
    " error, next_retry_at"
)


def deliveries_of(
    conn: psycopg.Connection, tenant_id: str, event_id: int, *, site_id: str | None = None
) -> list[Delivery]:
    """Every attempt for one event of ``tenant_id``, oldest first; with ``site_id``, only those of
    that site's routes (as :func:`routes_of` lists them: not tenant-wide ones, nor removed ones)."""
    query = f"SELECT {_DELIVERY_COLUMNS} FROM alert_deliveries WHERE tenant_id = %s AND event_id = %s"
    params: tuple[Any, ...] = (tenant_id, event_id)
    if site_id is not None:
        query += " AND route_id IN (SELECT id FROM alert_routes WHERE tenant_id = %s AND site_id = %s)"
        params += (tenant_id, site_id)
    with conn.cursor(row_factory=class_row(Delivery)) as cursor:
        return cursor.execute(query + " ORDER BY id", params).fetchall()


@dataclass(frozen=True)
class DueDelivery:
    """A claimed attempt with what sending it needs."""

    delivery: Delivery
    event: AlertEvent
    route: Route | None
    """None: the route was removed since (the attempt is canceled)."""


_CLAIM = f"""
WITH due AS (
    SELECT id, route_id FROM alert_deliveries
     WHERE status = 'pending' AND due_at <= %(now)s
     ORDER BY due_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
), current AS (
    SELECT due.id, r.channel, r.target FROM due LEFT JOIN alert_routes r ON r.id = due.route_id
)
UPDATE alert_deliveries d
   SET status = 'sending', claimed_at = %(now)s,
       channel = COALESCE(current.channel, d.channel), target = COALESCE(current.target, d.target)
  FROM current WHERE d.id = current.id
RETURNING {", ".join(f"d.{column.strip()}" for column in _DELIVERY_COLUMNS.split(","))}
"""


def claim_due(conn: psycopg.Connection, *, now: datetime, limit: int) -> list[DueDelivery]:
    """Mark up to ``limit`` due pending attempts ``sending`` (a route edited since takes its new
    channel and target) and return them with their events and routes. Concurrent dispatchers
    never claim the same row."""
    with conn.transaction():
        with conn.cursor(row_factory=class_row(Delivery)) as cursor:
            claimed = cursor.execute(_CLAIM, {"now": now, "limit": limit}).fetchall()
        if not claimed:
            return []
        with conn.cursor(row_factory=class_row(AlertEvent)) as cursor:
            events = {
                event.id: event
                for event in cursor.execute(
                    f"SELECT {_EVENT_COLUMNS} FROM alert_events WHERE id = ANY(%s)",
                    ([d.event_id for d in claimed],),
                )
            }
        route_ids = [d.route_id for d in claimed if d.route_id is not None]
        routes = {
            int(row[0]): _route(row)
            for row in conn.execute(
                f"SELECT {_ROUTE_COLUMNS} FROM alert_routes WHERE id = ANY(%s)", (route_ids,)
            )
        }
    return [
        DueDelivery(d, events[d.event_id], None if d.route_id is None else routes.get(d.route_id))
        for d in claimed
    ]


def finish_delivery(
    conn: psycopg.Connection,
    delivery_id: int,
    *,
    status: Literal["delivered", "failed", "canceled"],
    now: datetime,
    error: str | None = None,
    retry_at: datetime | None = None,
) -> int | None:
    """Record how a claimed attempt ended; with ``retry_at`` (a failure) queue the next attempt as
    a new pending row and return its id."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE alert_deliveries SET status = %s, finished_at = %s, error = %s, next_retry_at = %s"
            " WHERE id = %s AND status = 'sending'"
            " RETURNING event_id, tenant_id, route_id, channel, target, attempt",
            (status, now, None if error is None else error[:ERROR_MAX_CHARS], retry_at, delivery_id),
        ).fetchone()
        if row is None or retry_at is None:
            return None
        event_id, tenant_id, route_id, channel, target, attempt = row
        queued = conn.execute(
            "INSERT INTO alert_deliveries (event_id, tenant_id, route_id, channel, target, attempt, due_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING id",
            (event_id, tenant_id, route_id, channel, target, attempt + 1, retry_at),
        ).fetchone()
    return None if queued is None else int(queued[0])


INTERRUPTED = "interrupted: the dispatcher stopped while sending (it may have been delivered)"


def reclaim_stale(
    conn: psycopg.Connection, *, now: datetime, lease: timedelta, retry_at: Callable[[int], datetime | None]
) -> int:
    """Fail attempts left ``sending`` longer than ``lease`` (their dispatcher died) and queue the
    next attempt where ``retry_at(attempt)`` gives a time. Returns how many were reclaimed."""
    stale = conn.execute(
        "SELECT id, attempt FROM alert_deliveries WHERE status = 'sending' AND claimed_at < %s",
        (now - lease,),
    ).fetchall()
    for delivery_id, attempt in stale:
        finish_delivery(
            conn, delivery_id, status="failed", now=now, error=INTERRUPTED, retry_at=retry_at(attempt)
        )
    return len(stale)
