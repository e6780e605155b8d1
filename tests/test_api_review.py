"""Defects a hostile review of the API found, each proven against the real PostgreSQL and
VictoriaMetrics the tests start (the DNS-rebinding case: the real httpx client and a real HTTP
receiver on loopback, with the resolver answering as a rebinding DNS server would)."""

from __future__ import annotations

import email
import email.policy
import http.server
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import httpx
import psycopg
import pytest
import uvicorn
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool
from pydantic import SecretStr
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from api.__main__ import server_config
from api.alerts import open_dispatcher
from api.app import create_app
from api.notify.dispatcher import Senders
from api.notify.errors import DeliveryFailed
from api.settings import ApiSettings
from localdev.servers import free_port
from registry import alerts
from tests.api_harness import (
    T0,
    TwoTenants,
    api_client,
    bearer,
    iso,
    new_key,
    sample,
    seed_registry,
    smtp_server,
    unique_tenant,
    write_points,
)

pytestmark = pytest.mark.integration


@dataclass
class World(TwoTenants):
    key_a: str
    key_b: str


@pytest.fixture
def world(postgres_dsn: str, victoria_metrics: str) -> World:
    """Tenants A and B, each with machine ``m1`` in site ``s1``; A's ran 600 s at 1 point/s."""
    a, b = unique_tenant("a"), unique_tenant("b")
    seed_registry(postgres_dsn, {a: {"s1": {"m1": "cnc_mill"}}, b: {"s1": {"m1": "cnc_mill"}}})
    write_points(
        victoria_metrics,
        [sample(a, "s1", "m1", T0 + i, {"spindle_temp_c": 1.0, "power_kw": 5.0}) for i in range(1, 601)],
    )
    return World(postgres_dsn, victoria_metrics, a, b, new_key(postgres_dsn, a), new_key(postgres_dsn, b))


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    with api_client(world.dsn, world.vm) as test_client:
        yield test_client


# ------------------------------------------------------------------------------------- bodies
def test_a_json_body_is_bounded_before_the_key_is_even_checked(client: TestClient) -> None:
    """FastAPI reads a route's whole body before its dependencies run: without a bound, anyone
    (no key needed) could make a replica buffer any number of bytes."""
    huge = b'{"title": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    for path in ("/v1/maintenance", "/v1/alert-routes"):
        answer = client.post(path, content=huge, headers={"Content-Type": "application/json"})
        assert answer.status_code == 413, (path, answer.status_code)
        assert answer.json()["code"] == "payload_too_large"
    chunked = client.post(
        "/v1/maintenance",
        content=iter([b'{"title": "', b"x" * (3 * 1024 * 1024), b'"}']),
        headers={"Content-Type": "application/json"},
    )
    assert chunked.status_code == 413
    small = client.post("/v1/maintenance", json={"title": "t"})
    assert small.status_code == 401  # a small body goes on to the key check


# ------------------------------------------------------------------------------------- SSRF
class _Receiver(http.server.BaseHTTPRequestHandler):
    posts: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        _Receiver.posts.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        return


def test_a_webhook_target_cannot_rebind_to_a_private_address_after_the_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rebinding DNS server answers the check with a public address and the connection with
    loopback: the address checked must be the address connected to."""
    port = free_port()
    receiver = http.server.HTTPServer(("127.0.0.1", port), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    _Receiver.posts.clear()
    real = socket.getaddrinfo
    answers = iter(["93.184.215.14"] + ["127.0.0.1"] * 20)  # public first, then loopback

    def rebinding(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "hooks.example.test":
            return real(host, *args, **kwargs)
        address = next(answers)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://hooks.example.test:{port}/hook"
    now = datetime.now(UTC)
    event = alerts.AlertEvent(
        "t1", "grafana-t1", "fp", "firing", now, None, "Hot", "critical", "s1", "m1", {}, {}, None, {}, 1, now
    )
    spec = alerts.RouteSpec(name="sms", channel="webhook", target=url)
    delivery = alerts.Delivery(1, 1, "t1", 1, "webhook", url, 1, "sending", now, now, None, None, None)
    due = alerts.DueDelivery(delivery, event, alerts.Route(1, "t1", spec, now, now))
    try:
        with httpx.Client(timeout=2, follow_redirects=False) as client:
            senders = Senders(smtp=None, http=client, allow_http=True, allow_private=False)
            with pytest.raises(DeliveryFailed):
                senders.send(due)
    finally:
        receiver.shutdown()
    assert _Receiver.posts == []


# ------------------------------------------------------------------------------------- errors
def test_a_store_failure_is_a_502_that_names_no_internal_address(world: World) -> None:
    """The store's URL, its port and its error text are the platform's, not the caller's."""
    dead = f"http://127.0.0.1:{free_port()}"
    with api_client(world.dsn, dead) as client:
        answers = [
            client.get("/v1/machines/m1", headers=bearer(world.key_a)),
            client.get("/v1/machines", headers=bearer(world.key_a)),
            client.get(
                "/v1/machines/m1/series",
                params={"from": iso(T0), "to": iso(T0 + 600)},
                headers=bearer(world.key_a),
            ),
            client.get(
                "/v1/uptime", params={"from": iso(T0), "to": iso(T0 + 600)}, headers=bearer(world.key_a)
            ),
        ]
    for answer in answers:
        assert answer.status_code == 502 and answer.json()["code"] == "store_unavailable"
        assert dead.removeprefix("http://") not in answer.text and "Errno" not in answer.text, answer.text


# ------------------------------------------------------------------------------------ times
def _grafana(tenant: str, starts_at: str, ends_at: str = "0001-01-01T00:00:00Z") -> dict[str, Any]:
    alert = {
        "status": "firing",
        "labels": {"alertname": "Hot", "tenant": tenant, "site_id": "s1", "severity": "critical"},
        "startsAt": starts_at,
        "endsAt": ends_at,
        "fingerprint": uuid.uuid4().hex[:16],
    }
    return {"receiver": "ironlink", "status": "firing", "orgId": 1, "alerts": [alert]}


def test_an_alert_time_the_registry_cannot_give_back_is_refused_not_stored(
    world: World, client: TestClient
) -> None:
    """PostgreSQL stores 1 BC and 10000 AD, psycopg cannot read them back: such an event, once
    stored, failed every read of it, and the dispatcher's claim of its delivery failed every
    round, holding up every tenant's notifications behind it."""
    token = uuid.uuid4().hex * 2
    with psycopg.connect(world.dsn, autocommit=True) as conn:
        alerts.upsert_webhook_source(conn, f"grafana-{world.a}", token, tenant_id=world.a, actor="tests")
        alerts.create_route(
            conn,
            world.a,
            alerts.RouteSpec(name="sms", channel="webhook", target="https://hooks.example.test/x"),
            actor="tests",
        )
    for starts_at in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:00:00-05:00"):
        answer = client.post("/v1/alerts/grafana", json=_grafana(world.a, starts_at), headers=bearer(token))
        assert answer.status_code == 422, (starts_at, answer.text)
        assert "alerts.0.startsAt" in answer.json()["detail"]
    late_end = _grafana(world.a, iso(T0), "9999-12-31T23:00:00-05:00")
    late_end["alerts"][0]["status"] = "resolved"
    answer = client.post("/v1/alerts/grafana", json=late_end, headers=bearer(token))
    assert answer.status_code == 422 and "alerts.0.endsAt" in answer.json()["detail"]
    with psycopg.connect(world.dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM alert_events").fetchone() == (0,)
    fine = client.post("/v1/alerts/grafana", json=_grafana(world.a, iso(T0)), headers=bearer(token))
    assert fine.status_code == 200 and fine.json()["stored"] == 1


def test_times_at_the_edges_of_the_calendar_are_422_naming_the_parameter(
    world: World, client: TestClient
) -> None:
    """Each of these was a 500: an OverflowError in the handler, or psycopg failing to read back
    what PostgreSQL stored (an entry of 1 BC), or a store asked for times before 1970."""
    late = {"from": "9999-01-01T00:00:00Z", "to": "9999-01-02T00:00:00Z"}
    early = {"from": "1000-01-01T00:00:00Z", "to": "1000-01-02T00:00:00Z"}
    refused = {
        "from": client.get(
            "/v1/machines/m1/series", params={**late, "step": 86400}, headers=bearer(world.key_a)
        ),
        "to": client.get(
            "/v1/machines/m1/series",
            params={"from": iso(T0), "to": "9999-12-31T23:59:59-05:00"},
            headers=bearer(world.key_a),
        ),
    }
    refused_too = [
        ("from", client.get("/v1/uptime", params=early, headers=bearer(world.key_a))),
        (
            "from",
            client.get(
                "/v1/usage",
                params={"from": "9999-12-31T00:00:00Z", "to": "9999-12-31T23:00:00Z", "period": "day"},
                headers=bearer(world.key_a),
            ),
        ),
        (
            "occurred_at",
            client.post(
                "/v1/maintenance",
                json={
                    "site_id": "s1",
                    "machine_id": "m1",
                    "kind": "note",
                    "title": "t",
                    "occurred_at": "0001-01-01T00:00:00+01:00",
                },
                headers=bearer(world.key_a),
            ),
        ),
    ]
    for name, answer in [*refused.items(), *refused_too]:
        assert answer.status_code == 422, (name, answer.status_code, answer.text)
        assert answer.json()["detail"].startswith(name), answer.text
    with psycopg.connect(world.dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM maintenance_entries").fetchone() == (0,)


def test_an_alert_cursor_holding_an_endless_number_is_422(world: World, client: TestClient) -> None:
    import base64

    cursor = base64.urlsafe_b64encode(b'["2026-01-01T00:00:00+00:00", 1e400]').decode()
    answer = client.get(
        "/v1/alerts",
        params={"from": iso(T0), "to": iso(T0 + 3600), "cursor": cursor},
        headers=bearer(world.key_a),
    )
    assert answer.status_code == 422 and answer.json()["detail"].startswith("cursor"), answer.text


# ------------------------------------------------------------------------------- rate limits
def test_a_scan_is_charged_in_full_however_large(world: World) -> None:
    """The bucket used to stop at one bucket below zero: a request scanning any number of points
    cost at most twice the burst. Now the debt is what was scanned, and the wait says so."""
    with api_client(world.dsn, world.vm, rate_burst_points=100, rate_points_per_second=1.0) as client:
        scanned = client.get(
            "/v1/machines/m1/series",
            params={"from": iso(T0), "to": iso(T0 + 600), "step": 1},
            headers=bearer(world.key_a),
        )
        assert scanned.status_code == 200 and scanned.json()["points_scanned"] == 1800
        refused = client.get("/v1/sites", headers=bearer(world.key_a))
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1800 - 100  # the scan's points past the burst, at 1/s


def test_a_machine_page_is_charged_for_every_machine_the_store_read(
    postgres_dsn: str, victoria_metrics: str
) -> None:
    """The latest status is read for the whole tenant (or site) whatever the page size: a page
    of 1 read 40 machines and cost 1."""
    tenant = unique_tenant("c")
    machines = {f"m{i:02d}": "cnc_mill" for i in range(40)}
    seed_registry(postgres_dsn, {tenant: {"s1": machines}})
    write_points(victoria_metrics, [sample(tenant, "s1", m, T0 + 1, {"power_kw": 1.0}) for m in machines])
    key = new_key(postgres_dsn, tenant)
    with api_client(
        postgres_dsn, victoria_metrics, rate_burst_points=1000, rate_points_per_second=0.001
    ) as c:
        page = c.get("/v1/machines", params={"limit": 1}, headers=bearer(key))
    assert page.status_code == 200 and len(page.json()["machines"]) == 1
    assert int(page.headers["RateLimit-Remaining"]) <= 1000 - 1 - 40


def test_usage_refuses_a_from_that_is_a_whole_hour_only_in_its_own_offset(
    world: World, client: TestClient
) -> None:
    """Usage is counted per UTC hour: 00:00+05:30 is 18:30 UTC, whose hour was silently dropped."""
    answer = client.get(
        "/v1/usage",
        params={"from": "2026-01-01T00:00:00+05:30", "to": "2026-01-02T00:00:00Z"},
        headers=bearer(world.key_a),
    )
    assert answer.status_code == 422 and answer.json()["detail"].startswith("from"), answer.text
    whole = client.get(
        "/v1/usage",
        params={"from": "2026-01-01T01:00:00+01:00", "to": "2026-01-02T00:00:00Z"},
        headers=bearer(world.key_a),
    )
    assert whole.status_code == 200 and whole.json()["start"].startswith("2026-01-01T00:00:00")


# -------------------------------------------------------------------------------- live feed
def test_a_live_feed_message_over_its_bound_is_refused_before_it_is_buffered(world: World) -> None:
    """uvicorn's default hands the feed a 1 MiB message whole (the feed then says it is too
    large); ``python -m api``'s server refuses it in the WebSocket protocol (close 1009)."""
    big = "x" * (1024 * 1024)
    answers = []
    for configure in (_default_uvicorn, server_config):
        base = _serve(world, configure)
        with connect(f"{base}/v1/sites/s1/live", open_timeout=10) as ws:
            ws.send(big)
            try:
                answers.append(json.loads(ws.recv(timeout=15))["code"])
            except ConnectionClosed as closed:
                answers.append(closed.rcvd.code if closed.rcvd else None)
    assert answers == ["message_too_large", 1009]


def _default_uvicorn(settings: ApiSettings, app: Any) -> uvicorn.Config:
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level)


def _serve(world: World, configure: Any) -> str:
    settings = ApiSettings(
        registry_dsn=SecretStr(world.dsn),
        store_url=world.vm,
        notify_dispatcher=False,
        host="127.0.0.1",
        port=free_port(),
        log_level="warning",
    )
    pool = ConnectionPool(world.dsn, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False)
    server = uvicorn.Server(configure(settings, create_app(settings, pool=pool)))
    server.config.ws = "websockets"
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _SERVERS.append((server, thread))
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    return f"ws://127.0.0.1:{settings.port}"


_SERVERS: list[tuple[uvicorn.Server, threading.Thread]] = []


@pytest.fixture(autouse=True)
def _stop_servers() -> Iterator[None]:
    yield
    for server, thread in _SERVERS:
        server.should_exit = True
        thread.join(10)
    _SERVERS.clear()


# ---------------------------------------------------------------------------- notifications
def _alerting_client(world: World, smtp_port: int) -> Any:
    """The app with email to the real SMTP server, webhook targets on loopback allowed, and the
    dispatcher left to the test (``open_dispatcher``)."""
    return api_client(
        world.dsn,
        world.vm,
        notify_dispatcher=False,
        notify_allow_http=True,
        notify_allow_private=True,
        smtp_host="127.0.0.1",
        smtp_port=smtp_port,
        smtp_security="none",
        smtp_from="Ironlink alerts <alerts@ironlink.test>",
    )


def _source_token(world: World) -> str:
    token = uuid.uuid4().hex * 2
    with psycopg.connect(world.dsn, autocommit=True) as conn:
        alerts.upsert_webhook_source(
            conn, alerts.tenant_source_id(world.a), token, tenant_id=world.a, actor="tests"
        )
    return token


def test_an_alert_label_with_line_breaks_is_delivered_on_one_header_line(world: World) -> None:
    """A CR/LF in a label made the Subject header invalid: the SMTP sender raised ValueError,
    the attempt was retried until none were left, and the email never went out. Header values
    are now folded to one line (no header can be injected either)."""
    with smtp_server() as (port, smtp), _alerting_client(world, port) as client:
        route = {"name": "mail", "channel": "email", "target": "ops@a.example"}
        assert client.post("/v1/alert-routes", json=route, headers=bearer(world.key_a)).status_code == 201
        payload = _grafana(world.a, iso(T0))
        payload["alerts"][0]["labels"]["alertname"] = "Hot\r\nBcc: victim@evil.example\r\n\r\nbody"
        answer = client.post("/v1/alerts/grafana", json=payload, headers=bearer(_source_token(world)))
        assert answer.status_code == 200 and answer.json()["deliveries"] == 1, answer.text
        dispatcher, http_client = open_dispatcher(client.app.state.settings, client.app.state.pool)
        try:
            assert dispatcher.run_once() == 1
        finally:
            dispatcher.close()
            http_client.close()
    with psycopg.connect(world.dsn, autocommit=True) as conn:
        assert conn.execute("SELECT status, error FROM alert_deliveries").fetchall() == [("delivered", None)]
    (mail,) = smtp.envelopes
    assert mail.rcpt_tos == ["ops@a.example"]
    parsed = email.message_from_bytes(mail.original_content or b"", policy=email.policy.default)
    assert parsed["Subject"] == "[FIRING] Hot Bcc: victim@evil.example body — s1"
    assert parsed["Bcc"] is None


def test_a_site_key_sees_only_the_deliveries_of_its_own_sites_routes(world: World) -> None:
    """A site key reads its site's alerts; it used to see, with each, the deliveries of the
    tenant-wide routes too, their email addresses whole. It now sees what it can list in
    /v1/alert-routes: the deliveries of its site's routes; the tenant key sees them all."""
    site_key = new_key(world.dsn, world.a, "s1")
    with smtp_server() as (port, _smtp), _alerting_client(world, port) as client:
        tenant_wide = {"name": "board", "channel": "email", "target": "board@a.example"}
        site_route = {"name": "s1 floor", "site_id": "s1", "channel": "email", "target": "floor@a.example"}
        for key, route in ((world.key_a, tenant_wide), (site_key, site_route)):
            assert client.post("/v1/alert-routes", json=route, headers=bearer(key)).status_code == 201
        payload = _grafana(world.a, iso(T0))
        answer = client.post("/v1/alerts/grafana", json=payload, headers=bearer(_source_token(world)))
        assert answer.json()["deliveries"] == 2, answer.text
        (event,) = client.get(
            "/v1/alerts", params={"from": iso(T0 - 60), "to": iso(T0 + 60)}, headers=bearer(site_key)
        ).json()["items"]
        seen = {
            key: [
                d["target"]
                for d in client.get(f"/v1/alerts/{event['id']}", headers=bearer(key)).json()["deliveries"]
            ]
            for key in (site_key, world.key_a)
        }
    assert seen[site_key] == ["floor@a.example"]
    assert sorted(seen[world.key_a]) == ["board@a.example", "floor@a.example"]
