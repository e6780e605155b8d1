"""What a tenant stack's ``pulumi up`` writes for the API, against a real PostgreSQL, through the
provider objects Pulumi would unpickle: the store read token in the tenant's route, and a Grafana
org's webhook token (as a digest) that the API then authenticates alerts by."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterator
from typing import Any, TypeVar

import dill
import psycopg
import pytest
from pulumi.dynamic.dynamic import serialize_provider

from components.providers.registry import RegistryAlertSourceProvider, RegistryTenantProvider
from infra.config import Tenant, parse_platform
from registry import alerts
from registry.tenant_routes import tenant_route_for, tenant_routes

pytestmark = pytest.mark.integration

ACTOR = "pulumi:test"
STORE_URL = "http://influxdb.ironlink.svc.cluster.local:8086"
PLATFORM = parse_platform({"phase": "B", "region": "test"})
ACME = Tenant(id="acme", name="Acme", tier="basic")
Provider = TypeVar("Provider")


def unpickled(provider: Provider) -> Provider:
    """The provider as the engine gets it: pickled into state and loaded back."""
    loaded: Provider = dill.loads(base64.b64decode(serialize_provider(provider)))
    return loaded


@pytest.fixture
def conn(postgres_dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        yield connection


def tenant_props(dsn: str, read_token: str) -> dict[str, Any]:
    # The route input as the engine hands it over: no token in it (components.providers.registry.route_input).
    plain = tenant_route_for(PLATFORM, ACME, STORE_URL, "").model_dump(
        mode="json", exclude={"token", "read_token"}
    )
    return {
        "dsn": dsn,
        "tenant_id": ACME.id,
        "tenant": ACME.model_dump(mode="json"),
        "isolation": 2.0,
        "actor": ACTOR,
        "route": plain,
        "write_token": "write-token-1",
        "read_token": read_token,
    }


def source_props(dsn: str, token: str, tenant_id: str | None) -> dict[str, Any]:
    props = {"dsn": dsn, "source_id": "grafana-acme", "token": token, "actor": ACTOR}
    return props if tenant_id is None else {**props, "tenant_id": tenant_id}  # None: not sent


def test_the_tenant_stack_writes_the_read_token_the_api_queries_its_store_with(
    postgres_dsn: str, conn: psycopg.Connection
) -> None:
    provider = unpickled(RegistryTenantProvider())
    provider.create(tenant_props(postgres_dsn, "read-token-1"))
    route = tenant_routes(conn, "acme")["acme"]
    assert (route.token.get_secret_value(), route.read_token.get_secret_value()) == (
        "write-token-1",
        "read-token-1",
    )
    old, new = tenant_props(postgres_dsn, "read-token-1"), tenant_props(postgres_dsn, "read-token-2")
    assert provider.diff("acme", old, new).changes and not provider.diff("acme", old, new).replaces
    provider.update("acme", old, new)
    assert tenant_routes(conn, "acme")["acme"].read_token.get_secret_value() == "read-token-2"
    (details,) = conn.execute(
        "SELECT details FROM audit_events WHERE action = 'store_route.updated' AND subject = 'acme'"
    ).fetchone() or (None,)
    assert details["read_token_rotated"] is True and "read-token" not in str(details)


def test_a_webhook_source_is_accepted_by_its_token_rotated_in_place_and_gone_after_delete(
    postgres_dsn: str, conn: psycopg.Connection
) -> None:
    unpickled(RegistryTenantProvider()).create(tenant_props(postgres_dsn, "read-token-1"))
    provider = unpickled(RegistryAlertSourceProvider())
    first, second = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    created = provider.create(source_props(postgres_dsn, first, "acme"))
    assert created.id == "grafana-acme"
    assert alerts.webhook_source(conn, first) == alerts.WebhookSource("grafana-acme", "acme")
    stored = conn.execute("SELECT token_sha256 FROM alert_webhook_sources").fetchall()
    assert stored == [(alerts.token_digest(first),)], "the registry keeps the digest only"

    old, new = source_props(postgres_dsn, first, "acme"), source_props(postgres_dsn, second, "acme")
    rotation = provider.diff("grafana-acme", old, new)
    assert rotation.changes and not rotation.replaces, "a new token is an update"
    assert provider.diff("grafana-acme", old, {**old, "source_id": "grafana-x"}).replaces == ["source_id"]
    provider.update("grafana-acme", old, new)
    assert alerts.webhook_source(conn, first) is None
    assert alerts.webhook_source(conn, second) == alerts.WebhookSource("grafana-acme", "acme")

    provider.delete("grafana-acme", new)
    assert alerts.webhook_source(conn, second) is None


def test_the_shared_orgs_source_speaks_for_no_one_tenant(postgres_dsn: str, conn: psycopg.Connection) -> None:
    token = secrets.token_urlsafe(32)
    unpickled(RegistryAlertSourceProvider()).create(source_props(postgres_dsn, token, None))
    source = alerts.webhook_source(conn, token)
    assert source is not None and source.tenant_id is None


def test_check_names_every_missing_input(postgres_dsn: str) -> None:
    result = RegistryAlertSourceProvider().check({}, {"dsn": postgres_dsn, "source_id": "", "token": ""})
    assert sorted(failure.property for failure in result.failures) == ["actor", "source_id", "token"]
