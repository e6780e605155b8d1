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

from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
from pulumi.runtime import config as engine_config

from components.grafana import ADMIN_USER as GRAFANA_ADMIN_USER
from components.providers.influxdb import InfluxConnection
from components.regional_platform import RegionalPlatform, RegionalPlatformArgs
from components.tenant import Tenant, TenantArgs, grafana_admin_provider
from infra.config import (
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


def build(config: PlatformConfig) -> RegionalPlatform:
    """Declare one region and export what operators, devices and tenant stacks need."""
    platform = RegionalPlatform(f"ironlink-{config.region}", RegionalPlatformArgs(config=config))
    pulumi.export("phase", config.phase)
    pulumi.export("region", config.region)
    pulumi.export("namespace", platform.namespace)
    pulumi.export("mqtt_endpoint", f"mqtts://{platform.broker.public_host}:{platform.broker.tls_port}")
    pulumi.export("grafana_url", platform.grafana.public_url)
    pulumi.export("ca_cert_pem", platform.ca.cert_pem)
    pulumi.export("provisioning_url", platform.provisioning.public_url)
    # For the tenant stacks (StackReference): in-cluster endpoints and the admin credentials their
    # providers use. The secret ones stay encrypted in state and in the reference.
    pulumi.export("influxdb_url", platform.influxdb.url)
    pulumi.export("influxdb_admin_token", pulumi.Output.secret(platform.influxdb.admin_token))
    pulumi.export("grafana_internal_url", platform.grafana.url)
    pulumi.export("grafana_admin_password", pulumi.Output.secret(platform.grafana.admin_password))
    pulumi.export("registry_dsn", pulumi.Output.secret(platform.postgres.dsn))
    return platform


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
    kubernetes = k8s.Provider(
        "k8s",
        context=platform.cluster.context,
        namespace=platform.cluster.namespace,
        opts=pulumi.ResourceOptions(aliases=[legacy["k8s"]]),
    )
    shared = InfluxConnection(
        required("influxdb_url"), pulumi.Output.secret(required("influxdb_admin_token"))
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
        ),
        pulumi.ResourceOptions(aliases=[legacy["tenant"]]),
    )
    pulumi.export("platform", stack.platform)
    pulumi.export("tenant", stack.tenant.id)
    pulumi.export("isolation", tenant.level)
    pulumi.export("bucket", tenant.route.bucket)
    pulumi.export("grafana_org_id", tenant.grafana_org_id)
    return tenant


def main() -> RegionalPlatform | Tenant:
    if is_tenant_stack(pulumi.get_stack()):
        return build_tenant(*load_tenant_config())
    return build(load_config())
