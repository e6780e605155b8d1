"""Alerts through the API against the real PostgreSQL the tests start: Grafana's webhook payload
stored once however often it is posted, routed by its tenant's rules, and delivered to a real
SMTP server (``aiosmtpd``) and to :class:`ChatAndSmsReceiver`, a small HTTP server this module
starts that stands in for Slack, Microsoft Teams and an SMS provider (it is a receiver the test
inspects, not those services). A failed delivery is retried with backoff, every attempt
recorded; pending deliveries survive a restart of the dispatcher; another tenant's routes are
never used; malformed payloads and routes are refused naming the field.

The dispatcher runs on a clock the tests set (``Dispatcher(clock=...)``), so a retry "an hour
later" needs no waiting; one test runs it as the app's own thread.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool
from pydantic import SecretStr
from typer.testing import CliRunner

from api.alerts import open_dispatcher
from api.app import create_app
from api.notify.dispatcher import Dispatcher
from api.notify.errors import DeliveryFailed
from api.notify.http import check_destination
from api.settings import ApiSettings
from components.render.postgres import EMQX_ROLE
from infra.cli import app as cli
from registry import alerts
from registry.store import audit_events
from tests.api_harness import (
    RecordingHandler,
    bearer,
    broker_role_reading_every_table,
    new_key,
    seed_registry,
    unique_tenant,
)
from tests.api_harness import smtp_server as running_smtp_server

pytestmark = pytest.mark.integration
NOW = datetime.now(UTC).replace(microsecond=0)


# --------------------------------------------------------------------------------- receivers
@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class ChatAndSmsReceiver:
    """An HTTP server standing in for Slack's and Teams' incoming webhooks and an SMS provider's
    API: records each POST and answers it with the next status scripted for its path (200 once
    the script is used up)."""

    url: str
    received: list[Received] = field(default_factory=list)
    scripts: dict[str, list[int]] = field(default_factory=dict)

    def on(self, path: str) -> list[Received]:
        return [item for item in self.received if item.path == path]


@pytest.fixture
def smtp_server() -> Iterator[tuple[int, RecordingHandler]]:
    with running_smtp_server() as server:
        yield server


@pytest.fixture
def receiver() -> Iterator[ChatAndSmsReceiver]:
    state = ChatAndSmsReceiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"null")
            state.received.append(Received(self.path, dict(self.headers), body))
            script = state.scripts.get(self.path, [])
            status = script.pop(0) if script else 200
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"ok" if status < 400 else b"receiver says no")

        def log_message(self, *_args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


# ------------------------------------------------------------------------------------- world
@dataclass
class World:
    dsn: str
    a: str
    b: str
    key_a: str
    key_b: str
    token_a: str
    token_b: str
    token_shared: str
    client: TestClient
    settings: ApiSettings
    pool: ConnectionPool
    smtp: RecordingHandler
    receiver: ChatAndSmsReceiver
    opened: list[tuple[Dispatcher, Any]] = field(default_factory=list)

    def post(self, payload: Any, token: str | None) -> Any:
        headers = {} if token is None else bearer(token)
        return self.client.post("/v1/alerts/grafana", json=payload, headers=headers)

    def route(self, key: str, **spec: Any) -> dict[str, Any]:
        answer = self.client.post("/v1/alert-routes", json=spec, headers=bearer(key))
        assert answer.status_code == 201, answer.text
        body: dict[str, Any] = answer.json()
        return body

    def dispatcher(self, at: datetime) -> Dispatcher:
        """A dispatcher as the app builds it, on a clock fixed at ``at``."""
        dispatcher, client = open_dispatcher(self.settings, self.pool)
        dispatcher.clock = lambda: at
        self.opened.append((dispatcher, client))
        return dispatcher

    def close(self) -> None:
        for dispatcher, client in self.opened:
            dispatcher.close()
            client.close()

    def rows(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()


def _settings(dsn: str, smtp_port: int, **overrides: Any) -> ApiSettings:
    values: dict[str, Any] = {
        "registry_dsn": dsn,
        "store_kind": "influxdb",  # no store is queried here
        "notify_dispatcher": False,
        "notify_allow_http": True,
        "notify_allow_private": True,
        "notify_backoff_s": 60.0,
        "notify_max_attempts": 3,
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp_port,
        "smtp_security": "none",
        "smtp_from": "Ironlink alerts <alerts@ironlink.test>",
    }
    return ApiSettings(**{**values, **overrides})


@pytest.fixture
def world(
    postgres_dsn: str, smtp_server: tuple[int, RecordingHandler], receiver: ChatAndSmsReceiver
) -> Iterator[World]:
    """Tenants A (sites s1, s2) and B (site s1), both in the shared org; each with its own webhook
    source, plus the shared org's source."""
    a, b = unique_tenant("a"), unique_tenant("b")
    seed_registry(
        postgres_dsn, {a: {"s1": {"m1": "cnc_mill"}, "s2": {"m2": "cnc_mill"}}, b: {"s1": {"m1": "cnc_mill"}}}
    )
    tokens = {name: f"{name}-{uuid.uuid4().hex}{uuid.uuid4().hex}" for name in ("a", "b", "shared")}
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        alerts.upsert_webhook_source(
            conn, alerts.tenant_source_id(a), tokens["a"], tenant_id=a, actor="tests"
        )
        alerts.upsert_webhook_source(
            conn, alerts.tenant_source_id(b), tokens["b"], tenant_id=b, actor="tests"
        )
        alerts.upsert_webhook_source(
            conn, alerts.SHARED_SOURCE_ID, tokens["shared"], tenant_id=None, actor="tests"
        )
    settings = _settings(postgres_dsn, smtp_server[0])
    pool = ConnectionPool(postgres_dsn, min_size=1, max_size=4, kwargs={"autocommit": True}, open=False)
    with TestClient(create_app(settings, pool=pool)) as client:
        world = World(
            postgres_dsn,
            a,
            b,
            new_key(postgres_dsn, a),
            new_key(postgres_dsn, b),
            tokens["a"],
            tokens["b"],
            tokens["shared"],
            client,
            settings,
            pool,
            smtp_server[1],
            receiver,
        )
        yield world
        world.close()


def grafana_alert(
    tenant: str | None,
    *,
    site: str = "s1",
    machine: str = "m1",
    severity: str = "critical",
    status: str = "firing",
    fingerprint: str | None = None,
    starts: datetime = NOW - timedelta(minutes=5),
) -> dict[str, Any]:
    """One alert as Grafana's webhook contact point sends it (the documented payload)."""
    labels = {
        "alertname": "CNC mill: machine in fault",
        "grafana_folder": "Telemetry",
        "severity": severity,
        "site_id": site,
        "machine_id": machine,
        "machine_type": "cnc_mill",
    }
    if tenant is not None:
        labels["tenant"] = tenant
    return {
        "status": status,
        "labels": labels,
        "annotations": {"summary": f"{site}/{machine} reports status fault"},
        "startsAt": starts.isoformat(),
        "endsAt": (NOW if status == "resolved" else datetime(1, 1, 1, tzinfo=UTC)).isoformat(),
        "generatorURL": "https://grafana.example/alerting/grafana/abc/view",
        "fingerprint": fingerprint or uuid.uuid4().hex[:16],
        "silenceURL": "https://grafana.example/alerting/silence/new",
        "dashboardURL": "",
        "panelURL": "",
        "values": {"A": 2.0, "B": 1},
    }


def grafana_payload(*alerts_: dict[str, Any]) -> dict[str, Any]:
    return {
        "receiver": "ironlink-api",
        "status": "firing",
        "orgId": 1,
        "alerts": list(alerts_),
        "groupLabels": {"alertname": alerts_[0]["labels"]["alertname"]},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "https://grafana.example/",
        "version": "1",
        "groupKey": '{}:{alertname="CNC mill: machine in fault"}',
        "truncatedAlerts": 0,
        "title": "[FIRING:1] CNC mill: machine in fault",
        "state": "alerting",
        "message": "**Firing**",
    }


# -------------------------------------------------------------------------------------- tests
def test_an_alert_posted_twice_is_stored_once_routed_by_its_tenant_and_delivered(world: World) -> None:
    url = world.receiver.url
    world.route(
        world.key_a,
        name="s1 critical",
        site_id="s1",
        severities=["critical"],
        channel="email",
        target="ops@a.example, night@a.example",
    )
    world.route(world.key_a, name="everything to slack", channel="slack", target=f"{url}/slack/a")
    world.route(world.key_a, name="s2 only", site_id="s2", channel="webhook", target=f"{url}/sms/a-s2")
    world.route(world.key_b, name="b to teams", channel="teams", target=f"{url}/teams/b")
    payload = grafana_payload(
        grafana_alert(world.a), grafana_alert(world.a, machine="m1", severity="warning")
    )

    first, again = world.post(payload, world.token_a), world.post(payload, world.token_a)
    assert first.status_code == 200, first.text
    assert first.json() == {"stored": 2, "duplicates": 0, "deliveries": 3}  # email once, slack twice
    assert again.json() == {"stored": 0, "duplicates": 2, "deliveries": 0}
    assert world.rows("SELECT count(*) FROM alert_events") == [(2,)]

    assert world.dispatcher(datetime.now(UTC)).run_once() == 3
    (mail,) = world.smtp.envelopes
    assert sorted(mail.rcpt_tos) == ["night@a.example", "ops@a.example"]
    content = mail.content.decode() if isinstance(mail.content, bytes) else str(mail.content)
    assert (
        "Subject: [FIRING] CNC mill: machine in fault" in content and "s1/m1 reports status fault" in content
    )
    slack = world.receiver.on("/slack/a")
    assert len(slack) == 2 and all(item.body["text"].startswith("[FIRING]") for item in slack)
    assert {block["type"] for block in slack[0].body["blocks"]} >= {"header", "section"}
    assert world.receiver.on("/sms/a-s2") == [] and world.receiver.on("/teams/b") == []
    assert world.rows("SELECT status, attempt, count(*) FROM alert_deliveries GROUP BY 1, 2") == [
        ("delivered", 1, 3)
    ]
    assert world.rows("SELECT count(*) FROM alert_deliveries WHERE tenant_id = %s", world.b) == [(0,)]


def test_a_failed_delivery_is_retried_after_its_backoff_and_every_attempt_is_recorded(world: World) -> None:
    url = world.receiver.url
    world.receiver.scripts["/sms/a"] = [503]
    world.receiver.scripts["/teams/a"] = [400]
    with psycopg.connect(world.dsn, autocommit=True) as conn:
        spec = alerts.RouteSpec(
            name="sms",
            channel="webhook",
            target=f"{url}/sms/a",
            authorization=SecretStr("Bearer sms-provider-key"),
        )
        alerts.create_route(conn, world.a, spec, actor="tests")
    world.route(world.key_a, name="teams", channel="teams", target=f"{url}/teams/a")
    assert world.post(grafana_payload(grafana_alert(world.a)), world.token_a).json()["deliveries"] == 2

    t0 = datetime.now(UTC)
    assert world.dispatcher(t0).run_once() == 2
    assert world.dispatcher(t0 + timedelta(seconds=59)).run_once() == 0  # the retry is not due yet
    assert world.dispatcher(t0 + timedelta(seconds=61)).run_once() == 1

    (event_id,) = world.rows("SELECT id FROM alert_events")[0]
    detail = world.client.get(f"/v1/alerts/{event_id}", headers=bearer(world.key_a)).json()
    attempts = [(d["channel"], d["attempt"], d["status"]) for d in detail["deliveries"]]
    assert attempts == [("webhook", 1, "failed"), ("teams", 1, "failed"), ("webhook", 2, "delivered")]
    sms_failure, teams_failure = detail["deliveries"][0], detail["deliveries"][1]
    assert sms_failure["error"].startswith("HTTP 503") and sms_failure["next_retry_at"] is not None
    assert datetime.fromisoformat(sms_failure["next_retry_at"]) == t0 + timedelta(seconds=60)
    assert teams_failure["error"].startswith("HTTP 400") and teams_failure["next_retry_at"] is None  # final
    assert "/sms/a" not in detail["deliveries"][0]["target"]  # the URL's secret path is not shown

    sms = world.receiver.on("/sms/a")
    assert len(sms) == 2 and sms[1].headers["Authorization"] == "Bearer sms-provider-key"
    assert sms[1].body["schema"] == "ironlink.alert.v1" and sms[1].body["tenant_id"] == world.a
    (teams,) = world.receiver.on("/teams/a")
    assert teams.body["type"] == "message"
    assert teams.body["attachments"][0]["contentType"] == "application/vnd.microsoft.card.adaptive"


def test_retries_stop_after_the_last_attempt(world: World) -> None:
    world.receiver.scripts["/down"] = [500, 500, 500, 500]
    world.route(world.key_a, name="down", channel="slack", target=f"{world.receiver.url}/down")
    world.post(grafana_payload(grafana_alert(world.a)), world.token_a)
    t0 = datetime.now(UTC)
    for hours in range(5):
        world.dispatcher(t0 + timedelta(hours=hours)).run_once()
    assert world.rows("SELECT attempt, status, next_retry_at IS NULL FROM alert_deliveries ORDER BY id") == [
        (1, "failed", False),
        (2, "failed", False),
        (3, "failed", True),
    ]
    assert len(world.receiver.on("/down")) == 3


def test_pending_deliveries_survive_a_restart_and_an_interrupted_send_is_retried(world: World) -> None:
    world.route(world.key_a, name="mail", channel="email", target="ops@a.example")
    world.post(grafana_payload(grafana_alert(world.a), grafana_alert(world.a, machine="m9")), world.token_a)
    t0 = datetime.now(UTC)
    with psycopg.connect(world.dsn, autocommit=True) as conn:  # a dispatcher claims one and dies
        (claimed,) = alerts.claim_due(conn, now=t0, limit=1)

    restarted = world.dispatcher(t0 + timedelta(seconds=1))
    assert restarted.run_once() == 1  # the other one, still pending
    assert restarted.run_once() == 0  # the claimed one is within its lease
    after_lease = world.dispatcher(t0 + timedelta(seconds=world.settings.notify_lease_s + 1))
    after_lease.run_once()  # fails the stale claim, queues attempt 2 after the backoff
    world.dispatcher(t0 + timedelta(seconds=world.settings.notify_lease_s + 62)).run_once()

    rows = world.rows(
        "SELECT attempt, status, error FROM alert_deliveries WHERE event_id = %s ORDER BY id",
        claimed.event.id,
    )
    assert rows == [(1, "failed", alerts.INTERRUPTED), (2, "delivered", None)]
    assert len(world.smtp.envelopes) == 2


def test_the_running_app_dispatches_by_itself(
    postgres_dsn: str, smtp_server: tuple[int, RecordingHandler]
) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    seed_registry(postgres_dsn, {tenant: {"s1": {"m1": "cnc_mill"}}})
    token = uuid.uuid4().hex * 2
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        alerts.upsert_webhook_source(conn, "grafana-own", token, tenant_id=tenant, actor="tests")
        alerts.create_route(
            conn, tenant, alerts.RouteSpec(name="m", channel="email", target="o@t.example"), actor="t"
        )
    settings = _settings(postgres_dsn, smtp_server[0], notify_dispatcher=True, notify_poll_s=0.2)
    pool = ConnectionPool(postgres_dsn, min_size=1, max_size=4, kwargs={"autocommit": True}, open=False)
    with TestClient(create_app(settings, pool=pool)) as client:
        answer = client.post(
            "/v1/alerts/grafana", json=grafana_payload(grafana_alert(tenant)), headers=bearer(token)
        )
        assert answer.json()["deliveries"] == 1
        deadline = time.monotonic() + 30  # a wait for the thread, not a measure of its speed
        while not smtp_server[1].envelopes and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [e.rcpt_tos for e in smtp_server[1].envelopes] == [["o@t.example"]]


def test_a_source_speaks_only_for_its_tenant_and_the_shared_one_for_shared_org_tenants(world: World) -> None:
    world.route(world.key_b, name="b", channel="slack", target=f"{world.receiver.url}/b")
    forged = world.post(grafana_payload(grafana_alert(world.b)), world.token_a)
    assert forged.status_code == 403
    assert (
        forged.json()["detail"].startswith("alerts[0].labels.tenant:") and world.b in forged.json()["detail"]
    )

    unlabelled = grafana_alert(None)
    assert world.post(grafana_payload(unlabelled), world.token_a).json()["stored"] == 1  # its own tenant's
    missing = world.post(grafana_payload(grafana_alert(None)), world.token_shared)
    assert missing.status_code == 422 and "alerts[0].labels.tenant: is required" in missing.json()["detail"]
    assert world.post(grafana_payload(grafana_alert(world.b)), world.token_shared).json()["stored"] == 1
    with psycopg.connect(world.dsn, autocommit=True) as conn:
        conn.execute("UPDATE tenants SET isolation = 2 WHERE id = %s", (world.b,))
    own_org = world.post(grafana_payload(grafana_alert(world.b)), world.token_shared)
    assert own_org.status_code == 403 and "is not a tenant of the shared org" in own_org.json()["detail"]

    assert world.rows("SELECT tenant_id, source_id FROM alert_events ORDER BY id") == [
        (world.a, alerts.tenant_source_id(world.a)),
        (world.b, alerts.SHARED_SOURCE_ID),
    ]


def test_another_tenants_alerts_and_routes_are_never_reached(world: World) -> None:
    b_route = world.route(world.key_b, name="b", channel="email", target="ops@b.example")
    world.post(grafana_payload(grafana_alert(world.b)), world.token_b)
    (b_event,) = world.rows("SELECT id FROM alert_events WHERE tenant_id = %s", world.b)[0]
    key = bearer(world.key_a)
    assert world.client.get("/v1/alert-routes", headers=key).json() == []
    for method in ("GET", "PUT", "DELETE"):
        body = {"name": "x", "channel": "email", "target": "x@a.example"} if method == "PUT" else None
        answer = world.client.request(method, f"/v1/alert-routes/{b_route['id']}", json=body, headers=key)
        assert answer.status_code == 404, (method, answer.text)
    assert world.client.get(f"/v1/alerts/{b_event}", headers=key).status_code == 404
    window = {"from": (NOW - timedelta(days=1)).isoformat(), "to": (NOW + timedelta(days=1)).isoformat()}
    assert world.client.get("/v1/alerts", params=window, headers=key).json() == {"items": [], "next": None}
    assert world.rows("SELECT count(*) FROM alert_routes WHERE tenant_id = %s", world.b) == [(1,)]


def test_history_pages_through_a_bounded_range_with_a_cursor(world: World) -> None:
    starts = [NOW - timedelta(minutes=m) for m in (30, 20, 10)]
    world.post(
        grafana_payload(*(grafana_alert(world.a, starts=s, machine=f"m{i}") for i, s in enumerate(starts))),
        world.token_a,
    )
    key, window = bearer(world.key_a), {"from": (NOW - timedelta(hours=1)).isoformat(), "to": NOW.isoformat()}
    first = world.client.get("/v1/alerts", params={**window, "limit": 2}, headers=key).json()
    assert [datetime.fromisoformat(item["starts_at"]) for item in first["items"]] == starts[:2]
    second = world.client.get(
        "/v1/alerts", params={**window, "limit": 2, "cursor": first["next"]}, headers=key
    ).json()
    assert [datetime.fromisoformat(item["starts_at"]) for item in second["items"]] == starts[2:]
    assert second["next"] is None
    site_key = new_key(world.dsn, world.a, "s2")
    assert world.client.get("/v1/alerts", params=window, headers=bearer(site_key)).json()["items"] == []

    too_long = world.client.get(
        "/v1/alerts", params={"from": "2020-01-01T00:00:00Z", "to": "2022-01-01T00:00:00Z"}, headers=key
    )
    assert too_long.status_code == 422 and too_long.json()["detail"].startswith("to:")
    missing = world.client.get("/v1/alerts", params={"to": NOW.isoformat()}, headers=key)
    assert missing.status_code == 422 and "from" in missing.json()["detail"]
    bad_cursor = world.client.get("/v1/alerts", params={**window, "cursor": "nope"}, headers=key)
    assert bad_cursor.status_code == 422 and bad_cursor.json()["detail"].startswith("cursor:")
    assert world.client.get("/v1/alerts", params=window).status_code == 401


def test_bad_payloads_are_refused_naming_the_field(world: World) -> None:
    alert = grafana_alert(world.a)
    del alert["startsAt"]
    broken = grafana_payload(alert, {**grafana_alert(world.a), "status": "exploded"})
    answer = world.post(broken, world.token_a)
    assert answer.status_code == 422
    parameters = {problem["parameter"] for problem in answer.json()["errors"]}
    assert {"alerts.0.startsAt", "alerts.1.status"} <= parameters
    no_alerts = world.post({**grafana_payload(grafana_alert(world.a)), "alerts": []}, world.token_a)
    assert no_alerts.status_code == 422 and no_alerts.json()["errors"][0]["parameter"] == "alerts"
    naive = world.post(
        grafana_payload({**grafana_alert(world.a), "startsAt": "2026-01-01T00:00:00"}), world.token_a
    )
    assert naive.status_code == 422 and naive.json()["errors"][0]["parameter"] == "alerts.0.startsAt"
    not_json = world.client.post("/v1/alerts/grafana", content=b"{nope", headers=bearer(world.token_a))
    assert not_json.status_code == 422 and not_json.json()["detail"].startswith("body:")
    huge = world.client.post(
        "/v1/alerts/grafana",
        content=b" " * (world.settings.alert_webhook_max_bytes + 1),
        headers=bearer(world.token_a),
    )
    assert huge.status_code == 413
    flood = world.post(grafana_payload(*[grafana_alert(world.a)] * 1001), world.token_a)
    assert flood.status_code == 422 and flood.json()["errors"][0]["parameter"] == "alerts"
    assert len(flood.content) < 2000  # the refused list is named, not echoed
    nested = world.client.post("/v1/alerts/grafana", content=b"[" * 100_000, headers=bearer(world.token_a))
    assert nested.status_code == 422 and nested.json()["detail"].startswith("body:")
    assert world.post(grafana_payload(grafana_alert(world.a)), None).status_code == 401
    assert world.post(grafana_payload(grafana_alert(world.a)), "x" * 40).status_code == 401
    assert world.rows("SELECT count(*) FROM alert_events") == [(0,)]


def test_routes_are_edited_through_the_api_and_refused_naming_the_field(world: World) -> None:
    key = bearer(world.key_a)
    route = world.route(
        world.key_a,
        name="night",
        channel="email",
        target="ops@a.example",
        time_zone="Europe/Berlin",
        hours=[{"days": ["mon", "tue"], "start": "22:00", "end": "24:00"}],
    )
    replaced = world.client.put(
        f"/v1/alert-routes/{route['id']}",
        headers=key,
        json={"name": "night", "channel": "email", "target": "ops@a.example", "enabled": False},
    )
    assert (
        replaced.status_code == 200
        and replaced.json()["enabled"] is False
        and replaced.json()["hours"] is None
    )
    assert [r["id"] for r in world.client.get("/v1/alert-routes", headers=key).json()] == [route["id"]]
    duplicate = world.client.post(
        "/v1/alert-routes", headers=key, json={"name": "night", "channel": "email", "target": "x@a.example"}
    )
    assert duplicate.status_code == 409 and "name" in duplicate.json()["detail"]
    bad = world.client.post(
        "/v1/alert-routes",
        headers=key,
        json={
            "name": "bad",
            "channel": "email",
            "target": "not-an-address",
            "time_zone": "Mars/Olympus",
            "hours": [{"days": ["mon"], "start": "18:00", "end": "08:00"}],
            "severities": ["apocalyptic"],
        },
    )
    assert bad.status_code == 422
    detail = bad.json()["detail"]
    for named in ("time_zone", "hours.0", "severities.0"):
        assert named in detail, (named, detail)
    assert (
        world.client.post(
            "/v1/alert-routes", headers=key, json={"name": "s", "channel": "slack", "target": "not a url"}
        )
        .json()["detail"]
        .count("target")
        == 1
    )
    unknown_site = world.client.post(
        "/v1/alert-routes",
        headers=key,
        json={"name": "x", "site_id": "nowhere", "channel": "email", "target": "o@a.example"},
    )
    assert unknown_site.status_code == 422 and "site_id" in unknown_site.json()["detail"]
    site_key = bearer(new_key(world.dsn, world.a, "s1"))
    wider = world.client.post(
        "/v1/alert-routes",
        headers=site_key,
        json={"name": "all", "channel": "email", "target": "o@a.example"},
    )
    assert wider.status_code == 403 and wider.json()["detail"].startswith("site_id:")
    assert (
        world.client.get("/v1/alert-routes", headers=site_key).json() == []
    )  # the tenant-wide route is not its
    assert world.client.delete(f"/v1/alert-routes/{route['id']}", headers=key).status_code == 204
    actions = [event.action for event in audit_events_of(world)]
    assert actions == ["alert_route.created", "alert_route.updated", "alert_route.removed"]


def audit_events_of(world: World) -> list[Any]:
    with psycopg.connect(world.dsn, autocommit=True) as conn:
        return [e for e in audit_events(conn, tenant_id=world.a) if e.action.startswith("alert_route.")]


def test_route_matching_reads_hours_in_the_routes_time_zone() -> None:
    spec = alerts.RouteSpec(
        name="office",
        channel="email",
        target="o@a.example",
        time_zone="Europe/Berlin",
        hours=[alerts.parse_hours("mon-fri 08:00-18:00")],
        severities=["critical"],
    )
    route = alerts.Route(1, "a", spec, NOW, NOW)
    alert = alerts.NewAlertEvent(
        "a", "s", "f", "firing", NOW, None, "x", "critical", "s1", "m1", {}, {}, None, {}
    )
    monday_0730_utc = datetime(2026, 6, 1, 7, 30, tzinfo=UTC)  # 09:30 in Berlin (summer time)
    assert route.matches(alert, monday_0730_utc)
    assert not route.matches(alert, monday_0730_utc.replace(hour=16, minute=30))  # 18:30 in Berlin
    assert not route.matches(alert, datetime(2026, 6, 6, 9, 0, tzinfo=UTC))  # a Saturday
    assert not route.matches(
        alerts.NewAlertEvent(**{**alert.__dict__, "severity": "warning"}), monday_0730_utc
    )
    assert alerts.parse_hours("daily 22:00-24:00").days == list(alerts.DAYS)
    for bad in ("fri-mon 08:00-18:00", "mon 18:00-08:00", "someday 08:00-09:00", "mon"):
        with pytest.raises(ValueError):
            alerts.parse_hours(bad)


def test_a_webhook_source_is_kept_as_a_digest_written_idempotently_and_audited(world: World) -> None:
    source = alerts.tenant_source_id(world.a)
    with psycopg.connect(world.dsn, autocommit=True) as conn:
        assert not alerts.upsert_webhook_source(
            conn, source, world.token_a, tenant_id=world.a, actor="pulumi"
        )
        rotated = world.token_a[::-1]
        assert alerts.upsert_webhook_source(conn, source, rotated, tenant_id=world.a, actor="pulumi")
        stored = conn.execute("SELECT row_to_json(s)::text FROM alert_webhook_sources s").fetchall()
        trail = json.dumps([e.details for e in audit_events(conn) if e.action.startswith("alert_source.")])
        with pytest.raises(alerts.RegistryError, match=r"token: must be 32"):
            alerts.upsert_webhook_source(conn, source, "short", tenant_id=world.a, actor="pulumi")
        assert alerts.delete_webhook_source(conn, source, actor="pulumi")
    assert all(world.token_a not in row[0] and rotated not in row[0] for row in stored)
    assert world.token_a not in trail and rotated not in trail and '"token_rotated": true' in trail
    assert world.post(grafana_payload(grafana_alert(world.a)), rotated).status_code == 401  # removed


def test_the_cli_adds_lists_and_removes_routes_and_names_every_bad_flag(world: World) -> None:
    runner, registry = CliRunner(), ["--registry", world.dsn]
    added = runner.invoke(
        cli,
        [
            "alerts",
            "route",
            "add",
            *registry,
            "--tenant",
            world.a,
            "--name",
            "on call",
            "--channel",
            "webhook",
            "--target",
            "https://sms.example/send",
            "--site",
            "s1",
            "--severity",
            "critical",
            "--hours",
            "mon-fri 08:00-18:00",
            "--tz",
            "Europe/Berlin",
            "--authorization-env",
            "SMS_KEY",
            "--json",
        ],
        env={"SMS_KEY": "Bearer k"},
    )
    assert added.exit_code == 0, added.output
    route_id = json.loads(added.output)["id"]
    listed = runner.invoke(cli, ["alerts", "route", "list", *registry, "--tenant", world.a, "--json"])
    (route,) = json.loads(listed.output)
    assert route["authorization"] is True and route["hours"][0]["days"] == ["mon", "tue", "wed", "thu", "fri"]
    assert "Bearer k" not in listed.output and "/send" not in listed.output
    bad = runner.invoke(
        cli,
        [
            "alerts",
            "route",
            "add",
            *registry,
            "--tenant",
            "Not A Tenant",
            "--name",
            "x",
            "--channel",
            "pager",
            "--target",
            "t",
            "--hours",
            "someday",
            "--tz",
            "Nowhere/City",
        ],
    )
    assert bad.exit_code == 2
    for flag in ("--tenant", "--hours", "--channel", "--tz"):
        assert flag in bad.output, (flag, bad.output)
    removed = runner.invoke(cli, ["alerts", "route", "remove", str(route_id), *registry, "--tenant", world.a])
    assert removed.exit_code == 0 and world.rows("SELECT count(*) FROM alert_routes") == [(0,)]


@pytest.mark.xdist_group("postgres-cluster-roles")  # roles are the server's, not a database's
def test_the_brokers_role_cannot_read_alert_tokens_routes_or_history(postgres_dsn: str) -> None:
    with broker_role_reading_every_table(postgres_dsn) as (owner, readable):
        assert owner.execute(readable, (EMQX_ROLE, "mqtt_acl")).fetchone() == (True,)
        for table in ("alert_webhook_sources", "alert_routes", "alert_events", "alert_deliveries"):
            assert owner.execute(readable, (EMQX_ROLE, table)).fetchone() == (False,), table


def test_targets_must_be_https_on_public_addresses_unless_allowed() -> None:
    for url, allow_http, why in (
        ("http://hooks.example/x", False, "https only"),
        ("https://127.0.0.1/hook", False, "not a public address"),
        ("http://10.0.0.7/sms", True, "not a public address"),
    ):
        with pytest.raises(DeliveryFailed, match=why) as refused:
            check_destination(url, allow_http=allow_http, allow_private=False)
        assert not refused.value.retryable, url
    check_destination("http://127.0.0.1:9/x", allow_http=True, allow_private=True)  # tests, dev
