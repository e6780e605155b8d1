"""The dashboards the builders produce: the panels and queries a tenant needs, on its bucket alone."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from dashboards.alerts import alert_thresholds
from dashboards.flux import FluxQuery
from dashboards.tenant import UNITS, tenant_dashboards
from dashboards.view import TenantView
from infra.config import PlatformConfig, parse_platform
from infra.tenancy import GRAFANA_UID_MAX, grafana_names, grafana_uid, store_route
from ingest.catalog import MACHINE_TYPES
from ingest.points import MEASUREMENT, STATUS_CODES

CONFIG = parse_platform(
    {
        "region": "test",
        "tenants": [
            {
                "id": "acme",
                "name": "Acme",
                "tier": "basic",
                "machine_types": ["hydraulic_press", "cnc_mill"],
            },
            {
                "id": "a-tenant-with-a-very-long-id-x32",
                "name": "Long",
                "tier": "standard",
                "machine_types": ["injection_molder"],
            },
        ],
    }
)


def boards(config: PlatformConfig, tenant_id: str) -> dict[str, dict[str, Any]]:
    view = TenantView.of(config, config.tenant(tenant_id))
    return {uid: json.loads(body) for uid, body in tenant_dashboards(view).items()}


def queries(board: dict[str, Any]) -> list[str]:
    found = [target["query"] for panel in board["panels"] for target in panel["targets"]]
    return found + [variable["query"] for variable in board.get("templating", {}).get("list", [])]


def panel(board: dict[str, Any], title: str) -> dict[str, Any]:
    matches = [p for p in board["panels"] if p["title"] == title]
    assert len(matches) == 1, (
        f"{board['uid']}: no single panel {title!r} (have {[p['title'] for p in board['panels']]})"
    )
    return matches[0]


ACME = boards(CONFIG, "acme")


def test_acme_gets_a_fleet_overview_and_one_drilldown_per_machine_type_it_runs() -> None:
    assert sorted(ACME) == ["acme-cnc_mill", "acme-fleet", "acme-hydraulic_press"]


def test_fleet_overview_shows_machines_status_and_message_rate() -> None:
    fleet = ACME["acme-fleet"]
    reporting = panel(fleet, "Machines reporting")["targets"][0]["query"]
    assert reporting.endswith("|> last()\n  |> group()\n  |> count()")
    rate = panel(fleet, "Messages per second")
    assert rate["fieldConfig"]["defaults"]["unit"] == "reqps"
    assert "aggregateWindow(every: 1m, fn: count" in rate["targets"][0]["query"]
    assert "float(v: r._value) / 60.0" in rate["targets"][0]["query"]
    last_status = panel(fleet, "Machines: last status")
    mapped = last_status["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert {int(code): option["text"] for code, option in mapped.items()} == {
        code: status for status, code in STATUS_CODES.items()
    }
    assert panel(fleet, "Status history")["type"] == "state-timeline"


@pytest.mark.parametrize("uid", sorted(ACME))
def test_every_query_reads_the_tenants_bucket_through_its_datasource(uid: str) -> None:
    route, names = store_route(CONFIG, CONFIG.tenant("acme")), grafana_names(CONFIG, CONFIG.tenant("acme"))
    board = ACME[uid]
    for query in queries(board):
        assert re.findall(r'bucket: "([^"]+)"', query) == [route.bucket], query
        assert f'r._measurement == "{MEASUREMENT}" and r.tenant_id == "acme"' in query
    sources = [p["datasource"] for p in board["panels"]] + [
        t["datasource"] for p in board["panels"] for t in p["targets"]
    ]
    assert {(s["type"], s["uid"]) for s in sources} == {("influxdb", names.datasource_uid)}


def test_no_dashboard_of_one_tenant_names_another_tenants_bucket() -> None:
    other = store_route(CONFIG, CONFIG.tenant("a-tenant-with-a-very-long-id-x32")).bucket
    text = json.dumps(ACME)
    assert other not in text
    assert "acme-telemetry" not in json.dumps(boards(CONFIG, "a-tenant-with-a-very-long-id-x32"))


@pytest.mark.parametrize("machine_type", ["hydraulic_press", "cnc_mill"])
def test_drilldown_has_a_panel_per_catalog_metric_in_its_unit(machine_type: str) -> None:
    kind = MACHINE_TYPES[machine_type]
    board = ACME[f"acme-{machine_type}"]
    for metric in kind.metrics:
        shown = panel(board, f"{metric.name} ({metric.unit})")
        assert shown["fieldConfig"]["defaults"]["unit"] == UNITS.get(metric.unit, f"suffix:{metric.unit}")
        query = shown["targets"][0]["query"]
        assert f'r._field == "{metric.name}"' in query
        assert f'r.machine_type == "{machine_type}" and r.site_id == "${{site}}"' in query
        assert 'r.machine_id == "${machine}"' in query
    fields = {field for query in queries(board) for field in re.findall(r'r\._field == "(\w+)"', query)}
    assert fields == {m.name for m in kind.metrics} | {"status_code"}, "fields of another machine type"


def test_drilldown_variables_list_only_machines_of_its_type_in_the_chosen_site() -> None:
    board = ACME["acme-hydraulic_press"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert sorted(variables) == ["machine", "site"]
    assert 'tag: "site_id"' in variables["site"]["query"]
    assert 'r.machine_type == "hydraulic_press"' in variables["site"]["query"]
    assert 'tag: "machine_id"' in variables["machine"]["query"]
    assert 'r.site_id == "${site}"' in variables["machine"]["query"]


def test_the_temperature_panel_draws_the_alert_limit() -> None:
    press = MACHINE_TYPES["hydraulic_press"]
    limit = alert_thresholds(press)["oil_temp_c"]
    defaults = panel(ACME["acme-hydraulic_press"], "oil_temp_c (degC)")["fieldConfig"]["defaults"]
    assert [step["value"] for step in defaults["thresholds"]["steps"]] == [None, limit]
    assert defaults["custom"]["thresholdsStyle"]["mode"] == "line"


def test_uids_fit_grafanas_limit_and_stay_distinct_for_long_ids() -> None:
    long = boards(CONFIG, "a-tenant-with-a-very-long-id-x32")
    assert len(long) == 2
    assert all(len(uid) <= GRAFANA_UID_MAX for uid in long)
    assert all(board["uid"] == uid for uid, board in long.items())
    first, second = grafana_uid("x" * 32, "injection_molder"), grafana_uid("x" * 32, "hydraulic_press")
    assert first != second and len(first) == len(second) == GRAFANA_UID_MAX


def test_flux_query_serializes_as_the_influxdb_datasource_model() -> None:
    built = FluxQuery('from(bucket: "b")', "ds").ref_id("Q").build()
    assert built.to_json() == {
        "refId": "Q",
        "query": 'from(bucket: "b")',
        "datasource": {"type": "influxdb", "uid": "ds"},
    }
