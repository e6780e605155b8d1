"""Move a fleet (sites, machines, device credentials) into the registry: ``ironlink fleet import``
and the dev platform's demo fleet go through :func:`import_fleet`.

It only adds and updates, never deletes: a machine the registry has and the fleet lacks stays (it
may have been enrolled since). Idempotent: a second import changes nothing and records nothing. A
device whose stored credential is the fleet's hash is left as it is, revoked or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg

from infra.fleet import Fleet, TenantFleet
from infra.tenancy import device_username
from registry.provisioning import store_device
from registry.store import RegistryError, record_event


@dataclass
class ImportResult:
    """What one tenant's import changed, as ``<action> <subject>`` lines (empty: nothing)."""

    tenant_id: str
    changes: list[str] = field(default_factory=list)


def import_fleet(conn: psycopg.Connection, fleet: Fleet, *, actor: str) -> list[ImportResult]:
    """Write every site, machine and device credential of ``fleet`` in one transaction.

    Its tenants must already be in the registry (the stack's sync puts them there); a missing one
    refuses the whole import, naming it, before anything is written.
    """
    known = {row[0] for row in conn.execute("SELECT id FROM tenants")}
    missing = [tenant.id for tenant in fleet.tenants if tenant.id not in known]
    if missing:
        raise RegistryError(
            f"tenants: {', '.join(repr(t) for t in missing)} not in the registry "
            "(sync the stack's tenants first: `pulumi up`, or `ironlink tenant add --registry`)"
        )
    with conn.transaction():
        return [_import_tenant(conn, tenant, actor) for tenant in fleet.tenants]


def _import_tenant(conn: psycopg.Connection, tenant: TenantFleet, actor: str) -> ImportResult:
    result = ImportResult(tenant.id)

    def record(action: str, subject: str, **details: object) -> None:
        record_event(conn, actor=actor, action=action, subject=subject, tenant_id=tenant.id, details=details)
        result.changes.append(f"{action} {subject}")

    sites: dict[str, str | None] = dict(
        conn.execute("SELECT id, name FROM sites WHERE tenant_id = %s", (tenant.id,)).fetchall()
    )
    for site in tenant.sites:
        if site.id not in sites:
            conn.execute(
                "INSERT INTO sites (tenant_id, id, name) VALUES (%s, %s, %s)", (tenant.id, site.id, site.name)
            )
            record("site.added", site.id, name=site.name)
        elif site.name is not None and sites[site.id] != site.name:
            conn.execute(
                "UPDATE sites SET name = %s WHERE tenant_id = %s AND id = %s", (site.name, tenant.id, site.id)
            )
            record("site.updated", site.id, before={"name": sites[site.id]}, after={"name": site.name})

    rows = conn.execute(
        "SELECT site_id, id, type FROM machines WHERE tenant_id = %s", (tenant.id,)
    ).fetchall()
    machines = {(site_id, machine_id): kind for site_id, machine_id, kind in rows}
    credentials: dict[str, str] = dict(
        conn.execute("SELECT username, credential FROM devices WHERE tenant_id = %s", (tenant.id,)).fetchall()
    )
    for site, machine in tenant.machines:
        subject = f"{site.id}/{machine.id}"
        stored_type = machines.get((site.id, machine.id))
        if stored_type is None:
            conn.execute(
                "INSERT INTO machines (tenant_id, site_id, id, type) VALUES (%s, %s, %s, %s)",
                (tenant.id, site.id, machine.id, machine.type),
            )
            record("machine.added", subject, type=machine.type)
        elif stored_type != machine.type:
            conn.execute(
                "UPDATE machines SET type = %s WHERE tenant_id = %s AND site_id = %s AND id = %s",
                (machine.type, tenant.id, site.id, machine.id),
            )
            record("machine.updated", subject, before={"type": stored_type}, after={"type": machine.type})
        username = device_username(tenant.id, site.id, machine.id)
        if machine.password_hash is None or credentials.get(username) == machine.password_hash:
            continue
        store_device(conn, tenant.id, site.id, machine.id, credential=machine.password_hash, replace=True)
        record("credential.issued", username, rotated=username in credentials, source="fleet_import")
    return result
