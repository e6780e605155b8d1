"""Each tenant's store route in the registry (migration ``0006_tenant_store_routes.sql``): where its
telemetry goes, with which token, under which quota and age bound, and how long its dead letters
are kept.

The platform's services learn their tenants from here at runtime (issue 10), not from a list in
the platform stack: the ingest worker follows the table (``ingest/fleet.py``, channel
:data:`TENANT_ROUTES_CHANNEL`), the dead-letter consumer reads the retention before each purge.
A tenant's own stack (the Pulumi registry provider) and ``ironlink dev`` write its row with
:func:`upsert_tenant_route`, the values derived once, by :func:`tenant_route_for`. Every change
is audited like the rest of the registry (``registry/store.py``); a write that changes nothing
records nothing and notifies no one.

The worker's image holds this module (the model and the reads) but not ``registry.store`` and
what it imports (access rules, the fleet model, migrations): the two writers import it when called.
"""

from __future__ import annotations

from typing import Annotated, Any

import psycopg
from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from infra.config import PlatformConfig, Tenant
from infra.tenancy import store_route

TENANT_ROUTES_CHANNEL = "ironlink_tenant_routes"
STORE_URL_PATTERN = r"^https?://\S+$"
TOKEN_MAX_CHARS = 4096
TenantStoreRoutes = dict[str, "TenantStoreRoute"]
"""Tenant id -> its route: the worker's whole tenant directory."""
InstanceName = Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length=63)]
"""An InfluxDB instance name (``infra.tenancy.influxdb_instance``), as the table's check says."""
StoreName = Annotated[str, Field(min_length=1, max_length=256)]
"""An InfluxDB org or bucket name."""


class TenantStoreRoute(BaseModel):
    """Where one tenant's points go and what the worker admits of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instance: InstanceName = Field(description="One client per URL and token, not per instance.")
    url: str = Field(pattern=STORE_URL_PATTERN, max_length=2048, description="The instance's base URL.")
    org: StoreName
    bucket: StoreName
    token: SecretStr = Field(
        default=SecretStr(""),
        max_length=TOKEN_MAX_CHARS,
        description="Write-only token; '' for a store without.",
    )
    read_token: SecretStr = Field(
        default=SecretStr(""),
        max_length=TOKEN_MAX_CHARS,
        description="Read-only token the API queries with (api/stores.py); '' for a store without.",
    )
    messages_per_second: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Quota across all replicas, counted on arrival; None = no quota.",
    )
    max_age_s: int | None = Field(
        default=None, ge=1, description="Oldest ts accepted, seconds before arrival; None = no bound."
    )
    dead_letter_retention_s: int | None = Field(
        default=None, ge=0, description="Seconds its dead letters are kept (0: forever); None: the default."
    )
    messages_per_month: int | None = Field(
        default=None,
        ge=1,
        description="Hard monthly message quota (its tier's), metered by ingest/usage.py; None = none.",
    )


def tenant_route_for(config: PlatformConfig, tenant: Tenant, store_url: str, token: str) -> TenantStoreRoute:
    """A tenant's route as the stack derives it: instance, org and bucket from
    ``infra.tenancy.store_route``, quota and bounds from its tier. The one derivation that the
    worker's static settings (``ingest.settings.worker_settings_for``), the tenant stacks and
    ``ironlink dev`` share."""
    route, tier = store_route(config, tenant), config.retention_of(tenant)
    return TenantStoreRoute(
        instance=route.instance,
        url=store_url,
        org=route.org,
        bucket=route.bucket,
        token=SecretStr(token),
        messages_per_second=config.quota_of(tenant).messages_per_second,
        max_age_s=tier.max_age_seconds,
        dead_letter_retention_s=tier.dead_letter_seconds,
        messages_per_month=config.monthly_messages_of(tenant),
    )


_COLUMNS = (
    "instance",
    "url",
    "org",
    "bucket",
    "token",
    "read_token",
    "messages_per_second",
    "max_age_s",
    "dead_letter_retention_s",
    "messages_per_month",
)
_SELECT = sql.SQL("SELECT tenant_id, {} FROM tenant_store_routes").format(
    sql.SQL(", ").join(map(sql.Identifier, _COLUMNS))
)
_UPSERT = sql.SQL(
    "INSERT INTO tenant_store_routes (tenant_id, {columns}) VALUES (%(tenant_id)s, {values})"
    " ON CONFLICT (tenant_id) DO UPDATE SET ({columns}, updated_at) = ({excluded}, now())"
).format(
    columns=sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)),
    values=sql.SQL(", ").join(map(sql.Placeholder, _COLUMNS)),
    excluded=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in _COLUMNS),
)


_TOKENS = {"token", "read_token"}


def _row(route: TenantStoreRoute) -> dict[str, Any]:
    return {
        **route.model_dump(exclude=_TOKENS),
        "token": route.token.get_secret_value(),
        "read_token": route.read_token.get_secret_value(),
    }


def _route(row: tuple[Any, ...]) -> TenantStoreRoute:
    return TenantStoreRoute.model_validate(dict(zip(_COLUMNS, row, strict=True)))


def tenant_routes(conn: psycopg.Connection, tenant_id: str | None = None) -> TenantStoreRoutes:
    """Every tenant's route (or one tenant's) in one query."""
    query: sql.Composed = _SELECT
    params: tuple[str, ...] = ()
    if tenant_id is not None:
        query, params = sql.SQL("{} WHERE tenant_id = %s").format(_SELECT), (tenant_id,)
    return {row[0]: _route(row[1:]) for row in conn.execute(query, params)}


def dead_letter_retention(conn: psycopg.Connection) -> dict[str, int | None]:
    """Every routed tenant -> seconds its dead letters are kept (None: the consumer's default)."""
    rows = conn.execute("SELECT tenant_id, dead_letter_retention_s FROM tenant_store_routes")
    return {tenant: None if seconds is None else int(seconds) for tenant, seconds in rows}


def listen(conn: psycopg.Connection) -> None:
    """Subscribe ``conn`` (autocommit) to route changes; read them with ``conn.notifies()``."""
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(TENANT_ROUTES_CHANNEL)))


def _audited(route: TenantStoreRoute) -> dict[str, Any]:
    """A route as the audit trail keeps it: everything but the tokens."""
    return route.model_dump(mode="json", exclude=_TOKENS)


def upsert_tenant_route(
    conn: psycopg.Connection, tenant_id: str, route: TenantStoreRoute, *, actor: str
) -> bool:
    """Make the registry hold ``route`` for ``tenant_id``; False when it already did (nothing is
    written, recorded or notified). Audited as ``store_route.created`` or ``store_route.updated``
    (with what changed, a new token only as ``token_rotated`` or ``read_token_rotated``). The
    tenant must be in the registry (``registry.store.sync_tenant`` first)."""
    from registry.store import RegistryError, record_event

    where = f"tenant_routes[{tenant_id}]"
    with conn.transaction():
        found = conn.execute(
            sql.SQL("{} WHERE tenant_id = %s FOR UPDATE").format(_SELECT), (tenant_id,)
        ).fetchone()
        before = None if found is None else _route(found[1:])
        if before == route:
            return False
        try:
            with conn.transaction():
                conn.execute(_UPSERT, {"tenant_id": tenant_id, **_row(route)})
        except psycopg.errors.ForeignKeyViolation as error:
            raise RegistryError(
                f"{where}: tenant {tenant_id!r} is not in the registry (sync it first)"
            ) from error
        except psycopg.errors.IntegrityError as error:
            raise RegistryError(f"{where}: {error.diag.message_primary or error}") from error
        if before is None:
            action, details = "store_route.created", _audited(route)
        else:
            old, new = _audited(before), _audited(route)
            details = {
                "before": {k: v for k, v in old.items() if new[k] != v},
                "after": {k: v for k, v in new.items() if old[k] != v},
                "token_rotated": before.token != route.token,
                "read_token_rotated": before.read_token != route.read_token,
            }
            action = "store_route.updated"
        record_event(
            conn, actor=actor, action=action, subject=tenant_id, tenant_id=tenant_id, details=details
        )
    return True


def delete_tenant_route(conn: psycopg.Connection, tenant_id: str, *, actor: str) -> bool:
    """Remove a tenant's route (the worker then dead-letters its messages ``unknown_tenant``);
    False when there was none. Removing the tenant itself removes its route too."""
    from registry.store import record_event

    with conn.transaction():
        deleted = conn.execute("DELETE FROM tenant_store_routes WHERE tenant_id = %s", (tenant_id,)).rowcount
        if deleted:
            record_event(
                conn, actor=actor, action="store_route.removed", subject=tenant_id, tenant_id=tenant_id
            )
    return bool(deleted)
