"""The fleet as the ingest worker reads it: every machine and its type, and the channel that says
when it changed (migration ``0005_fleet_notify.sql``).

Read only; the writes are ``registry.store`` (stack sync) and ``registry.provisioning`` (runtime),
whose statements fire the triggers that NOTIFY :data:`FLEET_CHANNEL` with the tenant id.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

FLEET_CHANNEL = "ironlink_fleet"
MachineTypes = dict[tuple[str, str, str], str]
"""``(tenant, site, machine) -> machine type``, the shape ``ingest.contract.decode`` reads."""

_ALL = "SELECT tenant_id, site_id, id, type FROM machines"
_ONE_TENANT = _ALL + " WHERE tenant_id = %s"


def machine_types(conn: psycopg.Connection, tenant_id: str | None = None) -> MachineTypes:
    """Every machine (or one tenant's) in one query. Tenant, site and type strings repeat across
    thousands of machines: each distinct one is kept once, which halves the map's memory."""
    same: dict[str, str] = {}
    one = same.setdefault
    with conn.cursor() as cursor:
        if tenant_id is None:
            cursor.execute(_ALL)
        else:
            cursor.execute(_ONE_TENANT, (tenant_id,))
        return {
            (one(tenant, tenant), one(site, site), machine): one(kind, kind)
            for tenant, site, machine, kind in cursor
        }


def listen(conn: psycopg.Connection) -> None:
    """Subscribe ``conn`` (autocommit) to fleet changes; read them with ``conn.notifies()``."""
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(FLEET_CHANNEL)))
