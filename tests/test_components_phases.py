"""What each phase really changes, asserted on the plan of every stack (the real program under the
mock engine). Each test is a policy; a failure names the stack and the resource that broke it."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from pulumi.runtime.sync_await import _sync_await
from pyhocon import ConfigFactory

from components.influxdb import influxdb_url
from components.render import emqx
from components.render.kubernetes import (
    ROLE_API,
    ROLE_BACKUP,
    ROLE_BROKER,
    ROLE_DEAD_LETTERS,
    ROLE_GRAFANA,
    ROLE_INGEST,
    ROLE_PROVISIONING,
    ROLE_RUNNER,
    prometheus_peer,
    role_selector,
)
from components.render.mosquitto import DYNSEC_ADMIN, dynsec_password
from infra.plan import SECRET, Plan, PlannedResource
from infra.tenancy import DEAD_LETTER_SERVICE, INGEST_SERVICE, influxdb_instance, store_route
from ingest.settings import WorkerSettings
from registry.roles import INGEST_PRIVILEGES, INGEST_ROLE
from tests.pulumi_mocks import (
    PLANS,
    STACKS,
    broker,
    env_of,
    pod_spec,
    region_plan,
    stack_config,
    stack_plan,
    stacks_of,
    workloads,
)

pytestmark = PLANS

PHASE_A, PHASE_B, PHASE_C = stacks_of("A"), stacks_of("B"), stacks_of("C")
# Resources that hold or guard data: protected where the stack protects stateful resources.
STATEFUL = [
    ("StatefulSet", "postgres"),
    ("StatefulSet", "influxdb"),
    ("Secret", "postgres-credentials"),
    ("Secret", "influxdb-auth"),
    ("Namespace", "ironlink"),
    ("SelfSignedCert", None),
]


def registry_in_cluster(stack: str) -> bool:
    """Phase C on AWS runs the registry on RDS (tests/test_aws_stores.py), elsewhere a StatefulSet."""
    aws = stack_config(stack).aws
    return aws is None or aws.registry == "in-cluster"


def store_in_cluster(stack: str) -> bool:
    """Phase C on AWS runs InfluxDB as Timestream for InfluxDB, elsewhere a StatefulSet."""
    aws = stack_config(stack).aws
    return aws is None or aws.telemetry_store == "in-cluster"


def in_cluster_databases(stack: str) -> list[str]:
    return [
        name
        for name, inside in (("postgres", registry_in_cluster(stack)), ("influxdb", store_in_cluster(stack)))
        if inside
    ]


def names(resources: list[PlannedResource]) -> list[str]:
    return [f"{r.kind} {r.name}" for r in resources]


def node_selector(plan: Plan) -> dict[str, str]:
    return dict(broker(plan).get("spec.selector.matchLabels"))


def emqx_conf(plan: Plan) -> Any:
    return ConfigFactory.parse_string(plan.one("ConfigMap", "emqx-config").get("data")["emqx.conf"])


# ---------------------------------------------------------------------------------- phase A
@pytest.mark.parametrize("stack", PHASE_A)
def test_phase_a_runs_one_mosquitto_reachable_only_over_tls(stack: str) -> None:
    plan = stack_plan(stack)
    brokers = [
        w for w in workloads(plan) if w.get("metadata.labels")["app.kubernetes.io/component"] == ROLE_BROKER
    ]
    assert names(brokers) == ["StatefulSet mosquitto"], f"{stack}: phase A has exactly one Mosquitto"
    assert brokers[0].get("spec.replicas") == 1
    service = plan.one("Service", "mosquitto")
    # Passwords on 8883, certificate devices (CN = identity) on 8884: both TLS, nothing in plaintext.
    assert [p["port"] for p in service.get("spec.ports")] == [8883, 8884], (
        f"{stack}: Service mosquitto must expose only 8883 and 8884"
    )
    conf = plan.one("ConfigMap", "mosquitto-config").get("data")["mosquitto.conf"]
    assert "listener 8883" in conf and "listener 1883" not in conf, f"{stack}: mosquitto.conf opens 1883"
    assert "allow_anonymous false" in conf


@pytest.mark.parametrize("stack", PHASE_A)
def test_phase_a_has_no_disruption_budgets_and_protects_nothing(stack: str) -> None:
    plan = stack_plan(stack)
    assert names(plan.find("PodDisruptionBudget")) == [], f"{stack}: phase A declares PDBs"
    protected = [r for r in plan.resources if r.protect]
    # Only what a server applies at first start (components.credentials.first_start_password).
    assert {r.type for r in protected} <= {"random:index/randomPassword:RandomPassword"}, (
        f"{stack}: phase A protects {names(protected)}"
    )
    assert plan.find("HorizontalPodAutoscaler") == []


def mosquitto_conf(plan: Plan) -> list[str]:
    return plan.one("ConfigMap", "mosquitto-config").get("data")["mosquitto.conf"].splitlines()


def conf_value(lines: list[str], key: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in lines if line.startswith(f"{key} ")]


def mount_of(container: dict[str, Any], path: str) -> dict[str, Any]:
    (mount,) = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"])]
    return mount


@pytest.mark.parametrize("stack", PHASE_A)
def test_phase_a_mosquitto_loads_the_dynamic_security_plugin_and_trusts_only_device_cas(stack: str) -> None:
    plan, config = stack_plan(stack), stack_config(stack)
    conf = mosquitto_conf(plan)
    assert conf_value(conf, "plugin") == [config.broker.dynamic_security_plugin], stack
    assert conf_value(conf, "password_file") == [] and conf_value(conf, "acl_file") == [], stack
    (state,) = conf_value(conf, "plugin_opt_config_file")
    spec = pod_spec(broker(plan))
    server, sidecar, *_ = spec["containers"]  # the broker-log sidecar: tests/test_broker_log_component.py
    assert (server["name"], sidecar["name"]) == ("mosquitto", "trust-sync"), stack
    # The plugin rewrites its state: it lives on the persistent volume, writable.
    assert mount_of(server, state)["name"] == "data" and not mount_of(server, state).get("readOnly")
    # Listeners: passwords on 8883 (platform CA server cert), certificates on 8884 (device CAs only).
    listeners = "\n".join(conf).split("\nlistener ")[1:]
    by_port = {block.split("\n", 1)[0]: block.splitlines() for block in listeners}
    assert set(by_port) == {"8883", "8884"}, stack
    assert "require_certificate false" in by_port["8883"]
    certificates = by_port["8884"]
    assert {"require_certificate true", "use_identity_as_username true"} <= set(certificates)
    assert conf_value(certificates, "cafile") == [], f"{stack}: the certificate listener trusts a cafile"
    (capath,) = conf_value(certificates, "capath")
    (crlfile,) = conf_value(certificates, "crlfile")
    assert crlfile.startswith(f"{capath}/"), f"{stack}: the CRLs come with the CAs"
    volumes = {v["name"]: v for v in spec["volumes"]}
    device_ca = volumes[mount_of(server, capath)["name"]]
    # Written by the trust sidecar from the provisioning service's CAs and CRLs, not by Pulumi.
    assert device_ca == {"name": device_ca["name"], "emptyDir": {}}, stack
    assert mount_of(server, capath)["readOnly"] is True
    assert not mount_of(sidecar, capath).get("readOnly"), f"{stack}: the sidecar cannot write the capath"


@pytest.mark.parametrize("stack", PHASE_A)
def test_the_plugin_seed_holds_the_admin_and_services_by_hash_only_and_no_device(stack: str) -> None:
    plan = stack_plan(stack)
    platform = plan.platform
    assert plan.one("Secret", "mosquitto-dynsec-seed").get("stringData") == {"dynamic-security.json": SECRET}
    assert plan.find("Secret", "mosquitto-passwd") == [], "dynamic security replaces the password file"
    seed_output = platform.broker.dynamic_security_seed
    assert seed_output is not None and _sync_await(seed_output.is_secret())
    seed = _sync_await(seed_output.future())
    document = json.loads(seed)
    clients = {client["username"]: client for client in document["clients"]}
    # The platform's own services only: tenants are stacks of their own, devices are the registry's.
    assert set(clients) == {DYNSEC_ADMIN, INGEST_SERVICE, DEAD_LETTER_SERVICE}, f"{stack}: {sorted(clients)}"
    admin = platform.broker_admin_credential
    assert admin is not None
    credentials = {
        DYNSEC_ADMIN: admin,
        INGEST_SERVICE: platform.ingest_credential,
        DEAD_LETTER_SERVICE: platform.dead_letter_credential,
    }
    assert set(credentials) == set(clients)
    for username, credential in credentials.items():
        password = _sync_await(credential.password.future())
        assert password and password not in seed, f"{stack}: {username}'s password is in the seed"
        hashed = _sync_await(credential.password_hash.future())
        expected = dynsec_password(hashed, username)
        assert {key: clients[username][key] for key in expected} == expected, username
    assert document["defaultACLAccess"]["subscribe"] is False


@pytest.mark.parametrize("stack", PHASE_A)
def test_the_seed_init_container_never_overwrites_the_plugins_state(stack: str, tmp_path: Any) -> None:
    plan = stack_plan(stack)
    spec = pod_spec(broker(plan))
    seeder, _trust = spec["initContainers"]  # then the first trust sync (tests/test_trust_sync.py)
    (state,) = conf_value(mosquitto_conf(plan), "plugin_opt_config_file")
    *script, seed_path, state_path = seeder["command"]
    assert state_path == state and mount_of(seeder, state)["name"] == "data"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mount_of(seeder, seed_path)["name"]]["secret"]["secretName"] == "mosquitto-dynsec-seed"
    for container in spec["containers"]:  # the broker and its trust sidecar
        assert all(m["name"] != mount_of(seeder, seed_path)["name"] for m in container["volumeMounts"])
    # Run the planned command itself, twice: the second start keeps what the plugin wrote.
    seed, target = tmp_path / "seed.json", tmp_path / "dynamic-security.json"
    seed.write_text('{"seed": 1}')
    subprocess.run([*script, str(seed), str(target)], check=True, capture_output=True)
    assert target.read_text() == '{"seed": 1}'
    target.write_text('{"clients": ["written by the plugin"]}')
    seed.write_text('{"seed": 2}')
    subprocess.run([*script, str(seed), str(target)], check=True, capture_output=True)
    assert target.read_text() == '{"clients": ["written by the plugin"]}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dynamic-security.json", "seed.json"]


@pytest.mark.parametrize("stack", STACKS)
def test_only_the_provisioning_service_gains_a_named_way_into_the_broker(stack: str) -> None:
    plan = stack_plan(stack)
    rules = plan.one("NetworkPolicy", broker(plan).name).get("spec.ingress")
    named = [(tuple(p["port"] for p in rule["ports"]), rule["from"]) for rule in rules if "from" in rule]
    if stack_config(stack).broker.engine == "mosquitto":
        assert named == [((8883,), [{"podSelector": {"matchLabels": role_selector(ROLE_PROVISIONING)}}])]
    else:  # the cluster's own distribution ports, from its nodes only; metrics, from Prometheus only
        assert named == [
            ((emqx.EKKA_PORT, emqx.RPC_PORT), [{"podSelector": {"matchLabels": node_selector(plan)}}]),
            ((emqx.DASHBOARD_PORT,), [prometheus_peer(stack_config(stack).cluster.prometheus)]),
        ], stack


# ---------------------------------------------------------------------------------- phase B
@pytest.mark.parametrize("stack", PHASE_B + PHASE_C)
def test_phases_b_and_c_run_emqx(stack: str) -> None:
    plan = stack_plan(stack)
    assert plan.find("StatefulSet", "mosquitto") == [], f"{stack}: Mosquitto outside phase A"
    node = broker(plan)
    assert node.get("spec.template.spec.containers.0.image").startswith("emqx/emqx:5.")
    assert node.get("spec.replicas") == stack_config(stack).broker.nodes


@pytest.mark.parametrize("stack", PHASE_B + PHASE_C)
@pytest.mark.parametrize(("kind", "name"), STATEFUL)
def test_stateful_resources_are_protected_in_b_and_c(stack: str, kind: str, name: str | None) -> None:
    for resource in stack_plan(stack).find(kind, name):
        assert resource.protect, f"{stack}: {resource.kind} {resource.name} holds data and must be protected"


@pytest.mark.parametrize("stack", PHASE_B + PHASE_C)
def test_broker_statefulset_and_backup_volumes_are_protected(stack: str) -> None:
    plan = stack_plan(stack)
    assert broker(plan).protect, f"{stack}: StatefulSet {broker(plan).name} must be protected"
    volumes = plan.find("PersistentVolumeClaim")
    assert all(r.protect for r in volumes), (
        f"{stack}: unprotected volumes {names([r for r in volumes if not r.protect])}"
    )
    # With a backup bucket, backups go to S3 (tests/test_backup.py), not to a volume in the same zone.
    aws = stack_config(stack).aws
    assert (aws is not None and aws.backup_bucket) == (not [r for r in volumes if r.name.endswith("-backup")])


@pytest.mark.parametrize("stack", PHASE_B + PHASE_C)
def test_stateless_resources_stay_unprotected(stack: str) -> None:
    plan = stack_plan(stack)
    for kind in ("Deployment", "Service", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget"):
        protected = [r for r in plan.find(kind) if r.protect]
        assert protected == [], f"{stack}: {names(protected)} are protected but hold no data"


@pytest.mark.parametrize("stack", PHASE_B + PHASE_C)
def test_the_worker_autoscales_within_the_configured_bounds(stack: str) -> None:
    plan = stack_plan(stack)
    bounds = stack_config(stack).ingest.autoscaling
    assert bounds is not None
    hpa = plan.one("HorizontalPodAutoscaler", "ingest")
    assert hpa.get("spec.scaleTargetRef") == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "ingest",
    }
    assert (hpa.get("spec.minReplicas"), hpa.get("spec.maxReplicas")) == (
        bounds.min_replicas,
        bounds.max_replicas,
    )
    assert hpa.get("spec.metrics.0.resource.target.averageUtilization") == bounds.target_cpu_percent
    assert plan.one("StatefulSet", "ingest").get("spec.replicas") is None, (
        "the HPA, not pulumi up, owns the replicas"
    )


@pytest.mark.parametrize("stack", PHASE_B + PHASE_C)
def test_databases_are_backed_up_on_schedule(stack: str) -> None:
    plan, config = stack_plan(stack), stack_config(stack)
    schedules = {"influxdb": config.influxdb.backup_schedule, "postgres": config.postgres.backup_schedule}
    assert [job.name for job in plan.find("CronJob")] == sorted(
        f"{n}-backup" for n in in_cluster_databases(stack)
    )
    for rds in plan.find("aws:rds/instance:Instance"):  # a managed registry backs itself up
        assert rds.inputs["backupRetentionPeriod"] >= 1, stack
    for name in in_cluster_databases(stack):
        schedule = schedules[name]
        job = plan.one("CronJob", f"{name}-backup")
        assert job.get("spec.schedule") == schedule and job.get("spec.concurrencyPolicy") == "Forbid"


# ---------------------------------------------------------------------------------- phase C
@pytest.mark.parametrize("stack", PHASE_C)
def test_phase_c_broker_survives_a_node_drain(stack: str) -> None:
    plan = stack_plan(stack)
    node = broker(plan)
    assert node.get("spec.replicas") >= 3, f"{stack}: StatefulSet emqx needs 3+ nodes"
    budget = plan.one("PodDisruptionBudget", "emqx")
    assert budget.get("spec.minAvailable") >= 2, f"{stack}: PodDisruptionBudget emqx must keep 2+ nodes"
    assert budget.get("spec.selector.matchLabels") == node.get("spec.selector.matchLabels")
    terms = node.get(
        "spec.template.spec.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution"
    )
    assert terms and terms[0]["topologyKey"] == "kubernetes.io/hostname", (
        f"{stack}: emqx nodes may share a host"
    )


@pytest.mark.parametrize("stack", PHASE_C)
def test_phase_c_devices_need_a_client_certificate(stack: str) -> None:
    plan = stack_plan(stack)
    ssl = emqx_conf(plan)["listeners.ssl.default.ssl_options"]
    assert (ssl["verify"], ssl["fail_if_no_peer_cert"]) == ("verify_peer", True), (
        f"{stack}: ConfigMap emqx-config"
    )
    worker_files = plan.one("Secret", "ingest-credentials").get("stringData")
    assert {"tls.crt", "tls.key", "ca.crt"} <= set(worker_files), (
        f"{stack}: the worker has no client certificate"
    )
    client = plan.one("CertRequest", "ingest-client-csr")
    assert client.get("subject.commonName") == INGEST_SERVICE


@pytest.mark.parametrize("stack", PHASE_C)
def test_phase_c_grafana_is_ha_on_postgres(stack: str) -> None:
    plan = stack_plan(stack)
    grafana = plan.one("Deployment", "grafana")
    assert grafana.get("spec.replicas") >= 2
    env = env_of(grafana)
    assert env["GF_DATABASE_TYPE"] == "postgres" and env["GF_DATABASE_HOST"].startswith("postgres.")
    assert env["GF_DATABASE_PASSWORD"] == {
        "secretKeyRef": {"key": "database-password", "name": "grafana-credentials"}
    }
    gossip = plan.one("Service", "grafana-gossip")
    assert gossip.get("spec.clusterIP") == "None"
    assert {(p["port"], p["protocol"]) for p in gossip.get("spec.ports")} == {(9094, "TCP"), (9094, "UDP")}
    assert plan.one("PodDisruptionBudget", "grafana").get("spec.maxUnavailable") == 1


@pytest.mark.parametrize("stack", PHASE_A + PHASE_B)
def test_below_phase_c_grafana_keeps_sqlite_on_a_volume(stack: str) -> None:
    plan = stack_plan(stack)
    assert "GF_DATABASE_TYPE" not in env_of(plan.one("Deployment", "grafana"))
    assert plan.find("Service", "grafana-gossip") == []
    assert plan.one("Deployment", "grafana").get("spec.strategy.type") == "Recreate"


@pytest.mark.parametrize("stack", PHASE_C)
def test_phase_c_keeps_device_addresses_at_the_broker(stack: str) -> None:
    """Through the region's NLB the address travels in a PROXY v2 header that EMQX reads
    (``tests/test_aws_ingress.py``); the Service is no load balancer of its own."""
    plan = stack_plan(stack)
    assert plan.one("Service", "emqx").get("spec.type") == "ClusterIP"
    (target_group,) = plan.find("lb/targetGroup:TargetGroup")
    assert target_group.get("proxyProtocolV2") is True
    conf = plan.one("ConfigMap", "emqx-config").inputs["data"]["emqx.conf"]
    assert "proxy_protocol = true" in conf


# ------------------------------------------------------------------------------ every stack
@pytest.mark.parametrize("stack", PHASE_B + PHASE_C)
def test_emqx_cluster_discovery_and_plaintext_switch(stack: str) -> None:
    plan = stack_plan(stack)
    env = env_of(broker(plan))
    assert env["EMQX_CLUSTER__DISCOVERY_STRATEGY"] == "k8s"
    assert env["EMQX_LISTENERS__TCP__DEFAULT__ENABLE"] == "false", (
        f"{stack}: StatefulSet emqx enables plaintext"
    )
    assert env["EMQX_NODE__COOKIE"] == {"secretKeyRef": {"key": "cookie", "name": "emqx-secrets"}}
    headless = plan.one("Service", "emqx-headless")
    assert headless.get("spec.clusterIP") == "None" and headless.get("spec.publishNotReadyAddresses") is True
    role = plan.one("Role", "emqx-discovery")
    assert role.get("rules") == [
        {"apiGroups": [""], "resources": ["endpoints"], "verbs": ["get", "watch", "list"]}
    ]
    assert emqx_conf(plan)["authorization.no_match"] == "deny"
    assert [p["port"] for p in plan.one("Service", "emqx").get("spec.ports")] == [8883]
    rpc = emqx_conf(plan)["rpc.tcp_server_port"]
    cluster_rule = plan.one("NetworkPolicy", "emqx").get("spec.ingress")[1]
    assert {p["port"] for p in cluster_rule["ports"]} == {4370, rpc}, f"{stack}: nodes are cut off"
    assert cluster_rule["from"] == [{"podSelector": {"matchLabels": node_selector(plan)}}]


def ingress_sources(plan: Plan, name: str) -> tuple[set[tuple[str, str]], bool]:
    """The (label, value) pairs of every pod allowed into ``name``, and whether anything else is."""
    policy = plan.one("NetworkPolicy", name)
    peers = [peer for rule in policy.get("spec.ingress") for peer in rule.get("from", [None])]
    labels = {
        item for peer in peers if peer for item in peer.get("podSelector", {}).get("matchLabels", {}).items()
    }
    return labels, any(peer is None or "podSelector" not in peer for peer in peers)


@pytest.mark.parametrize("stack", STACKS)
def test_the_namespace_denies_ingress_by_default(stack: str) -> None:
    policy = stack_plan(stack).one("NetworkPolicy", "default-deny")
    assert policy.get("spec") == {"podSelector": {}, "policyTypes": ["Ingress"]}


@pytest.mark.parametrize("stack", STACKS)
def test_only_the_worker_grafana_broker_and_backups_reach_the_databases(stack: str) -> None:
    plan = stack_plan(stack)
    allowed_roles = {
        ROLE_INGEST,
        ROLE_GRAFANA,
        ROLE_BROKER,
        ROLE_BACKUP,
        ROLE_DEAD_LETTERS,
        ROLE_PROVISIONING,
        ROLE_API,
        ROLE_RUNNER,
    }
    databases = ["postgres"] if registry_in_cluster(stack) else []
    databases += [i.name for i in plan.find("ironlink:influxdb:InfluxDB")]
    assert databases or not (registry_in_cluster(stack) or store_in_cluster(stack)), stack
    for database in databases:
        labels, open_to_all = ingress_sources(plan, database)
        assert not open_to_all, f"{stack}: NetworkPolicy {database} lets any pod in"
        roles = {value for key, value in labels if key == "app.kubernetes.io/component"}
        assert roles and roles <= allowed_roles, (
            f"{stack}: NetworkPolicy {database} admits {roles - allowed_roles}"
        )
        assert ROLE_RUNNER in roles, f"{stack}: pulumi up's providers cannot reach {database}"
    if store_in_cluster(stack):
        influx_roles = {
            v for k, v in ingress_sources(plan, "influxdb")[0] if k == "app.kubernetes.io/component"
        }
        assert {ROLE_INGEST, ROLE_GRAFANA} <= influx_roles and ROLE_BROKER not in influx_roles
    if not registry_in_cluster(stack):  # RDS: its security group admits the cluster alone (test_aws_stores)
        return
    postgres_roles = {
        v for k, v in ingress_sources(plan, "postgres")[0] if k == "app.kubernetes.io/component"
    }
    assert ROLE_INGEST in postgres_roles, f"{stack}: the worker reads tenants and machines from the registry"
    assert ROLE_DEAD_LETTERS in postgres_roles and ROLE_DEAD_LETTERS not in influx_roles, stack
    assert ROLE_PROVISIONING in postgres_roles and ROLE_PROVISIONING not in influx_roles, stack
    assert (ROLE_BROKER in postgres_roles) == (stack_config(stack).broker.engine == "emqx")


@pytest.mark.parametrize("stack", STACKS)
def test_devices_reach_only_the_broker_tls_port(stack: str) -> None:
    plan = stack_plan(stack)
    open_rules = [
        (policy.name, rule)
        for policy in plan.find("NetworkPolicy")
        for rule in policy.get("spec.ingress", [])
        if "from" not in rule
    ]
    # Mosquitto's second listener is for certificate devices (CN = identity).
    device_ports = (8883, 8884) if stack_config(stack).broker.engine == "mosquitto" else (8883,)
    public = {(broker(plan).name, device_ports), ("grafana", (3000,))}
    if stack_config(stack).phase != "A":  # claims and renewals (components/provisioning.py)
        public.add(("provisioning", (8443,)))
    for name, rule in open_rules:
        ports = tuple(p["port"] for p in rule["ports"])
        assert (name, ports) in public, f"{stack}: NetworkPolicy {name} opens {ports} to anyone"
    assert any(name == broker(plan).name for name, _ in open_rules), (
        f"{stack}: devices cannot reach the broker"
    )


@pytest.mark.parametrize("stack", STACKS)
def test_every_pod_runs_non_root_on_a_read_only_root_filesystem(stack: str) -> None:
    plan = stack_plan(stack)
    for workload in workloads(plan):
        spec = pod_spec(workload)
        where = f"{stack}: {workload.kind} {workload.name}"
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0, (
            where
        )
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, (
                f"{where}: container {container['name']} writes its root"
            )
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where


@pytest.mark.parametrize("stack", STACKS)
def test_only_emqx_gets_a_kubernetes_api_token(stack: str) -> None:
    plan = stack_plan(stack)
    with_token = [w.name for w in workloads(plan) if pod_spec(w)["automountServiceAccountToken"]]
    assert with_token == (["emqx"] if stack_config(stack).broker.engine == "emqx" else [])


@pytest.mark.parametrize("stack", STACKS)
def test_requests_and_limits_come_from_the_config(stack: str) -> None:
    plan, config = stack_plan(stack), stack_config(stack)
    sections: dict[str, Any] = {
        **{name: getattr(config, name) for name in in_cluster_databases(stack)},
        "grafana": config.grafana,
        "ingest": config.ingest,
        "api": config.api,
        broker(plan).name: config.broker,
    }
    for name, section in sections.items():
        workload = plan.find("StatefulSet", name) or plan.find("Deployment", name)
        resources = pod_spec(workload[0])["containers"][0]["resources"]
        assert resources["requests"] == section.resources.requests.model_dump(), f"{stack}: {name} requests"
        assert resources["limits"] == section.resources.limits.model_dump(), f"{stack}: {name} limits"


@pytest.mark.parametrize("stack", STACKS)
def test_secret_values_never_appear_in_the_plan(stack: str) -> None:
    plan = stack_plan(stack)
    for secret in plan.find("Secret"):
        values = secret.get("stringData")
        assert values and set(values.values()) == {SECRET}, f"{stack}: Secret {secret.name} shows a value"
    for password in plan.find("RandomPassword"):
        assert "result" not in password.inputs
    for workload in workloads(plan):
        for container in pod_spec(workload)["containers"]:
            for entry in container.get("env", []):
                name = entry["name"]
                # ``*_PER_TOKEN``: a claim rate limit per token, not a token.
                if name.endswith(("PASSWORD", "TOKEN", "COOKIE")) and not name.endswith("_PER_TOKEN"):
                    assert "valueFrom" in entry, f"{stack}: {workload.name} sets {name} in plain text"


@pytest.mark.parametrize("stack", [*PHASE_A[:1], *PHASE_C[:1]])
def test_generated_credentials_are_pulumi_secrets(stack: str) -> None:
    platform = stack_plan(stack).platform
    outputs = {
        "grafana admin password": platform.grafana.admin_password,
        "influxdb operator token": platform.influxdb.admin_token,
        "postgres owner password": platform.postgres.owner_password,
        "postgres dsn": platform.postgres.dsn,
        "ingest broker password": platform.ingest_credential.password,
        "ingest broker hash": platform.ingest_credential.password_hash,
        "CA private key": platform.ca.private_key_pem,
    }
    for what, output in outputs.items():
        assert _sync_await(output.is_secret()), f"{stack}: the {what} is not a Pulumi secret"
    assert not _sync_await(platform.ca.cert_pem.is_secret()), "the CA certificate is public"


@pytest.mark.parametrize("stack", STACKS)
def test_the_worker_reads_its_deployment_environment_and_reaches_every_store(stack: str) -> None:
    plan, config = stack_plan(stack), stack_config(stack)
    deployment = plan.one("StatefulSet", "ingest")
    env = env_of(deployment)
    assert env["IRONLINK_MQTT_PASSWORD"] == {
        "secretKeyRef": {"key": "mqtt-password", "name": "ingest-credentials"}
    }
    plain = {name: value for name, value in env.items() if isinstance(value, str)}
    secrets = {"IRONLINK_MQTT_PASSWORD": "x", "IRONLINK_REGISTRY_DSN": "postgresql://r"}
    settings = WorkerSettings.from_env({**plain, **secrets})  # what `python -m ingest` reads
    assert settings.mqtt_host == f"{broker(plan).name}.{config.cluster.namespace}.svc.cluster.local"
    # The platform knows no tenant: their routes (a level-3 tenant's own instance too) and write
    # tokens are the registry's, written by each tenant's stack.
    assert settings.tenants == {} and settings.store_urls == {}, f"{stack}: the platform lists tenants"
    if store_in_cluster(stack):
        shared = plan.one("Service", "influxdb").get("spec.ports.0.port")
        assert influxdb_url(config.cluster.namespace, "influxdb").endswith(
            f"influxdb.{config.cluster.namespace}.svc.cluster.local:{shared}"
        )
    for tenant in config.tenants:  # what the worker will read: each tenant stack's registry row
        (row,) = tenant_owned(plan, tenant.id, "pulumi-python:dynamic/registry:Tenant")
        route, instance = row.inputs["route"], influxdb_instance(config, tenant)
        tokens = {t.inputs["url"] for t in tenant_owned(plan, tenant.id, INFLUX_TOKEN)}
        assert {route["url"]} == tokens, f"{stack}: {tenant.id}'s route is where its tokens live"
        if store_in_cluster(stack):
            assert route["url"] == influxdb_url(config.cluster.namespace, instance), f"{stack}: {tenant.id}"
        assert (route["instance"], route["bucket"]) == (instance, store_route(config, tenant).bucket)
        assert row.inputs["write_token"] == SECRET and "token" not in route
    files = set(plan.one("Secret", "ingest-credentials").get("stringData"))
    assert env["IRONLINK_REGISTRY_DSN"] == {
        "secretKeyRef": {"key": "registry-dsn", "name": "ingest-credentials"}
    }, f"{stack}: tenants, routes and tokens come from the registry"
    assert settings.mqtt_ca_file is not None and settings.mqtt_ca_file.name in files
    mtls = config.broker.tls == "mtls"
    assert (settings.mqtt_cert_file is not None) == mtls, f"{stack}: client certificate only under mutual TLS"
    http = pod_spec(deployment)["containers"][0]["ports"][0]["containerPort"]
    assert http == settings.http_port, f"{stack}: probes must hit the worker's HTTP port"


# ------------------------------------------------------------------------------------ tenants
INFLUX_TOKEN = "pulumi-python:dynamic/influxdb:Token"


def tenant_owned(plan: Plan, tenant_id: str, type: str | None = None) -> list[PlannedResource]:
    """What the tenant's component declared (its own InfluxDB's objects included), of ``type``."""
    return [r for r in plan.descendants(plan.one("Tenant", tenant_id)) if type is None or r.type == type]


@pytest.mark.parametrize("stack", STACKS)
def test_every_tenant_is_a_stack_of_its_own_on_its_platform(stack: str) -> None:
    region, config = region_plan(stack), stack_config(stack)
    assert region.platform.find("ironlink:tenant:Tenant") == [], f"{stack}: a tenant in the platform stack"
    assert sorted(region.tenants) == sorted(t.id for t in config.tenants) and region.tenants, stack
    for tenant_id, plan in region.tenants.items():
        component = plan.one("Tenant", tenant_id)
        assert component.parent is None, f"{plan.stack}: the tenant is the stack's root component"
        assert plan.references == [stack], f"{plan.stack}: reads its platform's outputs, no other stack's"
        registry = tenant_owned(plan, tenant_id, "pulumi-python:dynamic/registry:Tenant")
        assert [r.inputs["tenant_id"] for r in registry] == [tenant_id], f"{plan.stack}: registry rows"


@pytest.mark.parametrize("stack", STACKS)
def test_the_platform_stack_declares_nothing_of_any_tenant(stack: str) -> None:
    platform, config = region_plan(stack).platform, stack_config(stack)
    tenant_types = {r.type for plan in region_plan(stack).tenants.values() for r in plan.resources}
    for tenant in config.tenants:
        named = [r.urn for r in platform.resources if tenant.id in r.name]
        assert named == [], f"{stack}: the platform declares resources of tenant {tenant.id}"
    shared = {"pulumi:providers:grafana", "pulumi:providers:kubernetes", "kubernetes:core/v1:Secret"}
    kinds = {r.type for r in platform.resources} & tenant_types - shared
    assert INFLUX_TOKEN not in kinds and "grafana:oss/dashboard:Dashboard" not in kinds, stack
    outputs = set(platform.outputs)
    assert {"influxdb_url", "influxdb_admin_token", "grafana_admin_password", "registry_dsn"} <= outputs
    for secret in ("influxdb_admin_token", "grafana_admin_password", "registry_dsn"):
        assert platform.outputs[secret] == SECRET, f"{stack}: export {secret} is not a secret"


@pytest.mark.parametrize("stack", STACKS)
def test_each_tenants_store_lives_on_its_instance_and_level_3_gets_its_own(stack: str) -> None:
    plan, config = stack_plan(stack), stack_config(stack)
    store_type = (
        "ironlink:influxdb:InfluxDB" if store_in_cluster(stack) else "ironlink:telemetry:TelemetryStore"
    )
    urls: dict[str, set[str]] = {}
    for tenant in config.tenants:
        instance = influxdb_instance(config, tenant)
        own = [r.name for r in tenant_owned(plan, tenant.id, store_type)]
        if config.isolation_of(tenant) == 3:
            assert own == [f"influxdb-{tenant.id}"], f"{stack}: level-3 {tenant.id} needs its own store"
        else:
            assert own == [], f"{stack}: {tenant.id} is on the shared store"
        tokens = tenant_owned(plan, tenant.id, INFLUX_TOKEN)
        urls[tenant.id] = {t.inputs["url"] for t in tokens}
        assert tokens and len(urls[tenant.id]) == 1, f"{stack}: {tenant.id} tokens on one instance"
        if store_in_cluster(stack):
            assert urls[tenant.id] == {influxdb_url(config.cluster.namespace, instance)}, stack
        else:
            assert next(iter(urls[tenant.id])).startswith("https://"), f"{stack}: Timestream serves TLS"
    shared = {url for t in config.tenants if config.isolation_of(t) < 3 for url in urls[t.id]}
    own_urls = [url for t in config.tenants if config.isolation_of(t) == 3 for url in urls[t.id]]
    assert len(shared) <= 1 and not shared & set(own_urls), f"{stack}: a level-3 tenant shares an instance"


@pytest.mark.parametrize("stack", ["scale-eu-west-1", "scale-us-east-1"])
def test_the_scale_stacks_have_a_level_3_tenant(stack: str) -> None:
    plan = stack_plan(stack)
    level_3 = {"scale-eu-west-1": "umbrella", "scale-us-east-1": "stark"}[stack]
    kind = "InfluxDB" if store_in_cluster(stack) else "TelemetryStore"
    assert plan.component_of(plan.one(kind, f"influxdb-{level_3}")) == plan.one("Tenant", level_3)


@pytest.mark.parametrize("stack", STACKS)
def test_tenant_tokens_name_only_that_tenants_buckets(stack: str) -> None:
    plan, config = stack_plan(stack), stack_config(stack)
    for tenant in config.tenants:
        route = store_route(config, tenant)
        write = plan.one("Token", f"{tenant.id}-write-token").inputs["permissions"]
        read = plan.one("Token", f"{tenant.id}-read-token").inputs["permissions"]
        # the mock engine ids a resource "<name>-id"; buckets are named after the tenant
        assert write == [{"action": "write", "bucket_id": f"{route.bucket}-id"}], f"{stack}: {tenant.id}"
        assert read == [
            {"action": "read", "bucket_id": f"{route.bucket}-id"},
            {"action": "read", "bucket_id": f"{route.downsampled_bucket}-id"},
        ], f"{stack}: {tenant.id}"


@pytest.mark.parametrize("stack", STACKS)
def test_only_emqx_stacks_register_the_workers_broker_identity(stack: str) -> None:
    plan, config = stack_plan(stack), stack_config(stack)
    accounts = plan.find("pulumi-python:dynamic/registry:ServiceAccount")
    if config.broker.engine == "emqx":
        assert sorted((a.inputs["username"], a.inputs["password_hash"]) for a in accounts) == [
            (DEAD_LETTER_SERVICE, SECRET),
            (INGEST_SERVICE, SECRET),
        ], stack
        assert _sync_await(plan.platform.ingest_credential.password_hash.future()).startswith("$7$")
    else:
        assert accounts == [], f"{stack}: Mosquitto reads its password file, not the registry"


@pytest.mark.parametrize("stack", STACKS)
def test_the_worker_logs_into_the_registry_as_its_own_role_never_the_owner(stack: str) -> None:
    """In-cluster and on RDS: role ``ingest`` (registry.roles) is written once the database runs,
    with its privilege list as an input (a new list re-converges it), and the worker's DSN names it."""
    plan = stack_plan(stack)
    (role,) = plan.find("pulumi-python:dynamic/registry:ServiceRole")
    assert (role.inputs["role"], role.inputs["password"], role.inputs["dsn"]) == (INGEST_ROLE, SECRET, SECRET)
    assert role.inputs["privileges"] == {table: sorted(grants) for table, grants in INGEST_PRIVILEGES.items()}
    dsn = _sync_await(plan.platform.postgres.ingest_dsn.future())
    owner = _sync_await(plan.platform.postgres.dsn.future())
    assert dsn.startswith(f"postgresql://{INGEST_ROLE}:") and not owner.startswith(
        f"postgresql://{INGEST_ROLE}:"
    )
    assert dsn.rsplit("@", 1)[1] == owner.rsplit("@", 1)[1], "the same database"


@pytest.mark.parametrize("stack", PHASE_A)
def test_phase_a_tenants_share_grafanas_org(stack: str) -> None:
    plan = stack_plan(stack)
    assert plan.find("grafana:oss/organization:Organization") == [], f"{stack}: level 1 has no org"
    assert {f.name for f in plan.find("grafana:oss/folder:Folder")} == {
        f"{t.id}-folder" for t in stack_config(stack).tenants
    }


@pytest.mark.parametrize("stack", [s for s in PHASE_B + PHASE_C if in_cluster_databases(s)])
def test_a_databases_service_and_policy_never_select_its_backup_jobs_pods(stack: str) -> None:
    plan = stack_plan(stack)
    jobs = [job for job in plan.find("CronJob") if job.name.endswith("-backup")]
    assert jobs, f"{stack}: no backup jobs"
    for job in jobs:
        pod_labels = job.get("spec.jobTemplate.spec.template.metadata.labels")
        database = job.name.removesuffix("-backup")
        service = plan.one("Service", database).get("spec.selector")
        policy = plan.one("NetworkPolicy", database).get("spec.podSelector.matchLabels")
        for selecting in (service, policy):
            assert not selecting.items() <= pod_labels.items(), (
                f"{stack}: {database} selects {job.name}'s pods"
            )
