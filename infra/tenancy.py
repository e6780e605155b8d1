"""Names derived from the tenant model: topics, broker identities, InfluxDB orgs/buckets/instances.

Every renderer (broker ACLs, registry rows, worker routes, Grafana datasources) and the worker
itself take their names from here, so that a tenant's topic, bucket and token scope can never
disagree. All functions are pure.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from infra.config import PlatformConfig, Tenant

TOPIC_ROOT = "ironlink"
TELEMETRY_LEAF = "telemetry"
TELEMETRY_FILTER = f"{TOPIC_ROOT}/+/+/+/{TELEMETRY_LEAF}"
RECEIPTS_LEAF = "receipts"
RECEIPTS_FILTER = f"{TOPIC_ROOT}/+/+/+/{RECEIPTS_LEAF}"
DEAD_LETTER_ROOT = "dlq"
REPLAY_ROOT = "replay"
INGEST_SERVICE = "svc.ingest"
DEAD_LETTER_SERVICE = "svc.deadletters"
DEAD_LETTER_SHARE_GROUP = "deadletters"
SHARED_INFLUXDB = "influxdb"


def telemetry_topic(tenant_id: str, site_id: str, machine_id: str) -> str:
    """The long-lived MQTT contract: ``ironlink/<tenant>/<site>/<machine>/telemetry``."""
    return f"{TOPIC_ROOT}/{tenant_id}/{site_id}/{machine_id}/{TELEMETRY_LEAF}"


DRAIN_ROOT = "drain"


def drain_topic(client_id: str) -> str:
    """A worker replica's own topic: the marker it sends itself on a graceful stop arrives after
    everything the broker had queued for it, so it knows when its session may end."""
    return f"{DRAIN_ROOT}/{client_id}"


def receipts_topic(tenant_id: str, site_id: str, machine_id: str) -> str:
    """Where the worker confirms what it stored of a machine's sequenced (v3) telemetry: only the
    identity that publishes the machine's telemetry may read it (an end-to-end receipt)."""
    return f"{TOPIC_ROOT}/{tenant_id}/{site_id}/{machine_id}/{RECEIPTS_LEAF}"


def tenant_topic_filter(tenant_id: str) -> str:
    return f"{TOPIC_ROOT}/{tenant_id}/#"


def shared_subscription(group: str) -> str:
    """Shared subscription so that worker replicas split the load."""
    return f"$share/{group}/{TELEMETRY_FILTER}"


def ingest_subscription(config: PlatformConfig) -> str:
    """What the ingest worker subscribes to: the shared subscription on EMQX, the plain filter on
    Mosquitto. Mosquitto checks ACLs only at delivery, *after* picking a share-group member, so any
    identity that joins the worker's group silently swallows its turn of the telemetry (measured in
    tests/test_broker_isolation.py); EMQX refuses such a SUBSCRIBE. Mosquitto runs one worker anyway.
    """
    if config.broker.engine == "emqx":
        return shared_subscription(config.ingest.share_group)
    return TELEMETRY_FILTER


def dead_letter_topic(original_topic: str) -> str:
    """Where a rejected message goes: the original topic under ``dlq/`` (per-tenant readable)."""
    return f"{DEAD_LETTER_ROOT}/{original_topic}"


def tenant_dead_letter_filter(tenant_id: str) -> str:
    return f"{DEAD_LETTER_ROOT}/{tenant_topic_filter(tenant_id)}"


def dead_letter_origin(topic: str) -> str | None:
    """The original topic of a dead letter's topic; None if ``topic`` is not under ``dlq/``."""
    return _below(DEAD_LETTER_ROOT, topic)


def _below(root: str, topic: str) -> str | None:
    """``topic`` without its first level ``root``; None when it does not start with ``root/``."""
    head, slash, rest = topic.partition("/")
    return rest if head == root and slash and rest else None


def dead_letter_subscription(config: PlatformConfig) -> str:
    """What the dead-letter consumer subscribes to: every dead letter, shared on EMQX (replicas
    split the load), plain on Mosquitto for the reason :func:`ingest_subscription` gives."""
    every = f"{DEAD_LETTER_ROOT}/#"
    return f"$share/{DEAD_LETTER_SHARE_GROUP}/{every}" if config.broker.engine == "emqx" else every


def replay_topic(topic: str) -> str:
    """Where a dead letter is replayed: its original topic under ``replay/``. Only the dead-letter
    consumer may publish there, so a device cannot pose as a replay."""
    return f"{REPLAY_ROOT}/{topic}"


def original_topic(topic: str) -> str | None:
    """The topic a replayed message first arrived on; None if ``topic`` is not a replay topic."""
    return _below(REPLAY_ROOT, topic)


REPLAY_FILTER = replay_topic(TELEMETRY_FILTER)


def replay_subscription(config: PlatformConfig) -> str:
    """The worker's second subscription, to replayed telemetry: shared like the first on EMQX
    (same group, so a replay goes to one replica), plain on Mosquitto."""
    if config.broker.engine == "emqx":
        return f"$share/{config.ingest.share_group}/{REPLAY_FILTER}"
    return REPLAY_FILTER


def device_username(tenant_id: str, site_id: str, machine_id: str) -> str:
    """A device's broker identity (ids are DNS labels, so the dots are unambiguous)."""
    return f"{tenant_id}.{site_id}.{machine_id}"


def tenant_service_username(tenant_id: str) -> str:
    """A tenant's read-only service identity (subscribe to its own telemetry and dead letters)."""
    return f"svc.{tenant_id}"


@dataclass(frozen=True)
class StoreRoute:
    """Where one tenant's telemetry is written and read in InfluxDB 2.x."""

    tenant_id: str
    instance: str
    org: str
    bucket: str
    downsampled_bucket: str
    raw_retention_seconds: int
    downsampled_retention_seconds: int


def influxdb_instance(config: PlatformConfig, tenant: Tenant) -> str:
    """Level 3 tenants get a dedicated InfluxDB instance; everyone else shares one."""
    return f"influxdb-{tenant.id}" if config.isolation_of(tenant) >= 3 else SHARED_INFLUXDB


def influxdb_org(config: PlatformConfig, tenant: Tenant) -> str:
    """Level 1 tenants share one org (tag + RBAC); level 2+ tenants get their own org."""
    return config.influxdb.shared_org if config.isolation_of(tenant) == 1 else tenant.id


def store_route(config: PlatformConfig, tenant: Tenant) -> StoreRoute:
    tier = config.retention_of(tenant)
    return StoreRoute(
        tenant_id=tenant.id,
        instance=influxdb_instance(config, tenant),
        org=influxdb_org(config, tenant),
        bucket=f"{tenant.id}-telemetry",
        downsampled_bucket=f"{tenant.id}-telemetry-1h",
        raw_retention_seconds=tier.raw_seconds,
        downsampled_retention_seconds=tier.downsampled_seconds,
    )


def store_routes(config: PlatformConfig) -> dict[str, StoreRoute]:
    return {tenant.id: store_route(config, tenant) for tenant in config.tenants}


# ------------------------------------------------------------------------------------- Grafana
GRAFANA_UID_MAX = 40  # Grafana refuses longer uids


def grafana_uid(*parts: str) -> str:
    """A Grafana uid from name parts (``acme-fleet``); one that would pass Grafana's 40 characters
    keeps its head and a hash of the whole, so that two long names never share a uid."""
    uid = "-".join(parts)
    if len(uid) <= GRAFANA_UID_MAX:
        return uid
    digest = hashlib.sha256(uid.encode()).hexdigest()[:8]
    return f"{uid[: GRAFANA_UID_MAX - len(digest) - 1].rstrip('-')}-{digest}"


@dataclass(frozen=True)
class GrafanaNames:
    """Where one tenant lives in Grafana."""

    org: str | None
    """The tenant's own org (levels 2 and 3); None: the shared org (level 1)."""
    team: str | None
    """Level 1 only: the team whose members may see the tenant's folder in the shared org."""
    folder_uid: str
    folder_title: str
    datasource_uid: str
    datasource_name: str
    rule_group: str


def grafana_names(config: PlatformConfig, tenant: Tenant) -> GrafanaNames:
    """Names in a place shared with other tenants carry the tenant id, so two tenants with the same
    display name never clash (Grafana wants unique org names, and unique team, folder and datasource
    names within an org)."""
    own_org = config.isolation_of(tenant) >= 2
    return GrafanaNames(
        org=f"{tenant.name} ({tenant.id})" if own_org else None,
        team=None if own_org else f"tenant-{tenant.id}",
        folder_uid=grafana_uid(tenant.id, "telemetry"),
        folder_title=tenant.name if own_org else f"{tenant.name} ({tenant.id})",
        datasource_uid=grafana_uid(tenant.id, "influxdb"),
        datasource_name=f"InfluxDB {tenant.id}",
        rule_group=f"{tenant.id}-telemetry",
    )


# Where a tenant's component sat when a region was one stack: ``ironlink stack split`` prints the
# ``pulumi state move`` of it, and a tenant stack aliases its component to it.
REGION_COMPONENT_TYPE = "ironlink:regional_platform:RegionalPlatform"
TENANT_COMPONENT_TYPE = "ironlink:tenant:Tenant"
PROJECT = "ironlink"


def legacy_tenant_urn(stack: str, tenant_id: str) -> str:
    """The URN tenant ``tenant_id``'s component had under its region in stack ``stack``."""
    return f"urn:pulumi:{stack}::{PROJECT}::{REGION_COMPONENT_TYPE}${TENANT_COMPONENT_TYPE}::{tenant_id}"
