"""The registry dynamic provider against a real PostgreSQL: what ``pulumi up`` and ``destroy``
would do to a tenant's rows, through the provider object Pulumi would unpickle."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import dill
import psycopg
import pytest
from pulumi.dynamic.dynamic import serialize_provider

from components.providers.registry import RegistryServiceAccountProvider, RegistryTenantProvider
from infra.config import Tenant, parse_platform
from infra.fleet import Fleet, Machine, Site, TenantFleet
from infra.tenancy import INGEST_SERVICE, RECEIPTS_FILTER, TELEMETRY_FILTER
from registry import store
from registry.credentials import hash_password
from registry.fleet_import import import_fleet
from registry.queries import EMQX_AUTHN_QUERY, EMQX_AUTHZ_QUERY
from registry.tenant_routes import tenant_route_for, tenant_routes
from tests.test_registry import emqx, emqx_accepts

pytestmark = pytest.mark.integration

ACTOR = "pulumi:test"
PRESS = Machine(id="press-01", type="hydraulic_press", password_hash=hash_password("press-secret"))
FLEET = Fleet(tenants=[TenantFleet(id="acme", sites=[Site(id="plant-1", machines=[PRESS])])])


def acme(*machine_types: str, name: str = "Acme Manufacturing") -> Tenant:
    return Tenant(id="acme", name=name, tier="basic", machine_types=list(machine_types))


STORE_URL = "http://influxdb.ironlink.svc.cluster.local:8086"
PLATFORM = parse_platform({"phase": "B", "region": "test"})


def props(dsn: str, tenant: Tenant, isolation: int = 2, token: str = "write-token-1") -> dict[str, Any]:
    """The inputs as the engine hands them over: JSON values, numbers as floats."""
    return {
        "dsn": dsn,
        "tenant_id": tenant.id,
        "tenant": tenant.model_dump(mode="json"),
        "isolation": float(isolation),
        "actor": ACTOR,
        "route": tenant_route_for(PLATFORM, tenant, STORE_URL, "").model_dump(mode="json", exclude={"token"}),
        "write_token": token,
    }


@pytest.fixture
def provider() -> RegistryTenantProvider:
    """The provider as the engine gets it: pickled into state and loaded back."""
    return dill.loads(base64.b64decode(serialize_provider(RegistryTenantProvider())))


@pytest.fixture
def conn(postgres_dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        yield connection


def rows(conn: psycopg.Connection, query: str) -> list[tuple[Any, ...]]:
    return conn.execute(query).fetchall()


def test_create_migrates_an_empty_database_and_writes_the_tenant(
    provider: RegistryTenantProvider, postgres_dsn: str, conn: psycopg.Connection
) -> None:
    created = provider.create(props(postgres_dsn, acme("hydraulic_press")))
    assert created.id == "acme"
    assert rows(conn, "SELECT id, name, isolation FROM tenants") == [("acme", "Acme Manufacturing", 2)]
    assert rows(conn, "SELECT count(*) FROM machines") == [(0,)], "the stack declares no fleet"
    (route,) = tenant_routes(conn).values()  # what the platform's worker follows
    assert (route.url, route.bucket, route.token.get_secret_value()) == (
        STORE_URL,
        "acme-telemetry",
        "write-token-1",
    )
    actions = [(e.actor, e.action, e.subject) for e in store.audit_events(conn, tenant_id="acme")]
    assert (ACTOR, "tenant.created", "acme") in actions


def test_update_keeps_the_fleet_it_did_not_create(
    provider: RegistryTenantProvider, postgres_dsn: str, conn: psycopg.Connection
) -> None:
    before = props(postgres_dsn, acme("hydraulic_press"))
    provider.create(before)
    import_fleet(conn, FLEET, actor="provisioning")
    after = props(postgres_dsn, acme("hydraulic_press", "cnc_mill", name="Acme Industries"))
    diff = provider.diff("acme", before, after)
    assert (diff.changes, diff.replaces) == (True, [])
    provider.update("acme", before, after)
    assert rows(conn, "SELECT id, type FROM machines ORDER BY id") == [("press-01", "hydraulic_press")]
    assert rows(conn, "SELECT username, revoked_at FROM devices") == [("acme.plant-1.press-01", None)]
    assert len(emqx(conn, EMQX_AUTHZ_QUERY, username="acme.plant-1.press-01", clientid="x")) == 2
    assert store.audit_events(conn, tenant_id="acme")[-1].action == "tenant.updated"


def test_an_unchanged_tenant_diffs_clean_and_a_new_id_replaces(postgres_dsn: str) -> None:
    provider = RegistryTenantProvider()
    same = provider.diff("acme", props(postgres_dsn, acme("cnc_mill")), props(postgres_dsn, acme("cnc_mill")))
    assert same.changes is False
    renamed = Tenant(id="acme-2", name="Acme Manufacturing", tier="basic")
    moved = provider.diff("acme", props(postgres_dsn, acme()), props(postgres_dsn, renamed))
    assert moved.replaces == ["tenant_id"]


def test_delete_removes_every_row_and_keeps_the_audit_trail(
    provider: RegistryTenantProvider, postgres_dsn: str, conn: psycopg.Connection
) -> None:
    state = props(postgres_dsn, acme())
    provider.create(state)
    import_fleet(conn, FLEET, actor="provisioning")
    provider.delete("acme", state)
    assert rows(conn, "SELECT count(*) FROM tenants") == [(0,)]
    assert rows(conn, "SELECT count(*) FROM devices") == [(0,)]
    assert store.audit_events(conn, tenant_id="acme")[-1].action == "tenant.removed"
    assert provider.read("acme", state).id == "", "a removed tenant reads as gone"


def test_create_adopts_rows_a_local_tool_wrote_without_duplicating_them(
    provider: RegistryTenantProvider, postgres_dsn: str, conn: psycopg.Connection
) -> None:
    provider.create(props(postgres_dsn, acme()))
    events = len(store.audit_events(conn))
    provider.create(props(postgres_dsn, acme()))
    assert len(store.audit_events(conn)) == events, "an identical sync records nothing"
    assert provider.read("acme", props(postgres_dsn, acme())).id == "acme"


def test_a_bad_tenant_fails_check_and_create_naming_the_value_and_writes_nothing(
    provider: RegistryTenantProvider, postgres_dsn: str, conn: psycopg.Connection
) -> None:
    bad = props(postgres_dsn, acme("hydraulic_press"))
    bad["tenant"]["machine_types"][0] = "Hydraulic Press"  # unknown to the catalog
    failures = provider.check({}, bad).failures
    assert [f.property for f in failures] == ["tenant.machine_types.0"]
    assert "'Hydraulic Press'" in failures[0].reason
    with pytest.raises(ValueError, match="Hydraulic Press"):
        provider.create(bad)
    assert rows(conn, "SELECT to_regclass('tenants')") == [(None,)], "refused before connecting"


def test_check_names_missing_inputs_and_a_bad_isolation(postgres_dsn: str) -> None:
    news = {**props(postgres_dsn, acme()), "dsn": "", "isolation": 4.0}
    failures = {f.property: f.reason for f in RegistryTenantProvider().check({}, news).failures}
    assert set(failures) == {"dsn", "isolation"}
    assert "4.0" in failures["isolation"]


def test_the_worker_account_signs_in_and_may_read_telemetry_once_created_and_not_after_delete(
    postgres_dsn: str, conn: psycopg.Connection
) -> None:
    """What EMQX asks the registry for svc.ingest, through the provider the platform declares."""

    service = dill.loads(base64.b64decode(serialize_provider(RegistryServiceAccountProvider())))
    props = {
        "dsn": postgres_dsn,
        "actor": "pulumi",
        "username": INGEST_SERVICE,
        "password_hash": hash_password("worker-secret"),
    }
    created = service.create(props)
    assert created.id == INGEST_SERVICE

    signin = emqx(conn, EMQX_AUTHN_QUERY, username=INGEST_SERVICE, clientid=INGEST_SERVICE)
    assert len(signin) == 1 and emqx_accepts(signin[0], "worker-secret")
    assert not emqx_accepts(signin[0], "wrong")
    rules = {
        (action, topic)
        for _, action, topic in emqx(conn, EMQX_AUTHZ_QUERY, username=INGEST_SERVICE, clientid=INGEST_SERVICE)
    }
    assert ("subscribe", TELEMETRY_FILTER) in rules
    published = {topic for action, topic in rules if action == "publish"}
    assert published == {"dlq/#", RECEIPTS_FILTER, "drain/#"}, "dead letters, receipts, its drain marker"

    service.delete(INGEST_SERVICE, props)
    assert emqx(conn, EMQX_AUTHN_QUERY, username=INGEST_SERVICE, clientid=INGEST_SERVICE) == []
