"""The pure renderers the components call, tested alone: EMQX HOCON and environment, Kubernetes
fragments, Grafana environment, the PostgreSQL first-start script (run against the real server)."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pyhocon import ConfigFactory

from components.backup import backup_script
from components.mqtt_broker import config_hash
from components.render import emqx
from components.render.grafana import GrafanaDatabase, render_grafana_env
from components.render.kubernetes import (
    anti_affinity,
    container,
    majority,
    pod_disruption_budget_spec,
    pod_template,
    spreads,
)
from components.render.postgres import (
    EMQX_ROLE,
    GRAFANA_DATABASE,
    GRAFANA_ROLE,
    PASSWORD_ENV,
    render_init_script,
)
from infra.config import PlatformConfig, parse_platform
from registry.queries import EMQX_AUTHN_QUERY, EMQX_AUTHZ_QUERY, EMQX_PASSWORD_HASH
from tests.conftest import PostgresCluster

REGISTRY = emqx.RegistryConnection("postgres.ironlink.svc.cluster.local", 5432, "ironlink", "emqx")


def config(phase: str, **settings: Any) -> PlatformConfig:
    return parse_platform({"phase": phase, "region": "eu", **settings})


def parsed_conf(platform: PlatformConfig) -> Any:
    return ConfigFactory.parse_string(emqx.render_emqx_conf(platform, REGISTRY))


# ------------------------------------------------------------------------------------- EMQX
@pytest.mark.parametrize("phase", ["B", "C"])
def test_emqx_conf_parses_back_to_the_settings_it_was_rendered_from(phase: str) -> None:
    platform = config(phase)
    assert parsed_conf(platform).as_plain_ordered_dict() == emqx.emqx_settings(platform, REGISTRY)


def test_emqx_queues_and_windows_for_the_worker_instead_of_dropping() -> None:
    """EMQX defaults (inflight 32, queue 1000) would throttle the worker and drop during an outage."""
    mqtt = parsed_conf(config("C", ingest={"batch_size": 2000})).get("mqtt")
    assert mqtt["max_inflight"] == 8000
    assert mqtt["max_mqueue_len"] == 200_000
    assert mqtt["shared_subscription_strategy"] == "hash_topic"
    smaller = parsed_conf(config("B", broker={"max_queued_messages": 5000}))
    assert smaller.get("mqtt")["max_mqueue_len"] == 5000


def test_hocon_keeps_placeholders_quotes_and_odd_keys_literal() -> None:
    tree = {"q": 'a "quoted" \\ ${username}', "odd.key": {"x-y": [1, 2]}, "flag": False}
    assert ConfigFactory.parse_string(emqx.render_hocon(tree)).as_plain_ordered_dict() == tree


def test_hocon_refuses_values_it_cannot_write() -> None:
    with pytest.raises(TypeError, match="cannot write"):
        emqx.render_hocon({"x": object()})


@pytest.mark.parametrize("phase", ["B", "C"])
def test_emqx_denies_whatever_the_registry_does_not_allow(phase: str) -> None:
    conf = parsed_conf(config(phase))
    assert conf["authorization.no_match"] == "deny"
    sources = conf["authorization.sources"]
    assert [source["type"] for source in sources] == ["postgresql"], "no file source (its default allows all)"
    assert sources[0]["query"] == EMQX_AUTHZ_QUERY
    (authn,) = conf["authentication"]
    assert (authn["mechanism"], authn["backend"], authn["query"]) == (
        "password_based",
        "postgresql",
        EMQX_AUTHN_QUERY,
    )
    assert authn["password_hash_algorithm"] == EMQX_PASSWORD_HASH
    assert authn["server"] == "postgres.ironlink.svc.cluster.local:5432" and authn["username"] == "emqx"
    assert "password" not in authn, "the registry password comes from a Secret, not the file"


def test_phase_c_requires_client_certificates_and_b_does_not() -> None:
    mtls = parsed_conf(config("C"))["listeners.ssl.default.ssl_options"]
    assert (mtls["verify"], mtls["fail_if_no_peer_cert"]) == ("verify_peer", True)
    assert parsed_conf(config("C"))["mqtt.peer_cert_as_username"] == "cn"
    tls = parsed_conf(config("B"))["listeners.ssl.default.ssl_options"]
    assert (tls["verify"], tls["fail_if_no_peer_cert"]) == ("verify_none", False)
    assert "peer_cert_as_username" not in parsed_conf(config("B"))["mqtt"]


def test_the_tls_listener_carries_the_client_limits() -> None:
    platform = config(
        "B", broker={"limits": {"messages_rate": "50/s", "bytes_rate": "64KB/s", "max_conn_rate": "9/s"}}
    )
    listener = parsed_conf(platform)["listeners.ssl.default"]
    assert (listener["messages_rate"], listener["bytes_rate"], listener["max_conn_rate"]) == (
        "50/s",
        "64KB/s",
        "9/s",
    )
    assert listener["bind"] == "0.0.0.0:8883"
    assert parsed_conf(platform)["mqtt.max_packet_size"] == "256KB"


def test_plaintext_is_switched_off_unless_allowed() -> None:
    env = emqx.render_emqx_env(config("B"), namespace="ns", headless_service="emqx-headless")
    assert env["EMQX_LISTENERS__TCP__DEFAULT__ENABLE"] == "false"
    assert "tcp" not in parsed_conf(config("B"))["listeners"]
    allowed = config("A", broker={"engine": "emqx", "image": "emqx/emqx:5.8.9", "allow_plaintext": True})
    assert (
        emqx.render_emqx_env(allowed, namespace="ns", headless_service="h")[
            "EMQX_LISTENERS__TCP__DEFAULT__ENABLE"
        ]
        == "true"
    )
    assert parsed_conf(allowed)["listeners.tcp.default.bind"] == "0.0.0.0:1883"
    for listener in ("ws", "wss"):
        assert parsed_conf(allowed)[f"listeners.{listener}.default.enable"] is False


def test_nodes_discover_each_other_through_the_kubernetes_api_by_stable_names() -> None:
    env = emqx.render_emqx_env(config("C"), namespace="ironlink", headless_service="emqx-headless")
    assert env["EMQX_CLUSTER__DISCOVERY_STRATEGY"] == "k8s"
    assert env["EMQX_CLUSTER__K8S__SERVICE_NAME"] == "emqx-headless"
    assert env["EMQX_CLUSTER__K8S__NAMESPACE"] == "ironlink"
    assert env["EMQX_CLUSTER__K8S__ADDRESS_TYPE"] == "hostname"
    assert env["EMQX_CLUSTER__K8S__SUFFIX"] == "svc.cluster.local"
    assert env["EMQX_CLUSTER__K8S__APISERVER"] == '"https://kubernetes.default.svc:443"', (
        "quoted: // is a HOCON comment"
    )
    assert env["EMQX_HOST"] == "$(POD_NAME).emqx-headless.ironlink.svc.cluster.local"
    assert not set(env) & set(emqx.SECRET_ENV.values()), "secrets are not rendered into plain env"


def test_the_inter_node_rpc_port_is_pinned_to_what_the_network_policy_opens() -> None:
    rpc = parsed_conf(config("C"))["rpc"]
    assert (rpc["port_discovery"], rpc["tcp_server_port"]) == ("manual", emqx.RPC_PORT)


# ------------------------------------------------------------------------------ Kubernetes
def test_every_container_is_hardened_whatever_the_caller_passes() -> None:
    spec = container("x", "img", resources=config("A").grafana.resources)
    context = spec["securityContext"]
    assert context["runAsNonRoot"] and context["readOnlyRootFilesystem"]
    assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["resources"]["limits"] == {"cpu": "500m", "memory": "512Mi"}


def test_only_pods_that_call_the_api_get_a_token() -> None:
    plain = pod_template({"a": "b"}, [], user=1000, service_account="x")["spec"]
    assert plain["automountServiceAccountToken"] is False
    assert plain["securityContext"]["runAsUser"] == 1000 and plain["securityContext"]["runAsNonRoot"] is True
    assert pod_template({}, [], user=1, service_account="x", api_access=True)["spec"][
        "automountServiceAccountToken"
    ]


@pytest.mark.parametrize(("replicas", "quorum"), [(1, 1), (3, 2), (5, 3), (7, 4)])
def test_a_cluster_keeps_a_majority(replicas: int, quorum: int) -> None:
    assert majority(replicas) == quorum


def test_a_disruption_budget_takes_exactly_one_bound() -> None:
    assert pod_disruption_budget_spec({"a": "b"}, min_available=2)["minAvailable"] == 2
    assert pod_disruption_budget_spec({"a": "b"}, max_unavailable=1)["maxUnavailable"] == 1
    with pytest.raises(ValueError, match="exactly one"):
        pod_disruption_budget_spec({"a": "b"})
    with pytest.raises(ValueError, match="exactly one"):
        pod_disruption_budget_spec({"a": "b"}, min_available=1, max_unavailable=1)


def test_anti_affinity_is_required_only_when_asked() -> None:
    required = anti_affinity({"a": "b"}, required=True)["podAntiAffinity"]
    assert (
        required["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"]
        == "kubernetes.io/hostname"
    )
    preferred = anti_affinity({"a": "b"}, required=False)["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in preferred


def test_spreading_follows_ha_or_replica_count() -> None:
    assert not spreads(config("A"), 1)
    assert spreads(config("A"), 2)
    assert spreads(config("C"), 1)


def test_config_hash_changes_with_the_mounted_files() -> None:
    assert config_hash("a", "b") == config_hash("a", "b")
    assert config_hash("a", "b") != config_hash("a", "c")
    assert config_hash("ab", "") != config_hash("a", "b")


# ------------------------------------------------------------------------------------ Grafana
def test_grafana_single_replica_keeps_sqlite_and_no_gossip() -> None:
    env = render_grafana_env(public_url="https://g/")
    assert "GF_DATABASE_TYPE" not in env and "GF_UNIFIED_ALERTING_HA_PEERS" not in env
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and env["GF_USERS_ALLOW_SIGN_UP"] == "false"


def test_grafana_replicas_share_postgres_and_gossip_alert_state() -> None:
    env = render_grafana_env(
        public_url="https://g/",
        database=GrafanaDatabase("pg.ns.svc.cluster.local", 5432, "grafana", "grafana"),
        gossip_host="grafana-gossip.ns.svc.cluster.local",
    )
    assert env["GF_DATABASE_TYPE"] == "postgres" and env["GF_DATABASE_HOST"] == "pg.ns.svc.cluster.local:5432"
    assert env["GF_UNIFIED_ALERTING_HA_PEERS"] == "grafana-gossip.ns.svc.cluster.local:9094"
    assert env["GF_UNIFIED_ALERTING_HA_ADVERTISE_ADDRESS"] == "$(POD_IP):9094"
    assert not any("PASSWORD" in key for key in env), "passwords come from a Secret"


# ---------------------------------------------------------------------------------- backups
def test_backups_dump_into_a_new_entry_and_prune_old_ones() -> None:
    script = backup_script('pg_dump --file="$target.dump" db')
    assert 'target="/backup/$(date -u +%Y%m%dT%H%M%SZ)"' in script
    assert script.index("pg_dump") < script.index("find /backup -mindepth 1 -maxdepth 1 -mtime +7")


# --------------------------------------------------------------------------------- Postgres
@pytest.mark.integration
@pytest.mark.xdist_group("postgres-cluster-roles")  # roles are the server's, not a database's
def test_the_first_start_script_creates_least_privilege_roles(postgres_cluster: PostgresCluster) -> None:
    """Run the rendered script with psql against the real PostgreSQL, as the image's entrypoint would."""
    database = f"t_{uuid.uuid4().hex[:10]}"
    passwords = {EMQX_ROLE: "emqx" + uuid.uuid4().hex, GRAFANA_ROLE: "graf" + uuid.uuid4().hex}
    with psycopg.connect(postgres_cluster.dsn(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    script = Path(os.environ.get("TMPDIR", "/tmp")) / f"init-{database}.sh"
    script.write_text(render_init_script(database, "postgres"))
    env = {
        **os.environ,
        "POSTGRES_USER": "postgres",
        "POSTGRES_DB": database,
        "PGHOST": str(postgres_cluster.socket_dir),
        "PGPORT": str(postgres_cluster.port),
        **{PASSWORD_ENV[role]: password for role, password in passwords.items()},
    }
    try:
        subprocess.run(["sh", str(script)], env=env, check=True, capture_output=True, timeout=60)
        with psycopg.connect(postgres_cluster.dsn(database), autocommit=True) as owner:
            owner.execute("CREATE TABLE acl_rules (username text)")
            owner.execute("INSERT INTO acl_rules VALUES ('acme.plant-1.press-01')")
        tcp = f"host=127.0.0.1 port={postgres_cluster.port}"
        with psycopg.connect(f"{tcp} user=emqx password={passwords[EMQX_ROLE]} dbname={database}") as reader:
            assert reader.execute("SELECT username FROM acl_rules").fetchall() == [("acme.plant-1.press-01",)]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                reader.execute("INSERT INTO acl_rules VALUES ('intruder')")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(f"{tcp} user=emqx password=wrong dbname={database}")
        graf = f"{tcp} user=grafana password={passwords[GRAFANA_ROLE]} dbname={GRAFANA_DATABASE}"
        with psycopg.connect(graf, autocommit=True) as grafana:
            grafana.execute("CREATE TABLE dashboard (id int)")
    finally:
        script.unlink(missing_ok=True)
        with psycopg.connect(postgres_cluster.dsn(), autocommit=True) as admin:
            for name in (database, GRAFANA_DATABASE):
                admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
            admin.execute(f"DROP ROLE IF EXISTS {EMQX_ROLE}")
            admin.execute(f"DROP ROLE IF EXISTS {GRAFANA_ROLE}")
