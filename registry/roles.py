"""The ingest worker's registry role and exactly the table privileges it has.

The worker reads the fleet and the store routes (with their write tokens: it writes the points)
and writes gap records (``0007``) and usage (``0011``); it never reads API keys, alert sources,
routes (webhook URLs are credentials), maintenance notes, provisioning secrets or the audit
trail. :data:`INGEST_PRIVILEGES` is that list, as an allow-list: :func:`converge_privileges`
grants what is missing and revokes whatever else the role holds on the schema's tables, so a
table added later stays closed to the worker until it is named here, unlike a default
privilege that opens every future table.

:func:`registry.migrate.apply_migrations` converges after every run (under the migration lock:
concurrent ``GRANT`` on one table fails in PostgreSQL), whichever came first, the role or the
tables: the cluster's first-start script (:mod:`components.render.postgres`), the RDS roles
resource (:mod:`components.providers.database_roles`) and ``ironlink dev`` create the role, and
any writer's next migration run gives it its privileges. A database without the role is left
alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import psycopg
from psycopg import sql

INGEST_ROLE = "ingest"
"""The ingest worker's login role."""

_READ = frozenset({"SELECT"})
_UPSERT = frozenset({"SELECT", "INSERT", "UPDATE"})  # ON CONFLICT DO UPDATE ... RETURNING
_JOURNAL = frozenset({"SELECT", "INSERT", "DELETE"})  # insert once, prune by age
INGEST_PRIVILEGES: Mapping[str, frozenset[str]] = {
    "machines": _READ,  # registry/fleet.py: which machines exist, of which type
    "tenant_store_routes": _READ,  # registry/tenant_routes.py: where each tenant's points go
    "telemetry_gaps": _UPSERT,  # registry/gaps.py
    "usage_points": _JOURNAL,  # registry/usage.py: a point counted once, pruned after `keep`
    "usage_active_machines": _JOURNAL,
    "usage_active_sites": _JOURNAL,
    "usage_hourly": _UPSERT,
    "usage_quota_flags": _UPSERT,
}
SERVICE_PRIVILEGES: Mapping[str, Mapping[str, frozenset[str]]] = {INGEST_ROLE: INGEST_PRIVILEGES}
"""Role -> table -> privileges: everything the role may do in the registry database."""


def role_exists(conn: psycopg.Connection, role: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


def converge_privileges(conn: psycopg.Connection) -> None:
    """Give each existing service role exactly its :data:`SERVICE_PRIVILEGES` on the tables that
    exist (a table of a migration not applied yet is granted once it is), revoking the rest.
    Statements run only for a difference, so a settled database sees no catalog write."""
    tables = {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    for role, wanted in SERVICE_PRIVILEGES.items():
        if not role_exists(conn, role):
            continue
        (connects, uses) = conn.execute(
            "SELECT has_database_privilege(%s, current_database(), 'CONNECT'),"
            " has_schema_privilege(%s, 'public', 'USAGE')",
            (role, role),
        ).fetchone() or (False, False)
        if not connects:
            grant = "GRANT CONNECT ON DATABASE {} TO {}"
            conn.execute(sql.SQL(grant).format(sql.Identifier(conn.info.dbname), sql.Identifier(role)))
        if not uses:
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(sql.Identifier(role)))
        held: dict[str, set[str]] = {}
        for table, privilege in conn.execute(
            "SELECT table_name, privilege_type FROM information_schema.table_privileges"
            " WHERE grantee = %s AND table_schema = 'public'",
            (role,),
        ):
            held.setdefault(table, set()).add(privilege)
        for table in sorted(tables | set(held)):
            has, needs = held.get(table, set()), set(wanted.get(table, ()))
            if has - needs:
                _alter(conn, "REVOKE {} ON {} FROM {}", has - needs, table, role)
            if needs - has:
                _alter(conn, "GRANT {} ON {} TO {}", needs - has, table, role)


def _alter(conn: psycopg.Connection, statement: str, privileges: set[str], table: str, role: str) -> None:
    conn.execute(
        sql.SQL(statement).format(
            sql.SQL(", ").join(sql.SQL(privilege) for privilege in sorted(privileges)),
            sql.Identifier(table),
            sql.Identifier(role),
        )
    )
