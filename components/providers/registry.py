"""A tenant's registry rows (the tenant, its service identity's rules, its store route) as a Pulumi
resource, written through :mod:`registry.store` and :mod:`registry.tenant_routes`: the same SQL and
audit trail as ``ironlink tenant`` and ``ironlink dev``::

    RegistryTenant("acme-registry", dsn=dsn, tenant=tenant, isolation=2, actor="pulumi:prod",
                   route=route_without_token, write_token=token, read_token=read)

The route is where the platform's worker sends the tenant's points (URL, org, bucket, quota, age
bound, dead-letter retention; ``registry.tenant_routes.tenant_route_for``) with its write token,
and what the API reads them with (the read token): secret inputs kept apart so that the route
itself stays readable in a plan's diff. The worker
follows the table at runtime: a tenant stack's ``pulumi up`` is all it takes.

Create and update are :func:`registry.store.sync_tenant` then
:func:`registry.tenant_routes.upsert_tenant_route` (both idempotent: they adopt rows a local tool
already wrote and record one audit event per change); delete is :func:`registry.store.remove_tenant`
(its route goes with it).
Only the tenant id forces a replacement. Migrations are applied before each write, as every other
writer does. The provider holds nothing but its class: each operation connects with the ``dsn``
input (a secret).

``RegistryServiceAccount`` stores a platform service's broker credential (``svc.ingest``'s ``$7$``
hash, which EMQX authenticates against) through :func:`registry.store.issue_service_credential`;
delete revokes it (:func:`registry.store.revoke_credential`).

``RegistryAlertSource`` stores a Grafana contact point's webhook token as a digest
(:func:`registry.alerts.upsert_webhook_source`); delete stops accepting it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import psycopg
import pulumi
from pulumi.dynamic import (
    CheckFailure,
    CheckResult,
    CreateResult,
    DiffResult,
    ReadResult,
    Resource,
    ResourceProvider,
    UpdateResult,
)
from pydantic import ValidationError

from components.providers import plan_diff
from infra.config import PlatformConfig, Tenant
from registry import alerts, store
from registry.migrate import apply_migrations
from registry.tenant_routes import TenantStoreRoute, tenant_route_for, upsert_tenant_route

CONNECT_TIMEOUT_S = 15


@contextmanager
def _registry(props: Mapping[str, Any]) -> Iterator[psycopg.Connection]:
    with psycopg.connect(props["dsn"], autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        apply_migrations(conn)
        yield conn


class RegistryTenantProvider(ResourceProvider):
    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        failures = [CheckFailure(key, "is required") for key in ("dsn", "actor") if not news.get(key)]
        try:
            tenant = Tenant.model_validate(news.get("tenant"))
        except ValidationError as error:
            failures += [
                CheckFailure(
                    ".".join(["tenant", *(str(part) for part in item["loc"])]),
                    f"{item.get('input')!r}: {item['msg']}",
                )
                for item in error.errors(include_url=False)
            ]
        else:
            if tenant.id != news.get("tenant_id"):
                failures.append(CheckFailure("tenant_id", f"{news.get('tenant_id')!r} is not {tenant.id!r}"))
        if news.get("isolation") not in (1, 2, 3):
            failures.append(CheckFailure("isolation", f"{news.get('isolation')!r} is not 1, 2 or 3"))
        try:
            _route(news)
        except (ValidationError, TypeError) as error:
            failures.append(CheckFailure("route", str(error).splitlines()[0]))
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        # A new dsn (a rotated password, another database) is an update: the sync is idempotent.
        changing = ("tenant", "isolation", "dsn", "route", "write_token", "read_token")
        return plan_diff(olds, news, replace=("tenant_id",), update=changing)

    def create(self, props: dict[str, Any]) -> CreateResult:
        self._sync(props)
        return CreateResult(props["tenant_id"], dict(props))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        with _registry(props) as conn:
            present = id_ in store.tenant_ids(conn)
        return ReadResult(id_, dict(props)) if present else ReadResult("", {})

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        self._sync(news)
        return UpdateResult(dict(news))

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        with _registry(props) as conn:
            store.remove_tenant(conn, id_, actor=props["actor"])

    @staticmethod
    def _sync(props: Mapping[str, Any]) -> None:
        tenant, route = Tenant.model_validate(props["tenant"]), _route(props)
        with _registry(props) as conn:
            store.sync_tenant(conn, tenant, isolation=int(props["isolation"]), actor=props["actor"])
            upsert_tenant_route(conn, tenant.id, route, actor=props["actor"])


def _route(props: Mapping[str, Any]) -> TenantStoreRoute:
    tokens = {"token": props.get("write_token") or "", "read_token": props.get("read_token") or ""}
    return TenantStoreRoute.model_validate({**props["route"], **tokens})


def route_input(
    config: PlatformConfig, tenant: Tenant, store_url: pulumi.Input[str]
) -> pulumi.Output[dict[str, Any]]:
    """The tenant's route as a plain input, without its tokens (:class:`RegistryTenant` ``route``)."""
    return pulumi.Output.from_input(store_url).apply(
        lambda url: tenant_route_for(config, tenant, url, "").model_dump(
            mode="json", exclude={"token", "read_token"}
        )
    )


class RegistryTenant(Resource, module="registry", name="Tenant"):
    """The registry rows of one tenant; its ``id`` is the tenant id."""

    def __init__(
        self,
        resource_name: str,
        *,
        dsn: pulumi.Input[str],
        tenant: Tenant,
        isolation: int,
        actor: str,
        route: pulumi.Input[dict[str, Any]],
        write_token: pulumi.Input[str],
        read_token: pulumi.Input[str] | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        props = {
            "dsn": pulumi.Output.secret(dsn),
            "tenant_id": tenant.id,
            "tenant": tenant.model_dump(mode="json"),
            "isolation": isolation,
            "actor": actor,
            "route": route,
            "write_token": pulumi.Output.secret(write_token),
            "read_token": pulumi.Output.secret(read_token or ""),
        }
        super().__init__(RegistryTenantProvider(), resource_name, props, opts)


class RegistryServiceAccountProvider(ResourceProvider):
    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        failures = [
            CheckFailure(key, "is required")
            for key in ("dsn", "username", "password_hash", "actor")
            if not news.get(key)
        ]
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        # A new hash is a rotation: issue_service_credential updates the row in place.
        return plan_diff(olds, news, replace=("username",), update=("password_hash", "dsn"))

    def create(self, props: dict[str, Any]) -> CreateResult:
        self._issue(props)
        return CreateResult(props["username"], dict(props))

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        self._issue(news)
        return UpdateResult(dict(news))

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        with _registry(props) as conn:
            store.revoke_credential(conn, id_, actor=props["actor"])

    @staticmethod
    def _issue(props: Mapping[str, Any]) -> None:
        with _registry(props) as conn:
            store.issue_service_credential(
                conn, props["username"], props["password_hash"], actor=props["actor"]
            )
            # Without its rules EMQX (authorization.no_match = deny) would refuse the worker.
            store.sync_platform_rules(conn)


class RegistryServiceAccount(Resource, module="registry", name="ServiceAccount"):
    """A platform service's broker credential in the registry; its ``id`` is the username."""

    def __init__(
        self,
        resource_name: str,
        *,
        dsn: pulumi.Input[str],
        username: str,
        password_hash: pulumi.Input[str],
        actor: str,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        props = {
            "dsn": pulumi.Output.secret(dsn),
            "username": username,
            "password_hash": pulumi.Output.secret(password_hash),
            "actor": actor,
        }
        super().__init__(RegistryServiceAccountProvider(), resource_name, props, opts)


class RegistryAlertSourceProvider(ResourceProvider):
    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        failures = [
            CheckFailure(key, "is required")
            for key in ("dsn", "source_id", "token", "actor")
            if not news.get(key)
        ]
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        # A new token is a rotation, another tenant a new row: the source id names both.
        return plan_diff(olds, news, replace=("source_id",), update=("tenant_id", "token", "dsn"))

    def create(self, props: dict[str, Any]) -> CreateResult:
        self._upsert(props)
        return CreateResult(props["source_id"], dict(props))

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        self._upsert(news)
        return UpdateResult(dict(news))

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        with _registry(props) as conn:
            alerts.delete_webhook_source(conn, id_, actor=props["actor"])

    @staticmethod
    def _upsert(props: Mapping[str, Any]) -> None:
        with _registry(props) as conn:
            alerts.upsert_webhook_source(
                conn,
                props["source_id"],
                props["token"],
                tenant_id=props.get("tenant_id") or None,
                actor=props["actor"],
            )


class RegistryAlertSource(Resource, module="registry", name="AlertSource"):
    """A Grafana contact point's right to post alerts to the API: its token, kept in the registry
    as a digest only (:func:`registry.alerts.upsert_webhook_source`); its ``id`` is the source id.
    ``tenant_id`` None: the shared org's source."""

    def __init__(
        self,
        resource_name: str,
        *,
        dsn: pulumi.Input[str],
        source_id: str,
        tenant_id: str | None,
        token: pulumi.Input[str],
        actor: str,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        props = {
            "dsn": pulumi.Output.secret(dsn),
            "source_id": source_id,
            "tenant_id": tenant_id,
            "token": pulumi.Output.secret(token),
            "actor": actor,
        }
        super().__init__(RegistryAlertSourceProvider(), resource_name, props, opts)
