"""The API's operations endpoints against the real PostgreSQL and VictoriaMetrics the tests start:
fleet uptime (from status points written as the worker writes them, edge gaps counted unknown),
the maintenance log, usage per period, and the live WebSocket feed; isolation between tenants and
site keys, 422 naming the parameter, and the rate limit."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import uvicorn
from psycopg_pool import ConnectionPool
from pydantic import SecretStr
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from api.app import create_app
from api.settings import ApiSettings
from api.stores import InfluxDBStore, StatusQuery
from api.timeline import build_timeline, step_for
from localdev.servers import free_port
from registry.api_keys import revoke_api_key
from registry.gaps import GapRow, upsert_gaps
from registry.provisioning import move_machine, remove_machine
from registry.store import audit_events
from registry.tenant_routes import TenantStoreRoute, upsert_tenant_route
from registry.usage import UsageEvent, flag_quota, month_start, record_usage
from tests.api_harness import (
    T0,
    ServedTenants,
    api_client,
    bearer,
    iso,
    new_key,
    sample,
    seed_registry,
    unique_tenant,
    write_points,
)
from tests.conftest import PostgresCluster
from tests.test_api_influxdb_store import block, recording, tables
from tests.test_api_influxdb_store import store as influx_store  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration
HOUR = 3600
"""The hour every uptime test reads starts at T0."""
HOLD = 300


@dataclass
class World(ServedTenants):
    key_a: str
    key_a_s1: str
    key_b: str

    def hour(self, path: str, key: str, **params: Any) -> Any:
        return self.get(path, key, **{"from": iso(T0), "to": iso(T0 + HOUR), **params})


def _status_points(tenant: str, site: str, machine: str, spans: list[tuple[int, int, str]]) -> list[Any]:
    """A point every 10 s over each (start offset, end offset, status) span of the hour."""
    return [
        sample(tenant, site, machine, T0 + offset, {"power_kw": 1.0}, status)
        for begin, end, status in spans
        for offset in range(begin, end, 10)
    ]


@pytest.fixture(scope="module")
def world(postgres_cluster: PostgresCluster, victoria_metrics: str) -> Iterator[World]:
    """Tenant A: s1/m1 with a known hour (below), s1/m2 registered but silent, s2/m3 running all
    hour. Tenant B: s1/m1 (the same ids as A's) stopped all hour. Unique tenant names: the store
    is shared by the test session. One world for the module: tests add only what they then look
    for (their own entries, a point outside the hour).

    A's m1: running [0, 1200), fault [1200, 1500) of which the edge lost [1300, 1400], running
    [1500, 2400) (last point at 2390, held 300 s to 2690), silent to 3000, stopped [3000, 3600)."""
    a, b = unique_tenant("a"), unique_tenant("b")
    postgres_dsn = postgres_cluster.new_database()
    seed_registry(
        postgres_dsn,
        {
            a: {"s1": {"m1": "cnc_mill", "m2": "cnc_mill"}, "s2": {"m3": "cnc_mill"}},
            b: {"s1": {"m1": "cnc_mill"}},
        },
    )
    a_m1 = [(0, 1200, "running"), (1200, 1300, "fault"), (1410, 1500, "fault"), (1500, 2400, "running")]
    write_points(
        victoria_metrics,
        [
            *_status_points(a, "s1", "m1", [*a_m1, (3000, 3600, "stopped")]),
            *_status_points(a, "s2", "m3", [(0, 3600, "running")]),
            *_status_points(b, "s1", "m1", [(0, 3600, "stopped")]),
        ],
    )
    lost_from, lost_to = _at(1300), _at(1400)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:  # 11 readings at 10 s lost
        gap = GapRow(
            a, "s1", "m1", "gw1", 1, 130, 140, "max_bytes", 11, lost_from, lost_to, datetime.now(UTC)
        )
        upsert_gaps(conn, [gap])
    keys = new_key(postgres_dsn, a), new_key(postgres_dsn, a, "s1"), new_key(postgres_dsn, b)
    with api_client(postgres_dsn, victoria_metrics, uptime_hold_s=HOLD, notify_dispatcher=False) as client:
        yield World(postgres_dsn, victoria_metrics, a, b, client, *keys)


def _at(offset: int) -> datetime:
    return datetime.fromtimestamp(T0 + offset, UTC)


# ------------------------------------------------------------------------------------------ uptime
def test_machine_uptime_counts_running_fault_stopped_and_unknown_with_edge_gaps_as_unknown(
    world: World,
) -> None:
    answer = world.hour("/v1/uptime/machines", world.key_a, site_id="s1", machine_id="m1")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["resolution_s"] == 1 and body["hold_s"] == HOLD
    (m1,) = body["machines"]
    assert (m1["running_s"], m1["fault_s"], m1["stopped_s"]) == (1200 + 1190, 200, 600)
    assert m1["unknown_s"] == 100 + 310 and m1["gap_s"] == 100
    assert m1["downtime_s"] == 800
    assert m1["availability"] == pytest.approx(2390 / 3190, abs=1e-6)
    assert m1["coverage"] == pytest.approx(3190 / 3600, abs=1e-6)
    assert [(d["state"], d["start"], d["duration_s"]) for d in m1["downtime"]] == [
        ("fault", _iso_z(1200), 100),
        ("fault", _iso_z(1400), 100),
        ("stopped", _iso_z(3000), 600),
    ]
    assert m1["downtime_count"] == 3
    assert body["points_scanned"] > 0 and "RateLimit-Remaining" in answer.headers


def _iso_z(offset: int) -> str:
    return datetime.fromtimestamp(T0 + offset, UTC).isoformat().replace("+00:00", "Z")


def test_fleet_uptime_adds_machines_per_site_and_tenant_and_counts_a_silent_machine_unknown(
    world: World,
) -> None:
    body = world.hour("/v1/uptime", world.key_a).json()
    sites = {site["site_id"]: site for site in body["sites"]}
    assert sites["s1"]["machines"] == 2 and sites["s2"]["machines"] == 1
    # m2 never reported: its whole hour is unknown, never downtime.
    assert sites["s1"]["unknown_s"] == 410 + HOUR and sites["s1"]["downtime_s"] == 800
    assert sites["s2"]["running_s"] == HOUR and sites["s2"]["availability"] == 1.0
    total = body["total"]
    assert total["machines"] == 3 and total["running_s"] == 2390 + HOUR
    assert total["running_s"] + total["downtime_s"] + total["unknown_s"] == 3 * HOUR


def test_uptime_is_the_callers_tenant_and_a_site_keys_site_only(world: World) -> None:
    b = world.hour("/v1/uptime", world.key_b).json()
    assert b["tenant_id"] == world.b and b["total"]["machines"] == 1
    assert b["total"]["stopped_s"] == HOUR and b["total"]["running_s"] == 0  # not A's m1 of the same ids
    machines = world.hour("/v1/uptime/machines", world.key_b).json()["machines"]
    assert [(m["site_id"], m["machine_id"], m["stopped_s"]) for m in machines] == [("s1", "m1", HOUR)]
    site_key = world.hour("/v1/uptime", world.key_a_s1).json()
    assert site_key["site_id"] == "s1" and [s["site_id"] for s in site_key["sites"]] == ["s1"]
    assert {
        m["machine_id"] for m in world.hour("/v1/uptime/machines", world.key_a_s1).json()["machines"]
    } == {
        "m1",
        "m2",
    }
    for path in ("/v1/uptime", "/v1/uptime/machines"):
        refused = world.hour(path, world.key_a_s1, site_id="s2")
        assert refused.status_code == 404 and refused.json()["code"] == "site_unknown"
    assert world.hour("/v1/uptime", world.key_b, site_id="s2").status_code == 404  # A's site
    hidden = world.hour("/v1/uptime/machines", world.key_a_s1, machine_id="m3")  # A's, in s2
    assert hidden.status_code == 404 and hidden.json()["code"] == "machine_unknown"


def test_uptime_pages_machines_with_next(world: World) -> None:
    first = world.hour("/v1/uptime/machines", world.key_a, limit=2).json()
    assert [m["machine_id"] for m in first["machines"]] == ["m1", "m2"] and first["next"]
    second = world.client.get(first["next"], headers=bearer(world.key_a)).json()
    assert [m["machine_id"] for m in second["machines"]] == ["m3"] and second["next"] is None


def test_a_year_of_uptime_states_its_coarser_resolution_and_still_adds_up(world: World) -> None:
    end = T0 + HOUR
    body = world.get("/v1/uptime", world.key_a, **{"from": iso(end - 366 * 86400), "to": iso(end)}).json()
    assert body["resolution_s"] == step_for(366 * 86400 + HOLD, 20_000) == 1800
    total = body["total"]
    assert total["running_s"] + total["downtime_s"] + total["unknown_s"] == pytest.approx(3 * 366 * 86400)
    assert total["running_s"] == pytest.approx(2390 + HOUR, abs=2 * 1800 + HOLD)


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"to": iso(T0)}, "from"),
        ({"from": iso(T0)}, "to"),
        ({"from": "yesterday", "to": iso(T0)}, "from"),
        ({"from": iso(T0 + 60), "to": iso(T0)}, "from"),
        ({"from": "2026-01-01T00:00:00", "to": iso(T0)}, "from"),
        ({"from": iso(T0 - 400 * 86400), "to": iso(T0)}, "to"),
        ({"from": iso(time.time() + 3600), "to": iso(time.time() + 7200)}, "from"),
        ({"from": iso(T0), "to": iso(T0 + 60), "limit": 1000}, "limit"),
        ({"from": iso(T0), "to": iso(T0 + 60), "after": "no-slash"}, "after"),
    ],
)
def test_malformed_uptime_parameters_are_422_naming_the_parameter(
    world: World, params: dict[str, Any], named: str
) -> None:
    answer = world.get("/v1/uptime/machines", world.key_a, **params)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"].startswith(f"{named}:") or named in {
        e["parameter"] for e in answer.json().get("errors", [])
    }


def test_timeline_holds_a_report_from_its_bucket_end_for_hold_s_then_says_unknown() -> None:
    reports = {600: 1, 1200: 0}
    held = build_timeline(reports, start=600, end=2400, step=600, hold_s=900)
    assert [(i.start, i.end, i.state) for i in held.intervals] == [
        (600, 1200, "running"),
        (1200, 2400, "stopped"),
    ]
    expired = build_timeline(reports, start=600, end=2400, step=600, hold_s=500)
    assert [(i.start, i.end, i.state) for i in expired.intervals] == [
        (600, 1200, "running"),
        (1200, 1800, "stopped"),
        (1800, 2400, "unknown"),
    ]
    assert expired.tally.unknown_s == 600 and expired.tally.gap_s == 0


# ------------------------------------------------------------------------------------- maintenance
def _entry(world: World, key: str, **fields: Any) -> Any:
    body = {"site_id": "s1", "machine_id": "m1", "kind": "note", "title": "checked", **fields}
    return world.client.post("/v1/maintenance", json=body, headers=bearer(key))


def test_maintenance_entries_are_created_read_updated_closed_and_audited(world: World) -> None:
    created = _entry(
        world,
        world.key_a,
        kind="work_order",
        title="Replace spindle bearing",
        body="Noise above 80 dB since Monday.",
        priority="high",
        assignee="lee",
        due_at=iso(T0 + 86400),
    )
    assert created.status_code == 201, created.text
    entry = created.json()
    assert (entry["status"], entry["version"], created.headers["ETag"]) == ("open", 1, '"1"')
    path = f"/v1/maintenance/{entry['id']}"
    assert world.get(path, world.key_a).json() == entry
    updated = world.client.patch(
        path,
        json={"status": "in_progress", "assignee": None},
        headers={**bearer(world.key_a), "If-Match": '"1"'},
    )
    assert updated.status_code == 200, updated.text
    assert (updated.json()["status"], updated.json()["assignee"], updated.json()["version"]) == (
        "in_progress",
        None,
        2,
    )
    stale = world.client.patch(
        path, json={"priority": "low"}, headers={**bearer(world.key_a), "If-Match": '"1"'}
    )
    assert stale.status_code == 412 and stale.json()["code"] == "version_mismatch"
    closed = world.client.post(
        f"{path}/close", json={"resolution": "Bearing replaced."}, headers=bearer(world.key_a)
    )
    assert closed.status_code == 200, closed.text
    assert (closed.json()["status"], closed.json()["resolution"]) == ("closed", "Bearing replaced.")
    assert closed.json()["closed_at"] is not None and closed.json()["version"] == 3
    final = world.client.patch(path, json={"title": "again"}, headers=bearer(world.key_a))
    assert final.status_code == 409 and final.json()["code"] == "entry_closed"
    with psycopg.connect(world.dsn, autocommit=True) as conn:
        trail = [
            e for e in audit_events(conn, tenant_id=world.a) if e.subject == f"maintenance/{entry['id']}"
        ]
    assert [e.action for e in trail] == ["maintenance.created", "maintenance.updated", "maintenance.closed"]
    assert trail[1].details["changed"] == ["assignee", "status"]
    key_id = world.key_a.split(".")[1]
    assert {e.actor for e in trail} == {f"api-key:{key_id}"}


def test_closing_an_event_ends_it_and_an_unchanged_update_writes_nothing(world: World) -> None:
    event = _entry(world, world.key_a, kind="event", title="Coolant leak", occurred_at=iso(T0)).json()
    path = f"/v1/maintenance/{event['id']}"
    same = world.client.patch(path, json={"title": "Coolant leak"}, headers=bearer(world.key_a)).json()
    assert same["version"] == 1
    closed = world.client.post(f"{path}/close", headers=bearer(world.key_a)).json()
    assert closed["ended_at"] is not None and closed["ended_at"] >= closed["occurred_at"]


def test_maintenance_lists_newest_first_with_a_cursor_and_filters(world: World) -> None:
    ids = [_entry(world, world.key_a, machine_id="m2", title=f"note {n}").json()["id"] for n in range(5)]
    _entry(world, world.key_a, machine_id="m2", kind="event", title="an event")
    seen, url = [], "/v1/maintenance?site_id=s1&machine_id=m2&kind=note&limit=2"
    while url:
        page = world.client.get(url, headers=bearer(world.key_a)).json()
        assert len(page["entries"]) <= 2
        seen += [e["id"] for e in page["entries"]]
        url = page["next"]
    assert seen == sorted(ids, reverse=True)
    events = world.get("/v1/maintenance", world.key_a, machine_id="m2", kind="event").json()["entries"]
    assert [e["title"] for e in events] == ["an event"]


def test_maintenance_is_bound_to_the_callers_tenant_and_a_site_keys_site(world: World) -> None:
    a_entry = _entry(world, world.key_a, site_id="s2", machine_id="m3", title="A only").json()
    path = f"/v1/maintenance/{a_entry['id']}"
    for key in (world.key_b, world.key_a_s1):  # another tenant; a site key of another site
        assert world.get(path, key).status_code == 404
        assert world.client.patch(path, json={"title": "x"}, headers=bearer(key)).status_code == 404
        assert world.client.post(f"{path}/close", headers=bearer(key)).status_code == 404
        assert a_entry["id"] not in [e["id"] for e in world.get("/v1/maintenance", key).json()["entries"]]
    # B has an s1/m1 too: B's entry lands on B's machine, never on A's of the same ids.
    b_entry = _entry(world, world.key_b, title="B's").json()
    b_sees = [e["id"] for e in world.get("/v1/maintenance", world.key_b).json()["entries"]]
    assert b_entry["id"] in b_sees and a_entry["id"] not in b_sees
    assert b_entry["id"] not in [e["id"] for e in world.get("/v1/maintenance", world.key_a).json()["entries"]]
    refused = _entry(world, world.key_a_s1, site_id="s2", machine_id="m3")
    assert refused.status_code == 404 and refused.json()["code"] == "machine_unknown"
    assert world.get("/v1/maintenance", world.key_a_s1, site_id="s2").status_code == 404
    assert _entry(world, world.key_a, machine_id="nope").status_code == 404
    assert world.get("/v1/maintenance/999999999", world.key_a).status_code == 404


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"title": "x" * 201}, "title"),
        ({"title": "   "}, "title"),
        ({"body": "x" * 10_001}, "body"),
        ({"kind": "memo"}, "kind"),
        ({"assignee": "lee"}, "assignee"),
        ({"kind": "work_order", "due_at": "2026-01-01T00:00:00"}, "due_at"),
        ({"kind": "event", "occurred_at": iso(T0), "ended_at": iso(T0 - 1)}, "ended_at"),
        ({"ended_at": iso(T0)}, "ended_at"),
        ({"machine_id": "Not An Id"}, "machine_id"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_malformed_maintenance_entries_are_422_naming_the_field(
    world: World, fields: dict[str, Any], named: str
) -> None:
    answer = _entry(world, world.key_a, **fields)
    assert answer.status_code == 422, answer.text
    assert named in {e["parameter"] for e in answer.json()["errors"]}


def test_malformed_maintenance_updates_are_422_naming_the_field(world: World) -> None:
    note = _entry(world, world.key_a).json()
    path = f"/v1/maintenance/{note['id']}"
    for body, named in (
        ({"status": "closed"}, "status"),
        ({"title": None}, "title"),
        ({"assignee": "lee"}, "assignee"),  # a note has none: the registry's check names it
        ({"ended_at": iso(T0)}, "ended_at"),
    ):
        answer = world.client.patch(path, json=body, headers=bearer(world.key_a))
        assert answer.status_code == 422, answer.text
        problem = answer.json()
        assert named in {e["parameter"] for e in problem.get("errors") or []} or problem["detail"].startswith(
            f"{named}:"
        )
    assert (
        world.client.patch(path, json={}, headers={**bearer(world.key_a), "If-Match": "v1"}).status_code
        == 422
    )
    assert world.get("/v1/maintenance", world.key_a, cursor="abc").status_code == 422


def test_a_machines_log_is_bounded(postgres_dsn: str, victoria_metrics: str) -> None:
    tenant = unique_tenant("c")
    seed_registry(postgres_dsn, {tenant: {"s1": {"m1": "cnc_mill"}}})
    key = new_key(postgres_dsn, tenant)
    with api_client(
        postgres_dsn, victoria_metrics, maintenance_max_entries_per_machine=2, notify_dispatcher=False
    ) as client:
        note = {"site_id": "s1", "machine_id": "m1", "kind": "note", "title": "n"}
        codes = [client.post("/v1/maintenance", json=note, headers=bearer(key)).status_code for _ in range(3)]
        assert codes == [201, 201, 409]


# ------------------------------------------------------------------------------------------- usage
@pytest.fixture(scope="module")
def usage_recorded(world: World) -> None:
    """A: 4 messages from two machines of two sites in hour T0, 2 from one in hour T0+1 (each
    recorded twice: a redelivery counts once); B: one in hour T0. A's quota: 10 a month, 80 % flagged."""

    def event(tenant: str, site: str, machine: str, hour: int, n: int) -> UsageEvent:
        return UsageEvent(tenant, site, machine, (hour + n) * 1000, hour, 1, 100)

    events = [
        *(event(world.a, "s1", "m1", T0, n) for n in range(3)),
        event(world.a, "s2", "m3", T0, 0),
        *(event(world.a, "s1", "m1", T0 + HOUR, n) for n in range(2)),
        event(world.b, "s1", "m1", T0, 0),
    ]
    route = TenantStoreRoute(
        instance="local", url="http://127.0.0.1:8428", org=world.a, bucket=world.a, messages_per_month=10
    )
    with psycopg.connect(world.dsn, autocommit=True) as conn:
        assert record_usage(conn, events) == 7
        assert record_usage(conn, events) == 0
        upsert_tenant_route(conn, world.a, route, actor="tests")
        flag_quota(conn, world.a, month_start(datetime.now(UTC)), 10, "soft")


def test_usage_per_hour_day_and_month_counts_each_point_once_with_the_months_quota(
    world: World, usage_recorded: None
) -> None:
    hours = world.get("/v1/usage", world.key_a, period="hour", **{"from": iso(T0), "to": iso(T0 + 3 * HOUR)})
    assert hours.status_code == 200, hours.text
    body = hours.json()
    assert [(p["messages"], p["bytes"], p["points"]) for p in body["periods"]] == [
        (4, 400, 4),
        (2, 200, 2),
        (0, 0, 0),
    ]
    assert [(p["peak_active_machines"], p["peak_active_sites"]) for p in body["periods"]] == [
        (2, 2),
        (1, 1),
        (0, 0),
    ]
    assert body["total"]["messages"] == 6 and body["total"]["peak_active_machines"] == 2
    this_month = datetime.fromtimestamp(T0, UTC) >= datetime.now(UTC).replace(
        day=1, hour=0, minute=0, second=0
    )
    quota = body["quota"]
    assert quota["messages_limit"] == 10 and quota["soft_reached_at"] and quota["hard_reached_at"] is None
    if this_month:  # both hours are in the current month (not so in a month's first hours)
        assert quota["messages"] == 6 and quota["used_ratio"] == 0.6
    day = datetime.fromtimestamp(T0, UTC).replace(hour=0)
    days = world.get(
        "/v1/usage", world.key_a, **{"from": day.isoformat(), "to": (day + timedelta(days=2)).isoformat()}
    )
    assert len(days.json()["periods"]) == 2 and sum(p["messages"] for p in days.json()["periods"]) == 6
    month = day.replace(day=1)
    months = world.get(
        "/v1/usage",
        world.key_a,
        period="month",
        **{"from": (month - timedelta(days=1)).isoformat(), "to": iso(T0 + 2 * HOUR)},
    ).json()
    assert [p["start"][:10] for p in months["periods"]] == [
        (month - timedelta(days=1)).date().isoformat(),
        month.date().isoformat(),
    ]
    assert [p["messages"] for p in months["periods"]] == [0, 6]


def test_usage_is_the_callers_tenant_and_refused_to_a_site_key(world: World, usage_recorded: None) -> None:
    span = {"from": iso(T0), "to": iso(T0 + 3 * HOUR)}
    b = world.get("/v1/usage", world.key_b, period="hour", **span).json()
    assert b["tenant_id"] == world.b and [p["messages"] for p in b["periods"]] == [1, 0, 0]
    assert b["quota"]["messages_limit"] is None  # B has no route, hence no quota
    refused = world.get("/v1/usage", world.key_a_s1, **span)
    assert refused.status_code == 403 and refused.json()["code"] == "tenant_key_required"


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"from": iso(T0 + 60), "to": iso(T0 + HOUR)}, "from"),
        ({"from": iso(T0), "to": iso(T0 - HOUR)}, "to"),
        ({"from": iso(T0)}, "to"),
        ({"from": iso(T0), "to": iso(T0 + HOUR), "period": "week"}, "period"),
        ({"from": iso(T0 - 60 * 86400), "to": iso(T0), "period": "hour"}, "period"),
        ({"from": iso(T0 - 4000 * 86400), "to": iso(T0), "period": "month"}, "to"),
        ({"from": "2026-01-01T00:00:00", "to": iso(T0)}, "from"),
    ],
)
def test_malformed_usage_parameters_are_422_naming_the_parameter(
    world: World, params: dict[str, Any], named: str
) -> None:
    answer = world.get("/v1/usage", world.key_a, **params)
    assert answer.status_code == 422, answer.text
    problem = answer.json()
    assert problem["detail"].startswith(f"{named}:") or named in {
        e["parameter"] for e in problem.get("errors") or []
    }


# ------------------------------------------------------------------------------------ live feed
Start = Callable[..., str]


@pytest.fixture
def live_server(world: World) -> Iterator[Start]:
    """``start(**settings)``: the app served by a real uvicorn (WebSockets by ``websockets``) on a
    free port, against the world's registry and store; its ``ws://`` base URL."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**settings: Any) -> str:
        config = ApiSettings(
            registry_dsn=SecretStr(world.dsn),
            store_url=world.vm,
            notify_dispatcher=False,
            uptime_hold_s=HOLD,
            live_poll_s=0.2,
            **settings,
        )
        pool = ConnectionPool(world.dsn, min_size=1, max_size=4, kwargs={"autocommit": True}, open=False)
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(config, pool=pool),
                host="127.0.0.1",
                port=port,
                ws="websockets",
                log_level="warning",
            )
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        while not server.started:
            if not thread.is_alive():
                pytest.fail("uvicorn did not start")
            time.sleep(0.05)
        return f"ws://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def _feed(base: str, site: str, key: str | None = None) -> AbstractContextManager[ClientConnection]:
    headers = bearer(key) if key else {}
    return connect(f"{base}/v1/sites/{site}/live", additional_headers=headers, open_timeout=10)


def _message(ws: ClientConnection) -> Any:
    return json.loads(ws.recv(timeout=15))


def _refusal(ws: ClientConnection) -> tuple[str, int | None]:
    """The error message's code and the close code that followed it."""
    error = _message(ws)
    assert error["type"] == "error", error
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=15)
    return error["code"], closed.value.rcvd.code if closed.value.rcvd else None


def test_live_feed_sends_the_sites_snapshot_then_what_changes(world: World, live_server: Start) -> None:
    base = live_server()
    with _feed(base, "s1", world.key_a) as ws:
        snapshot = _message(ws)
        assert snapshot["type"] == "snapshot" and snapshot["site_id"] == "s1"
        machines = {m["machine_id"]: m for m in snapshot["machines"]}
        assert set(machines) == {"m1", "m2"} and snapshot["machines_total"] == 2
        assert (machines["m1"]["status"], machines["m1"]["last_seen"][:19]) == (
            "stopped",
            iso(T0 + 3590)[:19],
        )
        assert machines["m1"]["stale"] and machines["m2"]["status"] is None
        write_points(world.vm, [sample(world.a, "s1", "m2", time.time() - 60, {"power_kw": 2.0}, "fault")])
        change = _message(ws)
        assert change["type"] == "changes"
        assert [(m["machine_id"], m["status"], m["stale"]) for m in change["machines"]] == [
            ("m2", "fault", False)
        ]


def test_live_feed_takes_the_key_as_first_message_and_refuses_bad_missing_and_revoked_keys(
    world: World, live_server: Start
) -> None:
    base = live_server(live_auth_timeout_s=0.5)
    with _feed(base, "s1") as ws:
        ws.send(json.dumps({"api_key": world.key_a}))
        assert _message(ws)["type"] == "snapshot"
    with _feed(base, "s1") as ws:
        ws.send(json.dumps({"api_key": world.key_a + "x"}))
        assert _refusal(ws) == ("unauthorized", 4401)
    with _feed(base, "s1") as ws:
        assert _refusal(ws) == ("unauthorized", 4401)  # nothing sent within live_auth_timeout_s
    with _feed(base, "s1", world.key_a) as ws:
        assert _message(ws)["type"] == "snapshot"
        ws.send("x" * 5000)
        assert _refusal(ws) == ("message_too_large", 1009)
    revoked = new_key(world.dsn, world.a)
    with psycopg.connect(world.dsn, autocommit=True) as conn:
        revoke_api_key(conn, world.a, revoked.split(".")[1], actor="tests")
    with _feed(base, "s1", revoked) as ws:
        assert _refusal(ws) == ("api_key_revoked", 4401)


def test_a_live_feed_ends_when_its_key_is_revoked(world: World, live_server: Start) -> None:
    base = live_server(live_recheck_s=1)
    key = new_key(world.dsn, world.a)
    with _feed(base, "s1", key) as ws:
        assert _message(ws)["type"] == "snapshot"
        with psycopg.connect(world.dsn, autocommit=True) as conn:
            revoke_api_key(conn, world.a, key.split(".")[1], actor="tests")
        assert _refusal(ws) == ("api_key_revoked", 4401)


def test_live_feed_is_the_keys_tenant_and_site(world: World, live_server: Start) -> None:
    base = live_server()
    with _feed(base, "s1", world.key_b) as ws:  # B's own s1, not A's site of the same id
        snapshot = _message(ws)
        assert [(m["machine_id"], m["status"]) for m in snapshot["machines"]] == [("m1", "stopped")]
    for key in (world.key_a_s1, world.key_b):
        with _feed(base, "s2", key) as ws:
            assert _refusal(ws) == ("site_unknown", 4404)


def test_live_feeds_are_bounded_per_key_and_charged_to_its_rate_limit(
    world: World, live_server: Start
) -> None:
    base = live_server(live_max_per_key=1)
    with _feed(base, "s1", world.key_a) as first:
        assert _message(first)["type"] == "snapshot"
        for _ in range(2):  # a refused feed gives back no slot it never had
            with _feed(base, "s1", world.key_a) as second:
                assert _refusal(second) == ("too_many_feeds", 4429)
        with _feed(base, "s1", world.key_a_s1) as other_key:
            assert _message(other_key)["type"] == "snapshot"
    limited = live_server(rate_burst_points=3, rate_points_per_second=0.001)
    with _feed(limited, "s1", world.key_a) as ws:
        assert _message(ws)["type"] == "snapshot"  # 1 + 2 machines: the bucket is empty
        assert _refusal(ws) == ("rate_limited", 4429)


# ------------------------------------------------------------------- uptime on InfluxDB (unit)
def test_influxdb_status_buckets_read_the_last_status_per_window_for_the_tenant(
    influx_store: InfluxDBStore,  # noqa: F811 (the fixture imported above)
) -> None:
    """On the real influxdb-client classes (no InfluxDB 2.x server here): the tenant's own bucket,
    a tenant filter, windows ``(e - step, e]`` stamped a microsecond past ``e`` and read as ``e``."""
    t = int(datetime(2026, 12, 1, 10, 0, tzinfo=UTC).timestamp())
    at1, at2 = "2026-12-01T10:01:00.000001Z", "2026-12-01T10:02:00.000001Z"
    csv = block("status", "long", [(at1, "status_code", "m1", 2), (at2, "status_code", "m1", 0)]) + block(
        "samples", "long", [(at1, "status_code", "m1", 6), (at2, "status_code", "m1", 3)]
    )
    api = recording(influx_store, tables(csv))
    found = influx_store.status_buckets(StatusQuery("acme", "s1", ("m1",), t + 60, t + 120, 60))
    assert found.reports == {("s1", "m1"): {t + 60: 2, t + 120: 0}} and found.scanned == 9
    flux = api.query.call_args.args[0]
    assert api.query.call_args.kwargs == {"org": "acme"} and 'from(bucket: "acme-telemetry")' in flux
    assert 'r.tenant_id == "acme"' in flux and 'contains(value: r.machine_id, set: ["m1"])' in flux
    assert "range(start: 2026-12-01T10:00:00.000001Z, stop: 2026-12-01T10:02:00.000001Z)" in flux
    assert "every: 60s, offset: 1us, fn: last" in flux
    with pytest.raises(ValueError, match="not an id"):
        influx_store.status_buckets(StatusQuery("acme", "s1", ('m1"|',), t, t, 60))


def test_a_live_feed_follows_machines_added_to_and_removed_from_its_site(
    world: World, live_server: Start
) -> None:
    tenant = unique_tenant("c")
    seed_registry(world.dsn, {tenant: {"s1": {"m1": "cnc_mill"}}})
    base = live_server(live_recheck_s=1)
    with _feed(base, "s1", new_key(world.dsn, tenant)) as ws:
        assert [m["machine_id"] for m in _message(ws)["machines"]] == ["m1"]
        with psycopg.connect(world.dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO machines (tenant_id, site_id, id, type) VALUES (%s, 's1', 'm2', 'cnc_mill')",
                (tenant,),
            )
            conn.execute("DELETE FROM machines WHERE tenant_id = %s AND id = 'm1'", (tenant,))
        change = _message(ws)
        assert change["type"] == "changes" and change["removed"] == ["m1"]
        assert [(m["machine_id"], m["status"]) for m in change["machines"]] == [("m2", None)]


def test_a_moved_machine_keeps_its_maintenance_log_and_a_removed_one_takes_it(world: World) -> None:
    tenant = unique_tenant("d")
    seed_registry(world.dsn, {tenant: {"s1": {"m1": "cnc_mill"}, "s2": {}}})
    key = new_key(world.dsn, tenant)
    entry = _entry(world, key, title="before the move").json()
    with psycopg.connect(world.dsn, autocommit=True) as conn:
        move_machine(conn, tenant, "s1", "m1", "s2", actor="tests")
    moved = world.get(f"/v1/maintenance/{entry['id']}", key).json()
    assert (moved["site_id"], moved["machine_id"], moved["title"]) == ("s2", "m1", "before the move")
    with psycopg.connect(world.dsn, autocommit=True) as conn:
        remove_machine(conn, tenant, "s2", "m1", actor="tests")
    assert world.get(f"/v1/maintenance/{entry['id']}", key).status_code == 404


def test_uptime_is_charged_the_samples_it_scanned_and_then_answers_429(world: World) -> None:
    span = {"from": iso(T0), "to": iso(T0 + HOUR)}
    limits = {"rate_burst_points": 100, "rate_points_per_second": 0.01, "notify_dispatcher": False}
    with api_client(world.dsn, world.vm, **limits) as client:
        first = client.get("/v1/uptime", params=span, headers=bearer(world.key_a))
        assert first.status_code == 200 and first.json()["points_scanned"] > 100
        assert first.headers["RateLimit-Remaining"] == "0"
        refused = client.get("/v1/uptime", params=span, headers=bearer(world.key_a))
        assert refused.status_code == 429 and refused.json()["code"] == "rate_limited"
        assert int(refused.headers["Retry-After"]) >= 1 and refused.headers["RateLimit-Limit"] == "100"
        other = client.get("/v1/uptime", params=span, headers=bearer(world.key_b))  # its own bucket
        assert other.status_code == 200
