"""Each tenant's store route in the registry (issue 10), against a real PostgreSQL: one derivation
from the stack, audited and idempotent writes, one notification per statement and tenant, the
token kept from the broker's role and from the audit trail."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from pydantic import SecretStr, ValidationError

from components.render.postgres import EMQX_ROLE
from infra.config import PlatformConfig, parse_platform
from infra.tenancy import store_route
from registry import store, tenant_routes
from registry.migrate import apply_migrations
from registry.tenant_routes import TenantStoreRoute, tenant_route_for

ACTOR = "test@routes"
URL = "http://influxdb.ironlink.svc:8086"

pytestmark = pytest.mark.integration


def config() -> PlatformConfig:
    raw = {
        "phase": "C",
        "region": "test",
        "tenants": [
            {"id": "acme", "name": "Acme", "tier": "basic"},
            {"id": "globex", "name": "Globex", "tier": "standard", "isolation": 3},
        ],
    }
    return parse_platform(raw, "routes-test")


@pytest.fixture
def conn(postgres_dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        store.sync_platform(connection, config(), actor=ACTOR)
        yield connection


def test_a_route_is_derived_once_from_the_stack() -> None:
    stack = config()
    globex = stack.tenant("globex")
    route = tenant_route_for(stack, globex, URL, "secret")
    names, tier = store_route(stack, globex), stack.retention_of(globex)
    assert (route.instance, route.org, route.bucket) == (names.instance, names.org, names.bucket)
    assert route.instance == "influxdb-globex", "level 3: its own instance"
    assert route.messages_per_second == stack.quota_of(globex).messages_per_second
    assert (route.max_age_s, route.dead_letter_retention_s) == (
        tier.max_age_seconds,
        tier.dead_letter_seconds,
    )
    assert "secret" not in repr(route) and route.token.get_secret_value() == "secret"


def test_a_bad_route_is_refused_naming_each_field() -> None:
    with pytest.raises(ValidationError) as refused:
        TenantStoreRoute(
            instance="Influx DB",
            url="ftp://store",
            org="",
            bucket="b",
            token=SecretStr("x" * 5000),
            messages_per_second=float("nan"),
            max_age_s=0,
        )
    fields = {error["loc"][0] for error in refused.value.errors()}
    assert fields == {"instance", "url", "org", "token", "messages_per_second", "max_age_s"}


def test_writes_are_audited_idempotent_and_notify_once_per_statement(
    conn: psycopg.Connection, postgres_dsn: str
) -> None:
    stack = config()
    acme = stack.tenant("acme")
    route = tenant_route_for(stack, acme, URL, "token-1")
    with psycopg.connect(postgres_dsn, autocommit=True) as listener:
        tenant_routes.listen(listener)
        assert tenant_routes.upsert_tenant_route(conn, "acme", route, actor=ACTOR)
        assert not tenant_routes.upsert_tenant_route(conn, "acme", route, actor=ACTOR), "nothing changed"
        rotated = route.model_copy(update={"token": SecretStr("token-2"), "messages_per_second": 50.0})
        assert tenant_routes.upsert_tenant_route(conn, "acme", rotated, actor=ACTOR)
        assert [note.payload for note in listener.notifies(timeout=1.0)] == ["acme", "acme"]

        assert tenant_routes.tenant_routes(conn) == {"acme": rotated}
        assert tenant_routes.tenant_routes(conn, "globex") == {}
        assert tenant_routes.dead_letter_retention(conn) == {"acme": route.dead_letter_retention_s}

        events = [
            e for e in store.audit_events(conn, tenant_id="acme") if e.action.startswith("store_route.")
        ]
        assert [e.action for e in events] == ["store_route.created", "store_route.updated"]
        assert events[1].details["token_rotated"] is True
        assert events[1].details["after"] == {"messages_per_second": 50.0}
        assert not any("token-" in str(e.details) for e in events), "the trail never holds a token"

        assert tenant_routes.delete_tenant_route(conn, "acme", actor=ACTOR)
        assert not tenant_routes.delete_tenant_route(conn, "acme", actor=ACTOR)
        assert tenant_routes.upsert_tenant_route(conn, "acme", route, actor=ACTOR)
        assert store.remove_tenant(conn, "acme", actor=ACTOR)  # the route goes by ON DELETE CASCADE
        assert [note.payload for note in listener.notifies(timeout=1.0)] == ["acme"] * 3
        assert tenant_routes.tenant_routes(conn) == {}
    assert [e.action for e in store.audit_events(conn, tenant_id="acme")][-3:] == [
        "store_route.removed",
        "store_route.created",
        "tenant.removed",
    ]


def test_a_route_of_a_tenant_the_registry_lacks_is_refused_and_leaves_nothing(
    conn: psycopg.Connection,
) -> None:
    stack = config()
    route = tenant_route_for(stack, stack.tenant("acme"), URL, "")
    with pytest.raises(store.RegistryError, match=r"tenant_routes\[initech\]: tenant 'initech' is not in"):
        tenant_routes.upsert_tenant_route(conn, "initech", route, actor=ACTOR)
    assert tenant_routes.tenant_routes(conn) == {}
    assert not [e for e in store.audit_events(conn) if e.action.startswith("store_route.")]


@pytest.mark.xdist_group("postgres-cluster-roles")  # roles are the server's, not a database's
def test_the_brokers_role_cannot_read_the_tokens(postgres_dsn: str) -> None:
    """As components/render/postgres.py sets it up: SELECT on every table by default privileges."""
    with psycopg.connect(postgres_dsn, autocommit=True) as owner:
        owner.execute(f"CREATE ROLE {EMQX_ROLE}")
        try:
            owner.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {EMQX_ROLE}")
            apply_migrations(owner)
            readable = "SELECT has_table_privilege(%s, %s, 'SELECT')"
            assert owner.execute(readable, (EMQX_ROLE, "mqtt_acl")).fetchone() == (True,)
            assert owner.execute(readable, (EMQX_ROLE, "tenant_store_routes")).fetchone() == (False,)
        finally:  # roles are the cluster's: another test creates this one
            owner.execute(f"DROP OWNED BY {EMQX_ROLE}")
            owner.execute(f"DROP ROLE {EMQX_ROLE}")
