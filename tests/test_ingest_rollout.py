"""Rollouts and scale-in of the ingest worker lose nothing: stable consumer identities, a graceful
stop longer than the worker's own drain, a spool volume per replica, and blue/green colours sharing
one share group. Asserted on the real program's plan under the mock engine."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import kubernetes_validate
import pytest

from components.render.kubernetes import COLOUR_LABEL, ROLE_INGEST
from infra.config import PHASE_PRESETS, StackConfigError, parse_platform, read_stack_settings, stack_file
from infra.plan import Plan, PlannedResource, build_plan
from infra.tenancy import INGEST_SERVICE, ingest_subscription
from ingest.settings import WorkerSettings
from tests.pulumi_mocks import PLANS, STACKS, env_of, pod_spec, stack_config, stack_plan, stacks_of
from tests.test_manifests import KUBERNETES_VERSION

pytestmark = PLANS

BLUE_IMAGE, GREEN_IMAGE = "ghcr.io/ironlink/ingest:0.1.0", "ghcr.io/ironlink/ingest:0.2.0"
BLUE, GREEN = {"image": BLUE_IMAGE}, {"image": GREEN_IMAGE}


def mvp_eu_with_colours(**colours: dict[str, str]) -> Plan:
    """mvp-eu (phase B, EMQX) with the worker in the given colours (built once per test process)."""
    return _colour_plan(json.dumps(colours, sort_keys=True))


@functools.cache
def _colour_plan(colours: str) -> Plan:
    raw = read_stack_settings(stack_file("mvp-eu"))
    raw["ingest"] = {**raw.get("ingest", {}), "colours": json.loads(colours)}
    return build_plan(parse_platform(raw, "mvp-eu"), "mvp-eu")


def worker_sets(plan: Plan) -> list[PlannedResource]:
    return [
        s
        for s in plan.find("StatefulSet")
        if s.get("spec.template.metadata.labels")["app.kubernetes.io/component"] == ROLE_INGEST
    ]


def settings_of(workload: PlannedResource) -> WorkerSettings:
    """What ``python -m ingest`` reads from the workload's plain environment."""
    plain = {name: value for name, value in env_of(workload).items() if isinstance(value, str)}
    # the secrets, as the pod gets them from its Secret
    return WorkerSettings.from_env(
        {**plain, "IRONLINK_MQTT_PASSWORD": "x", "IRONLINK_REGISTRY_DSN": "postgresql://r"}
    )


def matches(selector: Mapping[str, str], pod_labels: Mapping[str, str]) -> bool:
    return all(pod_labels.get(key) == value for key, value in selector.items())


def admits(policy: PlannedResource, pod_labels: Mapping[str, str]) -> bool:
    """Whether any ingress rule of ``policy`` lets a pod with ``pod_labels`` in."""
    for rule in policy.get("spec.ingress", []):
        for peer in rule.get("from", [None]):
            if peer is None or matches(peer.get("podSelector", {}).get("matchLabels", {}), pod_labels):
                return True
    return False


# ------------------------------------------------------------------------- stable identities
@pytest.mark.parametrize("stack", STACKS)
def test_every_phase_runs_the_worker_as_a_statefulset_with_stable_client_ids(stack: str) -> None:
    plan = stack_plan(stack)
    assert plan.find("Deployment", "ingest") == [], f"{stack}: the worker is still a Deployment"
    worker = plan.one("StatefulSet", "ingest")
    env = [
        (entry["name"], entry.get("value", entry.get("valueFrom")))
        for entry in pod_spec(worker)["containers"][0]["env"]
    ]
    names = [name for name, _ in env]
    assert ("POD_NAME", {"fieldRef": {"fieldPath": "metadata.name"}}) in env, f"{stack}: no POD_NAME"
    assert dict(env)["IRONLINK_MQTT_CLIENT_ID"] == f"{INGEST_SERVICE}-$(POD_NAME)"
    assert names.index("POD_NAME") < names.index("IRONLINK_MQTT_CLIENT_ID"), (
        f"{stack}: $(POD_NAME) expands only from a variable declared before it"
    )
    settings = settings_of(worker)
    # EMQX accepts a service's client id only as '<username>-...' (registry/queries.py)
    assert settings.client_id.startswith(f"{settings.mqtt_username}-"), stack
    assert (worker.get("spec.podManagementPolicy"), worker.get("spec.updateStrategy.type")) == (
        "Parallel",
        "RollingUpdate",
    )
    governing = plan.one("Service", worker.get("spec.serviceName"))
    assert governing.get("spec.clusterIP") == "None", f"{stack}: the worker's pods get no stable DNS names"
    assert matches(governing.get("spec.selector"), worker.get("spec.template.metadata.labels"))


@pytest.mark.parametrize("stack", STACKS)
def test_a_stopping_worker_has_longer_than_its_own_drain_before_sigkill(stack: str) -> None:
    worker = stack_plan(stack).one("StatefulSet", "ingest")
    settings = settings_of(worker)
    assert settings.shutdown_grace_s == stack_config(stack).ingest.shutdown_grace_s
    assert pod_spec(worker)["terminationGracePeriodSeconds"] > settings.shutdown_grace_s, (
        f"{stack}: the kubelet kills the worker before it has drained"
    )


@pytest.mark.parametrize("stack", STACKS)
def test_each_replica_keeps_its_spool_on_its_own_retained_volume(stack: str) -> None:
    config, worker = stack_config(stack), stack_plan(stack).one("StatefulSet", "ingest")
    claims = {claim["metadata"]["name"]: claim["spec"] for claim in worker.get("spec.volumeClaimTemplates")}
    assert set(claims) == {"spool"}, f"{stack}: StatefulSet ingest has no spool volume claim"
    assert claims["spool"]["resources"]["requests"]["storage"] == config.ingest.spool_storage
    assert claims["spool"].get("storageClassName") == config.cluster.storage_class
    mounts = {m["name"]: m["mountPath"] for m in pod_spec(worker)["containers"][0]["volumeMounts"]}
    assert mounts["spool"] == str(settings_of(worker).spool_dir), f"{stack}: the spool is not on the volume"
    assert worker.get("spec.persistentVolumeClaimRetentionPolicy") == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }, f"{stack}: scale-in or a colour's removal would delete a spool"


@pytest.mark.parametrize("stack", stacks_of("B", "C"))
def test_the_hpa_and_the_disruption_budget_govern_the_statefulset(stack: str) -> None:
    plan = stack_plan(stack)
    worker = plan.one("StatefulSet", "ingest")
    target = plan.one("HorizontalPodAutoscaler", "ingest").get("spec.scaleTargetRef")
    assert target == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": worker.name}
    budget = plan.one("PodDisruptionBudget", "ingest")
    assert budget.get("spec.selector.matchLabels") == worker.get("spec.selector.matchLabels")
    assert not worker.protect, f"{stack}: a protected worker colour could never be removed at cutover"


# ------------------------------------------------------------------------------- blue/green
def test_one_colour_is_one_statefulset_named_after_it_with_its_own_spool_size() -> None:
    plan = mvp_eu_with_colours(green={**GREEN, "spool_storage": "5Gi"})
    (green,) = worker_sets(plan)
    assert green.name == "ingest-green" and green.get("spec.template.spec.containers.0.image") == GREEN_IMAGE
    assert green.get("spec.volumeClaimTemplates.0.spec.resources.requests.storage") == "5Gi"
    assert green.get("spec.template.metadata.labels")[COLOUR_LABEL] == "green"
    target = plan.one("HorizontalPodAutoscaler", "ingest-green").get("spec.scaleTargetRef")
    assert target["kind"] == "StatefulSet" and target["name"] == "ingest-green"


def test_two_colours_overlap_in_one_share_group_with_distinct_client_ids() -> None:
    plan, config = mvp_eu_with_colours(blue=BLUE, green=GREEN), stack_config("mvp-eu")
    sets = {s.name: s for s in worker_sets(plan)}
    assert set(sets) == {"ingest-blue", "ingest-green"}
    images = {name: s.get("spec.template.spec.containers.0.image") for name, s in sets.items()}
    assert images == {"ingest-blue": BLUE_IMAGE, "ingest-green": GREEN_IMAGE}
    subscriptions = {settings_of(s).mqtt_subscription for s in sets.values()}
    assert subscriptions == {f"$share/{config.ingest.share_group}/ironlink/+/+/+/telemetry"}, (
        "both colours must split one share group while they overlap"
    )
    # Kubernetes substitutes $(POD_NAME): '<statefulset>-<ordinal>'
    prefixes = {settings_of(s).client_id.replace("$(POD_NAME)", f"{name}-") for name, s in sets.items()}
    assert prefixes == {f"{INGEST_SERVICE}-ingest-blue-", f"{INGEST_SERVICE}-ingest-green-"}
    blue_pods, green_pods = (
        sets[n].get("spec.template.metadata.labels") for n in ("ingest-blue", "ingest-green")
    )
    assert not matches(sets["ingest-blue"].get("spec.selector.matchLabels"), green_pods)
    assert not matches(sets["ingest-green"].get("spec.selector.matchLabels"), blue_pods)
    for name, workload in sets.items():
        budget = plan.one("PodDisruptionBudget", name).get("spec.selector.matchLabels")
        assert budget == workload.get("spec.selector.matchLabels"), f"PodDisruptionBudget {name}"
        assert plan.one("HorizontalPodAutoscaler", name).get("spec.scaleTargetRef.name") == name


def test_network_policies_treat_both_colours_alike() -> None:
    plan = mvp_eu_with_colours(blue=BLUE, green=GREEN)
    blue, green = (
        plan.one("StatefulSet", n).get("spec.template.metadata.labels")
        for n in ("ingest-blue", "ingest-green")
    )
    assert (blue[COLOUR_LABEL], green[COLOUR_LABEL]) == ("blue", "green")
    policies = plan.find("NetworkPolicy")
    for policy in policies:
        assert admits(policy, blue) == admits(policy, green), (
            f"NetworkPolicy {policy.name} splits the colours"
        )
    reached = {policy.name for policy in policies if admits(policy, blue)}
    assert {"emqx", "influxdb", "postgres"} <= reached, "both colours reach the broker, store and registry"
    governing = plan.one("Service", "ingest").get("spec.selector")
    assert matches(governing, blue) and matches(governing, green)


def test_blue_green_manifests_pass_kubernetes_validate() -> None:
    plan = mvp_eu_with_colours(blue=BLUE, green=GREEN)
    for manifest in plan.manifests():
        # a ServiceMonitor is a CRD without a bundled schema (tests/test_monitoring.py checks it)
        if manifest["metadata"]["name"].startswith("ingest") and manifest["kind"] != "ServiceMonitor":
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_two_colours_are_refused_where_the_subscription_is_not_shared() -> None:
    colours = {"blue": BLUE, "green": GREEN}
    with pytest.raises(StackConfigError) as caught:
        parse_platform({"phase": "A", "region": "eu", "ingest": {"colours": colours}}, "poc")
    (problem,) = caught.value.problems
    assert problem.path == "ironlink:ingest.colours"
    assert "'mosquitto'" in problem.message and "every message" in problem.message


@pytest.mark.parametrize("phase", list(PHASE_PRESETS))
def test_two_colours_are_accepted_exactly_where_the_subscription_is_shared(phase: str) -> None:
    colours = {"blue": BLUE, "green": GREEN}
    shared = ingest_subscription(parse_platform({"phase": phase, "region": "eu"})).startswith("$share/")
    try:
        parse_platform({"phase": phase, "region": "eu", "ingest": {"colours": colours}})
    except StackConfigError:
        accepted = False
    else:
        accepted = True
    assert accepted == shared, f"phase {phase}"


@pytest.mark.parametrize(
    ("ingest", "expected"),
    [
        ({"colours": {"red": BLUE}}, "ironlink:ingest.colours.red: 'red' is not one of"),
        ({"colours": {"blue": {}}}, "ironlink:ingest.colours.blue.image: is required"),
        ({"shutdown_grace_s": 0}, "ironlink:ingest.shutdown_grace_s: 0 is invalid"),
        (
            {"spool_storage": "lots"},
            "ironlink:ingest.spool_storage: 'lots' is not a valid Kubernetes quantity",
        ),
    ],
)
def test_bad_rollout_settings_name_their_field_and_value(ingest: dict[str, Any], expected: str) -> None:
    with pytest.raises(StackConfigError) as caught:
        parse_platform({"phase": "B", "region": "eu", "ingest": ingest})
    assert any(str(problem).startswith(expected) for problem in caught.value.problems), caught.value
