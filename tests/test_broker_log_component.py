"""The brokers' refused connections reach the provisioning service in every cluster plan (the real
program under the mock engine): Phase A's broker pod runs ``python -m provisioning.broker_log``
beside Mosquitto on a log file they share, EMQX (B/C) renders its auth-failure rule, and both
present one generated token the service is given too, as Secrets only. What the follower and the
rule do with a real broker and service: ``tests/test_broker_log.py``."""

from __future__ import annotations

from typing import Any

import pytest
from pulumi.runtime.sync_await import _sync_await
from pyhocon import ConfigFactory

from components.provisioning import service_url
from components.render import emqx
from components.render.kubernetes import ROLE_BROKER, role_selector
from infra.plan import SECRET, Plan
from provisioning import broker_log
from provisioning.settings import HTTP_PORT
from tests.pulumi_mocks import PLANS, broker, env_of, pod_spec, stack_config, stack_plan, stacks_of
from tests.test_components_phases import conf_value, mosquitto_conf, mount_of

pytestmark = PLANS
PHASE_A, EMQX_STACKS = stacks_of("A"), stacks_of("B", "C")


def containers(plan: Plan) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod_spec(broker(plan))["containers"]}


def flags(command: list[str]) -> dict[str, str]:
    return dict(zip(command[3::2], command[4::2], strict=True))


def secret_ref(value: Any, what: str) -> tuple[str, str]:
    assert isinstance(value, dict) and "secretKeyRef" in value, f"{what} is not from a Secret: {value}"
    return value["secretKeyRef"]["name"], value["secretKeyRef"]["key"]


def test_one_generated_token_for_every_stack_is_a_pulumi_secret() -> None:
    for stack in (PHASE_A[0], EMQX_STACKS[0]):
        plan = stack_plan(stack)
        assert len(plan.find("RandomPassword", "broker-log-token")) == 1, stack
        assert _sync_await(plan.platform.broker_log_token.is_secret()), f"{stack}: the token is not secret"


@pytest.mark.parametrize("stack", PHASE_A)
def test_the_phase_a_broker_pod_follows_its_log_into_the_provisioning_service(
    stack: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plan, config = stack_plan(stack), stack_config(stack)
    spec, by_name = pod_spec(broker(plan)), containers(plan)
    sidecar, trust_sync = by_name["broker-log"], by_name["trust-sync"]
    command = sidecar["command"]
    assert command[:3] == ["python", "-m", "provisioning.broker_log"], command
    options = flags(command)
    url = service_url("provisioning", config.cluster.namespace)
    assert options["--url"] == f"{url}/v1/broker/auth-failures", options
    assert int(options["--truncate-over"]) > 0, "nothing else bounds the log file"
    # The reporting pod is named; Kubernetes expands $(POD_NAME) only from a variable declared before.
    assert options["--broker"] == "$(POD_NAME)"
    assert list(env_of(broker(plan), list(by_name).index("broker-log"))) == [
        "POD_NAME",
        broker_log.TOKEN_ENV,
    ]
    # HTTPS verified against the region CA: the file the trust sidecar verifies with, from the
    # broker's TLS Secret, whose ca.crt is the region CA.
    assert options["--ca-file"] == flags(trust_sync["command"])["--ca-file"] == "/mosquitto/certs/ca.crt"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mount_of(sidecar, options["--ca-file"])["name"]]["secret"]["secretName"] == "mosquitto-tls"
    # The follower's own command line accepts these flags: without the token it names only that.
    monkeypatch.delenv(broker_log.TOKEN_ENV, raising=False)
    assert broker_log.main(command[3:]) == 2
    assert capsys.readouterr().err == f"error: {broker_log.TOKEN_ENV}: is required\n"
    # Hardened like the trust sidecar, in its image.
    assert sidecar["image"] == trust_sync["image"] == config.provisioning.image
    assert sidecar["securityContext"] == trust_sync["securityContext"]
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert sidecar["resources"]["limits"].keys() >= {"cpu", "memory"}, sidecar["resources"]
    assert spec["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("stack", PHASE_A)
def test_mosquitto_logs_to_a_file_on_an_emptydir_shared_with_the_follower(stack: str) -> None:
    plan = stack_plan(stack)
    spec, by_name = pod_spec(broker(plan)), containers(plan)
    server, sidecar = by_name["mosquitto"], by_name["broker-log"]
    conf = mosquitto_conf(plan)
    (log_file,) = [d.removeprefix("file ") for d in conf_value(conf, "log_dest") if d.startswith("file ")]
    assert "stdout" in conf_value(conf, "log_dest"), f"{stack}: the pod's log (kubectl logs) is gone"
    assert log_file == flags(sidecar["command"])["--log"], stack
    # What the parser reads: notice (refusals, new connections) and error (TLS), timestamped.
    assert {"error", "notice"} <= set(conf_value(conf, "log_type")), stack
    assert conf_value(conf, "log_timestamp") in ([], ["true"]), "the parser needs the timestamps"
    volume = mount_of(server, log_file)["name"]
    assert mount_of(sidecar, log_file)["name"] == volume
    assert {v["name"]: v for v in spec["volumes"]}[volume] == {"name": volume, "emptyDir": {}}
    assert not mount_of(server, log_file).get("readOnly"), "Mosquitto cannot write its log"
    # The follower empties the file past --truncate-over; Mosquitto creates it 0600 (measured with
    # 2.0.11), so the sidecar runs as the pod's user, the broker's: no container sets its own.
    assert not mount_of(sidecar, log_file).get("readOnly"), "the follower cannot truncate the log"
    assert all("runAsUser" not in c["securityContext"] for c in (server, sidecar))


@pytest.mark.parametrize("stack", [*PHASE_A, *EMQX_STACKS])
def test_the_token_reaches_broker_and_service_only_as_secret_key_refs(stack: str) -> None:
    plan = stack_plan(stack)
    service = env_of(plan.one("Deployment", "provisioning"))
    assert secret_ref(service["IRONLINK_PROV_BROKER_LOG_TOKEN"], "the service's token") == (
        "provisioning-credentials",
        "broker-log-token",
    )
    if stack_config(stack).broker.engine == "mosquitto":
        index, variable = list(containers(plan)).index("broker-log"), broker_log.TOKEN_ENV
    else:
        index, variable = 0, emqx.AUTH_FAILURES_TOKEN_ENV
    secret, key = secret_ref(env_of(broker(plan), index)[variable], f"{stack}: the broker's token")
    for name, data_key in ((secret, key), ("provisioning-credentials", "broker-log-token")):
        assert plan.one("Secret", name).get("stringData")[data_key] == SECRET, f"{name} shows the token"


@pytest.mark.parametrize("stack", EMQX_STACKS)
def test_emqx_posts_refused_connects_to_the_in_cluster_service_verified_by_the_region_ca(stack: str) -> None:
    plan, config = stack_plan(stack), stack_config(stack)
    conf = ConfigFactory.parse_string(plan.one("ConfigMap", "emqx-config").get("data")["emqx.conf"])
    connector = conf["connectors"]["http"][emqx.AUTH_FAILURES_CONNECTOR]
    assert connector["url"] == service_url("provisioning", config.cluster.namespace), connector
    assert connector["ssl"]["verify"] == "verify_peer"
    assert "authorization" not in connector["headers"], "the token would be in a ConfigMap"
    (node,) = pod_spec(broker(plan))["containers"]
    certs = mount_of(node, connector["ssl"]["cacertfile"])
    volumes = {v["name"]: v for v in pod_spec(broker(plan))["volumes"]}
    assert volumes[certs["name"]]["secret"]["secretName"] == "emqx-tls"
    assert connector["ssl"]["cacertfile"].endswith("/ca.crt")
    rule = conf["rule_engine"]["rules"][emqx.AUTH_FAILURES]
    assert rule["actions"] == [f"http:{emqx.AUTH_FAILURES}"] and rule["enable"] is True


def test_emqxs_authorization_variable_is_a_hocon_string_of_the_bearer_token() -> None:
    value = emqx.auth_failures_authorization("t0ken")
    assert ConfigFactory.parse_string(f"header = {value}")["header"] == "Bearer t0ken"


@pytest.mark.parametrize("stack", [*PHASE_A, *EMQX_STACKS])
def test_the_provisioning_service_admits_the_broker_pods_on_its_port_by_name(stack: str) -> None:
    plan = stack_plan(stack)
    rules = plan.one("NetworkPolicy", "provisioning").get("spec.ingress")
    brokers = [{"podSelector": {"matchLabels": role_selector(ROLE_BROKER)}}]
    assert {"ports": [{"port": HTTP_PORT, "protocol": "TCP"}], "from": brokers} in rules, rules
