"""The registry against a real PostgreSQL: migrations, EMQX's queries, refusals and the audit trail."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from infra.config import Tenant
from infra.fleet import Fleet, Machine, Site, TenantFleet
from registry import migrate, store
from registry.access import access_rules
from registry.credentials import hash_password
from registry.fleet_import import import_fleet
from registry.queries import EMQX_AUTHN_QUERY, EMQX_AUTHZ_QUERY, EMQX_PASSWORD_HASH
from tests.fixtures.registry import Platform, platform

pytestmark = pytest.mark.integration

ACTOR = "tester@ci"
A_PRESS = "acme.plant-1.press-01"


@pytest.fixture
def conn(postgres_dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        yield connection


@pytest.fixture
def synced(conn: psycopg.Connection) -> Platform:
    """A migrated registry holding the two-tenant platform and every service credential."""
    fixture = platform()
    store.sync_platform(conn, fixture.config, actor=ACTOR)
    import_fleet(conn, fixture.fleet, actor=ACTOR)
    for tenant in fixture.config.tenants:
        username = f"svc.{tenant.id}"
        store.issue_service_credential(
            conn, username, fixture.hash_of(username), actor=ACTOR, tenant_id=tenant.id
        )
    for username in ("svc.ingest", "svc.deadletters"):
        store.issue_service_credential(conn, username, fixture.hash_of(username), actor=ACTOR)
    return fixture


def emqx(conn: psycopg.Connection, query: str, **values: str) -> list[tuple[Any, ...]]:
    """Run an EMQX query the way EMQX prepares it: each ``${name}`` becomes a bound parameter."""
    names = re.findall(r"\$\{(\w+)\}", query)
    return conn.execute(re.sub(r"\$\{\w+\}", "%s", query), [values[name] for name in names]).fetchall()


def emqx_accepts(row: tuple[Any, ...], password: str) -> bool:
    """EMQX's pbkdf2 check: derive with the configured algorithm, compare lowercase hex."""
    password_hash, salt, _ = row
    derived = hashlib.pbkdf2_hmac(
        EMQX_PASSWORD_HASH["mac_fun"],
        password.encode(),
        bytes(salt),
        EMQX_PASSWORD_HASH["iterations"],
        EMQX_PASSWORD_HASH["dk_length"],
    )
    return bool(derived.hex() == password_hash)


def actions(conn: psycopg.Connection, tenant_id: str | None = None) -> list[tuple[str, str]]:
    return [(event.action, event.subject) for event in store.audit_events(conn, tenant_id=tenant_id)]


# ------------------------------------------------------------------------------------- migrations
def test_migrations_apply_from_empty_and_a_second_time_do_nothing(conn: psycopg.Connection) -> None:
    versions = [m.version for m in migrate.migrations()]
    assert versions[:2] == [1, 2]
    assert migrate.applied_versions(conn) == []
    assert migrate.apply_migrations(conn) == versions
    assert migrate.apply_migrations(conn) == []
    assert migrate.applied_versions(conn) == versions
    tables = {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {
        "tenants",
        "sites",
        "machines",
        "devices",
        "service_accounts",
        "acl_rules",
        "audit_events",
    } <= tables


def test_a_failing_migration_leaves_nothing_behind(
    conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = migrate.Migration(1, "broken", "CREATE TABLE half_done (id int); SELECT no_such_function();")
    monkeypatch.setattr(migrate, "migrations", lambda: [broken])
    with pytest.raises(migrate.MigrationError, match="0001_broken failed"):
        migrate.apply_migrations(conn)
    assert conn.execute("SELECT to_regclass('half_done')").fetchone() == (None,)
    assert migrate.applied_versions(conn) == []


def test_an_edited_applied_migration_is_reported(conn: psycopg.Connection) -> None:
    migrate.apply_migrations(conn)
    conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
    with pytest.raises(migrate.MigrationError, match="0001_metadata was changed after it was applied"):
        migrate.apply_migrations(conn)


# ------------------------------------------------------------------------------------------- EMQX
def test_emqx_authentication_accepts_each_identity_only_with_its_password_and_client_id(
    conn: psycopg.Connection, synced: Platform
) -> None:
    for username, password in synced.passwords.items():
        rows = emqx(conn, EMQX_AUTHN_QUERY, username=username, clientid=username)
        assert len(rows) == 1, username
        assert emqx_accepts(rows[0], password), username
        assert not emqx_accepts(rows[0], password + "!"), username
        assert rows[0][2] is False, f"{username} must not be a superuser"
    assert len(emqx(conn, EMQX_AUTHN_QUERY, username="svc.ingest", clientid="svc.ingest-7f9c")) == 1, (
        "replica"
    )


@pytest.mark.parametrize(
    ("username", "clientid"),
    [
        (A_PRESS, "globex.line-a.molder-01"),  # a device borrowing another device's client id
        (A_PRESS, "svc.acme"),
        (A_PRESS, f"{A_PRESS}-2"),  # suffixes are for services only
        ("svc.globex", "svc.acme"),
        ("svc.globex", "svc.acme-1"),
        ("nobody", "nobody"),
        ("' OR '1'='1", "' OR '1'='1"),
    ],
)
def test_emqx_authentication_finds_nothing_for_borrowed_client_ids_or_strangers(
    conn: psycopg.Connection, synced: Platform, username: str, clientid: str
) -> None:
    assert emqx(conn, EMQX_AUTHN_QUERY, username=username, clientid=clientid) == []


def test_emqx_authorization_rows_are_the_access_rules_and_stay_within_the_tenant(
    conn: psycopg.Connection, synced: Platform
) -> None:
    expected: dict[str, set[tuple[str, str, str]]] = {}
    for rule in access_rules(synced.config, synced.fleet):
        expected.setdefault(rule.username, set()).add(("allow", rule.action, rule.topic))
    for username in synced.passwords:
        rows = set(emqx(conn, EMQX_AUTHZ_QUERY, username=username, clientid=username))
        assert rows == expected[username], username
    assert set(emqx(conn, EMQX_AUTHZ_QUERY, username=A_PRESS, clientid=A_PRESS)) == {
        ("allow", "publish", "ironlink/acme/plant-1/press-01/telemetry"),
        ("allow", "subscribe", "ironlink/acme/plant-1/press-01/receipts"),
    }
    for username in ("svc.acme", A_PRESS, "acme.plant-1.press-02"):
        for _, _, topic in emqx(conn, EMQX_AUTHZ_QUERY, username=username, clientid=username):
            assert topic.startswith(("ironlink/acme/", "dlq/ironlink/acme/")), (username, topic)
    assert emqx(conn, EMQX_AUTHZ_QUERY, username="nobody", clientid="nobody") == []


def test_issuing_a_service_credential_again_changes_nothing(
    conn: psycopg.Connection, synced: Platform
) -> None:
    (row,) = conn.execute("SELECT credential FROM service_accounts WHERE username = 'svc.acme'").fetchall()
    trail = store.audit_events(conn)
    assert not store.issue_service_credential(conn, "svc.acme", row[0], actor=ACTOR, tenant_id="acme")
    assert store.audit_events(conn) == trail
    assert store.issue_service_credential(
        conn, "svc.acme", hash_password("rotated"), actor=ACTOR, tenant_id="acme"
    )
    (row,) = emqx(conn, EMQX_AUTHN_QUERY, username="svc.acme", clientid="svc.acme")
    assert emqx_accepts(row, "rotated")
    assert store.audit_events(conn)[-1].action == "credential.issued"


def test_revoked_and_removed_credentials_stop_authenticating(
    conn: psycopg.Connection, synced: Platform
) -> None:
    assert store.revoke_credential(conn, A_PRESS, actor=ACTOR)
    assert emqx(conn, EMQX_AUTHN_QUERY, username=A_PRESS, clientid=A_PRESS) == []
    # Re-syncing the stack and re-importing the same fleet does not resurrect a revoked credential...
    store.sync_platform(conn, synced.config, actor=ACTOR)
    import_fleet(conn, synced.fleet, actor=ACTOR)
    assert emqx(conn, EMQX_AUTHN_QUERY, username=A_PRESS, clientid=A_PRESS) == []
    # ...a new one does.
    rotated = Fleet(
        tenants=[
            TenantFleet(
                id="acme",
                sites=[
                    Site(
                        id="plant-1",
                        machines=[
                            Machine(id="press-01", type="hydraulic_press", password_hash=hash_password("new"))
                        ],
                    )
                ],
            )
        ]
    )
    import_fleet(conn, rotated, actor=ACTOR)
    (row,) = emqx(conn, EMQX_AUTHN_QUERY, username=A_PRESS, clientid=A_PRESS)
    assert emqx_accepts(row, "new")
    # press-02 is not in that fleet, but an import never deletes: its identity and rules stay.
    press_02 = "acme.plant-1.press-02"
    assert len(emqx(conn, EMQX_AUTHN_QUERY, username=press_02, clientid=press_02)) == 1
    assert emqx(conn, EMQX_AUTHZ_QUERY, username=press_02, clientid=press_02) != []


def test_the_stack_sync_never_removes_the_fleet(conn: psycopg.Connection, synced: Platform) -> None:
    """The stack declares tenants only: syncing it again keeps every site, machine, device and rule."""
    before = {
        table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        for table in ("sites", "machines", "devices", "acl_rules")
    }
    store.sync_platform(conn, synced.config, actor=ACTOR)
    for tenant in synced.config.tenants:
        store.sync_tenant(conn, tenant, isolation=synced.config.isolation_of(tenant), actor=ACTOR)
    after = {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone() for table in before}
    assert after == before
    assert before["machines"] == (3,)


# --------------------------------------------------------------------------------------- refusals
def _tenant(**fields: Any) -> Tenant:
    """A tenant built without validation, as a careless caller of the registry might pass it."""
    values: dict[str, Any] = {
        "id": "initech",
        "name": "Initech",
        "tier": "basic",
        "isolation": None,
    }
    values.update(fields)
    return Tenant.model_construct(**values)


@pytest.mark.parametrize(
    ("tenant", "message"),
    [
        (_tenant(id="Acme Corp"), r"tenant\.id: 'Acme Corp' is not a valid tenant id"),
        (_tenant(id="ingest"), r"tenant\.id: 'ingest' is reserved"),
        (_tenant(id="x" * 33), r"tenant\.id: 'x{33}' is not a valid tenant id .*at most 32"),
        (_tenant(name=" "), r"tenant\.name: ' ' must not be empty"),
    ],
)
def test_malformed_and_duplicate_ids_are_refused_by_field_and_value(
    conn: psycopg.Connection, tenant: Tenant, message: str
) -> None:
    migrate.apply_migrations(conn)
    with pytest.raises(store.RegistryError, match=message):
        store.sync_tenant(conn, tenant, isolation=1, actor=ACTOR)
    assert store.tenant_ids(conn) == [], "a refused sync must leave nothing behind"
    assert store.audit_events(conn) == []


def test_duplicate_tenant_and_unknown_machine_are_refused(conn: psycopg.Connection, synced: Platform) -> None:
    acme = synced.config.tenant("acme")
    with pytest.raises(store.RegistryError, match=r"tenant\.id: 'acme' already exists in the registry"):
        store.sync_tenant(conn, acme, isolation=1, actor=ACTOR, must_be_new=True)
    with pytest.raises(
        store.RegistryError, match=r"tenants\[acme\]\.sites\[plant-1\]\.machines\[lathe-9\]: machine"
    ):
        store.issue_device_credential(conn, "acme", "plant-1", "lathe-9", hash_password("x"), actor=ACTOR)
    with pytest.raises(
        store.RegistryError, match=r"service_account\.username: 'ingest' is not a service username"
    ):
        store.issue_service_credential(conn, "ingest", hash_password("x"), actor=ACTOR)


def test_the_database_itself_refuses_bad_rows(conn: psycopg.Connection) -> None:
    """Constraints hold for any writer, not only for registry/store.py."""
    migrate.apply_migrations(conn)
    with pytest.raises(psycopg.errors.CheckViolation, match="tenants_id_format"):
        conn.execute("INSERT INTO tenants (id, name, tier, isolation) VALUES ('Bad_Id', 'x', 'basic', 1)")
    conn.execute("INSERT INTO tenants (id, name, tier, isolation) VALUES ('acme', 'Acme', 'basic', 1)")
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("INSERT INTO tenants (id, name, tier, isolation) VALUES ('acme', 'Acme 2', 'basic', 1)")
    with pytest.raises(psycopg.errors.CheckViolation, match="tenants_isolation_level"):
        conn.execute("UPDATE tenants SET isolation = 4 WHERE id = 'acme'")


# ------------------------------------------------------------------------------------------ audit
def test_provisioning_is_audited_once_and_removal_outlives_the_tenant(conn: psycopg.Connection) -> None:
    fixture = platform()
    store.sync_platform(conn, fixture.config, actor=ACTOR)
    import_fleet(conn, fixture.fleet, actor=ACTOR)
    assert actions(conn, "globex") == [
        ("tenant.created", "globex"),
        ("site.added", "line-a"),
        ("machine.added", "line-a/molder-01"),
        ("credential.issued", "globex.line-a.molder-01"),
    ]
    trail = store.audit_events(conn)
    assert [result.changes for result in store.sync_platform(conn, fixture.config, actor=ACTOR)] == [[], []]
    assert [result.changes for result in import_fleet(conn, fixture.fleet, actor=ACTOR)] == [[], []]
    assert store.audit_events(conn) == trail, "a second sync and import of the same records nothing"

    assert store.remove_tenant(conn, "globex", actor="sales@laptop")
    assert not store.remove_tenant(conn, "globex", actor="sales@laptop")
    removal = store.audit_events(conn, tenant_id="globex")[-1]
    assert (removal.action, removal.actor) == ("tenant.removed", "sales@laptop")
    assert removal.details == {"sites": 1, "machines": 1, "device_credentials": 1, "service_accounts": 0}
    assert store.tenant_ids(conn) == ["acme"]
    assert emqx(conn, EMQX_AUTHZ_QUERY, username="svc.globex", clientid="svc.globex") == []


def test_audit_trail_is_append_only(conn: psycopg.Connection) -> None:
    migrate.apply_migrations(conn)
    store.record_event(conn, actor=ACTOR, action="stack.deployed", subject="dev", details={"resources": 12})
    with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
        conn.execute("DELETE FROM audit_events")
    with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
        conn.execute("UPDATE audit_events SET actor = 'someone else'")
    with pytest.raises(store.RegistryError, match=r"audit_event\.action: 'Deployed!' is not an audit action"):
        store.record_event(conn, actor=ACTOR, action="Deployed!", subject="dev")
    (event,) = store.audit_events(conn)
    assert (event.actor, event.action, event.details) == (ACTOR, "stack.deployed", {"resources": 12})
