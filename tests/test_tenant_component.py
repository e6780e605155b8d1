"""What each tenant gets at each isolation level, under Pulumi's mock engine.

A region with one tenant per level (and a second level-1 tenant) is declared with the real
``Tenant`` component; every registration is recorded (secrets masked) by ``infra.plan``'s
recording monitor. Each test is a policy; a failure names the tenant and the resource.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
import pytest
from pulumi.runtime import mocks, settings
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

from components.alerting import CONTACT_POINT, GROUP_BY
from components.influxdb import influxdb_url
from components.providers.influxdb import InfluxConnection
from components.tenant import Tenant, TenantArgs, grafana_admin_provider
from infra.config import PlatformConfig, parse_platform
from infra.plan import (
    SECRET,
    Plan,
    PlanMocks,
    PlannedResource,
    RecordingMonitor,
    mock_grafana_id,
    tree_order,
)
from infra.tenancy import SHARED_INFLUXDB, store_route

SHARED_URL = "http://influxdb.ironlink.svc.cluster.local:8086"
ORG, BUCKET, TOKEN = (
    "pulumi-python:dynamic/influxdb:Organization",
    "pulumi-python:dynamic/influxdb:Bucket",
    "pulumi-python:dynamic/influxdb:Token",
)
GRAFANA_ORG = "grafana:oss/organization:Organization"
CONTACT, POLICY = (
    "grafana:alerting/contactPoint:ContactPoint",
    "grafana:alerting/notificationPolicy:NotificationPolicy",
)
ALERT_SOURCE = "pulumi-python:dynamic/registry:AlertSource"
WEBHOOK_URL = "http://api.ironlink.svc.cluster.local:8090/v1/alerts/grafana"


CONFIG = parse_platform(
    {
        "phase": "C",
        "region": "test",
        "broker": {"nodes": 3},
        "tenants": [
            {
                "id": "acme",
                "name": "Acme",
                "tier": "basic",
                "isolation": 1,
                "machine_types": ["hydraulic_press", "cnc_mill"],
            },
            {"id": "initech", "name": "Initech", "tier": "basic", "isolation": 1},
            {
                "id": "globex",
                "name": "Globex",
                "tier": "standard",
                "isolation": 2,
                "machine_types": ["injection_molder"],
            },
            {
                "id": "umbrella",
                "name": "Umbrella",
                "tier": "premium",
                "isolation": 3,
                "machine_types": ["air_compressor"],
            },
        ],
    },
    "tenant-test",
)
LEVEL = {tenant.id: CONFIG.isolation_of(tenant) for tenant in CONFIG.tenants}


@dataclass
class Declared:
    plan: Plan
    tenants: dict[str, Tenant]
    secret_outputs: dict[str, dict[str, tuple[bool, Any]]]


def _declare(config: PlatformConfig, influxdb: dict[str, InfluxConnection] | None) -> Declared:
    monitor = RecordingMonitor(PlanMocks())
    settings.ROOT.set(None)
    mocks.set_mocks(
        monitor.mocks, project="ironlink", stack="test", monitor=monitor, logger=logging.getLogger("t")
    )
    found: dict[str, Any] = {}

    async def program() -> None:
        k8s_provider = k8s.Provider("k8s")
        grafana = grafana_admin_provider(
            "grafana", "http://grafana:3000", "admin", pulumi.Output.secret("pw"), k8s_provider
        )
        shared = InfluxConnection(SHARED_URL, pulumi.Output.secret("operator-token"))
        tenants = {
            tenant.id: Tenant(
                tenant.id,
                TenantArgs(
                    config=config,
                    tenant=tenant,
                    influxdb={SHARED_INFLUXDB: shared} if influxdb is None else influxdb,
                    grafana=grafana,
                    registry_dsn=pulumi.Output.secret("postgresql://ironlink:pw@postgres/ironlink"),
                    k8s_provider=k8s_provider,
                    alert_webhook_url=WEBHOOK_URL,
                ),
            )
            for tenant in config.tenants
        }
        found["tenants"] = tenants
        found["secrets"] = {
            tenant_id: {
                attribute: (await output.is_secret(), await output.future())
                for attribute, output in (("write_token", t.write_token), ("read_token", t.read_token))
            }
            for tenant_id, t in tenants.items()
        }

    _sync_await(run_pulumi_func(program))
    return Declared(Plan("test", tree_order(monitor.recorded)), found["tenants"], found["secrets"])


@functools.cache
def declared() -> Declared:
    return contextvars.copy_context().run(_declare, CONFIG, None)


def owned(tenant_id: str, typ: str | None = None) -> list[PlannedResource]:
    """The resources declared under a tenant's component (of type ``typ``)."""
    plan = declared().plan
    component = plan.one("Tenant", tenant_id)
    return [r for r in plan.descendants(component) if typ is None or r.type == typ]


def one(tenant_id: str, typ: str, name: str | None = None) -> PlannedResource:
    found = [r for r in owned(tenant_id, typ) if name is None or r.name == name]
    assert len(found) == 1, (
        f"tenant {tenant_id}: expected one {typ} {name or ''}, got {[r.name for r in found]}"
    )
    return found[0]


def urn_id(resource: PlannedResource) -> str:
    """The id the mock engine gave a resource (``<name>-id``), as dependants see it."""
    return f"{resource.name}-id"


# ------------------------------------------------------------------------------- isolation
def test_level_1_tenants_share_the_org_and_get_a_folder_their_team_alone_may_view() -> None:
    for tenant_id in ("acme", "initech"):
        org = one(tenant_id, ORG)
        assert (org.inputs["name"], org.inputs["adopt"]) == (CONFIG.influxdb.shared_org, True), tenant_id
        assert owned(tenant_id, GRAFANA_ORG) == [], f"{tenant_id}: level 1 gets no Grafana org"
        team = one(tenant_id, "grafana:oss/team:Team")
        permissions = one(tenant_id, "grafana:oss/folderPermission:FolderPermission").inputs["permissions"]
        assert permissions == [{"permission": "View", "teamId": str(mock_grafana_id(team.name))}], (
            f"{tenant_id}: only {team.name} may view"
        )
        assert "orgId" not in one(tenant_id, "grafana:oss/dataSource:DataSource").inputs
        folder = one(tenant_id, "grafana:oss/folder:Folder").inputs
        assert folder["title"] == f"{CONFIG.tenant(tenant_id).name} ({tenant_id})", "titles must not clash"


def test_level_1_tenants_leave_alert_routing_to_the_shared_orgs_one_policy() -> None:
    """The shared org's contact point and policy are the platform stack's (one for every tenant:
    routing is the registry's); a level-1 tenant stack declares none and its rules name none."""
    for tenant_id in ("acme", "initech"):
        for typ in (CONTACT, POLICY, ALERT_SOURCE):
            assert owned(tenant_id, typ) == [], f"{tenant_id} declares a {typ}"
    rules = [rule for group in declared().plan.find("RuleGroup") for rule in group.inputs["rules"]]
    assert rules and all("notificationSettings" not in rule for rule in rules)


@pytest.mark.parametrize("tenant_id", ["globex", "umbrella"])
def test_level_2_and_3_tenants_get_their_own_grafana_and_influxdb_orgs(tenant_id: str) -> None:
    org = one(tenant_id, ORG)
    assert (org.inputs["name"], org.inputs["adopt"]) == (tenant_id, False)
    grafana_org = one(tenant_id, GRAFANA_ORG)
    org_id = str(_org_id(grafana_org))
    for typ in (
        "grafana:oss/dataSource:DataSource",
        "grafana:oss/folder:Folder",
        "grafana:alerting/ruleGroup:RuleGroup",
    ):
        assert one(tenant_id, typ).inputs["orgId"] == org_id, f"{tenant_id}: {typ} outside its org"
    assert owned(tenant_id, "grafana:oss/team:Team") == []


def _org_id(grafana_org: PlannedResource) -> int:
    return mock_grafana_id(grafana_org.name)


@pytest.mark.parametrize("tenant_id", ["globex", "umbrella"])
def test_a_tenant_with_its_own_org_sends_every_alert_to_the_api_as_its_own_webhook_source(
    tenant_id: str,
) -> None:
    org_id = str(_org_id(one(tenant_id, GRAFANA_ORG)))
    contact = one(tenant_id, CONTACT)
    assert (contact.inputs["name"], contact.inputs["orgId"]) == (CONTACT_POINT, org_id)
    # The webhook carries the bearer token: the whole setting is a secret in state and plan.
    assert [set(hook.values()) for hook in contact.inputs["webhooks"]] == [{SECRET}]
    alerts = declared().tenants[tenant_id].alerts
    assert alerts is not None
    webhooks = _sync_await(alerts.contact_point.webhooks.future())
    assert webhooks is not None
    (webhook,) = webhooks
    assert (webhook["url"], webhook["http_method"], webhook["authorization_scheme"]) == (
        WEBHOOK_URL,
        "POST",
        "Bearer",
    )
    assert "emails" not in contact.inputs, "who is told is the registry's routing, not Grafana's"
    policy = one(tenant_id, POLICY)
    assert (policy.inputs["contactPoint"], policy.inputs["orgId"]) == (CONTACT_POINT, org_id)
    assert policy.inputs["groupBies"] == GROUP_BY and "routes" not in policy.inputs
    source = one(tenant_id, ALERT_SOURCE)
    assert (source.inputs["source_id"], source.inputs["tenant_id"]) == (f"grafana-{tenant_id}", tenant_id)
    assert source.inputs["token"] == SECRET and source.inputs["dsn"] == SECRET


def test_only_the_level_3_tenant_gets_an_influxdb_instance_and_its_store_lives_there() -> None:
    plan = declared().plan
    owners = [(i.name, plan.component_of(i)) for i in plan.find("ironlink:influxdb:InfluxDB")]
    assert [(name, owner.name if owner else None) for name, owner in owners] == [
        ("influxdb-umbrella", "umbrella")
    ]
    umbrella_url = influxdb_url(CONFIG.cluster.namespace, "influxdb-umbrella")
    for tenant_id in LEVEL:
        expected = umbrella_url if LEVEL[tenant_id] == 3 else SHARED_URL
        for resource in owned(tenant_id):
            if resource.type in (ORG, BUCKET, TOKEN):
                assert resource.inputs["url"] == expected, (
                    f"{tenant_id}: {resource.name} talks to the wrong instance"
                )
        datasource = one(tenant_id, "grafana:oss/dataSource:DataSource")
        assert datasource.inputs["url"] == expected


def test_a_missing_shared_instance_is_named() -> None:
    message = "TenantArgs.influxdb: no 'influxdb' instance for tenant 'acme' (known: none)"
    with pytest.raises(ValueError, match=re.escape(message)):
        contextvars.copy_context().run(_declare, CONFIG, {})


# --------------------------------------------------------------------------------- tokens
def buckets_of(tenant_id: str) -> dict[str, PlannedResource]:
    return {b.inputs["name"]: b for b in owned(tenant_id, BUCKET)}


@pytest.mark.parametrize("tenant_id", sorted(LEVEL))
def test_tokens_name_only_the_tenants_own_buckets(tenant_id: str) -> None:
    route = store_route(CONFIG, CONFIG.tenant(tenant_id))
    buckets = buckets_of(tenant_id)
    assert sorted(buckets) == sorted([route.bucket, route.downsampled_bucket])
    raw, downsampled = urn_id(buckets[route.bucket]), urn_id(buckets[route.downsampled_bucket])
    org_id = urn_id(one(tenant_id, ORG))
    write, read = (
        one(tenant_id, TOKEN, f"{tenant_id}-write-token"),
        one(tenant_id, TOKEN, f"{tenant_id}-read-token"),
    )
    assert write.inputs["permissions"] == [{"action": "write", "bucket_id": raw}]
    assert read.inputs["permissions"] == [
        {"action": "read", "bucket_id": raw},
        {"action": "read", "bucket_id": downsampled},
    ]
    assert write.inputs["org_id"] == read.inputs["org_id"] == org_id
    others = {urn_id(b) for other in LEVEL if other != tenant_id for b in owned(other, BUCKET)}
    named = {grant["bucket_id"] for token in (write, read) for grant in token.inputs["permissions"]}
    assert not named & others, f"{tenant_id}: a token names another tenant's bucket"


@pytest.mark.parametrize("tenant_id", sorted(LEVEL))
def test_buckets_keep_the_tiers_retention_and_are_protected_with_the_stack(tenant_id: str) -> None:
    route = store_route(CONFIG, CONFIG.tenant(tenant_id))
    buckets = buckets_of(tenant_id)
    assert buckets[route.bucket].inputs["retention_seconds"] == route.raw_retention_seconds
    assert (
        buckets[route.downsampled_bucket].inputs["retention_seconds"] == route.downsampled_retention_seconds
    )
    assert all(b.protect == CONFIG.protect_stateful for b in buckets.values())


# -------------------------------------------------------------------------------- secrets
@pytest.mark.parametrize("tenant_id", sorted(LEVEL))
def test_tokens_and_credentials_are_secret(tenant_id: str) -> None:
    for attribute, (is_secret, value) in declared().secret_outputs[tenant_id].items():
        assert is_secret, f"{tenant_id}.{attribute} is not a secret"
        assert value == f"token-of-{tenant_id}-{attribute.replace('_token', '')}-token"
    for resource in owned(tenant_id):
        if resource.type in (ORG, BUCKET, TOKEN):
            assert resource.inputs["admin_token"] == SECRET, f"{resource.name}: admin token in clear"
    assert one(tenant_id, "grafana:oss/dataSource:DataSource").inputs["secureJsonDataEncoded"] == SECRET
    registry = one(tenant_id, "pulumi-python:dynamic/registry:Tenant")
    assert registry.inputs["dsn"] == SECRET
    # The API's read token for the tenant's store, kept out of the readable route.
    assert registry.inputs["read_token"] == registry.inputs["write_token"] == SECRET
    assert not {"token", "read_token"} & set(registry.inputs["route"])
    assert registry.inputs["isolation"] == LEVEL[tenant_id]


def test_the_datasource_is_flux_on_the_tenants_org_and_bucket() -> None:
    for tenant_id in LEVEL:
        route = store_route(CONFIG, CONFIG.tenant(tenant_id))
        data = json.loads(one(tenant_id, "grafana:oss/dataSource:DataSource").inputs["jsonDataEncoded"])
        assert data == {"version": "Flux", "organization": route.org, "defaultBucket": route.bucket}


# ---------------------------------------------------------------------------- dashboards
def flux_queries(tenant_id: str) -> list[str]:
    """Every Flux text the tenant's dashboards (panels, variables) and alert rules run."""
    queries = []
    for board in owned(tenant_id, "grafana:oss/dashboard:Dashboard"):
        model = json.loads(board.inputs["configJson"])
        queries += [target["query"] for panel in model["panels"] for target in panel.get("targets", [])]
        queries += [variable["query"] for variable in model.get("templating", {}).get("list", [])]
    for group in owned(tenant_id, "grafana:alerting/ruleGroup:RuleGroup"):
        for rule in group.inputs["rules"]:
            models = [json.loads(stage["model"]) for stage in rule["datas"]]
            queries += [model["query"] for model in models if "query" in model]
    return queries


@pytest.mark.parametrize("tenant_id", sorted(LEVEL))
def test_dashboards_and_rules_read_only_the_tenants_bucket(tenant_id: str) -> None:
    route = store_route(CONFIG, CONFIG.tenant(tenant_id))
    queries = flux_queries(tenant_id)
    assert queries, f"{tenant_id}: no queries"
    read = {bucket for query in queries for bucket in re.findall(r'bucket: "([^"]+)"', query)}
    assert read == {route.bucket}, f"{tenant_id}'s dashboards and rules read {sorted(read)}"
    assert all(f'r.tenant_id == "{tenant_id}"' in query for query in queries)


def test_a_tenant_without_machines_gets_no_alert_rules_and_one_dashboard() -> None:
    assert owned("initech", "grafana:alerting/ruleGroup:RuleGroup") == []
    assert [d.name for d in owned("initech", "grafana:oss/dashboard:Dashboard")] == ["initech-fleet"]


def test_the_registry_route_carries_the_tiers_monthly_quota_to_the_worker() -> None:
    """The hard quota usage metering enforces (ingest/usage.py) reaches tenant_store_routes."""
    quotas = {}
    for tenant_id in LEVEL:
        route = one(tenant_id, "pulumi-python:dynamic/registry:Tenant").inputs["route"]
        quotas[tenant_id] = route.get("messages_per_month")  # the engine drops a None (premium: none)
        assert quotas[tenant_id] == CONFIG.monthly_messages_of(CONFIG.tenant(tenant_id)), tenant_id
    assert {"basic", "standard"} <= {CONFIG.tenant(t).tier for t, quota in quotas.items() if quota}
