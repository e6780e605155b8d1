"""The Ironlink API in every stack's plan (the real program under the mock engine): its workload,
its NetworkPolicy peer by peer and port by port, its secrets, the databases admitting it, and
every Grafana org's alerts going to its webhook (``components/api.py``, ``components/alerting.py``)."""

from __future__ import annotations

from typing import Any

import pytest
from pulumi.runtime.sync_await import _sync_await

from api import alerts as alert_routes
from api.settings import ApiSettings
from components.api import WEBHOOK_PATH
from components.render import cloud_init
from components.render.kubernetes import ROLE_API, role_selector
from infra.config import ApiSmtp, StackConfigError, load_stack, parse_platform
from infra.plan import SECRET, PlannedResource, build_plan, mock_grafana_id
from registry.alerts import SHARED_SOURCE_ID, tenant_source_id
from tests.pulumi_mocks import (
    PLANS,
    STACKS,
    VM_STACKS,
    env_of,
    pod_spec,
    region_plan,
    stack_config,
    stack_plan,
)

pytestmark = PLANS

CONTACT_POINT = "grafana:alerting/contactPoint:ContactPoint"
POLICY = "grafana:alerting/notificationPolicy:NotificationPolicy"
ALERT_SOURCE = "pulumi-python:dynamic/registry:AlertSource"
API_PEER = {"podSelector": {"matchLabels": role_selector(ROLE_API)}}
DNS = {
    "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
    "to": [{"namespaceSelector": {}}],
}
PRIVATE_RANGES = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10"]


def on_rds(stack: str) -> bool:
    aws = stack_config(stack).aws
    return aws is not None and aws.registry == "rds"


def on_timestream(stack: str) -> bool:
    aws = stack_config(stack).aws
    return aws is not None and aws.telemetry_store == "timestream"


def tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"port": port, "protocol": "TCP"} for port in ports]


def names(resources: list[PlannedResource]) -> list[str]:
    return sorted(f"{r.kind} {r.name}" for r in resources)


@pytest.mark.parametrize("stack", STACKS)
def test_the_platform_declares_one_api_with_its_workload_service_secret_and_policy(stack: str) -> None:
    platform, config = region_plan(stack).platform, stack_config(stack)
    (component,) = platform.find("ironlink:api:IronlinkApi")
    owner = platform.component_of(component)
    assert owner is not None and owner.type == "ironlink:regional_platform:RegionalPlatform"
    expected = [
        "Deployment api",
        "NetworkPolicy api",
        "Secret api-credentials",
        "Service api",
        "ServiceAccount api",
    ]
    spread = config.high_availability or config.api.replicas > 1
    assert names(list(platform.children(component))) == sorted(
        [*expected, *(["PodDisruptionBudget api"] if spread else [])]
    ), stack
    assert all(not r.protect for r in platform.descendants(component)), f"{stack}: the API holds no data"
    for tenant in region_plan(stack).tenants.values():
        assert tenant.find("ironlink:api:IronlinkApi") == [], f"{tenant.stack}: the API is the platform's"


@pytest.mark.parametrize("stack", STACKS)
def test_the_api_runs_its_pinned_image_hardened_with_the_configs_limits_and_probes(stack: str) -> None:
    plan, config = stack_plan(stack), stack_config(stack)
    deployment = plan.one("Deployment", "api")
    spec = pod_spec(deployment)
    (server,) = spec["containers"]
    assert server["image"] == config.api.image and server["image"].rsplit(":", 1)[1][0].isdigit()
    assert deployment.get("spec.replicas") == config.api.replicas
    assert server["resources"] == {
        "requests": config.api.resources.requests.model_dump(),
        "limits": config.api.resources.limits.model_dump(),
    }
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["automountServiceAccountToken"] is False
    port = server["ports"][0]
    assert (port["name"], port["containerPort"]) == ("http", 8090)
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    service = plan.one("Service", "api")
    assert service.get("spec.type") == "ClusterIP"
    assert service.get("spec.ports") == [
        {"name": "http", "port": 8090, "protocol": "TCP", "targetPort": "http"}
    ]
    assert service.get("spec.selector") == deployment.get("spec.selector.matchLabels")


@pytest.mark.parametrize("stack", STACKS)
def test_the_api_reads_its_environment_and_its_registry_dsn_only_from_its_secret(stack: str) -> None:
    plan = stack_plan(stack)
    env = env_of(plan.one("Deployment", "api"))
    assert env["IRONLINK_API_REGISTRY_DSN"] == {
        "secretKeyRef": {"key": "registry-dsn", "name": "api-credentials"}
    }
    assert plan.one("Secret", "api-credentials").get("stringData") == {"registry-dsn": SECRET}
    plain = {name: value for name, value in env.items() if isinstance(value, str)}
    settings = ApiSettings.from_env(
        {**plain, "IRONLINK_API_REGISTRY_DSN": "postgresql://r"}
    )  # as `python -m api`
    # In a cluster the store is InfluxDB: each tenant's URL and read token come from its registry route.
    assert (settings.store_kind, settings.store_url, settings.port) == ("influxdb", None, 8090)
    assert settings.host == "0.0.0.0" and settings.notify_allow_private is False
    smtp = stack_config(stack).api.smtp
    assert settings.smtp_host == (smtp.host if smtp else None), stack
    assert not any("TOKEN" in name or "PASSWORD" in name for name in plain), f"{stack}: a secret in plain env"


@pytest.mark.parametrize("stack", STACKS)
def test_the_api_policy_admits_exactly_the_ingress_controller_and_grafana_and_reaches_exactly_its_peers(
    stack: str,
) -> None:
    config = stack_config(stack)
    policy = stack_plan(stack).one("NetworkPolicy", "api")
    controller = config.cluster.ingress_controller
    assert policy.get("spec.policyTypes") == ["Ingress", "Egress"]
    assert policy.get("spec.ingress") == [
        {
            "ports": tcp(8090),
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": controller.namespace}
                    },
                    "podSelector": {"matchLabels": dict(controller.pod_labels)},
                }
            ],
        },
        {
            "ports": tcp(8090),
            "from": [{"podSelector": {"matchLabels": role_selector("grafana")}}],
        },
    ], stack
    vpc = [{"ipBlock": {"cidr": config.aws.vpc_cidr}}] if config.aws else []
    registry = vpc if on_rds(stack) else [{"podSelector": {"matchLabels": role_selector("postgres")}}]
    stores = vpc if on_timestream(stack) else [{"podSelector": {"matchLabels": role_selector("influxdb")}}]
    notify_ports = tcp(443, *([config.api.smtp.port] if config.api.smtp else []))
    assert policy.get("spec.egress") == [
        {"ports": tcp(5432), "to": registry},
        {"ports": tcp(8086), "to": stores},
        {"ports": notify_ports, "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": PRIVATE_RANGES}}]},
        DNS,
    ], stack


@pytest.mark.parametrize("stack", STACKS)
def test_the_in_cluster_databases_admit_the_api_the_level_3_stores_too(stack: str) -> None:
    plan = stack_plan(stack)
    databases = [*plan.find("NetworkPolicy", "postgres"), *plan.find("NetworkPolicy", "influxdb")]
    databases += [p for p in plan.find("NetworkPolicy") if p.name.startswith("influxdb-")]
    expected = int(not on_rds(stack)) + len(plan.find("ironlink:influxdb:InfluxDB"))
    assert len(databases) == expected, f"{stack}: {names(databases)}"
    for policy in databases:
        (rule,) = policy.get("spec.ingress")
        assert API_PEER in rule["from"], f"{stack}: NetworkPolicy {policy.name} keeps the API out"
    # Grafana's own policy limits ingress only, so its webhook posts reach the API.
    assert plan.one("NetworkPolicy", "grafana").get("spec.policyTypes") == ["Ingress"]


@pytest.mark.parametrize("stack", STACKS)
def test_the_shared_org_has_one_contact_point_and_one_policy_for_every_tenant_all_to_the_api(
    stack: str,
) -> None:
    region, config = region_plan(stack), stack_config(stack)
    platform = region.platform
    url = platform.outputs["api_webhook_url"]
    assert url == f"http://api.{config.cluster.namespace}.svc.cluster.local:8090{WEBHOOK_PATH}"
    assert WEBHOOK_PATH in {getattr(route, "path", None) for route in alert_routes.router.routes}, (
        "the API serves the webhook"
    )
    (contact,) = platform.find(CONTACT_POINT)
    (policy,) = platform.find(POLICY)
    (source,) = platform.find(ALERT_SOURCE)
    assert "orgId" not in contact.inputs and "orgId" not in policy.inputs, "the shared org (the default one)"
    assert policy.inputs["contactPoint"] == contact.inputs["name"] and "policies" not in policy.inputs
    assert (source.inputs["source_id"], source.inputs.get("tenant_id")) == (SHARED_SOURCE_ID, None)
    assert source.inputs["token"] == SECRET and source.inputs["dsn"] == SECRET
    # One contact point and policy per org: the shared one, and each tenant's own org.
    for tenant_id, plan in region.tenants.items():
        level = config.isolation_of(config.tenant(tenant_id))
        contacts, policies, sources = plan.find(CONTACT_POINT), plan.find(POLICY), plan.find(ALERT_SOURCE)
        if level == 1:
            assert contacts == policies == sources == [], f"{plan.stack}: level 1 is the shared org's"
            continue
        (contact,), (policy,), (source,) = contacts, policies, sources
        (org,) = plan.find("grafana:oss/organization:Organization")
        org_id = str(mock_grafana_id(org.name))
        assert contact.inputs["orgId"] == policy.inputs["orgId"] == org_id, plan.stack
        assert policy.inputs["contactPoint"] == contact.inputs["name"] and "policies" not in policy.inputs
        assert (source.inputs["source_id"], source.inputs["tenant_id"]) == (
            tenant_source_id(tenant_id),
            tenant_id,
        )
        # The plan masks the webhook setting (it holds the token): read the URL from the output.
        assert [set(hook.values()) for hook in contact.inputs["webhooks"]] == [{SECRET}]
        (webhook,) = _sync_await(plan.platform.alerts.contact_point.webhooks.future())
        assert webhook["url"] == url, f"{plan.stack}: posts elsewhere than its platform's API"
    shared_webhook = _sync_await(platform.platform.shared_org_alerts.contact_point.webhooks.future())
    assert [hook["url"] for hook in shared_webhook] == [url]


@pytest.mark.parametrize("stack", STACKS)
def test_each_tenant_stack_gives_the_api_its_store_read_token_as_a_secret(stack: str) -> None:
    for plan in region_plan(stack).tenants.values():
        (row,) = plan.find("pulumi-python:dynamic/registry:Tenant")
        assert row.inputs["read_token"] == SECRET, f"{plan.stack}: no read token for the API"
        assert not {"token", "read_token"} & set(row.inputs["route"]), f"{plan.stack}: a token in the route"
        assert _sync_await(plan.platform.read_token.is_secret()), plan.stack


def test_an_smtp_relay_in_the_stack_opens_its_port_and_reaches_the_api_with_its_password_from_a_secret() -> (
    None
):
    config = stack_config("mvp-eu")
    relay = ApiSmtp(host="smtp.example.com", port=2525, username="alerts", sender="Ironlink <a@example.com>")
    with_relay = config.model_copy(update={"api": config.api.model_copy(update={"smtp": relay})})
    plan = build_plan(with_relay, "mvp-eu")
    env = env_of(plan.one("Deployment", "api"))
    assert env["IRONLINK_API_SMTP_PASSWORD"] == {
        "secretKeyRef": {"key": "password", "name": "api-smtp", "optional": True}
    }
    plain = {name: value for name, value in env.items() if isinstance(value, str)}
    settings = ApiSettings.from_env(plain)
    assert (settings.smtp_host, settings.smtp_port, settings.smtp_username, settings.smtp_from) == (
        "smtp.example.com",
        2525,
        "alerts",
        "Ironlink <a@example.com>",
    )
    notify = plan.one("NetworkPolicy", "api").get("spec.egress")[2]
    assert notify["ports"] == tcp(443, 2525) and notify["to"][0]["ipBlock"]["cidr"] == "0.0.0.0/0"


def test_bad_api_settings_are_refused_all_at_once_each_named() -> None:
    raw = {
        "phase": "A",
        "region": "x",
        "api": {"replicas": 0, "smtp": {"host": "bad host"}, "notify_except": ["nope"]},
        "cluster": {"ingress_controller": {"namespace": "Bad_NS"}},
    }
    with pytest.raises(StackConfigError) as refused:
        parse_platform(raw)
    assert sorted(problem.path for problem in refused.value.problems) == [
        "ironlink:api.notify_except[0]",
        "ironlink:api.replicas",
        "ironlink:api.smtp.host",
        "ironlink:api.smtp.sender",
        "ironlink:cluster.ingress_controller.namespace",
    ]


def test_phase_a_on_one_vm_runs_the_api_on_loopback_after_the_registry_and_the_store() -> None:
    config = load_stack(VM_STACKS[0])
    units = cloud_init.units(config)
    assert list(units) == list(cloud_init.UNITS) and cloud_init.UNITS[-1] == "api"
    assert "Requires=ironlink-registry.service ironlink-store.service" in units["api"].splitlines()
    assert f"ExecStart={cloud_init.PYTHON} -m api" in units["api"].splitlines()
    env = cloud_init.api_env(config)
    settings = ApiSettings.from_env(env)  # the unit's EnvironmentFile, as `python -m api` reads it
    assert (settings.host, settings.port, settings.store_kind) == ("127.0.0.1", 8090, "victoriametrics")
    assert settings.store_url == f"http://127.0.0.1:{cloud_init.STORE_PORT}"
    assert settings.dsn() == cloud_init.registry_dsn(config), "the registry over its Unix socket"
