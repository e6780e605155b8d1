"""Scrape paths under the namespace's default deny, and the Prometheus operator's objects, on the plan
of every stack: the cluster's Prometheus (``cluster.prometheus``) reaches exactly the metrics ports,
and where ``cluster.prometheus_operator`` is set the platform declares a monitor per metrics endpoint
and a PrometheusRule holding the rendered platform rules, which the real ``promtool`` accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from components.render.emqx import DASHBOARD_PORT, METRICS_PATH
from components.render.kubernetes import ROLE_INGEST, role_selector
from components.render.monitoring import API_VERSION
from dashboards.platform import platform_rules
from infra.plan import Plan, PlannedResource
from ingest.deadletters.settings import HTTP_PORT as DEAD_LETTER_PORT
from ingest.settings import WorkerSettings
from provisioning.settings import HTTP_PORT as PROVISIONING_PORT
from tests.pulumi_mocks import PLANS, stack_config, stack_plan, workloads
from tests.test_alert_rules import needs_promtool, run
from tests.test_pulumi_runner import CLUSTER_STACKS, admits

pytestmark = PLANS

WORKER_PORT = WorkerSettings.model_fields["http_port"].default
OPERATOR_STACKS = [s for s in CLUSTER_STACKS if stack_config(s).cluster.prometheus_operator]
PLAIN_STACKS = [s for s in CLUSTER_STACKS if not stack_config(s).cluster.prometheus_operator]


def metrics_ports(stack: str) -> dict[str, int]:
    """NetworkPolicy name → the one port Prometheus may scrape there."""
    ports = {"ingest": WORKER_PORT, "dead-letters": DEAD_LETTER_PORT, "provisioning": PROVISIONING_PORT}
    if stack_config(stack).broker.engine == "emqx":
        ports["emqx"] = DASHBOARD_PORT
    return ports


def prometheus_pod(stack: str) -> tuple[str, dict[str, str]]:
    prometheus = stack_config(stack).cluster.prometheus
    return prometheus.namespace, dict(prometheus.pod_labels)


def named_ports_for(policy: PlannedResource, namespace: str, labels: dict[str, str]) -> set[int]:
    """Ports of the rules that name a peer matching this pod (rules open to anyone left aside)."""
    own = policy.get("metadata.namespace")
    return {
        port["port"]
        for rule in policy.get("spec.ingress", [])
        if any(admits(peer, namespace, labels, own) for peer in rule.get("from", []))
        for port in rule["ports"]
    }


def monitoring_objects(plan: Plan) -> list[PlannedResource]:
    return [r for r in plan.resources if r.type.startswith(f"kubernetes:{API_VERSION}:")]


# ------------------------------------------------------------------------------ NetworkPolicies
@pytest.mark.parametrize("stack", CLUSTER_STACKS)
def test_prometheus_scrapes_each_metrics_port_and_nothing_else(stack: str) -> None:
    plan = stack_plan(stack)
    namespace, labels = prometheus_pod(stack)
    expected = metrics_ports(stack)
    admitted = {
        policy.name: ports
        for policy in plan.find("NetworkPolicy")
        if (ports := named_ports_for(policy, namespace, labels))
    }
    assert admitted == {name: {port} for name, port in expected.items()}, stack


@pytest.mark.parametrize("stack", CLUSTER_STACKS)
def test_the_worker_admits_only_prometheus(stack: str) -> None:
    policy = stack_plan(stack).one("NetworkPolicy", "ingest")
    assert policy.get("spec.podSelector.matchLabels") == role_selector(ROLE_INGEST), "every colour's pods"
    (rule,) = policy.get("spec.ingress")
    namespace, labels = prometheus_pod(stack)
    own = stack_config(stack).cluster.namespace
    assert [p["port"] for p in rule["ports"]] == [WORKER_PORT]
    assert len(rule["from"]) == 1 and admits(rule["from"][0], namespace, labels, own)
    assert not admits(rule["from"][0], own, labels, own), "a look-alike in the platform's namespace"
    assert not admits(rule["from"][0], namespace, {"app.kubernetes.io/name": "grafana"}, own)


# --------------------------------------------------------------------------- the operator's objects
@pytest.mark.parametrize("stack", OPERATOR_STACKS)
def test_each_metrics_endpoint_has_a_monitor_that_selects_it(stack: str) -> None:
    plan = stack_plan(stack)
    monitors = {r.name: r for r in monitoring_objects(plan) if r.kind in ("ServiceMonitor", "PodMonitor")}
    assert set(monitors) == set(metrics_ports(stack)), stack
    for name, monitor in monitors.items():
        wanted = monitor.get("spec.selector.matchLabels")
        if monitor.kind == "ServiceMonitor":
            (endpoint,) = monitor.get("spec.endpoints")
            ports = [
                port["port"]
                for service in plan.find("Service")
                if wanted.items() <= service.get("metadata.labels").items()
                for port in service.get("spec.ports")
                if port.get("name") == endpoint["port"]
            ]
        else:
            (endpoint,) = monitor.get("spec.podMetricsEndpoints")
            ports = [
                port["containerPort"]
                for workload in workloads(plan)
                if wanted.items() <= workload.get("spec.template.metadata.labels", {}).items()
                for container in workload.get("spec.template.spec.containers")
                for port in container.get("ports", [])
                if port["name"] == endpoint["port"]
            ]
        assert ports and set(ports) == {metrics_ports(stack)[name]}, f"{stack}: {monitor.kind} {name}"
    assert monitors["emqx"].get("spec.endpoints.0.path") == METRICS_PATH
    tls = monitors["provisioning"].get("spec.podMetricsEndpoints.0")
    assert tls["scheme"] == "https" and tls["tlsConfig"]["ca"]["secret"]["key"] == "ca.crt"


@pytest.mark.parametrize("stack", OPERATOR_STACKS)
def test_the_prometheus_rule_holds_the_rendered_platform_rules(stack: str) -> None:
    (rule,) = [r for r in monitoring_objects(stack_plan(stack)) if r.kind == "PrometheusRule"]
    assert rule.get("spec.groups") == platform_rules()["groups"]
    assert rule.get("metadata.namespace") == stack_config(stack).cluster.namespace


@needs_promtool
def test_promtool_accepts_the_prometheus_rules_groups(tmp_path: Path) -> None:
    (stack,) = OPERATOR_STACKS[:1]
    (rule,) = [r for r in monitoring_objects(stack_plan(stack)) if r.kind == "PrometheusRule"]
    groups: list[dict[str, Any]] = rule.get("spec.groups")
    rules_file = tmp_path / "prometheus-rule.yml"
    rules_file.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    checked = run("check", "rules", rules_file)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in groups)} rules found" in checked.stdout


def test_the_b_and_c_stacks_have_the_operator_and_phase_a_does_not() -> None:
    assert {stack_config(s).phase for s in OPERATOR_STACKS} == {"B", "C"}
    assert PLAIN_STACKS and {stack_config(s).phase for s in PLAIN_STACKS} == {"A"}


@pytest.mark.parametrize("stack", PLAIN_STACKS)
def test_no_monitor_or_rule_where_the_operator_is_absent(stack: str) -> None:
    found = monitoring_objects(stack_plan(stack))
    assert found == [], f"{stack}: {[f'{r.kind} {r.name}' for r in found]} need the operator's CRDs"
