"""The dead-letter sink: the consumer that stores ``dlq/#`` in the registry and replays on request.

One replica of the worker's image running ``python -m ingest.deadletters`` as ``svc.deadletters``
(its persistent session queues while it restarts; on EMQX it subscribes through a shared group, so
more replicas would split the load). Its environment is rendered by its own settings model
(``ingest.deadletters.settings``); the broker password and the registry DSN reach it only through
its Secret. Its NetworkPolicy limits it both ways: in, only the metrics port from inside the
cluster; out, only the broker's TLS port, PostgreSQL and DNS.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.kube import Kube, inherited_dependencies
from components.pki import IssuedCertificate
from components.render.kubernetes import (
    ROLE_BROKER,
    ROLE_DEAD_LETTERS,
    ROLE_POSTGRES,
    Manifest,
    container,
    container_port,
    egress_rule,
    env_list,
    isolated_policy_spec,
    labels,
    metrics_rule,
    pod_peer,
    pod_template,
    role_selector,
    scrape_annotations,
    scratch_volumes,
    secret_env,
    selector,
    service_probes,
)
from components.render.monitoring import MetricsEndpoint
from infra.config import PlatformConfig, Prometheus
from ingest.deadletters.settings import dead_letter_settings_for

USER = 10001
SECRETS_DIR = "/var/run/secrets/ironlink"
POSTGRES_PORT = 5432


class DeadLetterSinkArgs(TypedDict):
    config: PlatformConfig
    """The region's config: the worker's image and resources, the broker engine, the tenants' tiers."""
    provider: k8s.Provider
    """The region's Kubernetes provider."""
    mqtt_host: str
    """In-cluster name of the broker's Service."""
    mqtt_port: int
    """The broker's TLS port."""
    mqtt_password: pulumi.Input[str]
    """``svc.deadletters``'s broker password (secret)."""
    ca_cert_pem: pulumi.Input[str]
    """The CA that signed the broker's certificate."""
    registry_dsn: pulumi.Input[str]
    """DSN of the registry holding ``dead_letters`` (secret)."""
    client_certificate: NotRequired[IssuedCertificate | None]
    """Under mutual TLS: the consumer's client certificate (CN ``svc.deadletters``)."""


def network_policy_spec(
    pod_selector: Mapping[str, str], metrics_port: int, mqtt_port: int, prometheus: Prometheus
) -> Manifest:
    """In: the cluster's Prometheus on the metrics port (the kubelet's probes come from the node,
    which network policies do not restrict). Out: the broker, PostgreSQL, DNS."""
    return isolated_policy_spec(
        pod_selector,
        [metrics_rule(metrics_port, prometheus)],
        [
            egress_rule([(mqtt_port, "TCP")], [pod_peer(role_selector(ROLE_BROKER))]),
            egress_rule([(POSTGRES_PORT, "TCP")], [pod_peer(role_selector(ROLE_POSTGRES))]),
        ],
    )


class DeadLetterSink(pulumi.ComponentResource):
    deployment_name: str
    credentials: k8s.core.v1.Secret
    """The consumer's secret files and variables: MQTT password, registry DSN, CA (and client cert)."""
    network_policy: k8s.networking.v1.NetworkPolicy
    metrics: MetricsEndpoint
    """Its ``/metrics``: no Service fronts the consumer, so a PodMonitor scrapes it."""

    def __init__(
        self, name: str, args: DeadLetterSinkArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("ironlink:dead_letters:DeadLetterSink", name, None, opts)
        config = args["config"]
        section, namespace = config.ingest, config.cluster.namespace
        kube = Kube(self, args["provider"], namespace, config.protect_stateful, inherited_dependencies(opts))
        object_labels = labels("dead-letters", name, ROLE_DEAD_LETTERS)
        pods = selector(object_labels)
        self.deployment_name = name

        client = args.get("client_certificate")
        files: dict[str, pulumi.Input[str]] = {
            "mqtt-password": args["mqtt_password"],
            "registry-dsn": args["registry_dsn"],
            "ca.crt": args["ca_cert_pem"],
        }
        tls_files = {"mqtt_ca_file": f"{SECRETS_DIR}/ca.crt"}
        if client is not None:
            files.update({"tls.crt": client.cert_pem, "tls.key": client.private_key_pem})
            tls_files.update(
                {"mqtt_cert_file": f"{SECRETS_DIR}/tls.crt", "mqtt_key_file": f"{SECRETS_DIR}/tls.key"}
            )
        credentials = f"{name}-credentials"
        self.credentials = kube.secret(credentials, object_labels, files)
        kube.service_account(name, object_labels)

        settings = dead_letter_settings_for(
            config, mqtt_host=args["mqtt_host"], mqtt_port=args["mqtt_port"], **tls_files
        )
        env = [
            *env_list(settings.to_env()),
            secret_env("IRONLINK_DLQ_MQTT_PASSWORD", credentials, "mqtt-password"),
            secret_env("IRONLINK_DLQ_REGISTRY_DSN", credentials, "registry-dsn"),
        ]
        volumes, mounts = scratch_volumes({"tmp": "/tmp"})
        volumes.append({"name": "credentials", "secret": {"secretName": credentials, "defaultMode": 0o440}})
        mounts.append({"name": "credentials", "mountPath": SECRETS_DIR, "readOnly": True})
        port = settings.http_port
        consumer = container(
            "consumer",
            section.image,
            resources=section.resources,
            command=["python", "-m", "ingest.deadletters"],
            env=env,
            ports=[container_port("http", port)],
            mounts=mounts,
            **service_probes("http"),
        )
        annotations = scrape_annotations(port)
        spec: Manifest = {
            "replicas": 1,
            "selector": {"matchLabels": pods},
            # One session per identity on Mosquitto: the old pod goes before the new one connects.
            "strategy": {"type": "Recreate"},
            "template": pod_template(
                object_labels,
                [consumer],
                user=USER,
                service_account=name,
                volumes=volumes,
                annotations=annotations,
            ),
        }
        kube.deployment(name, object_labels, spec)
        self.network_policy = kube.network_policy(
            name, object_labels, network_policy_spec(pods, port, args["mqtt_port"], config.cluster.prometheus)
        )
        self.metrics = MetricsEndpoint(name, pods, port, "http")
        self.register_outputs({"deployment_name": name})
