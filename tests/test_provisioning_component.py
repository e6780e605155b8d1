"""The provisioning service in every stack's plan (the real program under the mock engine): its
Deployment, Service, NetworkPolicy, probes and metrics, how phases change it, and that no plan
holds a private key, least of all the signing key of the CA that issues device certificates."""

from __future__ import annotations

import json
import re

import pytest

from components.provisioning import CA_DIR, DEVICE_PORT
from components.render.kubernetes import (
    ROLE_BROKER,
    ROLE_POSTGRES,
    ROLE_PROVISIONING,
    metrics_rule,
    role_selector,
)
from infra.config import StackConfigError, parse_platform
from infra.plan import SECRET, Plan, PlannedResource
from provisioning.settings import HTTP_PORT, ProvisioningSettings
from tests.pulumi_mocks import PLANS, STACKS, env_of, pod_spec, stack_config, stack_plan, stacks_of

pytestmark = PLANS
COMPONENT = "ironlink:provisioning:ProvisioningService"
PEM_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")


def deployment(plan: Plan) -> PlannedResource:
    return plan.one("Deployment", "provisioning")


def container_of(plan: Plan) -> dict:
    (container,) = pod_spec(deployment(plan))["containers"]
    return container


def settings_of(plan: Plan) -> ProvisioningSettings:
    """The service's settings as ``python -m provisioning`` reads them from the pod's plain variables
    (the secret ones are references; a placeholder DSN stands in)."""
    plain = {name: value for name, value in env_of(deployment(plan)).items() if isinstance(value, str)}
    return ProvisioningSettings.from_env({**plain, "IRONLINK_PROV_REGISTRY_DSN": "postgresql://x@y/z"})


@pytest.mark.parametrize("stack", STACKS)
def test_every_stack_runs_the_provisioning_service_from_its_own_image(stack: str) -> None:
    plan, config = stack_plan(stack), stack_config(stack)
    component = plan.component_of(deployment(plan))
    assert component is not None and component.type == COMPONENT, stack
    container = container_of(plan)
    assert container["command"] == ["python", "-m", "provisioning"]
    assert container["image"] == config.provisioning.image
    assert container["resources"]["limits"]["memory"] == config.provisioning.resources.limits.memory
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod_spec(deployment(plan))["securityContext"]["runAsNonRoot"] is True
    settings = settings_of(plan)
    assert settings.region == config.region
    assert settings.cert_validity_days == config.provisioning.cert_validity_days
    assert settings.renew_before_days == config.provisioning.renew_before_days
    assert settings.claim_rate_per_source == config.provisioning.claim_rate_per_source


@pytest.mark.parametrize("stack", STACKS)
def test_probes_and_metrics_use_the_services_https_port(stack: str) -> None:
    plan = stack_plan(stack)
    container = container_of(plan)
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("https", HTTP_PORT)
    assert settings_of(plan).http_port == HTTP_PORT
    # The service speaks only TLS once it has its server certificate: probes must too.
    assert settings_of(plan).tls_cert_file is not None
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "https", "scheme": "HTTPS"}, stack
    annotations = deployment(plan).get("spec.template.metadata.annotations")
    assert annotations["prometheus.io/port"] == str(HTTP_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/scheme"] == "https"
    service = plan.one("Service", "provisioning")
    assert plan.component_of(service) == plan.component_of(deployment(plan))
    assert service.get("spec.type") == "ClusterIP"
    assert service.get("spec.selector") == deployment(plan).get("spec.selector.matchLabels")
    assert [(p["port"], p["targetPort"]) for p in service.get("spec.ports")] == [(HTTP_PORT, "https")]


@pytest.mark.parametrize("stack", stacks_of("A"))
def test_phase_a_runs_one_replica_on_its_own_volume(stack: str) -> None:
    plan = stack_plan(stack)
    assert deployment(plan).get("spec.replicas") == 1
    assert deployment(plan).get("spec.strategy.type") == "Recreate", "a RWO volume cannot be handed over live"
    assert plan.find("PodDisruptionBudget", "provisioning") == []
    assert plan.one("PersistentVolumeClaim", "provisioning-ca").get("spec.accessModes") == ["ReadWriteOnce"]


@pytest.mark.parametrize("stack", stacks_of("B", "C"))
def test_phases_b_and_c_survive_a_node_drain(stack: str) -> None:
    plan, config = stack_plan(stack), stack_config(stack)
    pods = deployment(plan).get("spec.selector.matchLabels")
    assert deployment(plan).get("spec.replicas") == config.provisioning.replicas >= 2
    budget = plan.one("PodDisruptionBudget", "provisioning")
    assert budget.get("spec") == {"selector": {"matchLabels": pods}, "maxUnavailable": 1}
    affinity = pod_spec(deployment(plan))["affinity"]["podAntiAffinity"]
    kind = "required" if config.high_availability else "preferred"
    assert any(key.startswith(kind) for key in affinity), f"{stack}: {affinity}"
    # Every replica signs with the same CA keys: the volume is shared across nodes.
    claim = plan.one("PersistentVolumeClaim", "provisioning-ca")
    assert claim.get("spec.accessModes") == ["ReadWriteMany"]
    # The cluster's default class (gp3, EBS) cannot share a volume across nodes: the stack names one.
    assert config.provisioning.ca_storage_class not in (None, config.cluster.storage_class), stack
    assert claim.get("spec.storageClassName") == config.provisioning.ca_storage_class


@pytest.mark.parametrize("stack", STACKS)
def test_devices_reach_the_service_only_where_the_phase_exposes_it(stack: str) -> None:
    plan = stack_plan(stack)
    policy = plan.one("NetworkPolicy", "provisioning")
    assert policy.get("spec.podSelector.matchLabels") == deployment(plan).get("spec.selector.matchLabels")
    ingress, *named = policy.get("spec.ingress")
    assert [p["port"] for p in ingress["ports"]] == [HTTP_PORT]
    # Mosquitto's trust sidecar reads the CAs and CRLs (tests/test_trust_sync.py), either engine
    # reports refused connections (tests/test_broker_log_component.py).
    brokers = [{"podSelector": {"matchLabels": role_selector(ROLE_BROKER)}}]
    broker_rule = {"ports": [{"port": HTTP_PORT, "protocol": "TCP"}], "from": brokers}
    # The cluster's Prometheus, from its own namespace (tests/test_monitoring.py).
    scrape_rule = metrics_rule(HTTP_PORT, stack_config(stack).cluster.prometheus)
    assert named == [broker_rule, scrape_rule]
    exposed = plan.find("Service", "provisioning-devices")
    if stack_config(stack).phase == "A":
        # Manual enrollment only: operators and the CLI from the platform namespace, nobody else.
        assert exposed == []
        assert ingress["from"] == [{"podSelector": {}}], stack
    else:
        (service,) = exposed
        assert service.get("spec.type") == "LoadBalancer"
        assert service.get("spec.externalTrafficPolicy") == "Local", "the per-source claim limit needs it"
        assert [(p["port"], p["targetPort"]) for p in service.get("spec.ports")] == [(DEVICE_PORT, "https")]
        assert "from" not in ingress, "devices claim from factories outside the cluster"


@pytest.mark.parametrize("stack", STACKS)
def test_the_service_reaches_only_the_registry_the_brokers_control_topic_and_dns(stack: str) -> None:
    plan = stack_plan(stack)
    policy = plan.one("NetworkPolicy", "provisioning")
    assert policy.get("spec.policyTypes") == ["Ingress", "Egress"]
    egress = {
        (
            port["port"],
            (("ipBlock", peer["ipBlock"]["cidr"]),)
            if "ipBlock" in peer
            else tuple(sorted(peer.get("podSelector", {}).get("matchLabels", {}).items())),
        )
        for rule in policy.get("spec.egress")
        for port in rule["ports"]
        for peer in rule["to"]
    }
    aws = stack_config(stack).aws
    on_rds = aws is not None and aws.registry == "rds"
    registry = (
        (("ipBlock", aws.vpc_cidr),)
        if on_rds and aws
        else tuple(sorted(role_selector(ROLE_POSTGRES).items()))
    )
    expected = {(5432, registry), (53, ())}
    if stack_config(stack).broker.engine == "mosquitto":  # devices are pushed over dynamic security
        assert settings_of(plan).broker == "mosquitto"
        expected.add((settings_of(plan).mosquitto_port, tuple(sorted(role_selector(ROLE_BROKER).items()))))
    else:  # EMQX reads the registry itself
        assert settings_of(plan).broker == "emqx"
    assert egress == expected, f"{stack}: the service may reach {egress}"


IN_CLUSTER_REGISTRY = [s for s in STACKS if (a := stack_config(s).aws) is None or a.registry == "in-cluster"]


@pytest.mark.parametrize("stack", IN_CLUSTER_REGISTRY)
def test_postgres_admits_the_provisioning_service(stack: str) -> None:
    """In-cluster PostgreSQL admits it by policy; RDS by its security group (tests/test_aws_stores)."""
    plan = stack_plan(stack)
    pod_labels = deployment(plan).get("spec.template.metadata.labels")
    assert pod_labels["app.kubernetes.io/component"] == ROLE_PROVISIONING
    (rule,) = plan.one("NetworkPolicy", "postgres").get("spec.ingress")
    admitted = [
        peer["podSelector"]["matchLabels"]
        for peer in rule["from"]
        if all(pod_labels.get(key) == value for key, value in peer["podSelector"]["matchLabels"].items())
    ]
    assert admitted, f"{stack}: Postgres admits none of {rule['from']}"
    assert [p["port"] for p in rule["ports"]] == [5432]


@pytest.mark.parametrize("stack", STACKS)
def test_credentials_reach_the_service_only_as_secrets(stack: str) -> None:
    plan = stack_plan(stack)
    env = env_of(deployment(plan))
    assert env["IRONLINK_PROV_REGISTRY_DSN"] == {
        "secretKeyRef": {"name": "provisioning-credentials", "key": "registry-dsn"}
    }
    secret = plan.one("Secret", "provisioning-credentials")
    assert plan.component_of(secret) == plan.component_of(deployment(plan))
    keys = {"registry-dsn", "ca.crt", "tls.crt", "tls.key", "broker-log-token"}
    if stack_config(stack).broker.engine == "mosquitto":
        keys.add("mosquitto-password")
        assert env["IRONLINK_PROV_MOSQUITTO_PASSWORD"] == {
            "secretKeyRef": {"name": "provisioning-credentials", "key": "mosquitto-password"}
        }
    assert set(secret.get("stringData")) == keys, f"{stack}: no CA key may ride in the Secret"
    assert set(secret.get("stringData").values()) == {SECRET}, f"{stack}: a provisioning secret shows a value"


@pytest.mark.parametrize("stack", STACKS)
def test_no_plan_holds_a_private_key(stack: str) -> None:
    """The whole serialized plan (resources and manifests) shows no PEM private key.

    The region's pulumi-tls keys (the region CA's, the broker's and the services' own TLS keys) are
    in Pulumi state today, as secrets; under the planner's mocks they are real PEM strings, masked
    as ``[secret]`` wherever the program passes them on. So this is not vacuous: the plan declares
    such keys, and none shows.
    """
    plan = stack_plan(stack)
    assert plan.find("tls:index/privateKey:PrivateKey"), "the plan declares pulumi-tls keys"
    text = json.dumps([plan.to_json(), plan.manifests()])
    assert not PEM_PRIVATE_KEY.search(text), f"{stack}: a PEM private key is in the plan"


@pytest.mark.parametrize("stack", STACKS)
def test_the_device_certificates_ca_signing_key_never_passes_through_pulumi(stack: str) -> None:
    """The CAs that sign device certificates are made by the service in the cluster, on its volume.

    The only CA Pulumi knows is the region's pulumi-tls CA (``components.pki``), which signs server
    and service certificates, the provisioning service's HTTPS certificate among them: that key is
    in Pulumi state (an existing fact, not the device CA).
    """
    plan = stack_plan(stack)
    service = plan.component_of(deployment(plan))
    assert service is not None
    owned = list(plan.descendants(service))
    # No CA inside the component: its one key is its server key, signed by the region CA for TLS.
    assert sorted(r.type for r in owned if r.type.startswith("tls:")) == [
        "tls:index/certRequest:CertRequest",
        "tls:index/locallySignedCert:LocallySignedCert",
        "tls:index/privateKey:PrivateKey",
    ]
    (server,) = [r for r in owned if r.type == "tls:index/locallySignedCert:LocallySignedCert"]
    assert "server_auth" in server.inputs["allowedUses"]
    assert "cert_signing" not in server.inputs["allowedUses"]
    # Every self-signed CA in the plan is the region's pki CA.
    for ca in plan.find("tls:index/selfSignedCert:SelfSignedCert"):
        owner = plan.component_of(ca)
        assert owner is not None and owner.type == "ironlink:pki:CertificateAuthority", ca.name
    # The service is given no CA key: it generates one in CA_DIR, the mount of an empty claim.
    settings = settings_of(plan)
    assert settings.ca_key_file is None and settings.ca_cert_file is None
    assert str(settings.ca_dir) == CA_DIR
    claim = plan.one("PersistentVolumeClaim", "provisioning-ca")
    assert "dataSource" not in claim.get("spec") and "dataSourceRef" not in claim.get("spec")
    volumes = {v["name"]: v for v in pod_spec(deployment(plan))["volumes"]}
    (mount,) = [m for m in container_of(plan)["volumeMounts"] if m["mountPath"] == CA_DIR]
    assert volumes[mount["name"]] == {
        "name": mount["name"],
        "persistentVolumeClaim": {"claimName": claim.name},
    }
    assert claim.protect == stack_config(stack).protect_stateful, "losing it voids every device certificate"


def test_level_3_tenants_get_an_issuing_ca_of_their_own() -> None:
    stacks = [s for s in STACKS if any(stack_config(s).isolation_of(t) == 3 for t in stack_config(s).tenants)]
    assert stacks, "no stack has a level-3 tenant"
    for stack in stacks:
        config, settings = stack_config(stack), settings_of(stack_plan(stack))
        assert settings.tenant_ca_isolation is not None
        for tenant in config.tenants:
            own = config.isolation_of(tenant) >= settings.tenant_ca_isolation
            assert own == (config.isolation_of(tenant) == 3), f"{stack}/{tenant.id}"


def test_the_stack_refuses_a_ca_mode_that_is_not_implemented_and_an_empty_renewal_window() -> None:
    arn = "arn:aws:acm-pca:eu-west-1:123456789012:certificate-authority/0a1b-2c3d"
    raw = {
        "region": "eu-west-1",
        "provisioning": {
            "cert_validity_days": 30,
            "renew_before_days": 30,
            "ca": {"mode": "aws-pca", "arn": arn},
        },
    }
    with pytest.raises(StackConfigError) as refused:
        parse_platform(raw, "bad")
    message = str(refused.value)
    assert "ironlink:provisioning.ca.mode: 'aws-pca' is not implemented yet" in message
    assert "ironlink:provisioning.renew_before_days: 30 must be less than cert_validity_days (30)" in message
