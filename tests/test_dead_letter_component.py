"""The dead-letter sink in every stack's plan (the real program under the mock engine): the
consumer, its secrets, and a NetworkPolicy that lets it reach only the broker and the registry."""

from __future__ import annotations

import json

import pytest
from pulumi.runtime.sync_await import _sync_await

from components.render.kubernetes import ROLE_BROKER, ROLE_DEAD_LETTERS, ROLE_POSTGRES, role_selector
from infra.plan import SECRET
from infra.tenancy import DEAD_LETTER_SERVICE, dead_letter_subscription
from ingest.deadletters.settings import HTTP_PORT
from tests.pulumi_mocks import PLANS, STACKS, broker, env_of, pod_spec, stack_config, stack_plan

pytestmark = PLANS


@pytest.mark.parametrize("stack", STACKS)
def test_every_stack_runs_one_dead_letter_consumer_from_the_workers_image(stack: str) -> None:
    plan = stack_plan(stack)
    deployment = plan.one("Deployment", "dead-letters")
    component = plan.component_of(deployment)
    assert component is not None and component.type == "ironlink:dead_letters:DeadLetterSink", stack
    (container,) = pod_spec(deployment)["containers"]
    assert container["command"] == ["python", "-m", "ingest.deadletters"]
    assert container["image"] == stack_config(stack).ingest.image
    assert deployment.get("spec.replicas") == 1
    env = env_of(deployment)
    assert env["IRONLINK_DLQ_MQTT_SUBSCRIPTION"] == dead_letter_subscription(stack_config(stack))
    assert env["IRONLINK_DLQ_MQTT_USERNAME"] == DEAD_LETTER_SERVICE
    for variable, key in (
        ("IRONLINK_DLQ_MQTT_PASSWORD", "mqtt-password"),
        ("IRONLINK_DLQ_REGISTRY_DSN", "registry-dsn"),
    ):
        assert env[variable] == {"secretKeyRef": {"name": "dead-letters-credentials", "key": key}}, stack
    secret = plan.one("Secret", "dead-letters-credentials")
    assert plan.component_of(secret) == component
    assert {"mqtt-password", "registry-dsn", "ca.crt"} <= set(secret.get("stringData"))
    assert set(secret.get("stringData").values()) == {SECRET}, f"{stack}: a dead-letter secret shows a value"


@pytest.mark.parametrize("stack", STACKS)
def test_the_consumer_reaches_only_the_broker_and_the_registry(stack: str) -> None:
    plan = stack_plan(stack)
    policy = plan.one("NetworkPolicy", "dead-letters")
    assert plan.component_of(policy) == plan.component_of(plan.one("Deployment", "dead-letters"))
    pods = plan.one("Deployment", "dead-letters").get("spec.selector.matchLabels")
    assert policy.get("spec.podSelector.matchLabels") == pods
    assert policy.get("spec.policyTypes") == ["Ingress", "Egress"]
    tls_port = next(
        p["port"] for p in plan.one("Service", broker(plan).name).get("spec.ports") if p["port"] == 8883
    )
    egress = {
        (port["port"], tuple(sorted(peer.get("podSelector", {}).get("matchLabels", {}).items())))
        for rule in policy.get("spec.egress")
        for port in rule["ports"]
        for peer in rule["to"]
    }
    assert egress == {
        (tls_port, tuple(sorted(role_selector(ROLE_BROKER).items()))),
        (5432, tuple(sorted(role_selector(ROLE_POSTGRES).items()))),
        (53, ()),
    }, f"{stack}: the consumer may reach {egress}"
    (ingress,) = policy.get("spec.ingress")
    assert [p["port"] for p in ingress["ports"]] == [HTTP_PORT], "only the metrics and probe port is open"
    labels = plan.one("Deployment", "dead-letters").get("spec.template.metadata.labels")
    assert labels["app.kubernetes.io/component"] == ROLE_DEAD_LETTERS


@pytest.mark.parametrize("stack", STACKS)
def test_the_consumers_broker_credential_reaches_the_broker(stack: str) -> None:
    plan = stack_plan(stack)
    if stack_config(stack).broker.engine == "emqx":
        accounts = [r for r in plan.find("pulumi-python:dynamic/registry:ServiceAccount")]
        assert DEAD_LETTER_SERVICE in {r.inputs.get("username") for r in accounts}, stack
    else:  # Mosquitto: the dynamic-security seed gives the consumer its identity and topics
        seed = plan.platform.broker.dynamic_security_seed
        assert seed is not None, stack
        document = json.loads(_sync_await(seed.future()))
        (client,) = [c for c in document["clients"] if c["username"] == DEAD_LETTER_SERVICE]
        (role,) = [r for r in document["roles"] if r["rolename"] in {x["rolename"] for x in client["roles"]}]
        assert ("subscribePattern", "dlq/#", True) in {
            (a["acltype"], a["topic"], a["allow"]) for a in role["acls"]
        }, stack
