"""The registry's least-privilege roles on a database Ironlink did not initialise (RDS).

The in-cluster image creates the ``emqx`` and ``grafana`` roles with its first-start script
(:func:`components.render.postgres.render_init_script`); RDS runs no such script, so this dynamic
resource runs the same statements through the owner's DSN, idempotently: a role that exists gets
its password set again, a database that exists is kept. On PostgreSQL 16 the owner must be able
to ``SET ROLE grafana`` to create a database it owns, hence the grant to the current user.

Delete drops nothing: the roles live and die with the database, which is retained on delete.

``RegistryServiceRole`` is a platform service's login role (the ingest worker's,
:data:`registry.roles.INGEST_ROLE`) on either database, the in-cluster one and RDS: created or
given its password again, then the migrations are applied, which give it exactly its privileges
(:mod:`registry.roles`). It is not a first-start role, so a deployed database gets it too.
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
from registry.migrate import apply_migrations
from registry.roles import SERVICE_PRIVILEGES

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


SERVICE_REQUIRED = ("dsn", "role", "password")


def ensure_service_role(dsn: str, role: str, password: str) -> None:
    """``role`` logs in with ``password`` and holds exactly its privileges (:mod:`registry.roles`)."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        _login_role(conn, role, password)
        apply_migrations(conn)


class RegistryServiceRoleProvider(ResourceProvider):
    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        failures = [CheckFailure(key, "is required") for key in SERVICE_REQUIRED if not news.get(key)]
        if news.get("role") and news["role"] not in SERVICE_PRIVILEGES:
            failures.append(
                CheckFailure("role", f"{news['role']!r} is not one of {sorted(SERVICE_PRIVILEGES)}")
            )
        return CheckResult(news, failures)

    def create(self, props: dict[str, Any]) -> CreateResult:
        ensure_service_role(*(str(props[key]) for key in SERVICE_REQUIRED))
        return CreateResult(str(props["role"]), props)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        # "privileges" in the inputs: a release that changes a role's list re-converges it.
        return plan_diff(olds, news, replace=(), update=(*SERVICE_REQUIRED, "privileges"))

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        ensure_service_role(*(str(news[key]) for key in SERVICE_REQUIRED))
        return UpdateResult(news)


class RegistryServiceRole(Resource, module="registry", name="ServiceRole"):
    role: pulumi.Output[str]
    """The role's name, once it exists (a DSN built from it waits for the role)."""

    def __init__(
        self,
        name: str,
        *,
        dsn: pulumi.Input[str],
        role: str,
        password: pulumi.Input[str],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        props = {
            "dsn": pulumi.Output.secret(dsn),
            "role": role,
            "password": pulumi.Output.secret(password),
            "privileges": {table: sorted(grants) for table, grants in SERVICE_PRIVILEGES[role].items()},
        }
        super().__init__(RegistryServiceRoleProvider(), name, props, opts)


def service_dsn(
    role: RegistryServiceRole, password: pulumi.Input[str], host: pulumi.Input[str], port: int, database: str
) -> pulumi.Output[str]:
    """``postgresql://<role>:<password>@host:port/database`` (secret), shaped as the owner's DSN."""
    return pulumi.Output.secret(
        pulumi.Output.concat("postgresql://", role.role, ":", password, "@", host, f":{port}/{database}")
    )
