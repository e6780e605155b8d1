"""One region of Ironlink, composed from one :class:`~infra.config.PlatformConfig`.

The region owns the single Kubernetes provider (``cluster.context``), the namespace (Pod Security
``restricted``, ingress denied by default), the certificate authority, and the platform's shared
services: PostgreSQL (registry, HA Grafana), the shared InfluxDB, the MQTT broker, Grafana, the
ingest worker, the dead-letter sink (``dlq/#`` into the registry, replays on request) and the
provisioning service (claims, enrollment, device certificates from in-cluster issuing CAs) and the
API (``components.api``), to whose webhook the shared Grafana org sends every alert. The
broker credentials of ``svc.ingest`` and ``svc.deadletters`` are registered in the registry, where
EMQX authenticates them.

No tenant is declared here: each tenant is a stack of its own (``infra.program.build_tenant``), and
whatever a platform service must know of all tenants (the worker's store routes and write tokens,
the brokers' devices, the issuing CAs of level-3 tenants) it reads from the registry at runtime.
"""

from __future__ import annotations

from typing import Any, TypedDict

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from components.alerting import AlertWebhook
from components.api import IronlinkApi, IronlinkApiArgs
from components.aws.backup_bucket import BackupBucket, BackupBucketArgs, ClusterIdentity
from components.aws.database import RegistryDatabase, RegistryDatabaseArgs
from components.aws.ingress import RegionalIngress, RegionalIngressArgs, endpoint_names
from components.aws.placement import PrivatePlacement
from components.aws.substrate import RegionalSubstrate, RegionalSubstrateArgs
from components.aws.telemetry import TelemetryStore, TelemetryStoreArgs
from components.backup import BACKUP_SERVICE_ACCOUNT, BackupTarget, backup_service_account
from components.credentials import ServiceCredential, generated_password, service_credential
from components.dead_letters import DeadLetterSink, DeadLetterSinkArgs
from components.grafana import Grafana, GrafanaArgs
from components.influxdb import InfluxDB, InfluxDBArgs
from components.ingest_worker import IngestWorker, IngestWorkerArgs
from components.kube import Kube, kubernetes_provider
from components.monitoring import PlatformMonitoring, PlatformMonitoringArgs
from components.mqtt_broker import DeviceTrust, MqttBroker, MqttBrokerArgs
from components.pki import CertificateAuthority, CertificateAuthorityArgs
from components.postgres import Postgres, PostgresArgs
from components.providers.registry import RegistryServiceAccount
from components.provisioning import ProvisioningService, ProvisioningServiceArgs, service_url
from components.render.grafana import ADMIN_USER as GRAFANA_ADMIN_USER
from components.render.kubernetes import (
    ROLE_BROKER,
    ROLE_INFLUXDB,
    ROLE_POSTGRES,
    Manifest,
    default_deny_spec,
    labels,
    namespace_labels,
    object_meta,
    pod_peer,
    role_selector,
)
from components.tenant import grafana_admin_provider
from dashboards.platform import platform_rules
from infra.config import PlatformConfig, regional_ingress
from infra.tenancy import DEAD_LETTER_SERVICE, INGEST_SERVICE, SHARED_INFLUXDB
from registry.alerts import SHARED_SOURCE_ID


class RegionalPlatformArgs(TypedDict):
    config: PlatformConfig
    """The validated stack config of the region."""


class RegionalPlatform(pulumi.ComponentResource):
    aws_provider: aws.Provider | None
    """The region's AWS provider, wherever the stack has an ``aws`` section."""
    substrate: RegionalSubstrate | None
    """Phase C on AWS: the VPC (and the EKS cluster) the region runs in."""
    backups: BackupBucket | None
    """The region's backup bucket (``aws.backup_bucket``), else None."""
    ingress: RegionalIngress | None
    """Phase C on its own EKS cluster: the NLB and Route 53 names devices reach the broker by."""
    provider: k8s.Provider
    namespace: str
    ca: CertificateAuthority
    postgres: Postgres | RegistryDatabase
    """The registry's PostgreSQL: in the cluster, or RDS (``aws.registry: rds``)."""
    influxdb: InfluxDB | TelemetryStore
    """The shared InfluxDB instance (tenants of isolation levels 1 and 2)."""
    broker: MqttBroker
    grafana: Grafana
    worker: IngestWorker
    ingest_credential: ServiceCredential
    """``svc.ingest``'s broker password and ``$7$`` hash (the registry needs the hash for EMQX)."""
    dead_letters: DeadLetterSink
    dead_letter_credential: ServiceCredential
    """``svc.deadletters``'s broker password and ``$7$`` hash."""
    provisioning: ProvisioningService
    api: IronlinkApi
    shared_org_alerts: AlertWebhook
    """The shared Grafana org's one contact point and policy: every alert to the API's webhook."""
    broker_admin_credential: ServiceCredential | None
    """Mosquitto only: the dynamic-security admin (``admin.dynsec``) the provisioning service logs
    in as; its ``$7$`` hash is what the broker's plugin state must hold."""
    broker_log_token: pulumi.Output[str]
    """What the broker presents to the provisioning service when it reports refused connections
    (secret): Mosquitto's log-follower sidecar, EMQX's auth-failure rule."""

    def __init__(
        self, name: str, args: RegionalPlatformArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("ironlink:regional_platform:RegionalPlatform", name, None, opts)
        config = args["config"]
        self.namespace = config.cluster.namespace
        here = pulumi.ResourceOptions(parent=self)
        on_aws = config.aws
        self.aws_provider = aws.Provider(f"{name}-aws", region=on_aws.region, opts=here) if on_aws else None
        self.substrate = None
        if on_aws and on_aws.substrate and self.aws_provider:
            self.substrate = RegionalSubstrate(
                name,
                RegionalSubstrateArgs(
                    aws=on_aws,
                    kubernetes_version=config.cluster.kubernetes_version,
                    protect=config.protect_stateful,
                    provider=self.aws_provider,
                ),
                here,
            )
        # On EKS the cluster's own kubeconfig (``aws eks get-token``); elsewhere the context named.
        kubeconfig = self.substrate.kubeconfig if self.substrate else None
        self.provider = kubernetes_provider(
            f"{name}-k8s",
            context=config.cluster.context if kubeconfig is None else None,
            kubeconfig=kubeconfig,
            namespace=self.namespace,
            opts=here,
        )
        on_cluster = pulumi.ResourceOptions(parent=self, provider=self.provider)
        metadata: Any = object_meta(self.namespace, None, namespace_labels())
        namespace = k8s.core.v1.Namespace(
            self.namespace,
            metadata=metadata,
            opts=pulumi.ResourceOptions.merge(
                on_cluster, pulumi.ResourceOptions(protect=config.protect_stateful)
            ),
        )
        deny: Any = default_deny_spec()
        deny_metadata: Any = object_meta(
            "default-deny", self.namespace, {"app.kubernetes.io/part-of": "ironlink"}
        )
        k8s.networking.v1.NetworkPolicy(
            "default-deny",
            metadata=deny_metadata,
            spec=deny,
            opts=pulumi.ResourceOptions.merge(on_cluster, pulumi.ResourceOptions(depends_on=[namespace])),
        )
        inside = pulumi.ResourceOptions(parent=self, depends_on=[namespace])
        backup = self._declare_backups(name, config, namespace)

        self.ca = CertificateAuthority(f"{name}-ca", CertificateAuthorityArgs(config=config), here)
        # Phase C's managed stores stand in for the in-cluster ones, with the same attributes.
        self.store_placement = self._placement()
        if on_aws and on_aws.registry == "rds" and self.store_placement is not None:
            self.postgres = RegistryDatabase(
                "registry",
                RegistryDatabaseArgs(
                    config=config, placement=self.store_placement, k8s_provider=self.provider
                ),
                inside,
            )
        else:
            self.postgres = Postgres(
                "postgres", PostgresArgs(config=config, provider=self.provider, backup=backup), inside
            )
        if on_aws and on_aws.telemetry_store == "timestream" and self.store_placement is not None:
            self.influxdb = TelemetryStore(
                SHARED_INFLUXDB,
                TelemetryStoreArgs(instance=SHARED_INFLUXDB, config=config, placement=self.store_placement),
                inside,
            )
        else:
            self.influxdb = InfluxDB(
                SHARED_INFLUXDB,
                InfluxDBArgs(instance=SHARED_INFLUXDB, config=config, provider=self.provider, backup=backup),
                inside,
            )
        self.ingest_credential = service_credential("svc-ingest", parent=self)
        self.dead_letter_credential = service_credential("svc-deadletters", parent=self)
        services = {INGEST_SERVICE: self.ingest_credential, DEAD_LETTER_SERVICE: self.dead_letter_credential}
        # Mosquitto learns devices from the service over dynamic security; EMQX reads the registry.
        mosquitto = config.broker.engine == "mosquitto"
        self.broker_admin_credential = service_credential("dynsec-admin", parent=self) if mosquitto else None
        self.broker_log_token = generated_password("broker-log-token", parent=self, protect=False)
        self.broker = MqttBroker(
            config.broker.engine,
            MqttBrokerArgs(
                config=config,
                provider=self.provider,
                ca=self.ca,
                registry=self.postgres,
                service_accounts={user: credential.password_hash for user, credential in services.items()},
                dynamic_security_admin_hash=(
                    self.broker_admin_credential.password_hash if self.broker_admin_credential else None
                ),
                device_trust=DeviceTrust(
                    image=config.provisioning.image, url=service_url("provisioning", self.namespace)
                ),
                broker_log_token=self.broker_log_token,
                public_names=endpoint_names(on_aws.region, on_aws.dns) if on_aws else [],
                external_load_balancer=regional_ingress(config),
            ),
            inside,
        )
        self.ingress = self._ingress(name, config)
        self.grafana = Grafana(
            "grafana", GrafanaArgs(config=config, provider=self.provider, database=self.postgres), inside
        )
        if config.broker.engine == "emqx":  # EMQX authenticates against the registry; Mosquitto has a file
            for username, credential in services.items():
                RegistryServiceAccount(
                    f"{name}-{username.replace('.', '-')}",
                    dsn=self.postgres.dsn,
                    username=username,
                    password_hash=credential.password_hash,
                    actor=f"pulumi:{pulumi.get_stack()}",
                    opts=pulumi.ResourceOptions(parent=self, depends_on=[self.postgres]),
                )
        client_certificate = (
            self.ca.issue("ingest-client", common_name=INGEST_SERVICE, parent=self, client=True)
            if config.broker.tls == "mtls"
            else None
        )
        self.worker = IngestWorker(
            "ingest",
            IngestWorkerArgs(
                config=config,
                provider=self.provider,
                mqtt_host=self.broker.host,
                mqtt_port=self.broker.tls_port,
                mqtt_password=self.ingest_credential.password,
                ca_cert_pem=self.ca.cert_pem,
                client_certificate=client_certificate,
                registry_dsn=self.postgres.ingest_dsn,  # its own role: fleet, routes, gaps, usage
            ),
            inside,
        )
        self.dead_letters = DeadLetterSink(
            "dead-letters",
            DeadLetterSinkArgs(
                config=config,
                provider=self.provider,
                mqtt_host=self.broker.host,
                mqtt_port=self.broker.tls_port,
                mqtt_password=self.dead_letter_credential.password,
                ca_cert_pem=self.ca.cert_pem,
                registry_dsn=self.postgres.dsn,
                client_certificate=(
                    self.ca.issue(
                        "dead-letters-client", common_name=DEAD_LETTER_SERVICE, parent=self, client=True
                    )
                    if config.broker.tls == "mtls"
                    else None
                ),
            ),
            inside,
        )
        section = config.provisioning
        self.provisioning = ProvisioningService(
            "provisioning",
            ProvisioningServiceArgs(
                section=section,
                provider=self.provider,
                namespace=self.namespace,
                region=config.region,
                domain=config.cluster.domain,
                storage_class=config.cluster.storage_class,
                high_availability=config.high_availability,
                protect=config.protect_stateful,
                expose_to_devices=config.phase != "A",
                ca=self.ca,
                registry_dsn=self.postgres.dsn,
                prometheus=config.cluster.prometheus,
                registry_peers=self._registry_peers(config),
                mosquitto=(
                    (self.broker.host, self.broker.tls_port, self.broker_admin_credential.password)
                    if self.broker_admin_credential is not None
                    else None
                ),
                broker_log_token=self.broker_log_token,
            ),
            inside,
        )
        self.api = IronlinkApi(
            "api",
            IronlinkApiArgs(
                section=config.api,
                provider=self.provider,
                namespace=self.namespace,
                domain=config.cluster.domain,
                high_availability=config.high_availability,
                registry_dsn=self.postgres.dsn,
                ingress_controller=config.cluster.ingress_controller,
                registry_peers=self._registry_peers(config),
                # Timestream, like RDS, sits in the VPC's private subnets.
                store_peers=(
                    [{"ipBlock": {"cidr": config.aws.vpc_cidr}}]
                    if isinstance(self.influxdb, TelemetryStore) and config.aws
                    else [pod_peer(role_selector(ROLE_INFLUXDB))]
                ),
            ),
            inside,
        )
        grafana_admin = grafana_admin_provider(
            f"{name}-grafana-shared-org",
            self.grafana.url,
            GRAFANA_ADMIN_USER,
            self.grafana.admin_password,
            parent=self,
        )
        self.shared_org_alerts = AlertWebhook(
            "shared-org-alerts",
            {
                "source_id": SHARED_SOURCE_ID,
                "tenant_id": None,
                "url": self.api.webhook_url,
                "registry_dsn": self.postgres.dsn,
                "grafana": grafana_admin,
                "org_id": None,
                "actor": f"pulumi:{pulumi.get_stack()}",
            },
            pulumi.ResourceOptions(parent=self, depends_on=[namespace, self.postgres, self.grafana]),
        )
        if config.cluster.prometheus_operator:
            endpoints = [self.worker.metrics, self.dead_letters.metrics, self.provisioning.metrics]
            PlatformMonitoring(
                "monitoring",
                PlatformMonitoringArgs(
                    provider=self.provider,
                    namespace=self.namespace,
                    prometheus=config.cluster.prometheus,
                    endpoints=[*endpoints, *([self.broker.metrics] if self.broker.metrics else [])],
                    rules=platform_rules(),
                ),
                inside,
            )
        self.register_outputs(
            {
                "namespace": self.namespace,
                "broker_host": self.broker.public_host,
                "grafana_url": self.grafana.public_url,
                "ca_cert_pem": self.ca.cert_pem,
                "provisioning_url": self.provisioning.public_url,
                "api_url": self.api.public_url,
            }
        )

    def _registry_peers(self, config: PlatformConfig) -> list[Manifest]:
        """Where services reach the registry: RDS sits in the VPC's private subnets, outside the
        cluster's pods; the in-cluster PostgreSQL is its pods."""
        if isinstance(self.postgres, RegistryDatabase) and config.aws:
            return [{"ipBlock": {"cidr": config.aws.vpc_cidr}}]
        return [pod_peer(role_selector(ROLE_POSTGRES))]

    def _ingress(self, name: str, config: PlatformConfig) -> RegionalIngress | None:
        """The region's NLB in the substrate's public subnets, targeting the broker's pods."""
        substrate, provider, on_aws = self.substrate, self.aws_provider, config.aws
        if not regional_ingress(config) or substrate is None or provider is None or on_aws is None:
            return None
        return RegionalIngress(
            f"{name}-mqtt",
            RegionalIngressArgs(
                aws_region=on_aws.region,
                vpc_id=substrate.vpc_id,
                vpc_cidr=on_aws.vpc_cidr,
                public_subnet_ids=substrate.network.public_subnet_ids,
                dns=on_aws.dns,
                namespace=self.namespace,
                service=self.broker.engine,
                service_port=self.broker.tls_port,
                labels=labels(self.broker.engine, self.broker.engine, ROLE_BROKER),
                aws_provider=provider,
                k8s_provider=self.provider,
            ),
            pulumi.ResourceOptions(parent=self, depends_on=[self.broker]),
        )

    def _placement(self) -> PrivatePlacement | None:
        """Where managed stores go: the substrate's private subnets, reached from its cluster."""
        substrate, provider = self.substrate, self.aws_provider
        if substrate is None or provider is None or substrate.cluster_security_group_id is None:
            return None
        return PrivatePlacement(
            provider=provider,
            vpc_id=substrate.vpc_id,
            subnet_ids=pulumi.Output.all(*substrate.private_subnet_ids),
            cluster_security_group_id=substrate.cluster_security_group_id,
        )

    def _declare_backups(
        self, name: str, config: PlatformConfig, namespace: k8s.core.v1.Namespace
    ) -> BackupTarget | None:
        """The backup bucket and the ServiceAccount its jobs run as, where the stack asks for one;
        on the stack's own EKS cluster that ServiceAccount gets the bucket's IRSA role."""
        self.backups = None
        if config.aws is None or not config.aws.backup_bucket or self.aws_provider is None:
            return None
        arn, issuer = (
            (self.substrate.oidc_provider_arn, self.substrate.oidc_issuer) if self.substrate else (None, None)
        )
        cluster = ClusterIdentity(arn, issuer) if arn is not None and issuer is not None else None
        self.backups = BackupBucket(
            f"{name}-backups",
            BackupBucketArgs(config=config, provider=self.aws_provider, cluster=cluster),
            pulumi.ResourceOptions(parent=self),
        )
        kube = Kube(self, self.provider, self.namespace, config.protect_stateful, [namespace])
        backup_service_account(kube, self.backups.service_account_annotations())
        return BackupTarget(
            bucket=self.backups.bucket,
            region=config.region,
            image=config.aws.backup_image,
            service_account=BACKUP_SERVICE_ACCOUNT,
        )
