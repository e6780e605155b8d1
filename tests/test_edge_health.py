"""The agent's health as telemetry: the gateway, enrolled as an ``edge_gateway`` machine, publishes
its backlog, drops, sources, sessions and identities on its own topic, and the real worker stores
them like any machine's readings (the provisioning platform of ``tests/fixtures/edge/gateway.py``);
the numbers are the status report's; ``status`` renders them; the gateway-health dashboard draws
every one of them from the tenant's bucket."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from dashboards.gateway import PANELS
from edge.agent import Agent
from edge.config import EdgeConfigError, parse_config
from edge.health import gateway_metrics, health_document, render_status
from edge.store import DROP_REASONS
from infra.config import parse_platform
from infra.tenancy import store_route, telemetry_topic
from ingest.catalog import GATEWAY_MACHINE_TYPE, MACHINE_TYPES
from ingest.contract import Accepted, decode
from tests.fixtures.edge.gateway import TENANT, WAIT, EnrollingPlatform, Gateway, platform_fixture, wait_for
from tests.test_dashboards import boards, panel, queries

CATALOG = MACHINE_TYPES[GATEWAY_MACHINE_TYPE]


def report(**changes: Any) -> dict[str, Any]:
    """A status report shaped as ``Agent.health()`` writes it."""
    now = time.time()
    base: dict[str, Any] = {
        "gateway": "gw-1",
        "boot": 3,
        "written_at": now,
        "taken": 500,
        "confirmed": 480,
        "sent": {"live": 500},
        "backlog": {"messages": 20, "payload_bytes": 5000, "store_bytes": 90_112, "oldest_unsent_age_s": 4.5},
        "drops": {"max_bytes": 7, "rejected:out_of_bounds": 2, "rejected:unknown_metric": 1},
        "store_moved_aside": None,
        "sources": {
            "press-01": {"state": "up", "since": now - 60, "readings": 400, "last_error": None},
            "mill-01": {"state": "down", "since": now - 40, "readings": 100, "last_error": "TimeoutError: "},
            "conv-01": {"state": "starting", "since": now, "readings": 0, "last_error": None},
        },
        "uplink": {
            "press-01": {"state": "connected", "since": now - 60, "reconnects": 0, "last_error": None},
            "mill-01": {"state": "connected", "since": now - 60, "reconnects": 0, "last_error": None},
            "conv-01": {"state": "reconnecting", "since": now, "reconnects": 2, "last_error": "refused"},
        },
    }
    return base | changes


# -------------------------------------------------------------------------------------- units
def test_the_health_reading_carries_every_number_of_the_report_under_the_catalogs_names() -> None:
    status, metrics = gateway_metrics(report())
    assert status == "fault", "a source is down"
    assert metrics == {
        "backlog_messages": 20,
        "backlog_bytes": 5000,
        "store_bytes": 90_112,
        "oldest_unsent_age_s": 4.5,
        "dropped_max_bytes": 7,
        "dropped_disk_headroom": 0,
        "dropped_max_age": 0,
        "rejected_readings": 3,
        "sources_up": 1,
        "sources_retrying": 1,  # starting counts as not up yet
        "sources_down": 1,
        "uplinks_connected": 2,
        "uplinks_disconnected": 1,
        "identities_missing": 0,
    }
    assert set(metrics) == {metric.name for metric in CATALOG.metrics}, "catalog and reading disagree"
    assert {f"dropped_{reason}" for reason in DROP_REASONS} <= set(metrics), "a drop reason has no metric"


def test_a_gateway_is_running_only_with_every_source_up_every_session_connected_and_every_identity() -> None:
    healthy = report(
        sources={"press-01": {"state": "up", "since": 0, "readings": 1, "last_error": None}},
        uplink={"press-01": {"state": "connected", "since": 0, "reconnects": 0, "last_error": None}},
    )
    assert gateway_metrics(healthy)[0] == "running"
    refused = {
        "press-01": {"state": "refused", "since": 0, "not_after": None, "last_error": "claim_token_used: "}
    }
    status, metrics = gateway_metrics(healthy | {"identity": refused})
    assert (status, metrics["identities_missing"]) == ("fault", 1)
    pending = {"press-01": {"state": "renew_pending", "since": 0, "not_after": 1e10, "last_error": "early"}}
    assert gateway_metrics(healthy | {"identity": pending})[0] == "running", "a valid certificate still works"


def test_values_beyond_the_catalogs_bounds_are_clamped_so_the_reading_is_never_dead_lettered() -> None:
    skewed = report(
        backlog={"messages": 1, "payload_bytes": 10, "store_bytes": 1, "oldest_unsent_age_s": -3.0}
    )
    _, metrics = gateway_metrics(skewed)
    assert metrics["oldest_unsent_age_s"] == 0.0  # a source clock ahead of the gateway's
    payload = health_document("acme", "plant-1", "gw-1", skewed, time.time())
    verdict = decode(
        telemetry_topic("acme", "plant-1", "gw-1"),
        payload,
        machine_types={("acme", "plant-1", "gw-1"): "edge_gateway"},
    )
    assert isinstance(verdict, Accepted), verdict
    document = json.loads(payload)
    assert (document["schema_version"], document["machine_type"], document["machine_id"]) == (
        2,
        "edge_gateway",
        "gw-1",
    )


def test_status_renders_the_backlog_drops_health_sources_and_identity_problems() -> None:
    buffer = io.StringIO()
    identity = {
        "press-01": {"state": "valid", "since": 0, "not_after": time.time() + 40 * 86400, "last_error": None},
        "mill-01": {
            "state": "refused",
            "since": 0,
            "not_after": None,
            "last_error": "claim_token_expired: gone",
        },
    }
    published = {"state": "connected", "published": 12, "skipped": 1, "last_error": None}
    render_status(report(identity=identity, health_uplink=published), Console(file=buffer, width=200))
    text = buffer.getvalue()
    assert "backlog 20 messages, 5000 bytes of payload, store 90112 bytes, oldest unsent 4.5 s" in text
    assert "drops: max_bytes 7, rejected:out_of_bounds 2, rejected:unknown_metric 1" in text
    assert "health: fault; published 12, skipped 1 (session connected)" in text
    assert "valid, 40 d left" in text
    assert "identity mill-01: refused: claim_token_expired: gone" in text
    assert "TimeoutError" in text and "down" in text


def test_the_agents_own_report_makes_a_health_reading(tmp_path: Path) -> None:
    """A real agent (store on disk, adapters built, nothing started): its report is readable as is."""
    config = parse_config(
        {
            "gateway": {"id": "gw-1", "tenant": "acme", "site": "plant-1"},
            "uplink": {"host": "127.0.0.1"},
            "store": {"path": str(tmp_path / "store.db")},
            "machines": [
                {"id": "press-01", "type": "hydraulic_press", "adapter": {"kind": "http", "port": 8080}}
            ],
            "health": {"interval_s": 5},
        }
    )
    agent = Agent(config)
    try:
        health = agent.health()
    finally:
        agent.store.close()
    _, metrics = gateway_metrics(health)
    assert metrics["backlog_messages"] == 0 and metrics["sources_retrying"] == 1, "its source is starting"
    assert json.loads(health_document("acme", "plant-1", "gw-1", health, time.time()))["metrics"] == metrics


def test_a_gateway_that_publishes_health_may_not_share_a_machines_id() -> None:
    raw = {
        "gateway": {"id": "press-01", "tenant": "acme", "site": "plant-1"},
        "uplink": {"host": "127.0.0.1"},
        "store": {"path": "/tmp/x.db"},
        "machines": [
            {"id": "press-01", "type": "hydraulic_press", "adapter": {"kind": "http", "port": 8080}}
        ],
        "health": {},
    }
    with pytest.raises(EdgeConfigError, match=r"gateway\.id 'press-01' publishes health as a machine"):
        parse_config(raw)


# ------------------------------------------------------------------------------ the dashboard
CONFIG = parse_platform(
    {
        "region": "test",
        "tenants": [
            {
                "id": "acme",
                "name": "Acme",
                "tier": "basic",
                "machine_types": ["hydraulic_press", "edge_gateway"],
            }
        ],
    }
)


def test_a_tenant_running_gateways_gets_a_health_dashboard_instead_of_a_drilldown() -> None:
    found = boards(CONFIG, "acme")
    assert sorted(found) == ["acme-edge_gateway", "acme-fleet", "acme-hydraulic_press"]
    board = found["acme-edge_gateway"]
    assert board["title"] == "Acme: gateway health"
    assert [v["name"] for v in board["templating"]["list"]] == ["site", "machine"]
    drawn = {field for query in queries(board) for field in re.findall(r'r\._field == "(\w+)"', query)}
    assert drawn == {metric.name for metric in CATALOG.metrics} | {"status_code"}, "a health number not drawn"
    bucket = store_route(CONFIG, CONFIG.tenant("acme")).bucket
    for query in queries(board):
        assert f'bucket: "{bucket}"' in query and f'r.tenant_id == "{TENANT}"' in query
        assert 'r.machine_type == "edge_gateway"' in query
    bytes_panel = panel(board, "Backlog (bytes)")
    assert bytes_panel["fieldConfig"]["defaults"]["unit"] == "bytes"
    assert [t["refId"] for t in bytes_panel["targets"]] == ["A", "B"]
    for title, metrics in PANELS.items():
        shown = panel(board, title)
        assert len(shown["targets"]) == len(metrics)
        for target, metric in zip(shown["targets"], metrics, strict=True):
            assert f'r._field == "{metric}"' in target["query"]
            assert 'r.machine_id == "${machine}"' in target["query"]


# ------------------------------------------------------------------------------- end to end
platform = platform_fixture("edge-health")


@pytest.mark.integration
@pytest.mark.slow
def test_the_gateways_health_reaches_the_store_through_the_worker_as_its_own_machine(
    platform: EnrollingPlatform,
) -> None:
    gateway = Gateway(platform, platform.platform.folder / "gw-health", "gw-health", ["press-h1"])
    gateway.token_file.write_text(platform.claim_token(count=2))  # the machine and the gateway itself
    gateway.config["health"] = {"interval_s": 1}
    try:
        gateway.start()
        wait_for(lambda: _identity_state(gateway, "gw-health") == "valid", WAIT, "the gateway claimed")
        ts = time.time()
        assert gateway.push("press-h1", ts) == 202
        wait_for(lambda: round(ts * 1000) in gateway.stored("press-h1"), WAIT, "the machine's reading stored")

        def healthy_points() -> dict[str, dict[int, float]]:
            found = _gateway_series(platform)
            running = [t for t, code in found.get("telemetry_status_code", {}).items() if code == 1]
            return found if running else {}

        series = wait_for(healthy_points, WAIT, "a health reading with status running stored")
        assert {f"telemetry_{metric.name}" for metric in CATALOG.metrics} <= set(series), sorted(series)
        running_at = max(t for t, code in series["telemetry_status_code"].items() if code == 1)
        assert series["telemetry_sources_up"][running_at] == 1
        assert series["telemetry_uplinks_connected"][running_at] == 1
        assert series["telemetry_identities_missing"][running_at] == 0
        assert gateway.health()["health_uplink"]["published"] >= 1
        listed = gateway.cli("status")
        assert listed.returncode == 0 and "health: running; published" in listed.stdout, listed.stdout
    finally:
        gateway.stop()


def _identity_state(gateway: Gateway, name: str) -> str | None:
    return gateway.health().get("identity", {}).get(name, {}).get("state")


def _gateway_series(platform: EnrollingPlatform) -> dict[str, dict[int, float]]:
    store = platform.platform.store
    store.force_flush()
    selector = f'{{tenant_id="{TENANT}",machine_id="gw-health",machine_type="edge_gateway"}}'
    return {s.metric: dict(zip(s.timestamps, s.values, strict=True)) for s in store.export(selector, start=0)}
