"""One tenant of a region: its store, its Grafana, its registry rows, at its isolation level.

``RegionalPlatform`` declares one per tenant of the stack config::

    shared = InfluxConnection(influxdb.url, influxdb.admin_token)
    Tenant("acme", TenantArgs(config=config, tenant=config.tenant("acme"), influxdb={SHARED_INFLUXDB: shared},
                              grafana=grafana_provider, registry_dsn=postgres.dsn, k8s_provider=provider))

What a tenant gets, by isolation level (``PlatformConfig.isolation_of``):

- **InfluxDB**: an org of its own at levels 2 and 3, the shared org (adopted, never deleted) at
  level 1; a raw and a downsampled bucket with its tier's retention; a write token for the ingest
  worker (the raw bucket alone) and a read token for Grafana (its two buckets alone). Level 3 runs
  all of it on an instance of its own (``components.influxdb.InfluxDB``).
- **Grafana**: an org of its own at levels 2 and 3; at level 1 a folder in the shared org that only
  its team may view. In either: a Flux datasource bound to the read token, the fleet and machine
  dashboards and the alert rules. Every alert goes to the API's webhook, which routes it by the
  tenant's rules in the registry: a tenant with an org of its own (levels 2, 3) declares that
  org's contact point and policy (``components.alerting.AlertWebhook``, its own webhook token); in
  the shared org (level 1) the platform stack's one contact point and policy carry every tenant's
  alerts, so no tenant stack touches what other tenants share.
- **Registry**: its rows, through ``RegistryTenant`` (with the read token the API queries its
  store with), and its org's webhook source.

All names come from :mod:`infra.tenancy`. Buckets hold data and are protected where the stack
protects stateful resources: moving a tenant to another org (a level change) replaces its buckets,
which a protected stack refuses instead of dropping the data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s
import pulumiverse_grafana as grafana
from pulumiverse_grafana import alerting, oss

from components.alerting import AlertWebhook
from components.aws.placement import PrivatePlacement
from components.aws.telemetry import TelemetryStore, TelemetryStoreArgs
from components.backup import BackupTarget
from components.influxdb import InfluxDB, InfluxDBArgs
from components.kube import inherited_dependencies
from components.providers.influxdb import InfluxBucket, InfluxConnection, InfluxOrganization, InfluxToken
from components.providers.registry import RegistryTenant, route_input
from dashboards.alerts import EVALUATION_INTERVAL_S, tenant_rules
from dashboards.tenant import tenant_dashboards
from dashboards.view import TenantView
from infra.config import PlatformConfig
from infra.config import Tenant as TenantModel
from infra.tenancy import GrafanaNames, StoreRoute, grafana_names, store_route
from registry.alerts import tenant_source_id

GRAFANA_ADMIN = "admin"


class TenantArgs(TypedDict):
    config: PlatformConfig
    """The region's validated config (isolation defaults, retention tiers, protection)."""
    tenant: TenantModel
    """The tenant, as the stack config holds it."""
    influxdb: Mapping[str, InfluxConnection]
    """InfluxDB instance name (:func:`infra.tenancy.influxdb_instance`) → its API URL and operator
    token. Must hold the shared instance for tenants of levels 1 and 2; a level-3 tenant's
    instance is created here and needs no entry."""
    grafana: pulumi.ProviderResource
    """The region's ``pulumiverse_grafana.Provider`` (admin basic auth): creates orgs and resources
    in them (``org_id``)."""
    registry_dsn: pulumi.Input[str]
    """Owner DSN of the registry database (``Postgres.dsn``, secret)."""
    k8s_provider: k8s.Provider
    """The region's Kubernetes provider (a level-3 tenant's InfluxDB)."""
    actor: NotRequired[str]
    """Who the registry's audit trail names; default ``pulumi:<stack>``."""
    placement: NotRequired[PrivatePlacement | None]
    """On a ``aws.telemetry_store: timestream`` stack, where a level-3 tenant's own Timestream for
    InfluxDB instance goes (the platform's private subnets and cluster security group)."""
    backup: NotRequired[BackupTarget | None]
    """The platform's backup bucket, for a level-3 tenant's in-cluster InfluxDB."""
    alert_webhook_url: NotRequired[pulumi.Input[str] | None]
    """The API's webhook (the platform's ``api_webhook_url``): a tenant with an org of its own
    sends that org's alerts there. None: its org has no contact point."""


class Tenant(pulumi.ComponentResource):
    route: StoreRoute
    """Where the tenant's telemetry goes (instance, org, buckets, retention)."""
    names: GrafanaNames
    level: int
    instance: InfluxDB | TelemetryStore | None
    """The tenant's own InfluxDB (level 3; Timestream for InfluxDB on a timestream stack), else None."""
    influxdb_org_id: pulumi.Output[str]
    bucket_id: pulumi.Output[str]
    write_token: pulumi.Output[str]
    """The ingest worker's token (secret): write on the raw bucket alone."""
    read_token: pulumi.Output[str]
    """Grafana's token (secret): read on the tenant's two buckets alone."""
    grafana_org_id: pulumi.Output[int] | None
    """The tenant's Grafana org (levels 2 and 3); None in the shared org."""
    alerts: AlertWebhook | None
    """Its org's contact point and policy to the API (levels 2, 3 with a webhook), else None."""

    def __init__(self, name: str, args: TenantArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("ironlink:tenant:Tenant", name, None, opts)
        config, tenant = args["config"], args["tenant"]
        self.level = config.isolation_of(tenant)
        self.route, self.names = store_route(config, tenant), grafana_names(config, tenant)
        after = inherited_dependencies(opts)
        connection = self._store(name, args, after)
        org_id = self._grafana(name, args, connection, after)
        # The platform's worker learns the tenant from this row: its route and its write token;
        # the API its read token.
        registry = RegistryTenant(
            f"{name}-registry",
            dsn=args["registry_dsn"],
            tenant=tenant,
            isolation=self.level,
            actor=args.get("actor") or f"pulumi:{pulumi.get_stack()}",
            route=route_input(config, tenant, connection.url),
            write_token=self.write_token,
            read_token=self.read_token,
            opts=pulumi.ResourceOptions(parent=self, depends_on=after),
        )
        self._alerts(name, args, org_id, [*after, registry])
        self.register_outputs(
            {
                "bucket": self.route.bucket,
                "influxdb_org_id": self.influxdb_org_id,
                "write_token": self.write_token,
                "grafana_org_id": self.grafana_org_id,
            }
        )

    # ------------------------------------------------------------------------------- InfluxDB
    def _store(self, name: str, args: TenantArgs, after: list[pulumi.Resource]) -> InfluxConnection:
        config, tenant, route = args["config"], args["tenant"], self.route
        self.instance = None
        own = pulumi.ResourceOptions(parent=self, depends_on=after)
        if self.level >= 3 and config.aws is not None and config.aws.telemetry_store == "timestream":
            placement = args.get("placement")
            if placement is None:
                raise ValueError(
                    f"TenantArgs.placement: level-3 tenant {tenant.id!r} needs one on Timestream"
                )
            self.instance = TelemetryStore(
                route.instance,
                TelemetryStoreArgs(
                    instance=route.instance, config=config, placement=placement, tenant_id=tenant.id
                ),
                own,
            )
        elif self.level >= 3:
            self.instance = InfluxDB(
                route.instance,
                InfluxDBArgs(
                    instance=route.instance,
                    config=config,
                    provider=args["k8s_provider"],
                    tenant_id=tenant.id,
                    backup=args.get("backup"),
                ),
                own,
            )
        if self.instance is not None:
            connection = InfluxConnection(self.instance.url, self.instance.admin_token)
            after = [*after, self.instance]
        elif route.instance in args["influxdb"]:
            connection = args["influxdb"][route.instance]
        else:
            known = ", ".join(sorted(args["influxdb"])) or "none"
            where = f"TenantArgs.influxdb: no {route.instance!r} instance"
            raise ValueError(f"{where} for tenant {tenant.id!r} (known: {known})")

        child = pulumi.ResourceOptions(parent=self, depends_on=after)
        stateful = pulumi.ResourceOptions.merge(
            child, pulumi.ResourceOptions(protect=config.protect_stateful)
        )
        org = InfluxOrganization(
            f"{name}-influxdb-org" if self.level >= 2 else f"{name}-shared-influxdb-org",
            connection=connection,
            name=route.org,
            description=None if self.level == 1 else f"Ironlink tenant {tenant.name}",
            adopt=self.level == 1,
            opts=child,
        )
        raw, downsampled = (
            InfluxBucket(
                bucket,  # already the tenant's own name (infra.tenancy.store_route)
                connection=connection,
                org_id=org.id,
                name=bucket,
                retention_seconds=seconds,
                description=f"{tenant.name}: {what}",
                opts=stateful,
            )
            for bucket, seconds, what in (
                (route.bucket, route.raw_retention_seconds, "raw telemetry"),
                (route.downsampled_bucket, route.downsampled_retention_seconds, "hourly aggregates"),
            )
        )
        write = InfluxToken(
            f"{name}-write-token",
            connection=connection,
            org_id=org.id,
            permissions=[{"action": "write", "bucket_id": raw.id}],
            description=f"ingest worker: write {route.bucket}",
            opts=child,
        )
        read = InfluxToken(
            f"{name}-read-token",
            connection=connection,
            org_id=org.id,
            permissions=[
                {"action": "read", "bucket_id": raw.id},
                {"action": "read", "bucket_id": downsampled.id},
            ],
            description=f"grafana: read {route.bucket}, {route.downsampled_bucket}",
            opts=child,
        )
        self.influxdb_org_id, self.bucket_id = org.id, raw.id
        self.write_token, self.read_token = (
            pulumi.Output.secret(write.token),
            pulumi.Output.secret(read.token),
        )
        return connection

    # -------------------------------------------------------------------------------- Grafana
    def _grafana(
        self, name: str, args: TenantArgs, connection: InfluxConnection, after: list[pulumi.Resource]
    ) -> pulumi.Output[str] | None:
        """The tenant's org (None: the shared org) with its datasource, folder, dashboards and rules."""
        config, tenant, names, route = args["config"], args["tenant"], self.names, self.route
        view = TenantView.of(config, tenant)
        child = pulumi.ResourceOptions(parent=self, provider=args["grafana"], depends_on=after)
        org_id: pulumi.Output[str] | None = None
        self.grafana_org_id = None
        if names.org is not None:
            org = oss.Organization(
                f"{name}-grafana-org", name=names.org, admin_user=GRAFANA_ADMIN, opts=child
            )
            self.grafana_org_id = org.org_id
            org_id = org.org_id.apply(str)

        datasource = oss.DataSource(
            f"{name}-datasource",
            type="influxdb",
            name=names.datasource_name,
            uid=names.datasource_uid,
            url=connection.url,
            org_id=org_id,
            json_data_encoded=json.dumps(
                {"version": "Flux", "organization": route.org, "defaultBucket": route.bucket}
            ),
            # secret, as the read token it is made of
            secure_json_data_encoded=self.read_token.apply(lambda token: json.dumps({"token": token})),
            opts=child,
        )
        folder = oss.Folder(
            f"{name}-folder", title=names.folder_title, uid=names.folder_uid, org_id=org_id, opts=child
        )
        if names.team is not None:
            team = oss.Team(f"{name}-team", name=names.team, opts=child)
            # The folder's whole permission list: the team may view, the org's Viewers and Editors not.
            oss.FolderPermission(
                f"{name}-folder-permissions",
                folder_uid=folder.uid,
                permissions=[{"team_id": team.team_id.apply(str), "permission": "View"}],
                opts=child,
            )
        for uid, body in tenant_dashboards(view).items():
            oss.Dashboard(
                uid,  # carries the tenant id (dashboards.tenant)
                config_json=body,
                folder=folder.uid,
                org_id=org_id,
                overwrite=True,
                opts=child,
            )

        rules = tenant_rules(view)
        if rules:
            alerting.RuleGroup(
                f"{name}-alert-rules",
                name=names.rule_group,
                folder_uid=folder.uid,
                interval_seconds=EVALUATION_INTERVAL_S,
                org_id=org_id,
                rules=rules,
                opts=pulumi.ResourceOptions.merge(
                    child, pulumi.ResourceOptions(depends_on=[*after, datasource])
                ),
            )
        return org_id

    def _alerts(
        self, name: str, args: TenantArgs, org_id: pulumi.Output[str] | None, after: list[pulumi.Resource]
    ) -> None:
        """The tenant's own org sends its alerts to the API as the tenant's webhook source (which
        the registry holds once the tenant's row is there)."""
        url, tenant_id = args.get("alert_webhook_url"), args["tenant"].id
        self.alerts = None
        if url is None or org_id is None:
            return
        self.alerts = AlertWebhook(
            f"{name}-alerts",
            {
                "source_id": tenant_source_id(tenant_id),
                "tenant_id": tenant_id,
                "url": url,
                "registry_dsn": args["registry_dsn"],
                "grafana": args["grafana"],
                "org_id": org_id,
                "actor": args.get("actor") or f"pulumi:{pulumi.get_stack()}",
                # The org's policy when it routed to an email contact point of the tenant's.
                "policy_aliases": [pulumi.Alias(name=f"{name}-notification-policy", parent=self)],
            },
            pulumi.ResourceOptions(parent=self, depends_on=after),
        )


def grafana_admin_provider(
    name: str,
    url: pulumi.Input[str],
    user: str,
    password: pulumi.Input[str],
    parent: pulumi.Resource | None = None,
    aliases: list[str] | None = None,
) -> grafana.Provider:
    """The region's Grafana provider with the admin's basic auth (``Grafana.url``, ``admin_user``,
    ``admin_password``), for :class:`TenantArgs` ``grafana``."""
    auth: pulumi.Output[str] = pulumi.Output.secret(pulumi.Output.concat(user, ":", password))
    options = pulumi.ResourceOptions(parent=parent, aliases=list(aliases or []))
    return grafana.Provider(name, url=url, auth=auth, opts=options)
