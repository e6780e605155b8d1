"""The ingest worker: subscribes to every tenant's telemetry through a shared subscription and
writes it to the tenant's InfluxDB bucket.

Its environment is rendered by the worker's own settings model (``ingest.settings``), so the
deployment and ``python -m ingest`` cannot disagree on a variable name. Secrets reach it only as
files and ``secretKeyRef`` variables: the broker password, the CA (and, under mutual TLS, its client
certificate with CN ``svc.ingest``), and the tenants' write tokens as one JSON file. With
autoscaling an HPA owns the replica count (the Deployment leaves ``replicas`` unset so that
``pulumi up`` does not fight it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.kube import Kube, inherited_dependencies
from components.pki import IssuedCertificate
from components.render.kubernetes import (
    ROLE_INGEST,
    Manifest,
    anti_affinity,
    container,
    container_port,
    env_list,
    http_probe,
    labels,
    pod_disruption_budget_spec,
    pod_template,
    scratch_volumes,
    secret_env,
    selector,
    spreads,
)
from infra.config import PlatformConfig
from ingest.settings import worker_settings_for

USER = 10001
SECRETS_DIR = "/var/run/secrets/ironlink"
TOKENS_FILE = "store-tokens.json"


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
    store_urls: Mapping[str, str]
    """InfluxDB instance name → in-cluster URL."""
    client_certificate: NotRequired[IssuedCertificate | None]
    """Under mutual TLS: the worker's client certificate (CN ``svc.ingest``)."""
    store_tokens: NotRequired[Mapping[str, pulumi.Input[str]]]
    """Tenant id → InfluxDB write token, mounted as a JSON file; empty until tenants are wired."""


class IngestWorker(pulumi.ComponentResource):
    deployment_name: str
    credentials: k8s.core.v1.Secret
    """The worker's secret files: MQTT password, CA (and client cert), the tenants' store tokens."""

    def __init__(self, name: str, args: IngestWorkerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("ironlink:ingest_worker:IngestWorker", name, None, opts)
        config = args["config"]
        section, namespace = config.ingest, config.cluster.namespace
        kube = Kube(self, args["provider"], namespace, config.protect_stateful, inherited_dependencies(opts))
        object_labels = labels("ingest-worker", name, ROLE_INGEST)
        pods = selector(object_labels)
        self.deployment_name = name

        client = args.get("client_certificate")
        tokens = args.get("store_tokens") or {}
        files: dict[str, pulumi.Input[str]] = {
            "mqtt-password": args["mqtt_password"],
            "ca.crt": args["ca_cert_pem"],
            TOKENS_FILE: pulumi.Output.json_dumps(dict(tokens)),
        }
        if client is not None:
            files.update({"tls.crt": client.cert_pem, "tls.key": client.private_key_pem})
        credentials = f"{name}-credentials"
        self.credentials = kube.secret(credentials, object_labels, files)
        kube.service_account(name, object_labels)

        tls_files = {"mqtt_ca_file": f"{SECRETS_DIR}/ca.crt"}
        if client is not None:
            tls_files.update(
                {"mqtt_cert_file": f"{SECRETS_DIR}/tls.crt", "mqtt_key_file": f"{SECRETS_DIR}/tls.key"}
            )
        settings = worker_settings_for(
            config,
            mqtt_host=args["mqtt_host"],
            mqtt_port=args["mqtt_port"],
            store_urls=args["store_urls"],
            store_tokens_file=f"{SECRETS_DIR}/{TOKENS_FILE}",
            **tls_files,
        )
        env = [
            *env_list(settings.to_env()),
            secret_env("IRONLINK_MQTT_PASSWORD", credentials, "mqtt-password"),
        ]
        volumes, mounts = scratch_volumes({"tmp": "/tmp"})
        volumes.append({"name": "credentials", "secret": {"secretName": credentials, "defaultMode": 0o440}})
        mounts.append({"name": "credentials", "mountPath": SECRETS_DIR, "readOnly": True})
        port = settings.http_port
        worker = container(
            "worker",
            section.image,
            resources=section.resources,
            command=["python", "-m", "ingest"],
            env=env,
            ports=[container_port("http", port)],
            mounts=mounts,
            readiness=http_probe("/readyz", "http"),
            liveness=http_probe("/healthz", "http", period=20, failures=3, delay=10),
        )
        replicas = section.autoscaling.min_replicas if section.autoscaling else section.replicas
        spread = spreads(config, replicas)
        affinity = anti_affinity(pods, required=config.high_availability) if spread else None
        annotations = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(port),
            "prometheus.io/path": "/metrics",
        }
        spec: Manifest = {
            "selector": {"matchLabels": pods},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": pod_template(
                object_labels,
                [worker],
                user=USER,
                service_account=name,
                volumes=volumes,
                affinity=affinity,
                annotations=annotations,
            ),
        }
        if section.autoscaling is None:
            spec["replicas"] = section.replicas
        kube.deployment(name, object_labels, spec)
        if section.autoscaling is not None:
            bounds = section.autoscaling
            target = {"type": "Utilization", "averageUtilization": bounds.target_cpu_percent}
            kube.autoscaler(
                name,
                object_labels,
                {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                    "minReplicas": bounds.min_replicas,
                    "maxReplicas": bounds.max_replicas,
                    "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": target}}],
                },
            )
        if spread:
            kube.disruption_budget(name, object_labels, pod_disruption_budget_spec(pods, max_unavailable=1))
        self.register_outputs({"deployment_name": name})
