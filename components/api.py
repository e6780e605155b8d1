"""The Ironlink API: machines, latest status, bounded series, alerts and their routing, maintenance
and usage, per tenant (``python -m api`` from ``ghcr.io/ironlink/api``, ``api/Dockerfile``).

Its ``IRONLINK_API_*`` environment comes from its own settings model (``api.settings``), the
registry DSN only through its Secret. In a cluster the store is InfluxDB (in the cluster or
Timestream): each tenant's URL, bucket and read token come from its registry route
(``tenant_store_routes.read_token``, written by the tenant's stack), so the API holds no store
credential of its own.

Reach, and nothing else (its NetworkPolicy isolates ingress and egress):

- **in**: clients through the cluster's ingress controller (``cluster.ingress_controller``), and
  Grafana, whose contact points post every alert to :data:`WEBHOOK_PATH`, both on
  :data:`api.settings.HTTP_PORT`;
- **out**: the registry (PostgreSQL 5432: its pods, or the VPC's range where it is RDS), the
  stores (InfluxDB 8086: every instance's pods, the shared and level-3 tenants' alike, or the
  VPC's range on Timestream), the notification channels (HTTPS, and the SMTP relay's port where
  ``api.smtp`` names one, to public addresses only: ``api.notify_except`` keeps a tenant's
  webhook URL off the cluster's own networks), and DNS.
"""

from __future__ import annotations

from typing import NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from api.settings import HTTP_PORT, ApiSettings
from components.kube import Kube, inherited_dependencies
from components.render.kubernetes import (
    ROLE_API,
    ROLE_GRAFANA,
    ROLE_INFLUXDB,
    ROLE_POSTGRES,
    Manifest,
    anti_affinity,
    container,
    container_port,
    egress_rule,
    env_list,
    ingress_controller_peer,
    ingress_rule,
    isolated_policy_spec,
    labels,
    pod_disruption_budget_spec,
    pod_peer,
    pod_template,
    role_selector,
    scratch_volumes,
    secret_env,
    selector,
    service_host,
    service_probes,
)
from infra.config import Api, IngressController

USER = 10003  # the API image's user (api/Dockerfile)
POSTGRES_PORT = 5432
STORE_PORT = 8086
HTTPS_PORT = 443
WEBHOOK_PATH = "/v1/alerts/grafana"
"""Where Grafana's contact points post (``api/alerts.py``)."""
SMTP_SECRET = "api-smtp"
"""The SMTP relay's password, if any: a Secret an operator creates (key ``password``), not config."""


def api_url(name: str, namespace: str) -> str:
    """The API's in-cluster URL (Grafana's webhook, operators' port-forward)."""
    return f"http://{service_host(name, namespace)}:{HTTP_PORT}"


def notification_peers(blocked: list[str]) -> list[Manifest]:
    """Any public address: SMTP relays, Slack, Teams and SMS providers live outside the cluster."""
    return [{"ipBlock": {"cidr": "0.0.0.0/0", "except": list(blocked)}}]


class IronlinkApiArgs(TypedDict):
    section: Api
    """The stack's ``api`` section: image, replicas, resources, SMTP relay, blocked ranges."""
    provider: k8s.Provider
    """The region's Kubernetes provider."""
    namespace: str
    domain: str
    """The cluster's domain: clients reach ``https://api.<domain>`` through the ingress controller."""
    high_availability: bool
    """Required anti-affinity (else preferred, with several replicas)."""
    registry_dsn: pulumi.Input[str]
    """Owner DSN of the registry (secret): keys, fleet, alerts, maintenance, usage, store routes."""
    ingress_controller: IngressController
    """The pods clients come in through (``cluster.ingress_controller``)."""
    registry_peers: NotRequired[list[Manifest]]
    """Where the registry is: the in-cluster PostgreSQL's pods (default), or the VPC's range (RDS)."""
    store_peers: NotRequired[list[Manifest]]
    """Where the stores are: every in-cluster InfluxDB's pods (default), or the VPC's range (Timestream)."""


class IronlinkApi(pulumi.ComponentResource):
    url: str
    """In-cluster URL of the API."""
    webhook_url: str
    """What every Grafana org's contact point posts its alerts to."""
    public_url: str
    """Where clients reach it: ``https://api.<domain>`` (the ingress controller terminates TLS)."""
    network_policy: k8s.networking.v1.NetworkPolicy

    def __init__(self, name: str, args: IronlinkApiArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("ironlink:api:IronlinkApi", name, None, opts)
        section, namespace = args["section"], args["namespace"]
        kube = Kube(self, args["provider"], namespace, False, inherited_dependencies(opts))
        object_labels = labels("api", name, ROLE_API)
        pods = selector(object_labels)
        self.url = api_url(name, namespace)
        self.webhook_url = f"{self.url}{WEBHOOK_PATH}"
        self.public_url = f"https://api.{args['domain']}"

        credentials = f"{name}-credentials"
        kube.secret(credentials, object_labels, {"registry-dsn": args["registry_dsn"]})
        kube.service_account(name, object_labels)
        smtp = section.smtp
        relay = (
            {
                "smtp_host": smtp.host,
                "smtp_port": smtp.port,
                "smtp_security": smtp.security,
                "smtp_username": smtp.username,
                "smtp_from": smtp.sender,
            }
            if smtp is not None
            else {}
        )
        # InfluxDB: each tenant's own URL and read token from its registry route, none here.
        settings = ApiSettings.model_validate({"store_kind": "influxdb", "port": HTTP_PORT, **relay})
        env = [
            *env_list(settings.to_env()),
            secret_env("IRONLINK_API_REGISTRY_DSN", credentials, "registry-dsn"),
        ]
        if smtp is not None:
            env.append(secret_env("IRONLINK_API_SMTP_PASSWORD", SMTP_SECRET, "password", optional=True))
        volumes, mounts = scratch_volumes({"tmp": "/tmp"})
        server = container(
            "api",
            section.image,
            resources=section.resources,
            command=["python", "-m", "api"],
            env=env,
            ports=[container_port("http", HTTP_PORT)],
            mounts=mounts,
            **service_probes("http"),
        )
        spread = args["high_availability"] or section.replicas > 1
        spec: Manifest = {
            "replicas": section.replicas,
            "selector": {"matchLabels": pods},
            "strategy": {"type": "RollingUpdate"},
            "template": pod_template(
                object_labels,
                [server],
                user=USER,
                service_account=name,
                volumes=volumes,
                affinity=anti_affinity(pods, required=args["high_availability"]) if spread else None,
            ),
        }
        kube.deployment(name, object_labels, spec)
        if spread:
            kube.disruption_budget(name, object_labels, pod_disruption_budget_spec(pods, max_unavailable=1))
        http = {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}
        kube.service(name, object_labels, {"type": "ClusterIP", "selector": pods, "ports": [http]})

        ingress = [
            ingress_rule([(HTTP_PORT, "TCP")], [ingress_controller_peer(args["ingress_controller"])]),
            ingress_rule([(HTTP_PORT, "TCP")], [pod_peer(role_selector(ROLE_GRAFANA))]),  # the webhook
        ]
        registry = args.get("registry_peers") or [pod_peer(role_selector(ROLE_POSTGRES))]
        stores = args.get("store_peers") or [pod_peer(role_selector(ROLE_INFLUXDB))]
        # Slack, Teams and webhooks over HTTPS; email to the relay's port, where there is one.
        notify_ports = [(HTTPS_PORT, "TCP"), *([(smtp.port, "TCP")] if smtp is not None else [])]
        egress = [
            egress_rule([(POSTGRES_PORT, "TCP")], registry),
            egress_rule([(STORE_PORT, "TCP")], stores),
            egress_rule(notify_ports, notification_peers(section.notify_except)),
        ]
        self.network_policy = kube.network_policy(
            name, object_labels, isolated_policy_spec(pods, ingress, egress)
        )
        self.register_outputs(
            {"url": self.url, "webhook_url": self.webhook_url, "public_url": self.public_url}
        )
