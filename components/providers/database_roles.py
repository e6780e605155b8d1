"""The registry's least-privilege roles on a database Ironlink did not initialise (RDS).

The in-cluster image creates the ``emqx`` and ``grafana`` roles with its first-start script
(:func:`components.render.postgres.render_init_script`); RDS runs no such script, so this dynamic
resource runs the same statements through the owner's DSN, idempotently: a role that exists gets
its password set again, a database that exists is kept. On PostgreSQL 16 the owner must be able
to ``SET ROLE grafana`` to create a database it owns, hence the grant to the current user.

Delete drops nothing: the roles live and die with the database, which is retained on delete.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pulumi
from psycopg import sql
from pulumi.dynamic import (
    CheckFailure,
    CheckResult,
    CreateResult,
    DiffResult,
    Resource,
    ResourceProvider,
    UpdateResult,
)

from components.providers import plan_diff
from components.render.postgres import EMQX_ROLE, GRAFANA_DATABASE, GRAFANA_ROLE

CONNECT_TIMEOUT_S = 15
REQUIRED = ("dsn", "owner", "database", "emqx_password", "grafana_password")


def _login_role(conn: psycopg.Connection, role: str, password: str) -> None:
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    verb = "ALTER" if exists else "CREATE"
    conn.execute(
        sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password))
    )


def ensure_roles(dsn: str, owner: str, database: str, emqx_password: str, grafana_password: str) -> None:
    """``emqx`` may read the registry's tables, ``grafana`` owns the ``grafana`` database."""
    emqx, grafana = sql.Identifier(EMQX_ROLE), sql.Identifier(GRAFANA_ROLE)
    with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        _login_role(conn, EMQX_ROLE, emqx_password)
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), emqx))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(emqx))
        conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(emqx))
        conn.execute(
            sql.SQL(
                "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA public GRANT SELECT ON TABLES TO {}"
            ).format(sql.Identifier(owner), emqx)
        )
        _login_role(conn, GRAFANA_ROLE, grafana_password)
        conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(grafana))
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (GRAFANA_DATABASE,)).fetchone()
        if not found:
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(GRAFANA_DATABASE), grafana)
            )


class RegistryRolesProvider(ResourceProvider):
    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        return CheckResult(news, [CheckFailure(key, "is required") for key in REQUIRED if not news.get(key)])

    def create(self, props: dict[str, Any]) -> CreateResult:
        ensure_roles(*(str(props[key]) for key in REQUIRED))
        return CreateResult(f"{props['database']}-roles", props)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        return plan_diff(olds, news, replace=(), update=REQUIRED)

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        ensure_roles(*(str(news[key]) for key in REQUIRED))
        return UpdateResult(news)


class RegistryRoles(Resource, module="registry", name="Roles"):
    def __init__(
        self,
        name: str,
        *,
        dsn: pulumi.Input[str],
        owner: str,
        database: str,
        emqx_password: pulumi.Input[str],
        grafana_password: pulumi.Input[str],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        props = {
            "dsn": pulumi.Output.secret(dsn),
            "owner": owner,
            "database": database,
            "emqx_password": pulumi.Output.secret(emqx_password),
            "grafana_password": pulumi.Output.secret(grafana_password),
        }
        super().__init__(RegistryRolesProvider(), name, props, opts)
