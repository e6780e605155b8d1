"""The registry's PostgreSQL on Amazon RDS (``aws.registry: rds``, Phase C).

Multi-AZ, encrypted at rest, automated backups kept ``aws.database.backup_retention_days``,
deletion protection on, a final snapshot on deletion, never publicly accessible, in the private
subnets behind a security group that admits 5432 from the cluster's security group alone. The
instance is ``protect``-ed and ``retain_on_delete``: neither a code change nor a ``pulumi destroy``
takes the registry with it.

The master password is a protected ``RandomPassword`` rather than ``manage_master_user_password``:
the registry's DSN is a Pulumi output that the registry provider, the worker's Secret and every
tenant stack (StackReference) hold, and RDS-managed secrets rotate every 7 days by default, which
would leave all of them with a stale password. The ``emqx`` and ``grafana`` roles, created by the
in-cluster image's first-start script, are created here by :class:`RegistryRoles` instead.

In-cluster clients keep one stable name: an ``ExternalName`` Service ``postgres`` points at the
instance's address, so EMQX's and Grafana's rendered settings are those of the in-cluster database.
The DSN names the RDS address itself, which a ``pulumi up`` runner in the VPC resolves too.
"""

from __future__ import annotations

from typing import TypedDict

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from components.aws.placement import PrivatePlacement
from components.credentials import generated_password
from components.kube import Kube, inherited_dependencies
from components.postgres import OWNER, PORT, ingest_role_dsn
from components.providers.database_roles import RegistryRoles
from components.render.kubernetes import ROLE_POSTGRES, labels, service_host
from infra.config import PlatformConfig

ENGINE = "postgres"


class RegistryDatabaseArgs(TypedDict):
    config: PlatformConfig
    """The region's config: ``aws.database`` (class, major version, storage, backups, Multi-AZ) and
    ``postgres.database`` (the database's name)."""
    placement: PrivatePlacement
    """The region's private subnets and the cluster's security group (the only source on 5432)."""
    k8s_provider: k8s.Provider
    """The region's Kubernetes provider (the ``ExternalName`` Service)."""


class RegistryDatabase(pulumi.ComponentResource):
    """Stands in for :class:`components.postgres.Postgres` wherever the registry is used."""

    tls = True
    """RDS PostgreSQL 15+ refuses unencrypted clients (``rds.force_ssl``)."""

    host: str
    """In-cluster name (the ``ExternalName`` Service) of the instance."""
    port: int
    database: str
    owner: str
    owner_password: pulumi.Output[str]
    emqx_password: pulumi.Output[str]
    grafana_password: pulumi.Output[str]
    address: pulumi.Output[str]
    """The instance's RDS address (VPC DNS)."""
    dsn: pulumi.Output[str]
    """Owner DSN ``postgresql://…@<rds address>:5432/<db>`` (secret), shaped as ``Postgres.dsn``."""
    ingest_dsn: pulumi.Output[str]
    """The ingest worker's DSN (secret), shaped as ``Postgres.ingest_dsn``."""
    instance: aws.rds.Instance
    security_group: aws.ec2.SecurityGroup

    def __init__(
        self, name: str, args: RegistryDatabaseArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("ironlink:database:RegistryDatabase", name, None, opts)
        config = args["config"]
        if config.aws is None:
            raise ValueError("RegistryDatabaseArgs.config: the stack has no 'aws' section")
        section, protect = config.aws.database, config.protect_stateful
        identifier = f"ironlink-{config.region}-{name}"

        placement = args["placement"]
        on_aws = pulumi.ResourceOptions(parent=self, provider=placement.provider)
        self.security_group = placement.security_group(
            f"{name}-sg", port=PORT, what="registry PostgreSQL", parent=self
        )
        subnets = aws.rds.SubnetGroup(
            f"{name}-subnets",
            subnet_ids=placement.subnet_ids,
            description="Ironlink registry: the VPC's private subnets",
            opts=on_aws,
        )
        # Baked into the instance at creation: protected with it.
        self.owner_password = generated_password(f"{name}-owner", parent=self, protect=protect)
        self.emqx_password = generated_password(f"{name}-emqx", parent=self, protect=protect)
        self.grafana_password = generated_password(f"{name}-grafana", parent=self, protect=protect)
        self.instance = aws.rds.Instance(
            name,
            identifier=identifier,
            engine=ENGINE,
            engine_version=section.engine_version,
            auto_minor_version_upgrade=True,
            instance_class=section.instance_class,
            allocated_storage=section.allocated_storage_gib,
            storage_type="gp3",
            storage_encrypted=True,
            multi_az=section.multi_az,
            db_name=config.postgres.database,
            username=OWNER,
            password=self.owner_password,
            port=PORT,
            db_subnet_group_name=subnets.name,
            vpc_security_group_ids=[self.security_group.id],
            publicly_accessible=False,
            backup_retention_period=section.backup_retention_days,
            copy_tags_to_snapshot=True,
            deletion_protection=True,
            skip_final_snapshot=False,
            final_snapshot_identifier=f"{identifier}-final",
            opts=pulumi.ResourceOptions.merge(
                on_aws, pulumi.ResourceOptions(protect=protect, retain_on_delete=True)
            ),
        )
        self.address = self.instance.address
        self.port, self.database, self.owner = PORT, config.postgres.database, OWNER
        self.dsn = pulumi.Output.secret(
            pulumi.Output.concat(
                "postgresql://",
                OWNER,
                ":",
                self.owner_password,
                "@",
                self.address,
                f":{PORT}/{self.database}",
            )
        )

        namespace = config.cluster.namespace
        kube = Kube(self, args["k8s_provider"], namespace, protect, inherited_dependencies(opts))
        external: dict[str, object] = {"type": "ExternalName", "externalName": self.address}
        kube.service("postgres", labels("postgres", "postgres", ROLE_POSTGRES), external)
        self.host = service_host("postgres", namespace)
        RegistryRoles(
            f"{name}-roles",
            dsn=self.dsn,
            owner=OWNER,
            database=self.database,
            emqx_password=self.emqx_password,
            grafana_password=self.grafana_password,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.instance]),
        )
        self.ingest_dsn = ingest_role_dsn(self, name, self.address, depends_on=[self.instance])
        self.register_outputs(
            {"address": self.address, "host": self.host, "dsn": self.dsn, "ingest_dsn": self.ingest_dsn}
        )
