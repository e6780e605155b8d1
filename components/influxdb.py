"""InfluxDB 2.x OSS for telemetry: one single-node instance (OSS does not cluster).

The region runs the shared instance (``influxdb``); ``components.tenant.Tenant`` declares one more
per isolation-level-3 tenant (``influxdb-<tenant>``, named by :func:`infra.tenancy.influxdb_instance`)
from the same component. ``DOCKER_INFLUXDB_INIT_*`` sets the instance up on first start only (while
no bolt file exists), with an operator token from pulumi-random that the tenant providers use to
create orgs, buckets and scoped tokens. Only the ingest worker, Grafana and the backup job may
connect (NetworkPolicy).
"""

from __future__ import annotations

from typing import NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.backup import BackupTarget, declare_backup
from components.credentials import first_start_password
from components.kube import Kube, inherited_dependencies
from components.render.kubernetes import (
    ROLE_API,
    ROLE_GRAFANA,
    ROLE_INFLUXDB,
    ROLE_INGEST,
    Manifest,
    backup_peer,
    container,
    container_port,
    env_list,
    http_probe,
    ingress_policy_spec,
    ingress_rule,
    labels,
    pod_peer,
    pod_template,
    role_selector,
    runner_peer,
    scratch_volumes,
    secret_env,
    selector,
    service_host,
    volume_claim_template,
)
from infra.config import PlatformConfig

PORT = 8086
USER = 1000  # the official image's influxdb user
ADMIN_USER = "admin"
PLATFORM_BUCKET = "platform"
DATA_DIR = "/var/lib/influxdb2"
TOKEN_LENGTH = 64


def influxdb_url(namespace: str, instance: str) -> str:
    """In-cluster URL of an instance; the worker's store routes are built from it before it exists."""
    return f"http://{service_host(instance, namespace)}:{PORT}"


class InfluxDBArgs(TypedDict):
    instance: str
    """Kubernetes name of the instance, from :func:`infra.tenancy.influxdb_instance` (``influxdb`` or
    ``influxdb-<tenant>``); every object of the instance is named after it."""
    config: PlatformConfig
    """The region's config: ``influxdb`` section (image, storage, resources, shared org, backups)."""
    provider: k8s.Provider
    """The region's Kubernetes provider."""
    tenant_id: NotRequired[str | None]
    """The level-3 tenant owning a dedicated instance (labelled ``ironlink.io/tenant``); None if shared."""
    backup: NotRequired[BackupTarget | None]
    """The region's backup bucket; None: scheduled backups go to a volume of their own."""


class InfluxDB(pulumi.ComponentResource):
    url: pulumi.Output[str]
    """In-cluster URL (``http://<instance>.<namespace>.svc.cluster.local:8086``)."""
    admin_token: pulumi.Output[str]
    """Operator token set at first start (secret): creates orgs, buckets and scoped tokens."""
    admin_password: pulumi.Output[str]
    org: str
    """The org created at setup (``influxdb.shared_org``)."""

    def __init__(self, name: str, args: InfluxDBArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("ironlink:influxdb:InfluxDB", name, None, opts)
        config, instance = args["config"], args["instance"]
        section, namespace = config.influxdb, config.cluster.namespace
        kube = Kube(self, args["provider"], namespace, config.protect_stateful, inherited_dependencies(opts))
        object_labels = labels("influxdb", instance, ROLE_INFLUXDB)
        if args.get("tenant_id"):
            object_labels["ironlink.io/tenant"] = str(args.get("tenant_id"))
        pods = selector(object_labels)
        # Its backup job's pods share name and instance: the Service and the policy select the
        # database's own pods by role too (the StatefulSet's selector is immutable and stays).
        serving = {**pods, **role_selector(ROLE_INFLUXDB)}

        # DOCKER_INFLUXDB_INIT_* set them at setup only: protected in every phase.
        self.admin_password = first_start_password(f"{instance}-admin-password", parent=self)
        self.admin_token = first_start_password(f"{instance}-admin-token", parent=self, length=TOKEN_LENGTH)
        credentials = f"{instance}-auth"
        kube.secret(
            credentials,
            object_labels,
            {"admin-password": self.admin_password, "admin-token": self.admin_token},
            stateful=True,
        )
        kube.service_account(instance, object_labels)

        env = [
            *env_list(
                {
                    "DOCKER_INFLUXDB_INIT_MODE": "setup",
                    "DOCKER_INFLUXDB_INIT_USERNAME": ADMIN_USER,
                    "DOCKER_INFLUXDB_INIT_ORG": section.shared_org,
                    "DOCKER_INFLUXDB_INIT_BUCKET": PLATFORM_BUCKET,
                    "INFLUXD_REPORTING_DISABLED": "true",
                    "INFLUX_CONFIGS_PATH": "/etc/influxdb2/influx-configs",
                }
            ),
            secret_env("DOCKER_INFLUXDB_INIT_PASSWORD", credentials, "admin-password"),
            secret_env("DOCKER_INFLUXDB_INIT_ADMIN_TOKEN", credentials, "admin-token"),
        ]
        volumes, mounts = scratch_volumes({"etc": "/etc/influxdb2", "tmp": "/tmp"})
        mounts.append({"name": "data", "mountPath": DATA_DIR})
        server = container(
            "influxdb",
            section.image,
            resources=section.resources,
            env=env,
            ports=[container_port("http", PORT)],
            mounts=mounts,
            readiness=http_probe("/health", "http"),
            liveness=http_probe("/health", "http", period=20, failures=6, delay=30),
        )
        spec: Manifest = {
            "serviceName": instance,
            "replicas": section.replicas,
            "selector": {"matchLabels": pods},
            "template": pod_template(
                object_labels, [server], user=USER, service_account=instance, volumes=volumes
            ),
            "volumeClaimTemplates": [
                volume_claim_template("data", section.storage, config.cluster.storage_class)
            ],
        }
        kube.stateful_set(instance, object_labels, spec)
        ports = [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}]
        kube.service(instance, object_labels, {"type": "ClusterIP", "selector": serving, "ports": ports})
        clients = [
            pod_peer(role_selector(ROLE_INGEST)),
            pod_peer(role_selector(ROLE_GRAFANA)),
            pod_peer(role_selector(ROLE_API)),  # the API's series, with the tenant's read token
            backup_peer(instance),
            runner_peer(config.cluster.runner_namespace),  # pulumi up: orgs, buckets, tokens
        ]
        kube.network_policy(
            instance, object_labels, ingress_policy_spec(serving, [ingress_rule([(PORT, "TCP")], clients)])
        )

        url = influxdb_url(namespace, instance)
        self.url, self.org = pulumi.Output.from_input(url), section.shared_org
        if section.backup_schedule:
            declare_backup(
                kube,
                instance=instance,
                engine="influxdb",
                schedule=section.backup_schedule,
                image=section.image,
                dump_command='influx backup "$target"',
                env=[
                    *env_list({"INFLUX_HOST": url, "INFLUX_CONFIGS_PATH": "/tmp/influx-configs"}),
                    secret_env("INFLUX_TOKEN", credentials, "admin-token"),
                ],
                user=USER,
                storage=section.storage,
                storage_class=config.cluster.storage_class,
                resources=section.resources,
                service_account=instance,
                target=args.get("backup"),
            )
        self.register_outputs({"url": self.url, "admin_token": self.admin_token})
