"""The ingest worker's registry role on the real PostgreSQL: it can do what the worker does (read
the fleet and store routes, write gap records and usage) and nothing else: no API key, alert
source, route, maintenance note, provisioning secret or audit event; a privilege granted by hand
is taken back, and a role made after the tables gets its privileges at the next migration run."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from infra.config import parse_platform
from registry import fleet, provisioning, store, tenant_routes
from registry.gaps import GapRow, upsert_gaps
from registry.migrate import apply_migrations
from registry.roles import INGEST_PRIVILEGES, INGEST_ROLE
from registry.usage import UsageEvent, flag_quota, month_messages, month_start, prune_usage, record_usage
from tests.conftest import PostgresCluster

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("postgres-cluster-roles")]
ACTOR = "test"
CONFIG = parse_platform(
    {"phase": "A", "region": "test", "tenants": [{"id": "acme", "name": "Acme", "tier": "basic"}]}, "roles"
)
CLOSED = [
    "api_keys",
    "alert_webhook_sources",
    "alert_routes",
    "alert_events",
    "alert_deliveries",
    "maintenance_entries",
    "audit_events",
    "admin_tokens",
    "claim_tokens",
    "devices",
    "service_accounts",
    "tenants",
    "dead_letters",
]


def _drop_role(cluster: PostgresCluster) -> None:
    """The role is the server's: its privileges go in every database (another test's migration run
    may have granted some while it existed), then the role."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        databases = [row[0] for row in admin.execute("SELECT datname FROM pg_database WHERE datallowconn")]
    for database in databases:
        with psycopg.connect(cluster.dsn(database), autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {INGEST_ROLE}")
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP ROLE {INGEST_ROLE}")


@pytest.fixture
def ingest_role(postgres_cluster: PostgresCluster) -> Iterator[None]:
    with psycopg.connect(postgres_cluster.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {INGEST_ROLE} LOGIN")
    try:
        yield
    finally:
        _drop_role(postgres_cluster)


def seeded(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as owner:
        apply_migrations(owner)
        store.sync_platform(owner, CONFIG, actor=ACTOR)
        provisioning.add_site(owner, "acme", "plant-1", None, actor=ACTOR)
        provisioning.add_machine(owner, "acme", "plant-1", "press-01", "hydraulic_press", actor=ACTOR)


def as_worker(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn.replace("user=postgres", f"user={INGEST_ROLE}"), autocommit=True)


def test_the_workers_role_writes_gaps_and_usage_and_reads_no_key_token_or_note(
    postgres_dsn: str, ingest_role: None
) -> None:
    seeded(postgres_dsn)
    now = datetime.now(UTC).replace(microsecond=0)
    gap = GapRow("acme", "plant-1", "press-01", "gw-1", 7, 10, 19, "cap_bytes", 10, now, now, now)
    hour = int(now.timestamp()) // 3600 * 3600
    events = [UsageEvent("acme", "plant-1", "press-01", 1000 * hour + n, hour, 1, 100) for n in range(3)]
    with as_worker(postgres_dsn) as worker:
        assert list(fleet.machine_types(worker).values()) == ["hydraulic_press"]
        assert tenant_routes.tenant_routes(worker) == {}
        fleet.listen(worker)
        with worker.transaction():
            assert upsert_gaps(worker, [gap]) == [10]
        with worker.transaction():
            assert upsert_gaps(worker, [gap]) == [0], "a resend updates its row"
        assert record_usage(worker, events) == 3
        assert record_usage(worker, events) == 0
        assert month_messages(worker, month_start(now)) == {"acme": 3}
        assert flag_quota(worker, "acme", month_start(now), 4, "soft")
        assert prune_usage(worker, timedelta(days=1)) == 0

        for table in CLOSED:
            with pytest.raises(psycopg.errors.InsufficientPrivilege), worker.transaction():
                worker.execute(f"SELECT 1 FROM {table} LIMIT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege), worker.transaction():
            worker.execute("UPDATE tenant_store_routes SET token = 'mine'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege), worker.transaction():
            worker.execute("DELETE FROM telemetry_gaps")


def test_privileges_converge_to_the_list_whichever_came_first(
    postgres_dsn: str, postgres_cluster: PostgresCluster
) -> None:
    seeded(postgres_dsn)  # the tables first, the role after: the next run grants it
    with psycopg.connect(postgres_cluster.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {INGEST_ROLE} LOGIN")
    try:
        with psycopg.connect(postgres_dsn, autocommit=True) as owner:
            apply_migrations(owner)
            owner.execute(f"GRANT SELECT, INSERT ON api_keys, alert_routes TO {INGEST_ROLE}")  # by hand
            owner.execute(f"GRANT DELETE ON tenant_store_routes TO {INGEST_ROLE}")
            apply_migrations(owner)
            held: dict[str, set[str]] = {}
            for table, privilege in owner.execute(
                "SELECT table_name, privilege_type FROM information_schema.table_privileges"
                " WHERE grantee = %s",
                (INGEST_ROLE,),
            ):
                held.setdefault(table, set()).add(privilege)
        assert held == {table: set(privileges) for table, privileges in INGEST_PRIVILEGES.items()}
    finally:
        _drop_role(postgres_cluster)
