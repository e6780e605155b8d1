"""The MQTT broker devices publish to: EMQX 5 (phases B and C, clustered in C) or a hardened
Mosquitto (phase A), chosen by ``broker.engine``.

Both engines:

- listen for devices on 8883 (TLS with a server certificate from the region's CA; mutual TLS where
  ``broker.tls: mtls``) and on 1883 only where ``broker.allow_plaintext``;
- are exposed by a ``LoadBalancer`` Service in every phase — devices connect from factories outside
  the cluster — carrying only those ports; with ``high_availability`` it keeps the devices' source
  addresses (``externalTrafficPolicy: Local``) so per-source limits see real clients. Phase C on
  its own EKS cluster is reached through the region's NLB instead (``components.aws.ingress``,
  proxy protocol v2), and that Service is ``ClusterIP``. The dashboard/API port (18083) is never
  on that Service;
- deny everything not granted: Mosquitto through its dynamic-security plugin (default access denied;
  devices added at runtime by the provisioning service over ``$CONTROL``), EMQX through the
  registry's ACL rows with ``no_match = deny``;
- get a PodDisruptionBudget (a majority must stay up) and anti-affinity when they run several
  nodes or the phase is HA.

EMQX nodes discover each other through the Kubernetes API (a Role that may only read endpoints)
on a headless Service that publishes not-ready addresses, share one random Erlang cookie, and keep
``/opt/emqx/data`` on a PVC per node.

Mosquitto keeps the plugin's state on its data volume: an initContainer seeds it from a Secret (the
admin and the platform's services, hashes only) when, and only when, the file is absent, since the
plugin rewrites it after every change. Its certificate listener (8884, on the device Service too)
trusts only the provisioning service's issuing CAs and checks their CRLs, from an emptyDir that a
sidecar, ``python -m provisioning.trust_sync`` in the service's image, keeps in step with
``/v1/ca.pem`` and ``/v1/crl.pem``: new CAs and revocations reach the running broker within seconds
(a revoked certificate is refused at the TLS handshake). Pulumi never holds those CAs: the service
makes them in the cluster. An initContainer syncs once first (``--once``): Mosquitto does not start
without a CRL in ``crlfile``. A second sidecar, ``python -m provisioning.broker_log``, follows the
log file Mosquitto also writes (beside stdout) on an emptyDir they share, and posts its refused
connections, counted per minute, to the service's audit trail with the broker-log token. The broker's
pods may reach the service's port and nothing else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.credentials import first_start_password, generated_password
from components.kube import Kube, inherited_dependencies
from components.pki import CertificateAuthority, IssuedCertificate
from components.postgres import RegistryEndpoint
from components.render import emqx
from components.render.kubernetes import (
    ROLE_BROKER,
    ROLE_PROVISIONING,
    Manifest,
    anti_affinity,
    container,
    container_port,
    egress_rule,
    env_list,
    field_env,
    http_probe,
    ingress_policy_spec,
    ingress_rule,
    isolated_policy_spec,
    labels,
    majority,
    metrics_rule,
    pod_disruption_budget_spec,
    pod_peer,
    pod_template,
    role_selector,
    scrape_annotations,
    scratch_volumes,
    secret_env,
    selector,
    service_host,
    spreads,
    tcp_probe,
    volume_claim_template,
)
from components.render.monitoring import MetricsEndpoint
from components.render.mosquitto import (
    DYNSEC_ADMIN,
    BrokerAccount,
    DynamicSecurity,
    MosquittoPaths,
    render_dynamic_security_config,
    render_mosquitto_conf,
    seed_if_absent_command,
)
from components.render.postgres import EMQX_ROLE
from infra.config import Amounts, ComputeResources, PlatformConfig, secret_text
from provisioning import broker_log
from provisioning.settings import HTTP_PORT as PROVISIONING_PORT
from provisioning.trust_sync import CRL_FILE

TLS_PORT = emqx.MQTTS_PORT
PLAINTEXT_PORT = emqx.MQTT_PORT
EMQX_USER = 1000  # the emqx/emqx image's user
MOSQUITTO_USER = 1883  # the eclipse-mosquitto image's user
MOSQUITTO_PATHS = MosquittoPaths(
    cafile="/mosquitto/certs/ca.crt",
    certfile="/mosquitto/certs/tls.crt",
    keyfile="/mosquitto/certs/tls.key",
    password_file="",  # dynamic-security mode: identities and ACLs live in the plugin
    acl_file="",
    persistence_dir="/mosquitto/data",
)
MOSQUITTO_MTLS_PORT = 8884
DYNSEC_STATE = f"{MOSQUITTO_PATHS.persistence_dir}/dynamic-security.json"
DYNSEC_SEED_DIR = "/mosquitto/seed"
DYNSEC_SEED_FILE = "dynamic-security.json"
DEVICE_CA_DIR = "/mosquitto/device-ca"
TRUST_SYNC_INTERVAL_S = 5
# The sidecars parse two small PEM bundles every few seconds, or follow the broker's log (at most
# 20,000 rows kept while the service is away): a sliver of CPU, a little memory.
SIDECAR_RESOURCES = ComputeResources(
    requests=Amounts(cpu="10m", memory="48Mi"), limits=Amounts(cpu="100m", memory="96Mi")
)
BROKER_LOG_DIR = "/mosquitto/log"
BROKER_LOG_FILE = f"{BROKER_LOG_DIR}/mosquitto.log"
BROKER_LOG_TRUNCATE_BYTES = 64 * 1024 * 1024
"""The follower empties the log file past this size: nothing else rotates it, and it lives on the
node's disk (an emptyDir)."""
BROKER_LOG_TOKEN_KEY = "broker-log-token"
AUTH_FAILURES_KEY = "auth-failures-authorization"
"""EMQX's Secret key holding its auth-failure rule's ``Authorization`` header."""


class DeviceTrust(TypedDict):
    """The provisioning service the broker relies on: where Mosquitto's certificate listener's CAs
    and CRLs come from, and where either engine reports refused connections."""

    image: str
    """The provisioning service's image: it holds ``provisioning.trust_sync``."""
    url: str
    """The service's in-cluster URL (HTTPS, its certificate signed by the region CA)."""


class MqttBrokerArgs(TypedDict):
    config: PlatformConfig
    """The region's config: ``broker`` section (engine, nodes, TLS mode, limits, resources)."""
    provider: k8s.Provider
    """The region's Kubernetes provider."""
    ca: CertificateAuthority
    """Signs the broker's server certificate; devices and services trust it."""
    registry: NotRequired[RegistryEndpoint | None]
    """EMQX only: the PostgreSQL holding the device registry it authenticates and authorizes against."""
    service_accounts: NotRequired[Mapping[str, pulumi.Input[str]]]
    """Mosquitto only: service username → ``$7$`` hash, every service of
    :func:`registry.access.service_usernames` (the plugin's seed); devices are never in it: the
    provisioning service adds them at runtime."""
    dynamic_security_admin_hash: NotRequired[pulumi.Input[str] | None]
    """Mosquitto only: the ``$7$`` hash of ``admin.dynsec``, whom the provisioning service logs in as."""
    device_trust: NotRequired[DeviceTrust | None]
    """Mosquitto only: the provisioning service the certificate listener's trust comes from."""
    broker_log_token: NotRequired[pulumi.Input[str] | None]
    """The provisioning service's broker-log token (secret, ``IRONLINK_PROV_BROKER_LOG_TOKEN``);
    with it the broker reports refused connections to ``device_trust``'s service: Mosquitto through
    a sidecar following its log (``/v1/broker/auth-failures``), EMQX through a rule on its CONNACK
    event (``/v1/broker/auth-events``)."""
    public_names: NotRequired[list[str]]
    """More names devices dial (the region's Route 53 names): TLS ends at the broker, so its
    certificate must carry them."""
    external_load_balancer: NotRequired[bool]
    """The region's own NLB reaches the pods (``components.aws.ingress``): the device Service is
    then ``ClusterIP``, so the cluster makes no second load balancer beside it."""


def config_hash(*documents: str) -> str:
    """Pod annotation that rolls the pods when their mounted configuration changes."""
    return hashlib.sha256("\0".join(documents).encode()).hexdigest()[:16]


class MqttBroker(pulumi.ComponentResource):
    engine: str
    host: str
    """In-cluster DNS name of the device Service (what the ingest worker connects to)."""
    public_host: str
    """The name devices use (``mqtt.<cluster.domain>``), in the server certificate."""
    tls_port: int
    ca_cert_pem: pulumi.Output[str]
    dynamic_security_seed: pulumi.Output[str] | None
    """Mosquitto only: the plugin's first state as seeded (secret); None for EMQX."""
    metrics: MetricsEndpoint | None
    """EMQX only: its Prometheus stats on the API port, through the headless Service (the device
    Service never carries that port); Mosquitto serves no metrics."""

    def __init__(self, name: str, args: MqttBrokerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("ironlink:mqtt_broker:MqttBroker", name, None, opts)
        config = args["config"]
        broker, namespace = config.broker, config.cluster.namespace
        self._kube = Kube(
            self, args["provider"], namespace, config.protect_stateful, inherited_dependencies(opts)
        )
        self._config, self._name = config, name
        self._external_load_balancer = args.get("external_load_balancer", False)
        self._labels = labels(broker.engine, name, ROLE_BROKER)
        self._pods = selector(self._labels)
        self.engine, self.tls_port = broker.engine, TLS_PORT
        self.host = service_host(name, namespace)
        self.public_host = f"mqtt.{config.cluster.domain}"
        self.ca_cert_pem = args["ca"].cert_pem
        self.dynamic_security_seed = None
        self.metrics = (
            MetricsEndpoint(
                name,
                self._pods,
                emqx.DASHBOARD_PORT,
                "dashboard",
                path=emqx.METRICS_PATH,
                service_labels=self._pods,
            )
            if broker.engine == "emqx"
            else None
        )

        headless = f"{name}-headless"
        server = args["ca"].issue(
            f"{name}-server",
            common_name=self.public_host,
            parent=self,
            dns_names=[
                self.public_host,
                *(extra for extra in args.get("public_names", []) if extra != self.public_host),
                name,
                f"{name}.{namespace}",
                f"{name}.{namespace}.svc",
                self.host,
                f"*.{service_host(headless, namespace)}",
            ],
        )
        self._tls_secret(server)
        if broker.engine == "emqx":
            registry = args.get("registry")
            if registry is None:
                raise ValueError(
                    "MqttBrokerArgs.registry: EMQX needs the registry's Postgres to authenticate devices"
                )
            self._emqx(registry, headless, args.get("device_trust"), args.get("broker_log_token"))
        else:
            admin_hash = args.get("dynamic_security_admin_hash")
            if admin_hash is None:
                raise ValueError(
                    "MqttBrokerArgs.dynamic_security_admin_hash: Mosquitto needs its dynamic-security admin"
                )
            trust = args.get("device_trust")
            if trust is None:
                raise ValueError(
                    "MqttBrokerArgs.device_trust: Mosquitto's certificate listener needs the provisioning API"
                )
            self._mosquitto(
                args.get("service_accounts") or {}, admin_hash, trust, args.get("broker_log_token")
            )
        self._service()
        self._network_policy()
        if spreads(config, broker.nodes):
            budget = pod_disruption_budget_spec(self._pods, min_available=majority(broker.nodes))
            self._kube.disruption_budget(name, self._labels, budget)
        self.register_outputs({"host": self.host, "tls_port": self.tls_port, "ca_cert_pem": self.ca_cert_pem})

    # ----------------------------------------------------------------------------- shared
    def _tls_secret(self, server: IssuedCertificate) -> None:
        self._kube.secret(
            f"{self._name}-tls",
            self._labels,
            {"ca.crt": self.ca_cert_pem, "tls.crt": server.cert_pem, "tls.key": server.private_key_pem},
            secret_type="kubernetes.io/tls",
        )

    def _listener_ports(self) -> list[int]:
        return [TLS_PORT, PLAINTEXT_PORT] if self._config.broker.allow_plaintext else [TLS_PORT]

    def _device_ports(self) -> list[tuple[str, int]]:
        """What devices connect to: the listeners, and Mosquitto's certificate listener."""
        ports = [("mqtts" if port == TLS_PORT else "mqtt", port) for port in self._listener_ports()]
        if self.engine == "mosquitto":
            ports.append(("mqtts-certs", MOSQUITTO_MTLS_PORT))
        return ports

    def _service(self) -> None:
        ports = [
            {"name": name, "port": port, "targetPort": port, "protocol": "TCP"}
            for name, port in self._device_ports()
        ]
        if self._external_load_balancer:
            self._kube.service(
                self._name, self._labels, {"type": "ClusterIP", "selector": self._pods, "ports": ports}
            )
            return
        spec: Manifest = {"type": "LoadBalancer", "selector": self._pods, "ports": ports}
        if self._config.high_availability:
            spec["externalTrafficPolicy"] = "Local"
        self._kube.service(self._name, self._labels, spec)

    def _network_policy(self) -> None:
        rules = [ingress_rule([(port, "TCP") for _, port in self._device_ports()], None)]
        if self.engine == "emqx":
            peers = [pod_peer(self._pods)]
            rules.append(ingress_rule([(emqx.EKKA_PORT, "TCP"), (emqx.RPC_PORT, "TCP")], peers))
            rules.append(metrics_rule(emqx.DASHBOARD_PORT, self._config.cluster.prometheus))
            spec = ingress_policy_spec(self._pods, rules)
        else:
            # The provisioning service's $CONTROL connection: named, so that it survives a narrower
            # device rule. Out: only the service's API, where the trust sidecar reads CAs and CRLs
            # and the broker-log sidecar posts refused connections.
            provisioning = [pod_peer(role_selector(ROLE_PROVISIONING))]
            rules.append(ingress_rule([(TLS_PORT, "TCP")], provisioning))
            spec = isolated_policy_spec(
                self._pods, rules, [egress_rule([(PROVISIONING_PORT, "TCP")], provisioning)]
            )
        self._kube.network_policy(self._name, self._labels, spec)

    def _affinity(self) -> Manifest | None:
        if not spreads(self._config, self._config.broker.nodes):
            return None
        return anti_affinity(self._pods, required=self._config.high_availability)

    def _certs_volume(self) -> Manifest:
        return {"name": "certs", "secret": {"secretName": f"{self._name}-tls", "defaultMode": 0o440}}

    # ------------------------------------------------------------------------------- EMQX
    def _emqx(
        self,
        registry: RegistryEndpoint,
        headless: str,
        trust: DeviceTrust | None,
        broker_log_token: pulumi.Input[str] | None,
    ) -> None:
        config, kube, name = self._config, self._kube, self._name
        broker, namespace = config.broker, config.cluster.namespace
        connection = emqx.RegistryConnection(
            registry.host, registry.port, registry.database, EMQX_ROLE, tls=registry.tls
        )
        # Refused CONNECTs to the service's audit trail; the header comes from the Secret, not the file.
        reporting: emqx.AuthFailureReporting | None = None
        reporting_secret: dict[str, pulumi.Input[str]] = {}
        if trust is not None and broker_log_token is not None:
            reporting = emqx.AuthFailureReporting(trust["url"], f"{emqx.CERTS_DIR}/ca.crt")
            header = pulumi.Output.from_input(broker_log_token).apply(emqx.auth_failures_authorization)
            reporting_secret = {AUTH_FAILURES_KEY: pulumi.Output.secret(header)}
        conf = emqx.render_emqx_conf(config, connection, auth_failures=reporting)
        kube.config_map(f"{name}-config", self._labels, {"emqx.conf": conf})
        secrets = f"{name}-secrets"
        # The cookie only has to be shared by the nodes: a new one is harmless after a full restart.
        kube.secret(
            secrets,
            self._labels,
            {
                "cookie": generated_password(f"{name}-cookie", parent=self, protect=False),
                # EMQX_DASHBOARD__DEFAULT_PASSWORD seeds the admin user at first start only.
                "dashboard-password": first_start_password(f"{name}-dashboard", parent=self),
                "registry-password": registry.emqx_password,
                **reporting_secret,
                **({"license": pulumi.Output.secret(secret_text(broker.license))} if broker.license else {}),
            },
        )
        self._discovery_rbac()

        cluster_ports = [("ekka", emqx.EKKA_PORT), ("rpc", emqx.RPC_PORT)]
        headless_ports = [*cluster_ports, ("mqtts", TLS_PORT), ("dashboard", emqx.DASHBOARD_PORT)]
        kube.service(
            headless,
            self._labels,
            {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": self._pods,
                "ports": [
                    {"name": n, "port": p, "targetPort": p, "protocol": "TCP"} for n, p in headless_ports
                ],
            },
        )
        env = [
            field_env("POD_NAME", "metadata.name"),
            *env_list(emqx.render_emqx_env(config, namespace=namespace, headless_service=headless)),
            *(secret_env(variable, secrets, key) for key, variable in emqx.SECRET_ENV.items()),
            secret_env(emqx.AUTHZ_PASSWORD_ENV, secrets, "registry-password"),
            *([secret_env(emqx.AUTH_FAILURES_TOKEN_ENV, secrets, AUTH_FAILURES_KEY)] if reporting else []),
            *([secret_env(emqx.LICENSE_ENV, secrets, "license")] if broker.license else []),
        ]
        volumes, mounts = scratch_volumes({"log": "/opt/emqx/log", "tmp": "/tmp"})
        volumes += [{"name": "config", "configMap": {"name": f"{name}-config"}}, self._certs_volume()]
        mounts += [
            {"name": "data", "mountPath": "/opt/emqx/data"},
            {
                "name": "config",
                "mountPath": "/opt/emqx/etc/emqx.conf",
                "subPath": "emqx.conf",
                "readOnly": True,
            },
            {"name": "certs", "mountPath": emqx.CERTS_DIR, "readOnly": True},
        ]
        ports = [container_port(n, p) for n, p in headless_ports]
        if broker.allow_plaintext:
            ports.append(container_port("mqtt", PLAINTEXT_PORT))
        node = container(
            "emqx",
            broker.image,
            resources=broker.resources,
            env=env,
            ports=ports,
            mounts=mounts,
            readiness=http_probe(emqx.STATUS_PATH, "dashboard", period=5),
            liveness=http_probe(emqx.STATUS_PATH, "dashboard", period=30, failures=4, delay=60),
        )
        annotations = {
            "ironlink.io/config-hash": config_hash(conf),
            **scrape_annotations(emqx.DASHBOARD_PORT, path=emqx.METRICS_PATH),
        }
        template = pod_template(
            self._labels,
            [node],
            user=EMQX_USER,
            service_account=name,
            volumes=volumes,
            affinity=self._affinity(),
            annotations=annotations,
            api_access=True,
        )
        spec: Manifest = {
            "serviceName": headless,
            "replicas": broker.nodes,
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "selector": {"matchLabels": self._pods},
            "template": template,
            "volumeClaimTemplates": [
                volume_claim_template("data", broker.storage, config.cluster.storage_class)
            ],
        }
        kube.stateful_set(name, self._labels, spec)

    def _discovery_rbac(self) -> None:
        """EMQX's ``k8s`` discovery lists the headless Service's endpoints: it may do nothing else."""
        kube, name = self._kube, self._name
        kube.service_account(name, self._labels)
        role = f"{name}-discovery"
        rules: Any = [{"apiGroups": [""], "resources": ["endpoints"], "verbs": ["get", "watch", "list"]}]
        k8s.rbac.v1.Role(role, metadata=kube.meta(role, self._labels), rules=rules, opts=kube.opts())
        ref: Any = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role}
        subjects: Any = [{"kind": "ServiceAccount", "name": name, "namespace": kube.namespace}]
        k8s.rbac.v1.RoleBinding(
            role, metadata=kube.meta(role, self._labels), role_ref=ref, subjects=subjects, opts=kube.opts()
        )

    # -------------------------------------------------------------------------- Mosquitto
    def _mosquitto(
        self,
        service_accounts: Mapping[str, pulumi.Input[str]],
        admin_hash: pulumi.Input[str],
        trust: DeviceTrust,
        broker_log_token: pulumi.Input[str] | None,
    ) -> None:
        config, kube, name = self._config, self._kube, self._name
        follows_log = broker_log_token is not None
        broker = config.broker
        dynamic = DynamicSecurity(
            broker.dynamic_security_plugin,
            DYNSEC_STATE,
            mtls_port=MOSQUITTO_MTLS_PORT,
            device_capath=DEVICE_CA_DIR,
            device_crlfile=f"{DEVICE_CA_DIR}/{CRL_FILE}",
        )
        conf = render_mosquitto_conf(
            config,
            MOSQUITTO_PATHS,
            tls_port=TLS_PORT,
            plaintext_port=PLAINTEXT_PORT,
            dynamic_security=dynamic,
            log_file=BROKER_LOG_FILE if follows_log else None,
        )
        kube.config_map(f"{name}-config", self._labels, {"mosquitto.conf": conf})
        usernames = list(service_accounts)
        seed = pulumi.Output.all(admin_hash, *service_accounts.values()).apply(
            lambda hashes: render_dynamic_security_config(
                config,
                BrokerAccount(DYNSEC_ADMIN, hashes[0]),
                [BrokerAccount(user, hashed) for user, hashed in zip(usernames, hashes[1:], strict=True)],
            )
        )
        self.dynamic_security_seed = pulumi.Output.secret(seed)
        seed_secret = f"{name}-dynsec-seed"
        kube.secret(seed_secret, self._labels, {DYNSEC_SEED_FILE: seed})
        kube.service_account(name, self._labels)

        # The log file is shared with the follower sidecar, which reads it and empties it.
        volumes, mounts = scratch_volumes({"tmp": "/tmp", **({"log": BROKER_LOG_DIR} if follows_log else {})})
        volumes += [
            {"name": "config", "configMap": {"name": f"{name}-config"}},
            {"name": "seed", "secret": {"secretName": seed_secret, "defaultMode": 0o440}},
            {"name": "device-ca", "emptyDir": {}},  # written by the trust sidecar only
            self._certs_volume(),
        ]
        data = {"name": "data", "mountPath": MOSQUITTO_PATHS.persistence_dir}
        mounts += [
            data,
            {"name": "config", "mountPath": "/mosquitto/config", "readOnly": True},
            {"name": "device-ca", "mountPath": DEVICE_CA_DIR, "readOnly": True},
            {"name": "certs", "mountPath": "/mosquitto/certs", "readOnly": True},
        ]
        seeder = container(
            "seed-dynamic-security",
            broker.image,
            resources=broker.resources,
            command=seed_if_absent_command(f"{DYNSEC_SEED_DIR}/{DYNSEC_SEED_FILE}", DYNSEC_STATE),
            mounts=[data, {"name": "seed", "mountPath": DYNSEC_SEED_DIR, "readOnly": True}],
        )
        ports = [container_port(port_name, port) for port_name, port in self._device_ports()]
        server = container(
            "mosquitto",
            broker.image,
            resources=broker.resources,
            command=["mosquitto", "-c", "/mosquitto/config/mosquitto.conf"],
            ports=ports,
            mounts=mounts,
            readiness=tcp_probe("mqtts"),
            liveness=tcp_probe("mqtts", period=20, failures=6),
        )
        # The seed is read only while the state file is absent: changing it must not roll the broker.
        annotations = {"ironlink.io/config-hash": config_hash(conf)}
        sidecars = [self._trust_sync(trust, once=False)]
        if broker_log_token is not None:
            sidecars.append(self._broker_log(trust, broker_log_token))
        template = pod_template(
            self._labels,
            [server, *sidecars],
            init_containers=[seeder, self._trust_sync(trust, once=True)],
            user=MOSQUITTO_USER,
            service_account=name,
            volumes=volumes,
            affinity=self._affinity(),
            annotations=annotations,
        )
        spec: Manifest = {
            "serviceName": name,
            "replicas": broker.nodes,
            "selector": {"matchLabels": self._pods},
            "template": template,
            "volumeClaimTemplates": [
                volume_claim_template("data", broker.storage, config.cluster.storage_class)
            ],
        }
        kube.stateful_set(name, self._labels, spec)

    def _trust_sync(self, trust: DeviceTrust, *, once: bool) -> Manifest:
        """``python -m provisioning.trust_sync`` into the certificate listener's capath: once before
        the broker starts (an initContainer), then every few seconds beside it."""
        command = [
            *("python", "-m", "provisioning.trust_sync"),
            *("--url", trust["url"], "--dir", DEVICE_CA_DIR, "--ca-file", MOSQUITTO_PATHS.cafile),
            *(["--once"] if once else ["--interval", str(TRUST_SYNC_INTERVAL_S)]),
        ]
        return container(
            "trust-sync-first" if once else "trust-sync",
            trust["image"],
            resources=SIDECAR_RESOURCES,
            command=command,
            mounts=[
                {"name": "device-ca", "mountPath": DEVICE_CA_DIR},
                {"name": "certs", "mountPath": "/mosquitto/certs", "readOnly": True},
            ],
        )

    def _broker_log(self, trust: DeviceTrust, token: pulumi.Input[str]) -> Manifest:
        """``python -m provisioning.broker_log``: the refused connections of the broker's log file,
        counted per minute, to the provisioning service's audit trail. Mosquitto creates that file
        ``0600``; the sidecar runs as the broker's user (the pod's), so it may read and empty it."""
        secret = f"{self._name}-broker-log"
        self._kube.secret(secret, self._labels, {BROKER_LOG_TOKEN_KEY: token})
        command = [
            *("python", "-m", "provisioning.broker_log", "--log", BROKER_LOG_FILE),
            *("--url", f"{trust['url']}{broker_log.AUTH_FAILURES_PATH}", "--ca-file", MOSQUITTO_PATHS.cafile),
            *("--broker", "$(POD_NAME)", "--truncate-over", str(BROKER_LOG_TRUNCATE_BYTES)),
        ]
        return container(
            "broker-log",
            trust["image"],
            resources=SIDECAR_RESOURCES,
            command=command,
            # POD_NAME first: Kubernetes expands $(POD_NAME) only from variables declared before.
            env=[
                field_env("POD_NAME", "metadata.name"),
                secret_env(broker_log.TOKEN_ENV, secret, BROKER_LOG_TOKEN_KEY),
            ],
            mounts=[
                {"name": "log", "mountPath": BROKER_LOG_DIR},
                {"name": "certs", "mountPath": "/mosquitto/certs", "readOnly": True},
            ],
        )
