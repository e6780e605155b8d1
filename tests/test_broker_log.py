"""The brokers' authentication failures in the registry's audit trail (``provisioning.broker_log``).

The parser is fed lines a real Mosquitto 2.0.11 wrote here (``log_type`` error and notice,
``log_timestamp`` on, epoch and ISO stamps); then a real Mosquitto with its dynamic-security
plugin refuses a wrong password, an unknown user, a revoked device, a foreign certificate and a
missing one, and a flood, while the provisioning service follows its log file into a real
PostgreSQL: each refusal is a counted row with its reason, and the flood is a few rows with the
whole count.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from localdev import pki
from provisioning import broker_log
from registry.store import audit_events
from tests.conftest import MosquittoFactory
from tests.test_broker_isolation import (  # noqa: F401  (clients: a fixture, used by name)
    A_PRESS,
    DYNAMIC,
    Broker,
    Probe,
    clients,
    payload,
    start_broker,
)
from tests.test_provisioning import Api, make_api

pytestmark = pytest.mark.integration
TOKEN = "broker-log-test-token"
WAIT_S = 20.0
FLOOD = 150

# Written by Mosquitto 2.0.11 on this machine (see the module docstring of provisioning.broker_log).
RECORDED = """\
1764623764: New connection from 127.0.0.1:45073 on port 54039.
1764623764: Client <unknown> disconnected, not authorised.
1764623767: New connection from 127.0.0.1:43577 on port 54039.
1764623767: New client connected from 127.0.0.1:43577 as acme.p.m1 (p5, c1, k60, u'acme.p.m1').
1764623768: Client acme.p.m1 disconnected.
1764623768: New connection from 127.0.0.1:55849 on port 54039.
1764623768: Client cid-anon disconnected, not authorised.
2026-12-01T21:15:38: New connection from 127.0.0.1:53963 on port 42179.
2026-12-01T21:15:38: OpenSSL Error[0]: error:0A000086:SSL routines::certificate verify failed
2026-12-01T21:15:38: Client <unknown> disconnected: Protocol error.
2026-12-01T21:15:39: New connection from 127.0.0.1:60335 on port 42179.
2026-12-01T21:15:39: Client connection from 127.0.0.1 failed: error:0A0000C7:SSL routines::peer did not \
return a certificate.
1796160307: New connection from 127.0.0.1:55051 on port 53777.
1796160307: OpenSSL Error[0]: error:0A0000C7:SSL routines::peer did not return a certificate
1796160307: Client <unknown> disconnected: Protocol error.
2026-12-01T21:16:10: New connection from 127.0.0.1:60931 on port 34555.
2026-12-01T21:16:10: Client <unknown> disconnected: Protocol error.
"""


def test_the_parser_reads_what_mosquitto_2_0_11_logs_of_a_refused_connect() -> None:
    parser = broker_log.MosquittoLogParser()
    failures = [f for line in RECORDED.splitlines() if (f := parser.feed(line + "\n"))]
    assert [(f.reason, f.address, f.listener, f.client_id) for f in failures] == [
        ("not_authorised", "127.0.0.1", 54039, None),
        ("not_authorised", "127.0.0.1", 54039, "cid-anon"),
        ("tls_certificate_rejected", "127.0.0.1", 42179, None),
        ("tls_no_certificate", "127.0.0.1", 42179, None),
        ("tls_no_certificate", "127.0.0.1", 53777, None),
    ], "a connection that broke before CONNECT with no TLS error is no authentication failure"
    assert failures[0].at == datetime.datetime.fromtimestamp(1764623764, datetime.UTC)
    assert failures[2].detail is not None and "certificate verify failed" in failures[2].detail


def test_a_window_holds_one_row_per_reason_and_address_and_at_most_max_keys_addresses() -> None:
    window = broker_log.FailureWindow(window_s=60, max_keys=10)
    at = datetime.datetime(2026, 12, 1, 12, 0, 5, tzinfo=datetime.UTC)
    for n in range(10_000):
        address = f"10.0.{n % 1000 // 250}.{n % 250}"  # 1000 addresses, 10 times each
        window.add(broker_log.AuthFailure(at + datetime.timedelta(seconds=n % 50), "not_authorised", address))
    assert window.closed(at) == [], "the window is still open"
    rows = window.closed(at + datetime.timedelta(minutes=1))
    assert len(rows) == 11 and sum(row.count for row in rows) == 10_000
    (spill,) = [row for row in rows if row.address == "*"]
    assert spill.count == 10_000 - 10 * 10
    assert window.closed() == []


@pytest.fixture
def logged_broker(start_mosquitto: MosquittoFactory, server_root: Path, tmp_path: Path) -> Iterator[Broker]:
    """A dynamic-security broker that also writes its log to ``<folder>/mosquitto.log``, as a broker
    pod would for its sidecar (``log_dest file``; Mosquitto flushes each line)."""
    folder = server_root / f"broker-log-{tmp_path.name}"
    log = folder / "mosquitto.log"

    def with_log_file(render: Callable[[int], str]) -> Any:
        return start_mosquitto(lambda port: render(port) + f"log_dest file {log}\n")

    broker = start_broker(with_log_file, folder, DYNAMIC)
    yield broker
    broker.close()


@pytest.fixture
def api(postgres_dsn: str, tmp_path: Path, logged_broker: Broker) -> Iterator[Api]:
    yield from make_api(
        postgres_dsn,
        tmp_path / "ca",
        broker_log_file=logged_broker.folder / "mosquitto.log",
        broker_log_window_s=1,
        broker_log_token=TOKEN,
    )


def _failures(api: Api) -> list[tuple[str, dict[str, Any]]]:
    return [(e.subject, e.details) for e in _events(api) if e.action == "broker.auth_failed"]


def _events(api: Api) -> list[Any]:
    with psycopg.connect(api.dsn, autocommit=True) as conn:
        return audit_events(conn)


def _wait_for_counts(api: Api, expected: dict[str, int]) -> list[tuple[str, dict[str, Any]]]:
    deadline = time.monotonic() + WAIT_S
    while True:
        rows = _failures(api)
        counts = {reason: sum(d["count"] for _, d in rows if d["reason"] == reason) for reason in expected}
        if counts == expected or time.monotonic() > deadline:
            assert counts == expected, rows
            return rows
        time.sleep(0.2)


def test_refused_connections_become_counted_audit_rows_with_their_reason(
    api: Api,
    logged_broker: Broker,
    clients: Callable[..., Probe],  # noqa: F811
) -> None:
    broker = logged_broker
    assert not clients(broker, A_PRESS, password="wrong").connect(), "a wrong password got in"
    assert not clients(broker, "acme.plant-1.nobody", password="x").connect(), "an unknown user got in"
    assert broker.directory is not None
    broker.directory.disable(A_PRESS)  # revoked
    assert not clients(broker, A_PRESS).connect(), "a revoked device got in"
    rows = _wait_for_counts(api, {"not_authorised": 3})
    assert {address for address, _ in rows} == {"127.0.0.1"}
    assert all(details["listeners"] == [broker.port] for _, details in rows)
    (actor,) = {e.actor for e in _events(api) if e.action == "broker.auth_failed"}
    assert actor == "broker:mosquitto"

    assert broker.mtls_port is not None
    foreign = pki.issue_client_cert(pki.make_ca("rogue CA"), A_PRESS)
    assert not clients(broker, A_PRESS, cert=foreign, password=None).connect(broker.mtls_port)
    assert not clients(broker, None, password=None).connect(broker.mtls_port)
    _wait_for_counts(api, {"not_authorised": 3, "tls_certificate_rejected": 1, "tls_no_certificate": 1})


def test_a_flood_of_failures_is_a_few_rows_with_the_whole_count(
    api: Api,
    logged_broker: Broker,
    clients: Callable[..., Probe],  # noqa: F811
) -> None:
    def guess(_: int) -> bool:
        return clients(logged_broker, A_PRESS, password=payload("guess").decode()).connect()

    with ThreadPoolExecutor(16) as pool:  # overlapping connections, as a real flood
        assert not any(pool.map(guess, range(FLOOD))), "a guessed password got in"
    rows = _wait_for_counts(api, {"not_authorised": FLOOD})
    starts = {details["window_start"] for _, details in rows}
    assert len(rows) == len(starts), "more than one row per window for one address and reason"
    assert len(rows) < FLOOD / 5, f"{len(rows)} rows for {FLOOD} failures"
    print(f"{FLOOD} refused CONNECTs → {len(rows)} audit rows (1 s windows)")


def test_the_endpoint_takes_rows_only_with_the_broker_log_token(api: Api) -> None:
    row = {
        "window_start": "2026-12-01T12:00:00+00:00",
        "reason": "not_authorised",
        "address": "10.1.2.3",
        "count": 42,
        "first_at": "2026-12-01T12:00:01+00:00",
        "last_at": "2026-12-01T12:00:59+00:00",
        "listeners": [8883],
    }
    body = {"broker": "mosquitto-0", "rows": [row]}
    assert api.client.post("/v1/broker/auth-failures", json=body).status_code == 401
    wrong = {"Authorization": "Bearer not-the-token"}
    assert api.client.post("/v1/broker/auth-failures", json=body, headers=wrong).status_code == 401
    admin = api.client.post("/v1/broker/auth-failures", json=body, headers=api.platform)
    assert admin.status_code == 401, "an admin token is not the brokers' token"
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    bad = api.client.post(
        "/v1/broker/auth-failures", json={"broker": "b", "rows": [{**row, "count": 0}] * 501}, headers=bearer
    )
    assert bad.status_code == 422 and "rows" in bad.text
    answer = api.client.post("/v1/broker/auth-failures", json=body, headers=bearer)
    assert answer.status_code == 201 and answer.json() == {"recorded": 1}
    assert ("10.1.2.3", 42) in [(address, details["count"]) for address, details in _failures(api)]
    assert 'ironlink_provisioning_broker_auth_failures_total{reason="not_authorised"} 42.0' in (
        api.client.get("/metrics").text
    )


# ----------------------------------------------------------------------------- EMQX (rendered only)
def test_emqx_reports_each_refused_connect_to_the_provisioning_service() -> None:
    """EMQX is not run here: the rendered rule is checked as HOCON, and the event it selects must be
    one the endpoint reads (``models.BrokerAuthEvent``)."""
    from pyhocon import ConfigFactory

    from components.render import emqx
    from infra.config import parse_platform
    from provisioning.models import BrokerAuthEvent

    platform = parse_platform(
        {"phase": "B", "region": "eu", "tenants": [{"id": "acme", "name": "Acme", "tier": "basic"}]}
    )
    registry = emqx.RegistryConnection("registry", 5432, "ironlink", "emqx")
    reporting = emqx.AuthFailureReporting(
        "https://provisioning.ironlink.svc:8443", "/opt/emqx/etc/prov/ca.crt"
    )
    conf = ConfigFactory.parse_string(emqx.render_emqx_conf(platform, registry, auth_failures=reporting))
    assert conf.as_plain_ordered_dict() == emqx.emqx_settings(platform, registry, auth_failures=reporting)
    rule = conf["rule_engine"]["rules"][emqx.AUTH_FAILURES]
    assert rule["actions"] == [f"http:{emqx.AUTH_FAILURES}"]
    assert "FROM \"$events/client_connack\" WHERE reason_code != 'success'" in rule["sql"]
    action = conf["actions"]["http"][emqx.AUTH_FAILURES]
    assert (action["connector"], action["parameters"]["path"]) == (
        emqx.AUTH_FAILURES_CONNECTOR,
        "/v1/broker/auth-events",
    )
    connector = conf["connectors"]["http"][emqx.AUTH_FAILURES_CONNECTOR]
    assert connector["ssl"]["verify"] == "verify_peer" and "authorization" not in connector["headers"]
    assert emqx.AUTH_FAILURES_TOKEN_ENV.removeprefix("EMQX_").lower().split("__") == [
        "actions",
        "http",
        emqx.AUTH_FAILURES,
        "parameters",
        "headers",
        "authorization",
    ]
    selected = rule["sql"].split("SELECT ")[1].split(" FROM")[0].split(", ")
    assert set(selected) <= set(BrokerAuthEvent.model_fields), "the rule selects a field nobody reads"
    assert "emqx_auth_failures" not in emqx.render_emqx_conf(platform, registry), "reporting is opt-in"
    assert "rule_engine" not in emqx.render_emqx_conf(platform, registry)


def test_emqx_events_are_counted_per_window_into_rows(api: Api) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    event = {
        "reason_code": "bad_username_or_password",
        "clientid": "acme.plant-1.press-01",
        "username": "acme.plant-1.press-01",
        "peername": "10.9.8.7:50123",
        "sockname": "10.0.0.5:8883",
        "timestamp": 1_764_600_000_000,
        "node": "emqx@emqx-0.emqx-headless",
        "event": "client.connack",  # EMQX sends more than it needs: ignored
    }
    for _ in range(40):
        assert api.client.post("/v1/broker/auth-events", json=event, headers=bearer).status_code == 202
    assert api.client.post("/v1/broker/auth-events", json=event).status_code == 401
    deadline = time.monotonic() + WAIT_S
    while not (rows := [r for r in _failures(api) if r[0] == "10.9.8.7"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [(d["reason"], d["count"], d["listeners"], d["usernames"]) for _, d in rows] == [
        ("bad_username_or_password", 40, [8883], ["acme.plant-1.press-01"])
    ]
