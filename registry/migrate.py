"""Versioned schema migrations for the registry database.

Migrations are the files ``registry/migrations/NNNN_<name>.sql``, applied in version order, each in
its own transaction together with its row in ``schema_migrations``; a failing migration leaves
nothing behind. Applying is idempotent and safe to run concurrently (the CLI, ``ironlink dev`` and
the Pulumi provider all call it before use): an advisory lock serialises appliers, and a migration
whose file changed after it was applied is reported instead of silently skipped. Every run ends
by giving the service roles exactly their privileges (:mod:`registry.roles`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import psycopg

from registry.roles import converge_privileges

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# An arbitrary constant naming "the Ironlink registry migration lock" for pg_advisory_xact_lock.
_LOCK_KEY = 0x1A0_11_4B


class MigrationError(RuntimeError):
    """A migration could not be applied, or an applied one no longer matches its file."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations() -> list[Migration]:
    """The packaged migrations in version order."""
    found = []
    for entry in resources.files("registry.migrations").iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version: {versions}")
    return found


_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def apply_migrations(conn: psycopg.Connection) -> list[int]:
    """Apply every pending migration; returns the versions applied by this call.

    ``conn`` must not be inside a transaction: each migration commits on its own.
    """
    applied_now: list[int] = []
    for migration in migrations():
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            conn.execute(_CREATE_TABLE)
            row = conn.execute(
                "SELECT checksum FROM schema_migrations WHERE version = %s", (migration.version,)
            ).fetchone()
            if row is not None:
                if row[0] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} was changed after it was "
                        "applied; add a new migration instead of editing an applied one"
                    )
                continue
            try:
                conn.execute(migration.sql)
            except psycopg.Error as error:
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name} failed: {error}"
                ) from error
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            applied_now.append(migration.version)
    with conn.transaction():  # concurrent GRANTs on one table fail: under the same lock
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        converge_privileges(conn)
    return applied_now


def applied_versions(conn: psycopg.Connection) -> list[int]:
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return []
    return [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
