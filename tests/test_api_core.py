"""The API's core against the real PostgreSQL and VictoriaMetrics the tests start: API keys,
sites, machines with their latest status (ETag), bounded series (downsampling, pages, gaps,
historical points), tenant isolation, rate limits and malformed input."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from registry.api_keys import authenticate, list_api_keys, revoke_api_key
from registry.store import audit_events
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

pytestmark = pytest.mark.integration
World = ServedTenants


@pytest.fixture
def world(postgres_dsn: str, victoria_metrics: str) -> Iterator[World]:
    """Two tenants with the same machine id ``m1`` in site ``s1``; tenant A also has ``m2`` in
    ``s2``. A's m1 ran 600 s at 1 point/s."""
    a, b = unique_tenant("a"), unique_tenant("b")
    seed_registry(
        postgres_dsn,
        {a: {"s1": {"m1": "cnc_mill"}, "s2": {"m2": "cnc_mill"}}, b: {"s1": {"m1": "cnc_mill"}}},
    )
    write_points(
        victoria_metrics,
        [
            sample(
                a,
                "s1",
                "m1",
                T0 + i,
                {"spindle_temp_c": float(i % 10), "power_kw": 5.0},
                "fault" if i == 30 else "running",
            )
            for i in range(1, 601)
        ],
    )
    write_points(
        victoria_metrics,
        [sample(b, "s1", "m1", T0 + i, {"spindle_temp_c": 99.0}, "stopped") for i in range(1, 61)],
    )
    write_points(victoria_metrics, [sample(a, "s2", "m2", T0 + 5, {"power_kw": 1.0}, "stopped")])
    with api_client(postgres_dsn, victoria_metrics) as client:
        yield World(postgres_dsn, victoria_metrics, a, b, client)


# ------------------------------------------------------------------------------------------ keys
def test_keys_are_stored_as_digests_scoped_audited_and_refused_once_revoked_or_expired(world: World) -> None:
    key = new_key(world.dsn, world.a)
    with psycopg.connect(world.dsn, autocommit=True) as conn:
        stored = conn.execute("SELECT row_to_json(k)::text FROM api_keys k").fetchall()
        assert stored and all(key.split(".")[2] not in row[0] for row in stored)
        found = authenticate(conn, key)
        assert not hasattr(found, "code") and found.tenant_id == world.a and found.site_id is None
        assert authenticate(conn, key[:-1] + ("A" if key[-1] != "A" else "B")).code == "unauthorized"
        (listed,) = list_api_keys(conn, world.a)
        assert list_api_keys(conn, world.b) == []
        assert world.get("/v1/sites", key).status_code == 200
        assert revoke_api_key(conn, world.a, listed.id, actor="tests") is True
        assert revoke_api_key(conn, world.a, listed.id, actor="tests") is False
        actions = [e.action for e in audit_events(conn, tenant_id=world.a) if e.subject == listed.id]
        assert actions == ["api_key.created", "api_key.revoked"]
    refused = world.get("/v1/sites", key)
    assert refused.status_code == 401 and refused.json()["code"] == "api_key_revoked"
    assert refused.headers["WWW-Authenticate"] == "Bearer"

    expired = new_key(world.dsn, world.a)
    with psycopg.connect(world.dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE api_keys SET created_at = now() - interval '2 days',"
            " expires_at = now() - interval '1 day' WHERE id = %s",
            (expired.split(".")[1],),
        )
    answer = world.get("/v1/sites", expired)
    assert answer.status_code == 401 and answer.json()["code"] == "api_key_expired"
    for headers in ({}, bearer("ilk-api.nothex.secret"), {"Authorization": "Basic abc"}):
        assert world.client.get("/v1/sites", headers=headers).status_code == 401


def test_a_site_key_cannot_be_made_for_another_tenants_site(world: World) -> None:
    from registry.provisioning import Refused

    with pytest.raises(Refused) as refused:
        new_key(world.dsn, world.a, "s9")
    assert refused.value.code == "site_unknown"


# ------------------------------------------------------------------------------ sites, machines
def test_machines_carry_their_latest_status_and_last_seen_with_an_etag(world: World) -> None:
    key = new_key(world.dsn, world.a)
    assert [s["id"] for s in world.get("/v1/sites", key).json()["sites"]] == ["s1", "s2"]
    listed = world.get("/v1/machines", key).json()
    by_id = {m["id"]: m for m in listed["machines"]}
    assert by_id["m1"]["status"] == "running" and by_id["m1"]["status_code"] == 1
    assert datetime.fromisoformat(by_id["m1"]["last_seen"]).timestamp() == T0 + 600
    assert by_id["m2"]["status"] == "stopped" and listed["next"] is None

    first = world.get("/v1/machines/m1", key)
    assert first.status_code == 200 and first.json()["site_id"] == "s1"
    etag = first.headers["ETag"]
    again = world.client.get("/v1/machines/m1", headers={**bearer(key), "If-None-Match": etag})
    assert again.status_code == 304 and again.headers["ETag"] == etag and again.content == b""
    other = world.client.get("/v1/machines/m1", headers={**bearer(key), "If-None-Match": '"stale"'})
    assert other.status_code == 200

    write_points(world.vm, [sample(world.a, "s1", "m1", T0 + 700, {"power_kw": 9.0}, "fault")])
    changed = world.client.get("/v1/machines/m1", headers={**bearer(key), "If-None-Match": etag})
    assert (
        changed.status_code == 200 and changed.json()["status"] == "fault" and changed.headers["ETag"] != etag
    )


def test_machine_pages_follow_next(world: World) -> None:
    key = new_key(world.dsn, world.a)
    first = world.get("/v1/machines", key, limit=1).json()
    assert [m["id"] for m in first["machines"]] == ["m1"] and first["next"]
    second = world.client.get(first["next"], headers=bearer(key)).json()
    assert [m["id"] for m in second["machines"]] == ["m2"] and second["next"] is None


def test_a_site_key_sees_only_its_site(world: World) -> None:
    key = new_key(world.dsn, world.a, "s2")
    assert [s["id"] for s in world.get("/v1/sites", key).json()["sites"]] == ["s2"]
    assert [m["id"] for m in world.get("/v1/machines", key).json()["machines"]] == ["m2"]
    for path, params in (
        ("/v1/machines/m1", {}),
        ("/v1/machines", {"site_id": "s1"}),
        ("/v1/machines/m1", {"site_id": "s1"}),
        ("/v1/machines/m1/series", {"from": iso(T0), "to": iso(T0 + 600)}),
    ):
        assert world.get(path, key, **params).status_code == 404, path


def test_no_key_of_one_tenant_reaches_another_tenants_data(world: World) -> None:
    key_b = new_key(world.dsn, world.b)
    # Same machine id in both tenants: B's key reads B's machine only, never A's points.
    assert [m["id"] for m in world.get("/v1/machines", key_b).json()["machines"]] == ["m1"]
    assert world.get("/v1/machines/m1", key_b).json()["status"] == "stopped"
    page = world.get(
        "/v1/machines/m1/series", key_b, **{"from": iso(T0), "to": iso(T0 + 600), "step": 60}
    ).json()
    assert {p["values"]["spindle_temp_c"] for p in page["points"]} == {99.0}
    assert sum(p["samples"] for p in page["points"]) == 60
    # A's other machine and site, by path or query parameter: unknown to B.
    for path, params in (
        ("/v1/machines/m2", {}),
        ("/v1/machines/m2", {"site_id": "s2"}),
        ("/v1/machines", {"site_id": "s2"}),
        ("/v1/machines/m2/series", {"from": iso(T0), "to": iso(T0 + 600)}),
    ):
        answer = world.get(path, key_b, **params)
        assert answer.status_code == 404 or answer.json()["machines"] == [], path
    smuggled = world.get("/v1/machines", key_b, tenant_id=world.a, site_id="s1").json()["machines"]
    assert [(m["id"], m["status"]) for m in smuggled] == [("m1", "stopped")]
    injected = world.get(
        "/v1/machines/m1/series", key_b, **{"from": iso(T0), "to": iso(T0 + 60), "metrics": 'x"}'}
    )
    assert injected.status_code == 422


# ------------------------------------------------------------------------------------------ series
def test_series_downsamples_to_a_resolution_it_states(world: World) -> None:
    key = new_key(world.dsn, world.a)
    page = world.get(
        "/v1/machines/m1/series", key, **{"from": iso(T0), "to": iso(T0 + 600), "limit": 10}
    ).json()
    assert page["resolution_s"] == 60 and page["resolution_chosen_by"] == "server"
    assert len(page["points"]) == 10 and page["next"] is None
    first = page["points"][0]
    assert first["samples"] == 60 and first["status_code"] == 2  # the fault at T0 + 30
    assert first["values"] == {"spindle_temp_c": 4.5, "power_kw": 5.0}
    assert page["points"][1]["status_code"] == 1
    assert page["points_scanned"] == 600 * 3  # two metrics and the status, 600 points


def test_series_pages_at_a_requested_step_with_next_until_the_range_ends(world: World) -> None:
    key = new_key(world.dsn, world.a)
    params = {"from": iso(T0), "to": iso(T0 + 600), "step": 1, "limit": 250, "metrics": "power_kw"}
    url, seen, pages = "/v1/machines/m1/series", [], 0
    answer = world.get(url, key, **params).json()
    while True:
        pages += 1
        assert answer["resolution_s"] == 1 and answer["resolution_chosen_by"] == "request"
        seen += [p["ts"] for p in answer["points"]]
        if answer["next"] is None:
            break
        answer = world.client.get(answer["next"], headers=bearer(key)).json()
    assert pages == 3 and len(seen) == 600 and len(set(seen)) == 600
    assert datetime.fromisoformat(seen[-1]).timestamp() == T0 + 600
    bad = world.get(url, key, **params, cursor="bm9wZQ")
    assert bad.status_code == 422 and "cursor" in bad.json()["detail"]


def test_series_flags_gaps_and_historical_points(world: World) -> None:
    key = new_key(world.dsn, world.a)
    write_points(
        world.vm,
        [sample(world.a, "s2", "m2", T0 + 100 + i, {"power_kw": 2.0}) for i in range(10)],
        historical=True,
    )
    with psycopg.connect(world.dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO telemetry_gaps (tenant_id, site_id, machine_id, gateway, boot, first_n, last_n,"
            " reason, count, first_ts, last_ts, received_at)"
            " VALUES (%s, 's2', 'm2', 'gw1', 1, 10, 19, 'max_bytes', 10, %s, %s, now())",
            (world.a, datetime.fromtimestamp(T0 + 200, UTC), datetime.fromtimestamp(T0 + 210, UTC)),
        )
    page = world.get(
        "/v1/machines/m2/series", key, **{"from": iso(T0), "to": iso(T0 + 600), "step": 60}
    ).json()
    flags = {datetime.fromisoformat(p["ts"]).timestamp(): p["historical"] for p in page["points"]}
    assert flags == {T0 + 60: False, T0 + 120: True}
    assert [(g["gateway"], g["reason"], g["count"]) for g in page["gaps"]] == [("gw1", "max_bytes", 10)]
    later = world.get("/v1/machines/m2/series", key, **{"from": iso(T0 + 300), "to": iso(T0 + 600)}).json()
    assert later["gaps"] == []


def test_a_ten_year_raw_range_comes_back_capped_and_downsampled_with_its_resolution(world: World) -> None:
    years = [T0 - year * 365 * 86400 for year in range(1, 10)]
    write_points(world.vm, [sample(world.a, "s2", "m2", ts, {"power_kw": 3.0}) for ts in years])
    key = new_key(world.dsn, world.a)
    ten_years = {"from": iso(T0 - 3653 * 86400), "to": iso(T0 + 600)}
    page = world.get("/v1/machines/m2/series", key, **ten_years).json()
    assert page["resolution_chosen_by"] == "server" and page["resolution_s"] == 43200
    assert "averaged" in page["resolution"] and page["next"] is None
    assert [p["samples"] for p in page["points"]] == [1] * 10  # nine yearly points and the one at T0 + 5
    raw = world.get("/v1/machines/m2/series", key, **ten_years, step=1).json()
    assert raw["resolution_s"] == 1 and raw["next"] and raw["points"] == []
    assert datetime.fromisoformat(raw["to"]) - datetime.fromisoformat(raw["from"]) == timedelta(
        seconds=10_000
    )


def test_series_bounds_its_range_and_names_every_bad_parameter(world: World) -> None:
    key = new_key(world.dsn, world.a)
    url = "/v1/machines/m1/series"
    missing = world.get(url, key).json()
    assert missing["code"] == "invalid_parameter"
    assert {e["parameter"] for e in missing["errors"]} == {"from", "to"}
    cases = {
        "from": {"from": iso(T0 + 600), "to": iso(T0)},
        "3700 days": {"from": iso(T0 - 20 * 365 * 86400), "to": iso(T0)},
        "time zone": {"from": "2026-01-01T00:00:00", "to": "2026-01-02T00:00:00"},
        "limit": {"from": iso(T0), "to": iso(T0 + 60), "limit": 10**7},
        "step": {"from": iso(T0), "to": iso(T0 + 60), "step": "fast"},
        "metrics": {"from": iso(T0), "to": iso(T0 + 60), "metrics": "Bad-Name"},
    }
    for expected, params in cases.items():
        answer = world.get(url, key, **params)
        assert answer.status_code == 422 and expected in answer.json()["detail"], (expected, answer.json())
    assert world.get("/v1/machines/BAD", key).status_code == 422


def test_a_machine_id_two_sites_share_needs_its_site(world: World) -> None:
    with psycopg.connect(world.dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO machines (tenant_id, site_id, id, type) VALUES (%s, 's2', 'm1', 'cnc_mill')",
            (world.a,),
        )
    key = new_key(world.dsn, world.a)
    assert world.get("/v1/machines/m1", key).json()["code"] == "machine_ambiguous"
    assert world.get("/v1/machines/m1", key, site_id="s1").json()["status"] == "running"


# ------------------------------------------------------------------------------------- rate limits
def test_requests_are_charged_the_points_they_scan_and_refused_with_429_when_spent(
    postgres_dsn: str, victoria_metrics: str
) -> None:
    tenant = unique_tenant("r")
    seed_registry(postgres_dsn, {tenant: {"s1": {"m1": "cnc_mill"}}})
    write_points(
        victoria_metrics, [sample(tenant, "s1", "m1", T0 + i, {"power_kw": 1.0}) for i in range(1, 301)]
    )
    key, other = new_key(postgres_dsn, tenant), new_key(postgres_dsn, tenant)
    with api_client(
        postgres_dsn, victoria_metrics, rate_burst_points=500, rate_points_per_second=0.001
    ) as client:
        ok = client.get("/v1/sites", headers=bearer(key))
        assert ok.headers["RateLimit-Limit"] == "500" and ok.headers["RateLimit-Remaining"] == "499"
        series = client.get(
            "/v1/machines/m1/series", params={"from": iso(T0), "to": iso(T0 + 300)}, headers=bearer(key)
        )
        assert series.status_code == 200 and series.json()["points_scanned"] == 600
        assert series.headers["RateLimit-Remaining"] == "0"
        refused = client.get("/v1/sites", headers=bearer(key))
        assert refused.status_code == 429 and refused.json()["code"] == "rate_limited"
        assert int(refused.headers["Retry-After"]) >= 1 and refused.headers["RateLimit-Remaining"] == "0"
        assert client.get("/v1/sites", headers=bearer(other)).status_code == 200  # per key


# ------------------------------------------------------------------------------------------ start
def test_python_m_api_exits_2_naming_every_bad_setting() -> None:
    env = {"PATH": os.environ["PATH"], "IRONLINK_API_PORT": "eighty", "IRONLINK_API_STORE_KIND": "mongo"}
    done = subprocess.run([sys.executable, "-m", "api"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "IRONLINK_API_PORT" in done.stderr and "IRONLINK_API_STORE_KIND" in done.stderr
    bare = {"PATH": os.environ["PATH"]}
    missing = subprocess.run(
        [sys.executable, "-m", "api"], env=bare, capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2 and "IRONLINK_API_REGISTRY_DSN: is required" in missing.stderr
