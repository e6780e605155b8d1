"""``ironlink provisioning token create`` (the first platform admin token, straight into the
registry) and ``ironlink claim create`` (a claim token through the provisioning API, with its QR
code in the terminal). Heavy modules are imported only when a command runs."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from infra.cli import app
from infra.cli.common import console, fail

provisioning_app = typer.Typer(help="The provisioning service's admin tokens.", no_args_is_help=True)
token_app = typer.Typer(help="Admin tokens (stored as hashes, shown once).", no_args_is_help=True)
claim_app = typer.Typer(help="Claim tokens for devices (through the provisioning API).", no_args_is_help=True)
provisioning_app.add_typer(token_app, name="token")
app.add_typer(provisioning_app, name="provisioning")
app.add_typer(claim_app, name="claim")

_ID = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_EXPIRES = re.compile(r"^(\d{1,4})([hd])$")
EXIT_UNAVAILABLE = 1


def _expiry(text: str, problems: list[str], max_days: int) -> timedelta | None:
    match = _EXPIRES.match(text)
    if not match:
        problems.append(f"--expires: {text[:40]!r} is not a duration such as '30d' or '12h'")
        return None
    delta = timedelta(**{"days" if match.group(2) == "d" else "hours": int(match.group(1))})
    if not timedelta(hours=1) <= delta <= timedelta(days=max_days):
        problems.append(f"--expires: {text!r} must be between 1h and {max_days}d")
        return None
    return delta


def _tenant(value: str | None, flag: str, problems: list[str]) -> None:
    if value is not None and (len(value) > 32 or not _ID.fullmatch(value)):
        problems.append(
            f"{flag}: {value[:40]!r} is not a valid id (lowercase letters, digits, '-'; at most 32)"
        )


@token_app.command("create")
def create_token(
    registry: Annotated[
        str, typer.Option("--registry", envvar="IRONLINK_REGISTRY_DSN", help="Registry DSN.")
    ],
    expires: Annotated[str, typer.Option("--expires", help="Lifetime: 30d, 12h (at most 366d).")] = "30d",
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="Scope to one tenant (default: platform).")
    ] = None,
    label: Annotated[str, typer.Option("--label", help="Who or what holds it.")] = "cli",
) -> None:
    """Mint an admin token in the registry (audited); it is printed once."""
    problems: list[str] = []
    delta = _expiry(expires, problems, 366)
    _tenant(tenant, "--tenant", problems)
    if not 1 <= len(label) <= 128 or not label.isprintable():
        problems.append("--label: must be 1 to 128 printable characters")
    if problems or delta is None:
        fail("\n  ".join(problems))
    import psycopg

    from registry import provisioning as reg
    from registry.migrate import apply_migrations
    from registry.store import default_actor

    try:
        with psycopg.connect(registry, autocommit=True, connect_timeout=10) as conn:
            apply_migrations(conn)
            token = reg.create_admin_token(
                conn,
                tenant_id=tenant,
                label=label,
                expires_at=datetime.now(UTC) + delta,
                actor=default_actor(),
            )
    except reg.Refused as refusal:
        fail(f"--tenant: {refusal.detail}")
    except psycopg.OperationalError as error:
        fail(f"--registry: cannot connect: {error}", EXIT_UNAVAILABLE)
    console.print(f"admin token {token.id} ({tenant or 'platform'} scope, expires in {expires}); shown once:")
    print(token.plaintext)


@claim_app.command("create")
def create_claim(
    tenant: Annotated[str, typer.Argument(help="Tenant id.")],
    site: Annotated[str, typer.Argument(help="Site the devices will belong to.")],
    api: Annotated[
        str, typer.Option("--api", envvar="IRONLINK_PROVISIONING_URL", help="Provisioning API URL.")
    ],
    token: Annotated[str, typer.Option("--token", envvar="IRONLINK_ADMIN_TOKEN", help="Admin token.")],
    count: Annotated[int, typer.Option("--count", min=1, max=100_000, help="Devices it may register.")] = 1,
    expires: Annotated[str, typer.Option("--expires", help="Lifetime: 12h, 7d (at most 90d).")] = "24h",
    machine_type: Annotated[str | None, typer.Option("--type", help="Only machines of this type.")] = None,
    qr: Annotated[bool, typer.Option("--qr", help="Print the QR code in the terminal.")] = False,
) -> None:
    """Mint a claim token; prints it once with what the QR code carries."""
    problems: list[str] = []
    delta = _expiry(expires, problems, 90)
    _tenant(tenant, "TENANT", problems)
    _tenant(site, "SITE", problems)
    if problems or delta is None:
        fail("\n  ".join(problems))
    body = {"site_id": site, "count": count, "expires_in_hours": int(delta.total_seconds() // 3600)}
    if machine_type is not None:
        body["machine_type"] = machine_type
    request = urllib.request.Request(
        f"{api.rstrip('/')}/v1/tenants/{tenant}/claim-tokens",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            created = json.load(answer)
    except urllib.error.HTTPError as error:
        fail(f"the provisioning API refused: {error.code} {error.read()[:2000].decode(errors='replace')}")
    except (urllib.error.URLError, OSError) as error:
        fail(f"--api: {api!r} cannot be reached: {error}", EXIT_UNAVAILABLE)
    console.print(
        f"claim token {created['id']}: {count} device(s) of {tenant}/{site}, expires {created['expires_at']}"
    )
    print(created["token"])
    if qr:
        import segno

        segno.make(created["qr_payload"], error="m").terminal(compact=True)
