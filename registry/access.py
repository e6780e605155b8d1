"""Who may publish or subscribe to what: the one rule set behind both brokers.

Mosquitto's ACL file (:func:`components.render.mosquitto.render_acl_file`) and EMQX's PostgreSQL
authorization rows (``acl_rules``, written by :mod:`registry.store`) are both rendered from
:func:`access_rules`, so the two brokers cannot drift apart. Everything not listed is denied: the
Mosquitto ACL file grants nothing else and EMQX runs with ``no_match = deny``.

- a device publishes only to its own telemetry topic and reads only its own receipts (what the
  worker confirms it stored of the device's sequenced telemetry);
- ``svc.ingest`` reads every telemetry topic (also through ``$share/<group>/...``: both brokers
  authorize a shared subscription by its topic filter) and replayed telemetry under ``replay/``,
  publishes dead letters under ``dlq/`` and receipts on every machine's receipts topic, and
  speaks to itself under ``drain/`` (the marker of a graceful stop);
- ``svc.deadletters`` (the dead-letter consumer) reads every dead letter and publishes replays
  under ``replay/``; nobody else may publish there, so a device cannot pose as a replay;
- ``svc.<tenant>`` reads only its tenant's telemetry and dead letters;
- nobody reads ``$SYS/#`` (broker internals are scraped as metrics, not subscribed to).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from infra.config import PlatformConfig, Tenant
from infra.fleet import Fleet
from infra.tenancy import (
    DEAD_LETTER_ROOT,
    DEAD_LETTER_SERVICE,
    DRAIN_ROOT,
    INGEST_SERVICE,
    RECEIPTS_FILTER,
    REPLAY_ROOT,
    TELEMETRY_FILTER,
    device_username,
    receipts_topic,
    telemetry_topic,
    tenant_dead_letter_filter,
    tenant_service_username,
    tenant_topic_filter,
)

Action = Literal["publish", "subscribe"]


@dataclass(frozen=True)
class AccessRule:
    """One allow rule; ``tenant_id`` is None for platform services (``svc.ingest``)."""

    username: str
    action: Action
    topic: str
    tenant_id: str | None = None


def machine_rules(tenant_id: str, site_id: str, machine_id: str) -> list[AccessRule]:
    """One device's rules (also written by the provisioning service when it enrolls a device)."""
    username = device_username(tenant_id, site_id, machine_id)
    return [
        AccessRule(username, "publish", telemetry_topic(tenant_id, site_id, machine_id), tenant_id),
        AccessRule(username, "subscribe", receipts_topic(tenant_id, site_id, machine_id), tenant_id),
    ]


def device_rules(fleet: Fleet) -> Iterator[AccessRule]:
    """The rules of a fleet's devices (the registry's, at runtime; a fleet file's, in static mode)."""
    for tenant_id, site, machine in fleet.machines():
        yield from machine_rules(tenant_id, site.id, machine.id)


def tenant_service_rules(tenant: Tenant) -> Iterator[AccessRule]:
    username = tenant_service_username(tenant.id)
    yield AccessRule(username, "subscribe", tenant_topic_filter(tenant.id), tenant.id)
    yield AccessRule(username, "subscribe", tenant_dead_letter_filter(tenant.id), tenant.id)


def tenant_rules(tenant: Tenant) -> list[AccessRule]:
    """The rules the stack declares for one tenant (its service identity's); its devices' rules
    are the registry's, written when a device is enrolled."""
    return list(tenant_service_rules(tenant))


def platform_rules() -> list[AccessRule]:
    """Rules of the platform's own services, which span tenants."""
    return [
        AccessRule(INGEST_SERVICE, "subscribe", TELEMETRY_FILTER),
        AccessRule(INGEST_SERVICE, "subscribe", f"{REPLAY_ROOT}/#"),
        AccessRule(INGEST_SERVICE, "publish", f"{DEAD_LETTER_ROOT}/#"),
        AccessRule(INGEST_SERVICE, "publish", RECEIPTS_FILTER),
        AccessRule(INGEST_SERVICE, "publish", f"{DRAIN_ROOT}/#"),
        AccessRule(INGEST_SERVICE, "subscribe", f"{DRAIN_ROOT}/#"),
        AccessRule(DEAD_LETTER_SERVICE, "subscribe", f"{DEAD_LETTER_ROOT}/#"),
        AccessRule(DEAD_LETTER_SERVICE, "publish", f"{REPLAY_ROOT}/#"),
    ]


def access_rules(config: PlatformConfig, fleet: Fleet | None = None) -> list[AccessRule]:
    """The stack's rules, and ``fleet``'s devices' rules for a broker without a runtime registry."""
    return [
        *platform_rules(),
        *(rule for tenant in config.tenants for rule in tenant_rules(tenant)),
        *(device_rules(fleet) if fleet else ()),
    ]


def service_usernames(config: PlatformConfig) -> list[str]:
    """The service identities a platform needs credentials for: the worker, the dead-letter
    consumer and one per tenant."""
    return [
        INGEST_SERVICE,
        DEAD_LETTER_SERVICE,
        *(tenant_service_username(tenant.id) for tenant in config.tenants),
    ]
