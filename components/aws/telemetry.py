"""Telemetry on Amazon Timestream for InfluxDB (``aws.telemetry_store: timestream``, Phase C).

InfluxDB 2.x OSS does not cluster; Timestream for InfluxDB is managed InfluxDB 2.x (the same orgs,
buckets, tokens and v2 API the tenancy providers and the worker use) with a standby in a second
availability zone (``WITH_MULTIAZ_STANDBY``). One instance per region replaces the shared
in-cluster InfluxDB, and one per level-3 tenant (declared by that tenant's stack) replaces its
dedicated one. Never publicly accessible, in the private subnets, behind a security group that
admits 8086 from the cluster's security group alone; ``protect``-ed and ``retain_on_delete``.

The initial org, bucket, user and password are set here; the admin password is a protected
``RandomPassword`` (the instance keeps it). AWS hands out no operator token: Timestream's secret
(``influx_auth_parameters_secret_arn``) holds those four values only, so
:class:`~components.providers.influxdb_operator.InfluxOperatorToken` signs in as the admin at
deploy time and creates one, which :attr:`TelemetryStore.admin_token` exposes exactly as
:attr:`components.influxdb.InfluxDB.admin_token`.
"""

from __future__ import annotations

import hashlib
from typing import NotRequired, TypedDict

import pulumi
import pulumi_aws as aws

from components.aws.placement import PrivatePlacement
from components.credentials import generated_password
from components.influxdb import ADMIN_USER, PLATFORM_BUCKET, PORT
from components.providers.influxdb_operator import InfluxOperatorToken
from infra.config import PlatformConfig

MULTI_AZ, SINGLE_AZ = "WITH_MULTIAZ_STANDBY", "SINGLE_AZ"
NAME_LIMIT = 40
"""Timestream for InfluxDB instance names: 3 to 40 characters, unique per account and region."""
LARGE_STORAGE_GIB = 400
"""From 400 GiB the 12,000-IOPS tier (``InfluxIOIncludedT2``) is allowed; below it only T1 (3,000)."""


def instance_name(instance: str) -> str:
    """The instance's AWS name: its Kubernetes name (``influxdb``, ``influxdb-<tenant>``) when it
    fits, else a prefix and a digest of the whole, so two long tenant ids never collide."""
    if len(instance) <= NAME_LIMIT:
        return instance
    digest = hashlib.sha256(instance.encode()).hexdigest()[:8]
    return f"{instance[: NAME_LIMIT - 9].rstrip('-')}-{digest}"


def storage_type(allocated_gib: int) -> str:
    return "InfluxIOIncludedT2" if allocated_gib >= LARGE_STORAGE_GIB else "InfluxIOIncludedT1"


class TelemetryStoreArgs(TypedDict):
    instance: str
    """The instance's name, from :func:`infra.tenancy.influxdb_instance` (``influxdb`` or
    ``influxdb-<tenant>``)."""
    config: PlatformConfig
    """The region's config: ``aws.timestream`` (instance type, storage, Multi-AZ) and
    ``influxdb.shared_org`` (the org set up at creation)."""
    placement: PrivatePlacement
    """The region's private subnets and the cluster's security group (the only source on 8086)."""
    tenant_id: NotRequired[str | None]
    """The level-3 tenant owning the instance (tagged ``ironlink:tenant``); None if shared."""


class TelemetryStore(pulumi.ComponentResource):
    """Stands in for :class:`components.influxdb.InfluxDB`: ``url``, ``admin_token``, ``org``."""

    url: pulumi.Output[str]
    """``https://<endpoint>:8086`` (Timestream serves the v2 API over TLS)."""
    admin_token: pulumi.Output[str]
    """Operator token (secret) created at deploy time: creates orgs, buckets and scoped tokens."""
    admin_password: pulumi.Output[str]
    org: str
    auth_secret_arn: pulumi.Output[str]
    """Timestream's Secrets Manager secret of the initial org, bucket, user and password."""
    instance: aws.timestreaminfluxdb.DbInstance

    def __init__(
        self, name: str, args: TelemetryStoreArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("ironlink:telemetry:TelemetryStore", name, None, opts)
        config, instance = args["config"], args["instance"]
        if config.aws is None:
            raise ValueError("TelemetryStoreArgs.config: the stack has no 'aws' section")
        section, protect = config.aws.timestream, config.protect_stateful
        placement = args["placement"]
        on_aws = pulumi.ResourceOptions(parent=self, provider=placement.provider)
        tags = {"ironlink:instance": instance}
        if args.get("tenant_id"):
            tags["ironlink:tenant"] = str(args.get("tenant_id"))

        security_group = placement.security_group(
            f"{name}-sg", port=PORT, what=f"telemetry store {instance}", parent=self, tags=tags
        )
        # Set at creation and kept by the instance: protected with it.
        self.admin_password = generated_password(f"{name}-admin-password", parent=self, protect=protect)
        self.org = config.influxdb.shared_org
        self.instance = aws.timestreaminfluxdb.DbInstance(
            name,
            name=instance_name(instance),
            db_instance_type=section.instance_type,
            db_storage_type=storage_type(section.allocated_storage_gib),
            allocated_storage=section.allocated_storage_gib,
            deployment_type=MULTI_AZ if section.multi_az else SINGLE_AZ,
            publicly_accessible=False,
            vpc_subnet_ids=placement.subnet_ids,
            vpc_security_group_ids=[security_group.id],
            port=PORT,
            organization=self.org,
            bucket=PLATFORM_BUCKET,
            username=ADMIN_USER,
            password=self.admin_password,
            tags=tags,
            opts=pulumi.ResourceOptions.merge(
                on_aws, pulumi.ResourceOptions(protect=protect, retain_on_delete=True)
            ),
        )
        self.url = pulumi.Output.concat("https://", self.instance.endpoint, f":{PORT}")
        self.auth_secret_arn = self.instance.influx_auth_parameters_secret_arn
        operator = InfluxOperatorToken(
            f"{name}-operator-token",
            url=self.url,
            username=ADMIN_USER,
            password=self.admin_password,
            organization=self.org,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.instance]),
        )
        self.admin_token = pulumi.Output.secret(operator.token)
        self.register_outputs({"url": self.url, "admin_token": self.admin_token})
