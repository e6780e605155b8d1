"""A ``pulumi up`` that can reach what it manages, and keeps what it must not recreate, on the plan
of every stack (platform and tenant stacks merged).

- the runner pod of ``docs/pulumi-runner.yaml`` is exactly what the databases' NetworkPolicies
  admit (``cluster.runner``), and the runner's providers talk to in-cluster addresses;
- every Kubernetes provider updates Secrets and ConfigMaps in place, and the force-new table agrees;
- what a server applies only at its first start is protected in every phase.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from components.render.kubernetes import CLUSTER_DOMAIN, ROLE_RUNNER, role_selector
from components.replacements import FORCE_NEW
from infra.config import Cluster
from infra.plan import Plan, PlannedResource
from tests.pulumi_mocks import PLANS, STACKS, stack_config, stack_plan
from tests.test_manifests import KUBERNETES_VERSION

pytestmark = PLANS

RUNNER_FILE = Path(__file__).parents[1] / "docs/pulumi-runner.yaml"
# Stacks on a cluster (a phase A stack on one VM, ``aws.vm``, has no Kubernetes and no runner pod).
CLUSTER_STACKS = [s for s in STACKS if getattr(stack_config(s).aws, "vm", None) is None]
K8S_PROVIDER = "pulumi:providers:kubernetes"
RANDOM_PASSWORD = "random:index/randomPassword:RandomPassword"


def runner_documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(RUNNER_FILE.read_text()) if doc]


def runner_pod() -> tuple[str, dict[str, str]]:
    """The runner Job's namespace and its pod's labels."""
    (job,) = [doc for doc in runner_documents() if doc["kind"] == "Job"]
    return job["metadata"]["namespace"], job["spec"]["template"]["metadata"]["labels"]


def admits(peer: dict[str, Any], namespace: str, pod_labels: dict[str, str], own_namespace: str) -> bool:
    """NetworkPolicy peer semantics: every matchLabels of the pod selector, in the selected namespace
    (the policy's own one without a namespace selector)."""
    pods = peer.get("podSelector", {}).get("matchLabels", {})
    if "namespaceSelector" in peer:
        wanted = peer["namespaceSelector"].get("matchLabels", {})
        in_namespace = all({"kubernetes.io/metadata.name": namespace}.get(k) == v for k, v in wanted.items())
    else:
        in_namespace = namespace == own_namespace
    return in_namespace and all(pod_labels.get(k) == v for k, v in pods.items())


def ports_admitting(policy: PlannedResource, namespace: str, pod_labels: dict[str, str]) -> set[int]:
    own = policy.get("metadata.namespace")
    return {
        port["port"]
        for rule in policy.get("spec.ingress", [])
        if "from" not in rule or any(admits(p, namespace, pod_labels, own) for p in rule["from"])
        for port in rule["ports"]
    }


def database_policies(plan: Plan) -> list[PlannedResource]:
    """The in-cluster InfluxDB instances' and the registry PostgreSQL's policies, where the stack has them."""
    names = {"postgres", *(store.name for store in plan.find("ironlink:influxdb:InfluxDB"))}
    return [policy for policy in plan.find("NetworkPolicy") if policy.name in names]


# ---------------------------------------------------------------------------------- the runner
def test_the_runner_manifests_are_valid_and_its_pod_is_restricted() -> None:
    for document in runner_documents():
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    namespace, labels = runner_pod()
    assert namespace == Cluster().runner_namespace, "the default config names the documented namespace"
    assert role_selector(ROLE_RUNNER).items() <= labels.items()
    (ns,) = [doc for doc in runner_documents() if doc["kind"] == "Namespace"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("stack", CLUSTER_STACKS)
def test_the_runner_reaches_every_database_api_and_grafana_on_their_ports_only(stack: str) -> None:
    plan = stack_plan(stack)
    namespace, labels = runner_pod()
    config = stack_config(stack)
    assert config.cluster.runner == "in-cluster" and config.cluster.runner_namespace == namespace
    policies = database_policies(plan)
    assert policies or config.aws is not None, f"{stack}: no in-cluster database found"
    for policy in policies:
        (port,) = [p["port"] for p in policy.get("spec.ingress.0.ports")]
        assert ports_admitting(policy, namespace, labels) == {port}, f"{stack}: {policy.name}"
    grafana = plan.one("NetworkPolicy", "grafana")
    assert 3000 in ports_admitting(grafana, namespace, labels), f"{stack}: the Grafana provider is cut off"


@pytest.mark.parametrize("stack", CLUSTER_STACKS)
def test_a_pod_of_another_namespace_or_role_is_not_admitted_as_the_runner(stack: str) -> None:
    namespace, labels = runner_pod()
    impostors = [("default", labels), (namespace, {**labels, "app.kubernetes.io/component": "shell"})]
    for policy in database_policies(stack_plan(stack)):
        for other_namespace, other_labels in impostors:
            assert ports_admitting(policy, other_namespace, other_labels) == set(), (
                f"{stack}: {policy.name} admits {other_namespace}/{other_labels}"
            )


@pytest.mark.parametrize("stack", CLUSTER_STACKS)
def test_the_runners_providers_connect_to_in_cluster_addresses(stack: str) -> None:
    plan = stack_plan(stack)
    urls = [r.get("url") for r in plan.resources if r.type == "pulumi:providers:grafana"]
    urls += [r.get("url") for r in plan.find("influxdb:Bucket")]
    assert urls, stack
    # Timestream for InfluxDB (aws.telemetry_store) is private to the VPC the cluster runs in.
    reachable = (f".{CLUSTER_DOMAIN}:", ".timestream-influxdb.amazonaws.com:")
    assert all(isinstance(url, str) and any(r in url for r in reachable) for url in urls), (stack, urls)


# ------------------------------------------------------------------------- Kubernetes provider
@pytest.mark.parametrize("stack", CLUSTER_STACKS)
def test_every_kubernetes_provider_updates_secrets_and_config_maps_in_place(stack: str) -> None:
    providers = [r for r in stack_plan(stack).resources if r.type == K8S_PROVIDER]
    assert len(providers) > 1, f"{stack}: the platform's and each tenant stack's provider"
    for provider in providers:
        # Provider inputs travel as JSON text on the wire.
        flags = {
            key: json.loads(provider.inputs.get(key, "null"))
            for key in ("enableSecretMutable", "enableConfigMapMutable")
        }
        assert flags == {"enableSecretMutable": True, "enableConfigMapMutable": True}, (
            f"{stack}: provider {provider.name} replaces named Secrets/ConfigMaps on new data"
        )


def test_the_force_new_table_lists_no_data_path_of_a_secret_or_config_map() -> None:
    data_paths = {"data", "stringData", "binaryData"}
    assert not data_paths & set(FORCE_NEW["kubernetes:core/v1:Secret"]), "the provider mutates Secrets"
    assert not data_paths & set(FORCE_NEW["kubernetes:core/v1:ConfigMap"]), "the provider mutates ConfigMaps"
    assert "type" in FORCE_NEW["kubernetes:core/v1:Secret"], "a Secret's type stays immutable"


# ---------------------------------------------------------------------- first-start passwords
FIRST_START = [
    "grafana-admin",  # GF_SECURITY_ADMIN_PASSWORD: the admin user is created once
    "emqx-dashboard",  # EMQX_DASHBOARD__DEFAULT_PASSWORD: the dashboard admin is seeded once
    "influxdb-admin-password",  # DOCKER_INFLUXDB_INIT_*: setup runs while no bolt file exists
    "influxdb-admin-token",
    "postgres-owner",  # initdb and the init script set the roles' passwords once
    "postgres-emqx",
    "postgres-grafana",
]


@pytest.mark.parametrize("stack", CLUSTER_STACKS)
def test_passwords_applied_only_at_first_start_are_protected_in_every_phase(stack: str) -> None:
    plan = stack_plan(stack)
    passwords = {r.name: r for r in plan.resources if r.type == RANDOM_PASSWORD}
    present = [name for name in FIRST_START if name in passwords]
    assert "grafana-admin" in present, stack
    if stack_config(stack).broker.engine == "emqx":
        assert "emqx-dashboard" in present, stack
    unprotected = [name for name in present if not passwords[name].protect]
    assert unprotected == [], f"{stack}: a new value would lock the providers out: {unprotected}"
    level_3 = [r for r in plan.resources if r.type == RANDOM_PASSWORD and r.name.endswith("-admin-token")]
    assert all(r.protect for r in level_3), f"{stack}: a level-3 tenant's InfluxDB token is unprotected"
