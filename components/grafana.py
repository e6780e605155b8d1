"""Grafana, the operations view: one replica on SQLite (phases A, B) or several on PostgreSQL with
alert-state gossip (phase C), behind a ClusterIP Service (users come in through the cluster's
ingress). Orgs, datasources and dashboards per tenant are declared by ``components.tenant`` with
the admin credentials this component generates.
"""

from __future__ import annotations

from typing import NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.credentials import first_start_password
from components.kube import Kube, inherited_dependencies
from components.postgres import RegistryEndpoint
from components.render.grafana import (
    ADMIN_USER,
    DATA_DIR,
    GOSSIP_PORT,
    HEALTH_PATH,
    HTTP_PORT,
    GrafanaDatabase,
    render_grafana_env,
)
from components.render.kubernetes import (
    ROLE_GRAFANA,
    Manifest,
    anti_affinity,
    container,
    container_port,
    env_list,
    field_env,
    http_probe,
    ingress_policy_spec,
    ingress_rule,
    labels,
    pod_disruption_budget_spec,
    pod_peer,
    pod_template,
    scratch_volumes,
    secret_env,
    selector,
    service_host,
    spreads,
)
from components.render.postgres import GRAFANA_DATABASE, GRAFANA_ROLE
from infra.config import PlatformConfig

USER = 472  # the grafana/grafana image's user
SQLITE_STORAGE = "2Gi"  # one replica's SQLite database, plugins and renders


class GrafanaArgs(TypedDict):
    config: PlatformConfig
    """The region's config: ``grafana`` section (image, replicas, resources) and ``cluster.domain``."""
    provider: k8s.Provider
    """The region's Kubernetes provider."""
    database: NotRequired[RegistryEndpoint | None]
    """Required with more than one replica: the PostgreSQL the replicas share."""


class Grafana(pulumi.ComponentResource):
    url: str
    """In-cluster URL (what the Grafana Pulumi provider and the tenants' resources talk to)."""
    public_url: str
    admin_user: str
    admin_password: pulumi.Output[str]

    def __init__(self, name: str, args: GrafanaArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("ironlink:grafana:Grafana", name, None, opts)
        config = args["config"]
        section, namespace = config.grafana, config.cluster.namespace
        kube = Kube(self, args["provider"], namespace, config.protect_stateful, inherited_dependencies(opts))
        object_labels = labels("grafana", name, ROLE_GRAFANA)
        pods = selector(object_labels)
        ha = section.replicas > 1
        self.admin_user, self.public_url = ADMIN_USER, f"https://grafana.{config.cluster.domain}/"
        self.url = f"http://{service_host(name, namespace)}:{HTTP_PORT}"
        self.admin_password = first_start_password(f"{name}-admin", parent=self)

        credentials = f"{name}-credentials"
        secret_data: dict[str, pulumi.Input[str]] = {"admin-password": self.admin_password}
        env = [secret_env("GF_SECURITY_ADMIN_PASSWORD", credentials, "admin-password")]
        database, gossip = None, None
        if ha:
            postgres = args.get("database")
            if postgres is None:
                raise ValueError(
                    f"GrafanaArgs.database: {section.replicas} replicas need a shared PostgreSQL"
                )
            ssl_mode = "require" if postgres.tls else "disable"
            database = GrafanaDatabase(postgres.host, postgres.port, GRAFANA_DATABASE, GRAFANA_ROLE, ssl_mode)
            secret_data["database-password"] = postgres.grafana_password
            env.append(secret_env("GF_DATABASE_PASSWORD", credentials, "database-password"))
            gossip = f"{name}-gossip"
            kube.service(
                gossip,
                object_labels,
                {
                    "clusterIP": "None",
                    "publishNotReadyAddresses": True,
                    "selector": pods,
                    "ports": [
                        {
                            "name": f"gossip-{p.lower()}",
                            "port": GOSSIP_PORT,
                            "targetPort": GOSSIP_PORT,
                            "protocol": p,
                        }
                        for p in ("TCP", "UDP")
                    ],
                },
            )
            env.insert(0, field_env("POD_IP", "status.podIP"))
        kube.secret(credentials, object_labels, secret_data)
        gossip_host = service_host(gossip, namespace) if gossip else None
        env += env_list(
            render_grafana_env(public_url=self.public_url, database=database, gossip_host=gossip_host)
        )
        kube.service_account(name, object_labels)

        volumes, mounts = scratch_volumes({"tmp": "/tmp"})
        if ha:
            volumes.append({"name": "data", "emptyDir": {}})
        else:
            # SQLite on a volume: one replica, replaced rather than rolled (the volume is ReadWriteOnce).
            claim = f"{name}-data"
            kube.volume_claim(claim, object_labels, SQLITE_STORAGE, config.cluster.storage_class)
            volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": "data", "mountPath": DATA_DIR})
        ports = [container_port("http", HTTP_PORT)]
        if ha:
            ports += [
                container_port("gossip-tcp", GOSSIP_PORT),
                container_port("gossip-udp", GOSSIP_PORT, "UDP"),
            ]
        server = container(
            "grafana",
            section.image,
            resources=section.resources,
            env=env,
            ports=ports,
            mounts=mounts,
            readiness=http_probe(HEALTH_PATH, "http"),
            liveness=http_probe(HEALTH_PATH, "http", period=20, failures=6, delay=30),
        )
        spread = spreads(config, section.replicas)
        affinity = anti_affinity(pods, required=config.high_availability) if spread else None
        template = pod_template(
            object_labels, [server], user=USER, service_account=name, volumes=volumes, affinity=affinity
        )
        spec: Manifest = {
            "replicas": section.replicas,
            "selector": {"matchLabels": pods},
            "strategy": {"type": "RollingUpdate" if ha else "Recreate"},
            "template": template,
        }
        kube.deployment(name, object_labels, spec)
        ports_spec = [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}]
        kube.service(name, object_labels, {"type": "ClusterIP", "selector": pods, "ports": ports_spec})
        rules = [ingress_rule([(HTTP_PORT, "TCP")], None)]
        if ha:
            rules.append(ingress_rule([(GOSSIP_PORT, "TCP"), (GOSSIP_PORT, "UDP")], [pod_peer(pods)]))
        kube.network_policy(name, object_labels, ingress_policy_spec(pods, rules))
        if spread:
            kube.disruption_budget(name, object_labels, pod_disruption_budget_spec(pods, max_unavailable=1))
        self.register_outputs({"url": self.url, "admin_password": self.admin_password})
