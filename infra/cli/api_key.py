"""``ironlink api-key create|list|revoke``: the Ironlink API's keys, in the registry.

A key is shown once, by ``create``; the registry keeps only its digest. A key reads one tenant, or
one site of it with ``--site``, and expires after ``--days`` (at most 366). Creating and revoking
are audit events under the operator's name. Bad input exits 2 naming each option; an unreachable
registry exits 1.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Annotated

import typer
from rich.table import Table

from infra.cli import app
from infra.cli.common import RegistryOption, check_tenant, console, fail, migrated_registry, refuse

api_key_app = typer.Typer(help="Create, list and revoke the Ironlink API's keys.", no_args_is_help=True)
app.add_typer(api_key_app, name="api-key")

MAX_DAYS = 366
"""``registry.api_keys.MAX_LIFETIME`` in days (repeated so the help needs no registry import)."""
_ID = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")
TenantOption = Annotated[str, typer.Option("--tenant", help="The tenant the key reads.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _checked(registry: str | None, tenant: str, problems: list[str]) -> str:
    if not registry:
        problems.append("--registry: is required (a PostgreSQL DSN, or set IRONLINK_REGISTRY_DSN)")
    check_tenant(tenant, problems)
    refuse(problems)
    assert registry is not None
    return registry


def _actor() -> str:
    from registry.store import default_actor

    return f"{default_actor()} (ironlink cli)"


@api_key_app.command("create")
def create(
    tenant: TenantOption,
    site: Annotated[str | None, typer.Option("--site", help="Only this site (a site key).")] = None,
    days: Annotated[int, typer.Option("--days", help=f"Days until it expires (1-{MAX_DAYS}).")] = 90,
    label: Annotated[str, typer.Option("--label", help="What the key is for (at most 128 characters).")] = "",
    registry: RegistryOption = None,
    as_json: JsonOption = False,
) -> None:
    """Mint a key and print it once (only its digest is stored)."""
    problems = []
    if site is not None and not (_ID.match(site) and len(site) <= 32):
        problems.append(f"--site: {site[:80]!r} is not a site id (lowercase letters, digits, '-')")
    if not 1 <= days <= MAX_DAYS:
        problems.append(f"--days: {days} is not between 1 and {MAX_DAYS}")
    if len(label) > 128:
        problems.append(f"--label: has {len(label)} characters, at most 128")
    dsn = _checked(registry, tenant, problems)
    from registry.api_keys import create_api_key
    from registry.provisioning import Refused

    with migrated_registry(dsn) as conn:
        try:
            key, plaintext = create_api_key(
                conn, tenant, site_id=site, label=label, lifetime=timedelta(days=days), actor=_actor()
            )
        except Refused as refused:
            fail(f"{'--site' if refused.code == 'site_unknown' else '--tenant'}: {refused.detail}")
    if as_json:
        document = {"id": key.id, "key": plaintext, "tenant_id": key.tenant_id, "site_id": key.site_id}
        console.print_json(json.dumps({**document, "expires_at": key.expires_at.isoformat()}))
        return
    scope = (
        f"site {key.site_id!r} of tenant {key.tenant_id!r}" if key.site_id else f"tenant {key.tenant_id!r}"
    )
    console.print(
        f"API key {key.id} for {scope}, expires {key.expires_at:%Y-%m-%d %H:%M} UTC.", highlight=False
    )
    console.print("Shown once; store it now:", highlight=False)
    console.print(plaintext, highlight=False, soft_wrap=True)


@api_key_app.command("list")
def list_keys(tenant: TenantOption, registry: RegistryOption = None, as_json: JsonOption = False) -> None:
    """The tenant's keys (never their secrets), revoked and expired ones included."""
    dsn = _checked(registry, tenant, [])
    from registry.api_keys import list_api_keys

    with migrated_registry(dsn) as conn:
        keys = list_api_keys(conn, tenant)
    rows = [
        {
            "id": key.id,
            "site_id": key.site_id,
            "label": key.label,
            "created_by": key.created_by,
            "created_at": key.created_at.isoformat(),
            "expires_at": key.expires_at.isoformat(),
            "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
        }
        for key in keys
    ]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table("id", "site", "label", "created", "expires", "revoked")
    for key in keys:
        table.add_row(
            key.id,
            key.site_id or "(all)",
            key.label,
            f"{key.created_at:%Y-%m-%d %H:%M}",
            f"{key.expires_at:%Y-%m-%d %H:%M}",
            f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "",
        )
    console.print(table)


@api_key_app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (its second part: ilk-api.<id>.…).")],
    tenant: TenantOption,
    registry: RegistryOption = None,
) -> None:
    """Revoke a key: the API refuses it (401 api_key_revoked) from its next request."""
    problems = [] if _KEY_ID.match(key_id) else [f"KEY_ID: {key_id[:80]!r} is not a key id (16 hex digits)"]
    dsn = _checked(registry, tenant, problems)
    from registry.api_keys import revoke_api_key
    from registry.provisioning import Refused

    with migrated_registry(dsn) as conn:
        try:
            revoked = revoke_api_key(conn, tenant, key_id, actor=_actor())
        except Refused as refused:
            fail(f"KEY_ID: {refused.detail}")
    console.print(f"API key {key_id} {'revoked' if revoked else 'was revoked already'}.", highlight=False)
