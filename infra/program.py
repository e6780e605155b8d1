"""The Pulumi program: what ``pulumi up`` declares for a stack, and what ``ironlink plan`` runs
under the mock engine.

Two kinds of stack run the same program. A **platform stack** (``mvp-eu``) declares one region's
shared services and exports what tenants need. A **tenant stack** (``mvp-eu.acme``) declares one
tenant on that platform: its config (tiers, phase, images) is read from the platform's stack file in
this repository — config is code — and the platform's runtime values (URLs, admin tokens, the
registry's DSN) come from the platform stack's outputs through a ``StackReference`` — they are
state. A tenant stack is created, updated and destroyed without touching the platform or any other
tenant.

The stack's ``ironlink:*`` settings are read from the engine and validated as a whole before any
resource is declared, so a bad stack fails with every problem listed and nothing half-created.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any

import pulumi
import pulumi_aws as aws
from pulumi.runtime import config as engine_config

from components.aws.placement import PrivatePlacement
from components.aws.substrate import RegionalSubstrate, runs_on_eks
from components.aws.vm import SingleVm, SingleVmArgs
from components.backup import BACKUP_SERVICE_ACCOUNT, BackupTarget
from components.grafana import ADMIN_USER as GRAFANA_ADMIN_USER
from components.kube import kubernetes_provider
from components.providers.influxdb import InfluxConnection
from components.regional_platform import RegionalPlatform, RegionalPlatformArgs
from components.render.cloud_init import MQTT_PORT
from components.tenant import Tenant, TenantArgs, grafana_admin_provider
from infra.config import (
    AwsVm,
    PlatformConfig,
    Problem,
    StackConfigError,
    TenantStackConfig,
    is_tenant_stack,
    load_platform,
    parse_platform_stack,
    parse_tenant_stack,
    settings_from_pulumi_config,
    source_stack,
)
from infra.tenancy import REGION_COMPONENT_TYPE, SHARED_INFLUXDB, legacy_tenant_urn

PLATFORM_CONFIGS: ContextVar[Mapping[str, PlatformConfig] | None] = ContextVar(
    "platform_configs", default=None
)
"""Platform configs the caller already holds (the offline planner, planning many tenants of one
platform); any other platform's config is read from its stack file."""


def engine_settings() -> dict[str, Any]:
    """The stack's ``ironlink:*`` settings as the engine passes them (all keys, so typos are reported)."""
    values = {**engine_config.get_config_env(), **engine_config.CONFIG.get()}
    return settings_from_pulumi_config(values)


def load_config() -> PlatformConfig:
    """A platform stack's validated config; raises ``StackConfigError`` listing every problem."""
    return parse_platform_stack(engine_settings(), pulumi.get_stack())


def platform_config(name: str) -> PlatformConfig:
    known = PLATFORM_CONFIGS.get() or {}
    return known[name] if name in known else load_platform(source_stack(name))


def load_tenant_config() -> tuple[PlatformConfig, TenantStackConfig]:
    """A tenant stack's validated config and its platform's."""
    settings, stack = engine_settings(), pulumi.get_stack()
    name = settings.get("platform")
    if not isinstance(name, str) or is_tenant_stack(name):
        problem = Problem("ironlink:platform", f"{str(name)[:80]!r} is not the name of a platform stack")
        raise StackConfigError([problem], stack)
    platform = platform_config(name)
    return platform, parse_tenant_stack(settings, stack, platform)


def build(config: PlatformConfig) -> RegionalPlatform | SingleVm:
    """Declare one region and export what operators, devices and tenant stacks need."""
    if config.aws is not None and config.aws.vm is not None:
        return build_vm(config, config.aws.region, config.aws.vm)
    platform = RegionalPlatform(f"ironlink-{config.region}", RegionalPlatformArgs(config=config))
    pulumi.export("phase", config.phase)
    pulumi.export("region", config.region)
    pulumi.export("namespace", platform.namespace)
    pulumi.export("mqtt_endpoint", f"mqtts://{platform.broker.public_host}:{platform.broker.tls_port}")
    pulumi.export("grafana_url", platform.grafana.public_url)
    pulumi.export("ca_cert_pem", platform.ca.cert_pem)
    pulumi.export("provisioning_url", platform.provisioning.public_url)
    pulumi.export("api_url", platform.api.public_url)
    # For the tenant stacks (StackReference): in-cluster endpoints and the admin credentials their
    # providers use. The secret ones stay encrypted in state and in the reference.
    pulumi.export("influxdb_url", platform.influxdb.url)
    pulumi.export("influxdb_admin_token", pulumi.Output.secret(platform.influxdb.admin_token))
    pulumi.export("grafana_internal_url", platform.grafana.url)
    pulumi.export("grafana_admin_password", pulumi.Output.secret(platform.grafana.admin_password))
    pulumi.export("registry_dsn", pulumi.Output.secret(platform.postgres.dsn))
    pulumi.export("api_webhook_url", platform.api.webhook_url)
    if platform.substrate is not None:
        export_substrate(platform.substrate)
    if platform.backups is not None:
        # ``ironlink backup --bucket``; on an existing cluster, the policy its backup identity needs.
        pulumi.export("backup_bucket", platform.backups.bucket)
        pulumi.export("backup_policy_json", platform.backups.policy_json)
        pulumi.export("backup_role_arn", platform.backups.role_arn)
    return platform


def build_vm(config: PlatformConfig, aws_region: str, vm: AwsVm) -> SingleVm:
    """Phase A on one EC2 instance: the VM and nothing of Kubernetes. Its registry and store
    listen on the VM's loopback only, so a tenant stack's providers reach them from a runner on
    the VM itself (``pulumi up`` there); none is exported here."""
    provider = aws.Provider(f"ironlink-{config.region}-aws", region=aws_region)
    single = SingleVm(f"ironlink-{config.region}", SingleVmArgs(config=config, vm=vm, provider=provider))
    pulumi.export("phase", config.phase)
    pulumi.export("region", config.region)
    pulumi.export("mqtt_endpoint", f"mqtts://{single.public_host}:{MQTT_PORT}")
    pulumi.export("mqtt_address", single.public_ip)
    pulumi.export("ca_cert_pem", single.ca.cert_pem)
    return single


def export_substrate(substrate: RegionalSubstrate) -> None:
    """The region's network and cluster, for stacks that place resources in it (tenant stores,
    IRSA roles) and for the tenant stacks' Kubernetes provider (``kubeconfig``, on EKS)."""
    pulumi.export("vpc_id", substrate.vpc_id)
    pulumi.export("private_subnet_ids", substrate.private_subnet_ids)
    if substrate.cluster is not None:
        pulumi.export("oidc_provider_arn", substrate.cluster.oidc_provider_arn)
        pulumi.export("oidc_issuer", substrate.cluster.oidc_issuer)
        pulumi.export("cluster_security_group_id", substrate.cluster.cluster_security_group_id)
        pulumi.export("kubeconfig", substrate.cluster.kubeconfig)


def platform_reference(platform: str) -> pulumi.StackReference:
    """The platform stack of this tenant stack, in the same organization and project."""
    return pulumi.StackReference(f"{pulumi.get_organization()}/{pulumi.get_project()}/{platform}")


def legacy_aliases(platform: PlatformConfig, tenant_id: str) -> dict[str, str]:
    """Where the tenant's component and its providers were when the region was one stack: after
    ``pulumi state move`` (``ironlink stack split`` prints it) they keep those URNs, and these
    aliases (URNs) make the tenant stack adopt them instead of replacing them."""
    stack, region = pulumi.get_stack(), f"ironlink-{platform.region}"
    under_region = f"urn:pulumi:{stack}::{pulumi.get_project()}::{REGION_COMPONENT_TYPE}$"
    return {
        "tenant": legacy_tenant_urn(stack, tenant_id),
        "grafana": f"{under_region}pulumi:providers:grafana::{region}-grafana-admin",
        "k8s": f"{under_region}pulumi:providers:kubernetes::{region}-k8s",
    }


def tenant_backup_target(
    platform: PlatformConfig, stack: TenantStackConfig, required: Callable[[str], pulumi.Output[Any]]
) -> BackupTarget | None:
    """Where a level-3 tenant's in-cluster InfluxDB is backed up: the platform's bucket."""
    aws_section = platform.aws
    if (
        aws_section is None
        or not aws_section.backup_bucket
        or aws_section.telemetry_store != "in-cluster"
        or platform.isolation_of(stack.tenant) < 3
    ):
        return None
    return BackupTarget(
        bucket=required("backup_bucket"),
        region=platform.region,
        image=aws_section.backup_image,
        service_account=BACKUP_SERVICE_ACCOUNT,
    )


def build_tenant(platform: PlatformConfig, stack: TenantStackConfig) -> Tenant:
    """Declare one tenant on its platform, with providers of its own built from the platform's outputs."""
    reference = platform_reference(stack.platform)

    def required(key: str) -> pulumi.Output[Any]:
        return reference.require_output(key)

    legacy = legacy_aliases(platform, stack.tenant.id)
    grafana = grafana_admin_provider(
        "grafana-admin",
        required("grafana_internal_url"),
        GRAFANA_ADMIN_USER,
        pulumi.Output.secret(required("grafana_admin_password")),
        aliases=[legacy["grafana"]],
    )
    kubeconfig = required("kubeconfig") if runs_on_eks(platform) else None
    kubernetes = kubernetes_provider(
        "k8s",
        context=platform.cluster.context if kubeconfig is None else None,
        kubeconfig=kubeconfig,
        namespace=platform.cluster.namespace,
        opts=pulumi.ResourceOptions(aliases=[legacy["k8s"]]),
    )
    shared = InfluxConnection(
        required("influxdb_url"), pulumi.Output.secret(required("influxdb_admin_token"))
    )
    aws_section = platform.aws
    placement = None
    if (
        aws_section is not None
        and aws_section.telemetry_store == "timestream"
        and platform.isolation_of(stack.tenant) >= 3
    ):
        # A level-3 tenant's own Timestream instance goes in the platform's private subnets.
        placement = PrivatePlacement(
            aws.Provider("aws", region=aws_section.region),
            required("vpc_id"),
            required("private_subnet_ids"),
            required("cluster_security_group_id"),
        )
    tenant = Tenant(
        stack.tenant.id,
        TenantArgs(
            config=platform,
            tenant=stack.tenant,
            influxdb={SHARED_INFLUXDB: shared},
            grafana=grafana,
            registry_dsn=pulumi.Output.secret(required("registry_dsn")),
            k8s_provider=kubernetes,
            placement=placement,
            backup=tenant_backup_target(platform, stack, required),
            alert_webhook_url=required("api_webhook_url"),
        ),
        pulumi.ResourceOptions(aliases=[legacy["tenant"]]),
    )
    pulumi.export("platform", stack.platform)
    pulumi.export("tenant", stack.tenant.id)
    pulumi.export("isolation", tenant.level)
    pulumi.export("bucket", tenant.route.bucket)
    pulumi.export("grafana_org_id", tenant.grafana_org_id)
    return tenant


def main() -> RegionalPlatform | SingleVm | Tenant:
    if is_tenant_stack(pulumi.get_stack()):
        return build_tenant(*load_tenant_config())
    return build(load_config())
