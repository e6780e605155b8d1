"""The ingest worker: subscribes to every tenant's telemetry through a shared subscription and
writes it to the tenant's InfluxDB bucket.

Its environment is rendered by the worker's own settings model (``ingest.settings``), so the
workload and ``python -m ingest`` cannot disagree on a variable name. Secrets reach it only as
files and ``secretKeyRef`` variables: the broker password, the CA (and, under mutual TLS, its client
certificate with CN ``svc.ingest``) and the registry's DSN. Tenants, their store routes and write
tokens are not in the workload: tenants have stacks of their own, and the worker reads what they
registered from the registry at runtime.

Rollouts and scale-in lose nothing because every replica has a stable identity: the worker is a
StatefulSet, its MQTT client id is ``svc.ingest-<pod name>`` (``ingest-0``, ``ingest-1``...), so a
crashed replica resumes its own broker session, and its spool lives on its own volume. A stopping
replica gets ``shutdown_grace_s`` plus a margin to drain before SIGKILL. Blue/green
(``ingest.colours``) runs one StatefulSet per colour, all in the one share group. With autoscaling
an HPA owns each StatefulSet's replica count (``replicas`` stays unset so ``pulumi up`` does not
fight it).
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.kube import Kube, inherited_dependencies
from components.pki import IssuedCertificate
from components.render.kubernetes import (
    COLOUR_LABEL,
    ROLE_INGEST,
    Manifest,
    anti_affinity,
    container,
    container_port,
    env_list,
    field_env,
    ingress_policy_spec,
    labels,
    metrics_rule,
    pod_disruption_budget_spec,
    pod_template,
    role_selector,
    scrape_annotations,
    scratch_volumes,
    secret_env,
    selector,
    service_probes,
    spreads,
    volume_claim_template,
)
from components.render.monitoring import MetricsEndpoint
from infra.config import Ingest, IngestColour, PlatformConfig
from infra.tenancy import INGEST_SERVICE
from ingest.settings import worker_settings_for

USER = 10001
SECRETS_DIR = "/var/run/secrets/ironlink"
SPOOL_VOLUME = "spool"
SPOOL_DIR = "/var/lib/ironlink/spool"
# Time the kubelet leaves between the worker's own shutdown grace and SIGKILL (process exit, flush).
SHUTDOWN_MARGIN_S = 10


class IngestWorkerArgs(TypedDict):
    config: PlatformConfig
    """The region's config: ``ingest`` section (image, replicas, autoscaling, batching) and tenants."""
    provider: k8s.Provider
    """The region's Kubernetes provider."""
    mqtt_host: str
    """In-cluster name of the broker's device Service."""
    mqtt_port: int
    """The broker's TLS port."""
    mqtt_password: pulumi.Input[str]
    """``svc.ingest``'s broker password (secret)."""
    ca_cert_pem: pulumi.Input[str]
    """The CA that signed the broker's certificate."""
    registry_dsn: pulumi.Input[str]
    """DSN of the registry (secret) as the ``ingest`` role (``Postgres.ingest_dsn``): the worker
    reads tenants, their store routes and write tokens, and machines from it at runtime, follows
    their changes, and writes gap records and usage; nothing else (``registry.roles``)."""
    client_certificate: NotRequired[IssuedCertificate | None]
    """Under mutual TLS: the worker's client certificate (CN ``svc.ingest``)."""


def colour_workloads(name: str, section: Ingest) -> dict[str, tuple[str | None, IngestColour]]:
    """StatefulSet name → (colour, its image and spool size): ``name`` alone without colours (the
    section's image), else ``<name>-<colour>`` for each."""
    if not section.colours:
        return {name: (None, IngestColour(image=section.image))}
    return {f"{name}-{colour}": (colour, spec) for colour, spec in sorted(section.colours.items())}


class IngestWorker(pulumi.ComponentResource):
    workload_names: list[str]
    """The worker's StatefulSets: ``ingest``, or one per colour (``ingest-blue``, ``ingest-green``)."""
    credentials: k8s.core.v1.Secret
    """The worker's secrets: MQTT password, registry DSN, CA (and client cert)."""
    metrics: MetricsEndpoint
    """Its ``/metrics`` (every colour's pods), through the headless Service."""

    def __init__(self, name: str, args: IngestWorkerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("ironlink:ingest_worker:IngestWorker", name, None, opts)
        config = args["config"]
        namespace = config.cluster.namespace
        kube = Kube(self, args["provider"], namespace, config.protect_stateful, inherited_dependencies(opts))
        object_labels = labels("ingest-worker", name, ROLE_INGEST)

        client = args.get("client_certificate")
        files: dict[str, pulumi.Input[str]] = {
            "mqtt-password": args["mqtt_password"],
            "registry-dsn": args["registry_dsn"],
            "ca.crt": args["ca_cert_pem"],
        }
        if client is not None:
            files.update({"tls.crt": client.cert_pem, "tls.key": client.private_key_pem})
        credentials = f"{name}-credentials"
        self.credentials = kube.secret(credentials, object_labels, files)
        kube.service_account(name, object_labels)

        tls_files: dict[str, Any] = {"mqtt_ca_file": f"{SECRETS_DIR}/ca.crt"}
        if client is not None:
            tls_files.update(
                {"mqtt_cert_file": f"{SECRETS_DIR}/tls.crt", "mqtt_key_file": f"{SECRETS_DIR}/tls.key"}
            )
        settings = worker_settings_for(
            config,
            mqtt_host=args["mqtt_host"],
            mqtt_port=args["mqtt_port"],
            from_registry=True,
            mqtt_client_id=f"{INGEST_SERVICE}-$(POD_NAME)",
            shutdown_grace_s=config.ingest.shutdown_grace_s,
            spool_dir=SPOOL_DIR,
            **tls_files,
        )
        # POD_NAME first: Kubernetes expands $(POD_NAME) only from variables declared before.
        env = [
            field_env("POD_NAME", "metadata.name"),
            *env_list(settings.to_env()),
            secret_env("IRONLINK_MQTT_PASSWORD", credentials, "mqtt-password"),
            secret_env("IRONLINK_REGISTRY_DSN", credentials, "registry-dsn"),
        ]
        port = settings.http_port
        volumes, mounts = scratch_volumes({"tmp": "/tmp"})
        volumes.append({"name": "credentials", "secret": {"secretName": credentials, "defaultMode": 0o440}})
        mounts += [
            {"name": "credentials", "mountPath": SECRETS_DIR, "readOnly": True},
            {"name": SPOOL_VOLUME, "mountPath": SPOOL_DIR},
        ]
        worker = container(
            "worker",
            config.ingest.image,
            resources=config.ingest.resources,
            command=["python", "-m", "ingest"],
            env=env,
            ports=[container_port("http", port)],
            mounts=mounts,
            **service_probes("http"),
        )
        # Governs the pods' stable DNS names (a StatefulSet needs one): every colour's pods.
        kube.service(
            name,
            object_labels,
            {
                "clusterIP": "None",
                "selector": role_selector(ROLE_INGEST),
                "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
            },
        )
        # Nothing connects to a worker but the cluster's Prometheus (the namespace denies the rest).
        kube.network_policy(
            name,
            object_labels,
            ingress_policy_spec(role_selector(ROLE_INGEST), [metrics_rule(port, config.cluster.prometheus)]),
        )
        self.metrics = MetricsEndpoint(
            name, role_selector(ROLE_INGEST), port, "http", service_labels=selector(object_labels)
        )
        self.workload_names = []
        for workload, (colour, spec) in colour_workloads(name, config.ingest).items():
            workload_labels = labels("ingest-worker", workload, ROLE_INGEST)
            if colour is not None:
                workload_labels[COLOUR_LABEL] = colour
            _stateful_workload(
                kube,
                config,
                workload,
                workload_labels,
                {**worker, "image": spec.image},
                volumes,
                spool_storage=spec.spool_storage or config.ingest.spool_storage,
                service=name,
            )
            self.workload_names.append(workload)
        self.register_outputs({"workload_names": self.workload_names})


def _stateful_workload(
    kube: Kube,
    config: PlatformConfig,
    name: str,
    object_labels: dict[str, str],
    worker: Manifest,
    volumes: list[Manifest],
    *,
    spool_storage: str,
    service: str,
) -> None:
    """One StatefulSet with its spool volumes, and its HPA and PDB where the phase has them.
    ``service``: the governing headless Service, also the worker's ServiceAccount."""
    section = config.ingest
    pods = selector(object_labels)
    replicas = section.autoscaling.min_replicas if section.autoscaling else section.replicas
    spread = spreads(config, replicas)
    port = worker["ports"][0]["containerPort"]
    pod = pod_template(
        object_labels,
        [worker],
        user=USER,
        service_account=service,
        volumes=volumes,
        affinity=anti_affinity(pods, required=config.high_availability) if spread else None,
        annotations=scrape_annotations(port),
        termination_grace_s=section.shutdown_grace_s + SHUTDOWN_MARGIN_S,
    )
    spec: Manifest = {
        "serviceName": service,
        # Scale-in and scale-out all at once; updates still replace one pod at a time.
        "podManagementPolicy": "Parallel",
        "updateStrategy": {"type": "RollingUpdate"},
        # A replica's spool outlives scale-in and its colour's removal: the same ordinal resumes it.
        "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
        "selector": {"matchLabels": pods},
        "template": pod,
        "volumeClaimTemplates": [
            volume_claim_template(SPOOL_VOLUME, spool_storage, config.cluster.storage_class)
        ],
    }
    if section.autoscaling is None:
        spec["replicas"] = section.replicas
    kube.stateful_set(name, object_labels, spec, stateful=False)
    if section.autoscaling is not None:
        bounds = section.autoscaling
        target = {"type": "Utilization", "averageUtilization": bounds.target_cpu_percent}
        kube.autoscaler(
            name,
            object_labels,
            {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name},
                "minReplicas": bounds.min_replicas,
                "maxReplicas": bounds.max_replicas,
                "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": target}}],
            },
        )
    if spread:
        kube.disruption_budget(name, object_labels, pod_disruption_budget_spec(pods, max_unavailable=1))
