"""Alerts: Grafana's webhook, the tenant's alert history, and its notification routing.

- ``POST /v1/alerts/grafana``: every Grafana org's contact point posts here (Grafana's webhook
  payload, ``Authorization: Bearer <source token>``; ``registry.alerts`` says which tenant a
  source speaks for). Each alert is stored once, however often Grafana resends it, routed by the
  tenant's rules and queued for delivery; the answer says how many were new. A payload naming a
  tenant the source may not speak for is refused whole (403), a malformed one 422 naming each
  field, one over ``alert_webhook_max_bytes`` 413.
- ``GET /v1/alerts`` (a range, a cursor) and ``GET /v1/alerts/{id}`` (with every delivery attempt;
  a site key sees only those of its site's routes).
- ``/v1/alert-routes``: the caller's routes, created, read, replaced and removed. A site key sees
  and writes only its site's routes.

The dispatcher (``api.notify.dispatcher``) runs in the API's process for as long as the app does
(this router's lifespan), unless ``notify_dispatcher`` is off.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
import psycopg
import structlog
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import ConnectionPool
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from api.auth import Caller, CallerDep
from api.deps import PoolDep, SettingsDep
from api.errors import ApiError, bad_parameter
from api.limits import InRange, bounded_time
from api.notify.dispatcher import Dispatcher, RetryPolicy, Senders
from api.notify.smtp import SmtpRelay
from api.ratelimit import MeterDep
from api.scope import actor_of, site_filter
from api.settings import ApiSettings
from infra.config import SiteId
from registry import alerts

log = structlog.get_logger("api.alerts")
HISTORY_MAX_RANGE = timedelta(days=366)
HISTORY_MAX_LIMIT = 500
MAX_ALERTS_PER_PAYLOAD = 1000
"""Set the contact point's ``max_alerts`` to this: Grafana then truncates (``truncatedAlerts``, logged)."""
LABELS_MAX = 64
ID_LABEL_MAX_CHARS = 64
URL_MAX_CHARS = 4096

LabelName = Annotated[str, Field(min_length=1, max_length=128)]
Labels = Annotated[dict[LabelName, Annotated[str, Field(max_length=2048)]], Field(max_length=LABELS_MAX)]
Annotations = Annotated[
    dict[LabelName, Annotated[str, Field(max_length=16_384)]], Field(max_length=LABELS_MAX)
]
Url = Annotated[str, Field(max_length=URL_MAX_CHARS)]


# ------------------------------------------------------------------------- Grafana's payload
def _grafana_end(value: datetime) -> datetime:
    """Grafana's zero time (year 1: not resolved) as sent, never stored; any other end in range."""
    return value if value.year == 1 else bounded_time(value)


class GrafanaAlert(BaseModel):
    """One alert of Grafana's webhook (field names as Grafana sends them; fields added by later
    Grafana versions are ignored)."""

    model_config = ConfigDict(extra="ignore")

    status: Literal["firing", "resolved"]
    labels: Labels
    annotations: Annotations = {}
    startsAt: Annotated[AwareDatetime, InRange]
    endsAt: Annotated[AwareDatetime, AfterValidator(_grafana_end)] | None = None
    fingerprint: str = Field(min_length=1, max_length=64, pattern=r"^\S+$")
    values: (
        Annotated[dict[Annotated[str, Field(max_length=64)], float | None], Field(max_length=64)] | None
    ) = None
    valueString: str = Field(default="", max_length=16_384)
    generatorURL: Url = ""
    silenceURL: Url = ""
    dashboardURL: Url = ""
    panelURL: Url = ""
    imageURL: Url = ""


class GrafanaWebhook(BaseModel):
    """Grafana Alerting's webhook notification (``version`` "1")."""

    model_config = ConfigDict(extra="ignore")

    receiver: str = Field(max_length=256)
    status: Literal["firing", "resolved"]
    orgId: int = Field(ge=0)
    alerts: list[GrafanaAlert] = Field(min_length=1, max_length=MAX_ALERTS_PER_PAYLOAD)
    groupLabels: Labels = {}
    commonLabels: Labels = {}
    commonAnnotations: Annotations = {}
    externalURL: Url = ""
    version: str = Field(default="1", max_length=16)
    groupKey: str = Field(default="", max_length=URL_MAX_CHARS)
    truncatedAlerts: int = Field(default=0, ge=0)


class WebhookAccepted(BaseModel):
    stored: int = Field(description="Alerts new to the history.")
    duplicates: int = Field(description="Alerts already stored (a resend): not routed again.")
    deliveries: int = Field(description="Notifications queued for the new alerts.")


# ---------------------------------------------------------------------------------- answers
class AlertOut(BaseModel):
    id: int
    status: str
    alertname: str
    severity: str | None
    site_id: str | None
    machine_id: str | None
    summary: str | None
    fingerprint: str
    starts_at: datetime
    ends_at: datetime | None
    occurred_at: datetime = Field(description="When this state began: starts_at, or ends_at when resolved.")
    received_at: datetime
    labels: dict[str, str]
    annotations: dict[str, str]
    values: dict[str, float | None] | None
    links: dict[str, str]

    @classmethod
    def of(cls, event: alerts.AlertEvent) -> AlertOut:
        named_alike = {name: getattr(event, name) for name in cls.model_fields if hasattr(event, name)}
        return cls(**named_alike, summary=event.annotations.get("summary"), values=event.metric_values)


class AlertPage(BaseModel):
    items: list[AlertOut]
    next: str | None = Field(description="Cursor of the next page (same from/to); null: this was the last.")


class DeliveryOut(BaseModel):
    id: int
    route_id: int | None
    channel: str
    target: str = Field(description="Email addresses, or the URL with its secret path elided.")
    attempt: int
    status: str
    due_at: datetime
    finished_at: datetime | None
    error: str | None
    next_retry_at: datetime | None

    @classmethod
    def of(cls, delivery: alerts.Delivery) -> DeliveryOut:
        fields = {name: getattr(delivery, name) for name in cls.model_fields}
        return cls(**{**fields, "target": alerts.shown_target(delivery.channel, delivery.target)})


class AlertDetail(AlertOut):
    deliveries: list[DeliveryOut]


class RouteOut(BaseModel):
    id: int
    name: str
    site_id: str | None
    severities: list[str] | None
    hours: list[alerts.HourWindow] | None
    time_zone: str
    channel: str
    target: str = Field(description="Email addresses, or the URL with its secret path elided.")
    authorization: bool = Field(description="Whether an Authorization header is sent (never shown).")
    send_resolved: bool
    enabled: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, route: alerts.Route) -> RouteOut:
        spec = route.spec
        return cls(
            id=route.id,
            name=spec.name,
            site_id=spec.site_id,
            severities=list(spec.severities) if spec.severities else None,
            hours=spec.hours,
            time_zone=spec.time_zone,
            channel=spec.channel,
            target=alerts.shown_target(spec.channel, spec.target),
            authorization=spec.authorization is not None,
            send_resolved=spec.send_resolved,
            enabled=spec.enabled,
            created_at=route.created_at,
            updated_at=route.updated_at,
        )


# ------------------------------------------------------------------------------- dispatcher
def open_dispatcher(settings: ApiSettings, pool: ConnectionPool) -> tuple[Dispatcher, httpx.Client]:
    """The dispatcher ``settings`` describe, and the HTTP client it sends with (close both)."""
    smtp = None
    if settings.smtp_host:
        smtp = SmtpRelay(
            host=settings.smtp_host,
            port=settings.smtp_port,
            sender=settings.smtp_from,
            security=settings.smtp_security,
            username=settings.smtp_username,
            password=None if settings.smtp_password is None else settings.smtp_password.get_secret_value(),
            timeout_s=settings.notify_timeout_s,
        )
    client = httpx.Client(timeout=settings.notify_timeout_s, follow_redirects=False)
    senders = Senders(
        smtp=smtp,
        http=client,
        allow_http=settings.notify_allow_http,
        allow_private=settings.notify_allow_private,
    )
    policy = RetryPolicy(
        settings.notify_max_attempts, settings.notify_backoff_s, settings.notify_backoff_max_s
    )
    dispatcher = Dispatcher(
        pool,
        senders,
        policy,
        batch=settings.notify_batch,
        concurrency=settings.notify_concurrency,
        lease=timedelta(seconds=settings.notify_lease_s),
    )
    return dispatcher, client


@asynccontextmanager
async def dispatching(app: FastAPI) -> AsyncIterator[None]:
    """Run the dispatcher thread while the app runs (the registry pool is open by then)."""
    settings: ApiSettings = app.state.settings
    app.state.alert_dispatcher = None
    if not settings.notify_dispatcher:
        yield
        return
    dispatcher, client = open_dispatcher(settings, app.state.pool)
    app.state.alert_dispatcher = dispatcher
    stop = threading.Event()
    thread = threading.Thread(
        target=dispatcher.run, args=(stop, settings.notify_poll_s), name="alert-dispatcher", daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        dispatcher.wake()
        thread.join(timeout=settings.notify_timeout_s * 3)
        dispatcher.close()
        client.close()


router = APIRouter(prefix="/v1", tags=["alerts"], lifespan=dispatching)
_source_bearer = HTTPBearer(
    auto_error=False, scheme_name="AlertSourceToken", description="A Grafana contact point's source token."
)


# ---------------------------------------------------------------------------------- webhook
async def _bounded_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload_too_large", f"body: {declared} bytes is more than {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"body: more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _payload(body: bytes) -> GrafanaWebhook:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ApiError(422, "invalid_parameter", f"body: is not a JSON document ({error})") from error
    try:
        return GrafanaWebhook.model_validate(document)
    except ValidationError as error:
        raise RequestValidationError(
            [
                {**problem, "loc": ("body", *problem["loc"]), "input": _shown_input(problem.get("input"))}
                for problem in error.errors(include_url=False, include_context=False)
            ]
        ) from error


def _shown_input(value: object) -> object:
    """What a 422 echoes of a refused value: a scalar, cut short; never a whole list or object."""
    if isinstance(value, str):
        return value[:100]
    return value if isinstance(value, int | float | bool) else None


def _label(alert: GrafanaAlert, name: str, where: str, problems: list[str]) -> str | None:
    value = alert.labels.get(name) or None
    if value is not None and len(value) > ID_LABEL_MAX_CHARS:
        problems.append(f"{where}.labels.{name}: longer than {ID_LABEL_MAX_CHARS} characters")
        return None
    return value


_LINKS = ("generatorURL", "silenceURL", "dashboardURL", "panelURL", "imageURL")


def _tenant_of(
    source: alerts.WebhookSource,
    named: str | None,
    shared: set[str],
    where: str,
    problems: dict[str, list[str]],
) -> str | None:
    """The tenant an alert is stored for, or None after appending why it may not be."""
    field = f"{where}.labels.{alerts.TENANT_LABEL}"
    if source.tenant_id is not None:
        if named and named != source.tenant_id:
            problems["refused"].append(
                f"{field}: {named[:64]!r} is not {source.tenant_id!r}, this source's tenant"
            )
            return None
        return source.tenant_id
    if not named:
        problems["malformed"].append(f"{field}: is required (the shared org's alerts name their tenant)")
        return None
    if named not in shared:
        problems["refused"].append(f"{field}: {named[:64]!r} is not a tenant of the shared org")
        return None
    return named


def _events(
    conn: psycopg.Connection, source: alerts.WebhookSource, payload: GrafanaWebhook
) -> list[alerts.NewAlertEvent]:
    """The payload's alerts with their tenants; ApiError naming every alert the source may not
    post (403) or that lacks what the registry needs (422)."""
    named = [alert.labels.get(alerts.TENANT_LABEL) or None for alert in payload.alerts]
    shared = alerts.shared_org_tenants(conn, [t for t in named if t]) if source.tenant_id is None else set()
    problems: dict[str, list[str]] = {"refused": [], "malformed": []}
    events = []
    for index, alert in enumerate(payload.alerts):
        where = f"alerts[{index}]"
        tenant = _tenant_of(source, named[index], shared, where, problems)
        site = _label(alert, alerts.SITE_LABEL, where, problems["malformed"])
        machine = _label(alert, alerts.MACHINE_LABEL, where, problems["malformed"])
        severity = _label(alert, alerts.SEVERITY_LABEL, where, problems["malformed"])
        if tenant is None:
            continue
        ended = (
            alert.endsAt if alert.status == "resolved" and alert.endsAt and alert.endsAt.year > 1 else None
        )
        events.append(
            alerts.NewAlertEvent(
                tenant_id=tenant,
                source_id=source.id,
                fingerprint=alert.fingerprint,
                status=alert.status,
                starts_at=alert.startsAt,
                ends_at=ended,
                alertname=alert.labels.get("alertname", "")[:256],
                severity=severity,
                site_id=site,
                machine_id=machine,
                labels=alert.labels,
                annotations=alert.annotations,
                metric_values=alert.values,
                links={name: getattr(alert, name) for name in _LINKS if getattr(alert, name)},
            )
        )
    if problems["refused"]:
        raise ApiError(403, "tenant_mismatch", "; ".join(problems["refused"] + problems["malformed"]))
    if problems["malformed"]:
        raise ApiError(422, "invalid_parameter", "; ".join(problems["malformed"]))
    return events


def _source(pool: ConnectionPool, token: str | None) -> alerts.WebhookSource:
    with pool.connection() as conn:
        source = None if token is None else alerts.webhook_source(conn, token)
    if source is None:
        raise ApiError(
            401,
            "unauthorized",
            "a webhook source token is required: Authorization: Bearer <token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return source


def _accept(
    pool: ConnectionPool, source: alerts.WebhookSource, payload: GrafanaWebhook, dispatcher: Dispatcher | None
) -> WebhookAccepted:
    if payload.truncatedAlerts:
        log.warning("alert_payload_truncated", source_id=source.id, truncated=payload.truncatedAlerts)
    with pool.connection() as conn:
        recorded = alerts.record_alerts(conn, _events(conn, source, payload), now=datetime.now(UTC))
    if recorded.deliveries and dispatcher is not None:
        dispatcher.wake()
    return WebhookAccepted(
        stored=recorded.stored, duplicates=recorded.duplicates, deliveries=recorded.deliveries
    )


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its ``$defs`` substituted in place (the body is read by hand,
    so FastAPI does not put the models in the document's components)."""
    definitions = schema.pop("$defs", {})

    def substitute(node: Any) -> Any:
        if isinstance(node, dict):
            reference = node.get("$ref", "")
            if reference.startswith("#/$defs/"):
                return substitute(definitions[reference.removeprefix("#/$defs/")])
            return {key: substitute(value) for key, value in node.items()}
        if isinstance(node, list):
            return [substitute(item) for item in node]
        return node

    inlined: dict[str, Any] = substitute(schema)
    return inlined


WEBHOOK_PATH = "/v1/alerts/grafana"


@router.post(
    WEBHOOK_PATH.removeprefix("/v1"),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _inlined(GrafanaWebhook.model_json_schema())}},
        }
    },
)
async def grafana_webhook(
    request: Request,
    pool: PoolDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_source_bearer)],
) -> WebhookAccepted:
    """Grafana's webhook contact point: store each alert once, route it, queue its notifications."""
    token = None if credentials is None else credentials.credentials
    source = await run_in_threadpool(_source, pool, token)
    payload = _payload(await _bounded_body(request, settings.alert_webhook_max_bytes))
    return await run_in_threadpool(_accept, pool, source, payload, request.app.state.alert_dispatcher)


# ---------------------------------------------------------------------------------- history
def _cursor(text: str) -> tuple[datetime, int]:
    try:
        moment, event_id = json.loads(base64.urlsafe_b64decode(text.encode()))
        return datetime.fromisoformat(moment), int(event_id)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError, OverflowError) as error:
        raise bad_parameter("cursor", text[:80], "is not a cursor this API returned") from error


def _next_cursor(event: alerts.AlertEvent) -> str:
    return base64.urlsafe_b64encode(json.dumps([event.occurred_at.isoformat(), event.id]).encode()).decode()


@router.get("/alerts")
def alert_history(
    caller: CallerDep,
    meter: MeterDep,
    pool: PoolDep,
    start: Annotated[
        AwareDatetime, Query(alias="from", description="Events that began at or after this."), InRange
    ],
    end: Annotated[
        AwareDatetime, Query(alias="to", description="... and before this (at most 366 days on)."), InRange
    ],
    cursor: Annotated[str | None, Query(max_length=200, description="`next` of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=HISTORY_MAX_LIMIT)] = 100,
    site_id: SiteId | None = None,
    status: Literal["firing", "resolved"] | None = None,
) -> AlertPage:
    """The tenant's alert events in the order they began, a page at a time."""
    if end <= start:
        raise bad_parameter("to", end.isoformat(), f"is not after from ({start.isoformat()})")
    if end - start > HISTORY_MAX_RANGE:
        raise bad_parameter("to", end.isoformat(), f"is more than {HISTORY_MAX_RANGE.days} days after from")
    after = None if cursor is None else _cursor(cursor)
    with pool.connection() as conn:
        events = alerts.alert_history(
            conn,
            caller.tenant_id,
            start=start,
            end=end,
            after=after,
            site_id=site_filter(caller, site_id),
            status=status,
            limit=limit + 1,
        )
    meter.charge(len(events))
    page = events[:limit]
    return AlertPage(
        items=[AlertOut.of(event) for event in page],
        next=_next_cursor(page[-1]) if len(events) > limit else None,
    )


@router.get("/alerts/{event_id}")
def alert_detail(
    caller: CallerDep, _meter: MeterDep, pool: PoolDep, event_id: Annotated[int, Path(ge=1, le=2**63 - 1)]
) -> AlertDetail:
    """One event and every delivery attempt made for it; for a site key, only the attempts of
    its site's routes (the routes it can list: tenant-wide ones, their targets, are not its)."""
    with pool.connection() as conn:
        event = alerts.alert_event(conn, caller.tenant_id, event_id)
        if event is None or (caller.site_id is not None and event.site_id != caller.site_id):
            raise ApiError(404, "alert_unknown", f"event_id: {event_id} is not an alert of this tenant")
        deliveries = alerts.deliveries_of(conn, caller.tenant_id, event_id, site_id=caller.site_id)
    return AlertDetail(**AlertOut.of(event).model_dump(), deliveries=[DeliveryOut.of(d) for d in deliveries])


# ----------------------------------------------------------------------------------- routes
RouteId = Annotated[int, Path(ge=1, le=2**63 - 1)]


def _writable(caller: Caller, settings: ApiSettings, spec: alerts.RouteSpec) -> None:
    if caller.site_id is not None and spec.site_id != caller.site_id:
        raise ApiError(
            403, "site_mismatch", f"site_id: {spec.site_id!r} must be {caller.site_id!r}, this key's site"
        )
    if spec.channel != "email" and urlsplit(spec.target).scheme != "https" and not settings.notify_allow_http:
        raise bad_parameter("target", alerts.shown_target(spec.channel, spec.target), "is not an https URL")


def _route_or_404(conn: psycopg.Connection, caller: Caller, route_id: int) -> alerts.Route:
    route = alerts.route_of(conn, caller.tenant_id, route_id)
    if route is None or (caller.site_id is not None and route.spec.site_id != caller.site_id):
        raise ApiError(404, "route_unknown", f"route_id: {route_id} is not a route of this tenant")
    return route


def _refused(error: alerts.RouteRefused) -> ApiError:
    return ApiError(
        409 if error.conflict else 422,
        "route_conflict" if error.conflict else "invalid_parameter",
        str(error),
    )


@router.get("/alert-routes")
def list_routes(caller: CallerDep, _meter: MeterDep, pool: PoolDep) -> list[RouteOut]:
    with pool.connection() as conn:
        return [
            RouteOut.of(route) for route in alerts.routes_of(conn, caller.tenant_id, site_id=caller.site_id)
        ]


@router.post("/alert-routes", status_code=201)
def create_route(
    spec: alerts.RouteSpec, caller: CallerDep, _meter: MeterDep, pool: PoolDep, settings: SettingsDep
) -> RouteOut:
    _writable(caller, settings, spec)
    with pool.connection() as conn:
        try:
            return RouteOut.of(alerts.create_route(conn, caller.tenant_id, spec, actor=actor_of(caller)))
        except alerts.RouteRefused as error:
            raise _refused(error) from error


@router.get("/alert-routes/{route_id}")
def get_route(route_id: RouteId, caller: CallerDep, _meter: MeterDep, pool: PoolDep) -> RouteOut:
    with pool.connection() as conn:
        return RouteOut.of(_route_or_404(conn, caller, route_id))


@router.put("/alert-routes/{route_id}")
def replace_route(
    route_id: RouteId,
    spec: alerts.RouteSpec,
    caller: CallerDep,
    _meter: MeterDep,
    pool: PoolDep,
    settings: SettingsDep,
) -> RouteOut:
    _writable(caller, settings, spec)
    with pool.connection() as conn:
        _route_or_404(conn, caller, route_id)
        try:
            route = alerts.replace_route(conn, caller.tenant_id, route_id, spec, actor=actor_of(caller))
        except alerts.RouteRefused as error:
            raise _refused(error) from error
    if route is None:
        raise ApiError(404, "route_unknown", f"route_id: {route_id} is not a route of this tenant")
    return RouteOut.of(route)


@router.delete("/alert-routes/{route_id}", status_code=204)
def delete_route(route_id: RouteId, caller: CallerDep, _meter: MeterDep, pool: PoolDep) -> Response:
    with pool.connection() as conn:
        _route_or_404(conn, caller, route_id)
        alerts.delete_route(conn, caller.tenant_id, route_id, actor=actor_of(caller))
    return Response(status_code=204)
