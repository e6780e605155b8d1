"""One region of Ironlink, composed from one :class:`~infra.config.PlatformConfig`.

The region owns the single Kubernetes provider (``cluster.context``), the namespace (Pod Security
``restricted``, ingress denied by default), the certificate authority, and the platform's shared
services: PostgreSQL (registry, HA Grafana), the shared InfluxDB, the MQTT broker, Grafana, the
ingest worker, the dead-letter sink (``dlq/#`` into the registry, replays on request) and the
provisioning service (claims, enrollment, device certificates from in-cluster issuing CAs). The
broker credentials of ``svc.ingest`` and ``svc.deadletters`` are registered in the registry, where
EMQX authenticates them.

No tenant is declared here: each tenant is a stack of its own (``infra.program.build_tenant``), and
whatever a platform service must know of all tenants (the worker's store routes and write tokens,
the brokers' devices, the issuing CAs of level-3 tenants) it reads from the registry at runtime.
"""

from __future__ import annotations

from typing import Any, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.credentials import ServiceCredential, service_credential
from components.dead_letters import DeadLetterSink, DeadLetterSinkArgs
from components.grafana import Grafana, GrafanaArgs
from components.influxdb import InfluxDB, InfluxDBArgs
from components.ingest_worker import IngestWorker, IngestWorkerArgs
from components.mqtt_broker import DeviceTrust, MqttBroker, MqttBrokerArgs
from components.pki import CertificateAuthority, CertificateAuthorityArgs
from components.postgres import Postgres, PostgresArgs
from components.providers.registry import RegistryServiceAccount
from components.provisioning import ProvisioningService, ProvisioningServiceArgs, service_url
from components.render.kubernetes import default_deny_spec, namespace_labels, object_meta
from infra.config import PlatformConfig
from infra.tenancy import DEAD_LETTER_SERVICE, INGEST_SERVICE, SHARED_INFLUXDB


class RegionalPlatformArgs(TypedDict):
    config: PlatformConfig
    """The validated stack config of the region."""


class RegionalPlatform(pulumi.ComponentResource):
    provider: k8s.Provider
    namespace: str
    ca: CertificateAuthority
    postgres: Postgres
    influxdb: InfluxDB
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
    broker_admin_credential: ServiceCredential | None
    """Mosquitto only: the dynamic-security admin (``admin.dynsec``) the provisioning service logs
    in as; its ``$7$`` hash is what the broker's plugin state must hold."""

    def __init__(
        self, name: str, args: RegionalPlatformArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("ironlink:regional_platform:RegionalPlatform", name, None, opts)
        config = args["config"]
        self.namespace = config.cluster.namespace
        here = pulumi.ResourceOptions(parent=self)
        self.provider = k8s.Provider(
            f"{name}-k8s", context=config.cluster.context, namespace=self.namespace, opts=here
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

        self.ca = CertificateAuthority(f"{name}-ca", CertificateAuthorityArgs(config=config), here)
        self.postgres = Postgres("postgres", PostgresArgs(config=config, provider=self.provider), inside)
        self.influxdb = InfluxDB(
            SHARED_INFLUXDB,
            InfluxDBArgs(instance=SHARED_INFLUXDB, config=config, provider=self.provider),
            inside,
        )
        self.ingest_credential = service_credential("svc-ingest", parent=self)
        self.dead_letter_credential = service_credential("svc-deadletters", parent=self)
        services = {INGEST_SERVICE: self.ingest_credential, DEAD_LETTER_SERVICE: self.dead_letter_credential}
        # Mosquitto learns devices from the service over dynamic security; EMQX reads the registry.
        mosquitto = config.broker.engine == "mosquitto"
        self.broker_admin_credential = service_credential("dynsec-admin", parent=self) if mosquitto else None
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
            ),
            inside,
        )
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
                registry_dsn=self.postgres.dsn,
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
                mosquitto=(
                    (self.broker.host, self.broker.tls_port, self.broker_admin_credential.password)
                    if self.broker_admin_credential is not None
                    else None
                ),
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
            }
        )
