"""The Pulumi program: what ``pulumi up`` declares for a stack, and what ``ironlink plan`` runs
under the mock engine.

The stack's ``ironlink:*`` settings are read from the engine and validated as a whole before any
resource is declared, so a bad stack fails with every problem listed and nothing half-created.
"""

from __future__ import annotations

from typing import Any

import pulumi
from pulumi.runtime import config as engine_config

from components.regional_platform import RegionalPlatform, RegionalPlatformArgs
from infra.config import PlatformConfig, parse_platform, settings_from_pulumi_config


def engine_settings() -> dict[str, Any]:
    """The stack's ``ironlink:*`` settings as the engine passes them (all keys, so typos are reported)."""
    values = {**engine_config.get_config_env(), **engine_config.CONFIG.get()}
    return settings_from_pulumi_config(values)


def load_config() -> PlatformConfig:
    """Validate the engine's config; raises ``StackConfigError`` listing every problem."""
    return parse_platform(engine_settings(), pulumi.get_stack())


def build(config: PlatformConfig) -> RegionalPlatform:
    """Declare one region and export what operators and devices need (nothing secret)."""
    platform = RegionalPlatform(f"ironlink-{config.region}", RegionalPlatformArgs(config=config))
    pulumi.export("phase", config.phase)
    pulumi.export("region", config.region)
    pulumi.export("namespace", platform.namespace)
    pulumi.export("mqtt_endpoint", f"mqtts://{platform.broker.public_host}:{platform.broker.tls_port}")
    pulumi.export("grafana_url", platform.grafana.public_url)
    pulumi.export("ca_cert_pem", platform.ca.cert_pem)
    return platform


def main() -> RegionalPlatform:
    return build(load_config())
