"""Alert rules: the tenants' Grafana rules (rendered for ``alerting.RuleGroup``) and the platform's
Prometheus rules, checked and unit-tested with the real ``promtool`` from Debian's prometheus."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from prometheus_client import generate_latest
from pulumiverse_grafana.alerting import (
    RuleGroupRuleArgs,
    RuleGroupRuleDataArgs,
    RuleGroupRuleDataRelativeTimeRangeArgs,
)

from dashboards.alerts import NO_DATA_MINUTES, temperature_limit, tenant_rules
from dashboards.platform import GROUP, platform_rules, render_platform_rules
from dashboards.view import TenantView
from infra.config import parse_platform
from infra.tenancy import GRAFANA_UID_MAX, grafana_names
from ingest.catalog import MACHINE_TYPES
from ingest.metrics import WorkerMetrics

CONFIG = parse_platform(
    {
        "region": "test",
        "tenants": [
            {
                "id": "acme",
                "name": "Acme",
                "tier": "basic",
                "machine_types": ["hydraulic_press", "conveyor"],
            },
            {"id": "empty", "name": "Empty", "tier": "basic"},
        ],
    }
)
ACME = TenantView.of(CONFIG, CONFIG.tenant("acme"))
RULES: dict[str, dict[str, Any]] = {
    str(rule["name"]): cast(dict[str, Any], rule) for rule in tenant_rules(ACME)
}


def models(rule: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {stage["ref_id"]: json.loads(stage["model"]) for stage in rule["datas"]}


def threshold(rule: dict[str, Any]) -> tuple[str, list[float]]:
    evaluator = models(rule)[rule["condition"]]["conditions"][0]["evaluator"]
    return evaluator["type"], evaluator["params"]


# ------------------------------------------------------------------------------------ Grafana
def test_each_machine_type_alerts_on_its_temperature_between_typical_and_maximum() -> None:
    for name in ("hydraulic_press", "conveyor"):
        kind = MACHINE_TYPES[name]
        metric = kind.metric(kind.temperature_metric or "")
        assert metric is not None
        limit = temperature_limit(metric)
        assert metric.typical < limit < metric.maximum, f"{name}: limit {limit} can never or always fire"
        rule = RULES[f"{kind.description}: {metric.name} above {limit:g} {metric.unit}"]
        assert threshold(rule) == ("gt", [limit])
        query = models(rule)["A"]["query"]
        assert f'r._field == "{metric.name}" and r.machine_type == "{name}"' in query
        assert "|> mean()" in query
        assert (rule["for_"], rule["no_data_state"]) == ("5m", "OK")
        assert rule["labels"] == {"tenant": "acme", "severity": "warning", "machine_type": name}


def test_a_machine_in_fault_fires_and_a_running_one_does_not() -> None:
    rule = RULES["Hydraulic press: machine in fault"]
    kind, (above,) = threshold(rule)
    assert kind == "gt" and 1 < above < 2, "status codes: 1 running, 2 fault"
    assert 'r._field == "status_code"' in models(rule)["A"]["query"]


def test_silence_for_n_minutes_alerts_per_machine_and_a_silent_tenant_alerts_too() -> None:
    rule = RULES[f"No telemetry for {NO_DATA_MINUTES} minutes"]
    assert threshold(rule) == ("gt", [NO_DATA_MINUTES * 60.0])
    assert rule["no_data_state"] == "Alerting"
    query = models(rule)["A"]["query"]
    assert "int(v: now()) - int(v: r._time)" in query
    assert 'keep(columns: ["_value", "site_id", "machine_id"])' in query


def test_rules_query_the_tenants_datasource_and_evaluate_server_side() -> None:
    datasource = grafana_names(CONFIG, CONFIG.tenant("acme")).datasource_uid
    for name, rule in RULES.items():
        sources = {stage["ref_id"]: stage["datasource_uid"] for stage in rule["datas"]}
        assert sources == {"A": datasource, "B": "__expr__"}, name
        assert rule["condition"] == "B"
        assert 'from(bucket: "acme-telemetry")' in models(rule)["A"]["query"]
    uids = [rule["uid"] for rule in RULES.values()]
    assert len(set(uids)) == len(uids) and all(len(uid) <= GRAFANA_UID_MAX for uid in uids)


def test_rendered_rules_are_what_the_rule_group_resource_accepts() -> None:
    for rule in RULES.values():
        datas = [
            RuleGroupRuleDataArgs(
                **{
                    **stage,
                    "relative_time_range": RuleGroupRuleDataRelativeTimeRangeArgs(
                        **stage["relative_time_range"]
                    ),
                }
            )
            for stage in rule["datas"]
        ]
        built = RuleGroupRuleArgs(**{**rule, "datas": datas})
        assert built.name == rule["name"]


def test_a_tenant_without_machines_has_no_rules() -> None:
    assert tenant_rules(TenantView.of(CONFIG, CONFIG.tenant("empty"))) == []


# --------------------------------------------------------------------------------- Prometheus
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: make deps installs prometheus"
)


def test_platform_rules_use_series_the_worker_exposes() -> None:
    metrics = WorkerMetrics()
    metrics.write_errors.labels(tenant="acme").inc()
    metrics.held.labels(tenant="acme").set(1)
    metrics.rejected.labels(tenant="acme", reason="schema").inc()
    metrics.received.labels(tenant="acme").inc()
    metrics.lag_seconds.observe(0.2)
    exposed = generate_latest(metrics.registry).decode()
    for rule in platform_rules(metrics)["groups"][0]["rules"]:
        used = re.findall(r"ironlink_\w+", rule["expr"])
        assert used, rule["alert"]
        for name in used:
            assert re.search(rf"^{name}[{{ ]", exposed, re.MULTILINE), (
                f"{rule['alert']}: the worker has no {name}"
            )


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


@needs_promtool
def test_promtool_accepts_the_rule_file(tmp_path: Path) -> None:
    rules = tmp_path / "ironlink.rules.yml"
    rules.write_text(render_platform_rules())
    checked = run("check", "rules", rules)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(platform_rules()['groups'][0]['rules'])} rules found" in checked.stdout


def alert(name: str, at: str, *expected: dict[str, str]) -> dict[str, Any]:
    return {
        "eval_time": at,
        "alertname": name,
        "exp_alerts": [
            {"exp_labels": {"team": "ironlink-platform", **labels}, "exp_annotations": {"summary": summary}}
            for labels in expected
            for summary in [labels.pop("summary")]
        ],
    }


@needs_promtool
def test_promtool_rule_tests_fire_for_the_broken_tenant_only(tmp_path: Path) -> None:
    rules = tmp_path / "ironlink.rules.yml"
    rules.write_text(render_platform_rules())
    lag = "ironlink_ingest_lag_seconds_bucket"
    series = [
        # acme's writes fail from the start; globex's never do
        ("ironlink_ingest_store_write_errors_total{tenant='acme'}", "0+6x30"),
        ("ironlink_ingest_store_write_errors_total{tenant='globex'}", "0x30"),
        # and acme is held (its points spooled) on one of the two replicas
        ("ironlink_ingest_tenant_held{tenant='acme',pod='ingest-0'}", "1x30"),
        ("ironlink_ingest_tenant_held{tenant='acme',pod='ingest-1'}", "0x30"),
        ("ironlink_ingest_tenant_held{tenant='globex',pod='ingest-0'}", "0x30"),
        # acme dead-letters 10 % of its messages, globex 1 %
        ("ironlink_ingest_messages_received_total{tenant='acme'}", "0+600x30"),
        ("ironlink_ingest_messages_rejected_total{tenant='acme',reason='schema'}", "0+60x30"),
        ("ironlink_ingest_messages_received_total{tenant='globex'}", "0+600x30"),
        ("ironlink_ingest_messages_rejected_total{tenant='globex',reason='schema'}", "0+6x30"),
        # both worker replicas lose the broker after 5 minutes
        ("ironlink_ingest_broker_connected{pod='ingest-0'}", "1x4 0x25"),
        ("ironlink_ingest_broker_connected{pod='ingest-1'}", "1x4 0x25"),
        # every message takes between 30 s and 60 s from device to store
        (f"{lag}{{le='30'}}", "0x30"),
        (f"{lag}{{le='60'}}", "0+100x30"),
        (f"{lag}{{le='+Inf'}}", "0+100x30"),
    ]
    test = {
        "rule_files": [rules.name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": name.replace("'", '"'), "values": values} for name, values in series
                ],
                "alert_rule_test": [
                    alert("IronlinkStoreWriteErrors", "2m"),  # not yet for 5 minutes
                    alert(
                        "IronlinkStoreWriteErrors",
                        "10m",
                        {
                            "tenant": "acme",
                            "severity": "critical",
                            "summary": "InfluxDB keeps refusing writes of tenant acme; its telemetry waits.",
                        },
                    ),
                    alert("IronlinkTenantHeld", "1m"),  # not yet for 2 minutes
                    alert(
                        "IronlinkTenantHeld",
                        "5m",
                        {
                            "tenant": "acme",
                            "severity": "critical",
                            "summary": "Tenant acme's store fails: its telemetry goes to the workers' spool"
                            " (dead-lettered once the spool is full).",
                        },
                    ),
                    alert(
                        "IronlinkDeadLetterRateHigh",
                        "25m",
                        {
                            "tenant": "acme",
                            "severity": "warning",
                            "summary": "10% of tenant acme's messages are dead-lettered.",
                        },
                    ),
                    alert(
                        "IronlinkBrokerDown",
                        "10m",
                        {
                            "severity": "critical",
                            "summary": "No ingest worker is connected to the MQTT broker.",
                        },
                    ),
                    alert("IronlinkIngestWorkerAbsent", "10m"),  # the workers do report
                    alert(
                        "IronlinkIngestionLagHigh",
                        "20m",
                        {
                            "severity": "warning",
                            "summary": "p99 lag from device to store is 59.7s (limit 30s).",
                        },
                    ),
                ],
            },
            {
                "interval": "1m",
                "input_series": [],
                "alert_rule_test": [
                    alert(
                        "IronlinkIngestWorkerAbsent",
                        "6m",
                        {
                            "severity": "critical",
                            "summary": "No ingest worker reports metrics (not running, or not scraped).",
                        },
                    )
                ],
            },
        ],
    }
    cases = tmp_path / "ironlink.rules.test.yml"
    cases.write_text(yaml.safe_dump(test, sort_keys=False))
    tested = run("test", "rules", cases)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_rule_file_has_one_group_of_named_alerts() -> None:
    document = yaml.safe_load(render_platform_rules())
    assert [group["name"] for group in document["groups"]] == [GROUP]
    assert sorted(rule["alert"] for rule in document["groups"][0]["rules"]) == [
        "IronlinkBrokerDown",
        "IronlinkDeadLetterRateHigh",
        "IronlinkIngestWorkerAbsent",
        "IronlinkIngestionLagHigh",
        "IronlinkStoreWriteErrors",
        "IronlinkTenantHeld",
    ]
