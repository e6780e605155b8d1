"""``ironlink deadletters list|show|replay``: read the registry's dead letters and replay them.

Dead letters are stored by the dead-letter consumer (``python -m ingest.deadletters``); ``replay``
only marks rows in the registry, and the consumer republishes each to ``replay/<topic>``, where the
worker takes it through the whole pipeline again (a message still bad comes back as a new dead
letter). Every filter is checked before the registry is asked, all problems at once (exit 2); an
unreachable registry exits 1.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from infra.cli import app
from infra.cli.common import (
    EXIT_REGISTRY_UNAVAILABLE,
    RegistryOption,
    check_tenant,
    console,
    fail,
    refuse,
    required_registry,
)

if TYPE_CHECKING:
    from registry.store import DeadLetter

deadletters_app = typer.Typer(
    help="List, show and replay the dead letters stored in the registry.", no_args_is_help=True
)
app.add_typer(deadletters_app, name="deadletters")

# The registry's bounds (registry.store.LIST_LIMIT_MAX, REPLAY_LIMIT_MAX), repeated here so that
# the help text does not need the registry imported.
LIST_LIMIT_MAX = 1_000
REPLAY_LIMIT_MAX = 10_000
_REASON = re.compile(r"^[a-z_]{1,64}$")
_AGO = re.compile(r"^(\d{1,6})([mhd])$")
_AGO_UNIT = {"m": "minutes", "h": "hours", "d": "days"}
_ID_MAX = 2**63 - 1
_SHOWN_PAYLOAD = 4096

TenantOption = Annotated[str | None, typer.Option("--tenant", help="Only this tenant's dead letters.")]
ReasonOption = Annotated[str | None, typer.Option("--reason", help="Only this reason (e.g. out_of_bounds).")]
SinceOption = Annotated[
    str | None,
    typer.Option(
        "--since", help="Received since: an ISO 8601 time (UTC if no zone) or an age: 30m, 12h, 7d."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


# ---------------------------------------------------------------------------------------- checks
def _since(text: str, problems: list[str]) -> datetime | None:
    ago = _AGO.match(text)
    if ago:
        return datetime.now(UTC) - timedelta(**{_AGO_UNIT[ago.group(2)]: int(ago.group(1))})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        problems.append(
            f"--since: {text[:80]!r} is neither an ISO 8601 time nor an age such as '12h' or '7d'"
        )
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _filters(
    tenant: str | None, reason: str | None, since: str | None, limit: int, limit_max: int, problems: list[str]
) -> datetime | None:
    """Check the filters (appending each problem); the parsed ``--since``."""
    if tenant is not None:
        check_tenant(tenant, problems)
    if reason is not None and not _REASON.match(reason):
        problems.append(
            f"--reason: {reason[:80]!r} is not a reason (lowercase letters and '_', e.g. out_of_bounds)"
        )
    if not 1 <= limit <= limit_max:
        problems.append(f"--limit: {limit} is not between 1 and {limit_max}")
    return _since(since, problems) if since is not None else None


# ---------------------------------------------------------------------------------------- output
def _payload(letter: DeadLetter) -> tuple[str, str]:
    """The payload sample as (text, encoding): UTF-8 text, else base64."""
    data = letter.payload or b""
    try:
        return data.decode("utf-8"), "text"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"


def _as_json(letter: DeadLetter) -> dict[str, Any]:
    document: dict[str, Any] = {
        "id": letter.id,
        "tenant_id": letter.tenant_id,
        "reason": letter.reason,
        "detail": letter.detail,
        "topic": letter.topic,
        "received_at": letter.received_at.isoformat(),
        "stored_at": letter.stored_at.isoformat(),
        "payload_bytes": letter.payload_bytes,
        "truncated": letter.truncated,
        "replay": letter.replay_state,
        "replay_requested_at": letter.replay_requested_at.isoformat() if letter.replay_requested_at else None,
        "replayed_at": letter.replayed_at.isoformat() if letter.replayed_at else None,
    }
    if letter.payload is not None:
        document["payload"], document["payload_encoding"] = _payload(letter)
    return document


def _print_json(value: object) -> None:
    console.print_json(json.dumps(value))


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


# -------------------------------------------------------------------------------------- commands
@deadletters_app.command("list")
def list_command(
    registry: RegistryOption = None,
    tenant: TenantOption = None,
    reason: ReasonOption = None,
    since: SinceOption = None,
    limit: Annotated[
        int, typer.Option("--limit", help=f"At most this many, newest first (1-{LIST_LIMIT_MAX}).")
    ] = 50,
    as_json: JsonOption = False,
) -> None:
    """List dead letters, newest first."""
    from registry import store

    problems: list[str] = []
    since_at = _filters(tenant, reason, since, limit, LIST_LIMIT_MAX, problems)
    refuse(problems)
    with required_registry(registry) as conn:
        letters = store.list_dead_letters(conn, tenant_id=tenant, reason=reason, since=since_at, limit=limit)
    if as_json:
        _print_json([_as_json(letter) for letter in letters])
        return
    scope = f"tenant {tenant!r}" if tenant else "all tenants"
    table = Table(title=f"Dead letters of {scope} ({len(letters)} shown, newest first)")
    for column in ("id", "tenant", "received (UTC)", "reason", "bytes", "replay"):
        table.add_column(column, no_wrap=True)
    table.add_column("topic", overflow="fold")
    table.add_column("detail", overflow="fold")
    for letter in letters:
        table.add_row(
            str(letter.id),
            letter.tenant_id or "-",
            _when(letter.received_at),
            letter.reason,
            f"{letter.payload_bytes}{' (cut)' if letter.truncated else ''}",
            letter.replay_state,
            letter.topic,
            letter.detail,
        )
    console.print(table)


@deadletters_app.command("show")
def show_command(
    dead_letter_id: Annotated[int, typer.Argument(metavar="ID", help="The dead letter's id (from list).")],
    registry: RegistryOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one dead letter with its payload sample."""
    from registry import store

    if not 1 <= dead_letter_id <= _ID_MAX:
        fail(f"ID: {dead_letter_id} is not a dead letter id (a positive integer)")
    with required_registry(registry) as conn:
        letter = store.get_dead_letter(conn, dead_letter_id)
    if letter is None:
        fail(f"ID: no dead letter {dead_letter_id} in the registry", EXIT_REGISTRY_UNAVAILABLE)
    if as_json:
        _print_json(_as_json(letter))
        return
    table = Table(show_header=False, title=f"Dead letter {letter.id}")
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    text, encoding = _payload(letter)
    shown = text if len(text) <= _SHOWN_PAYLOAD else text[:_SHOWN_PAYLOAD] + " …"
    for field, value in (
        ("tenant", letter.tenant_id or "- (names no tenant of the registry)"),
        ("topic", letter.topic),
        ("reason", letter.reason),
        ("detail", letter.detail),
        ("received", f"{_when(letter.received_at)} UTC (stored {_when(letter.stored_at)} UTC)"),
        ("payload", f"{letter.payload_bytes} bytes{', sample cut' if letter.truncated else ''}, {encoding}"),
        (
            "replay",
            letter.replay_state
            + (
                f": {letter.not_replayable}"
                if letter.replay_state == "none" and letter.not_replayable
                else ""
            ),
        ),
    ):
        table.add_row(field, value)
    console.print(table)
    console.print(shown, highlight=False, markup=False)


@deadletters_app.command("replay")
def replay_command(
    ids: Annotated[
        list[int] | None, typer.Argument(metavar="[ID]...", help="Dead letters to replay.")
    ] = None,
    registry: RegistryOption = None,
    tenant: TenantOption = None,
    reason: ReasonOption = None,
    since: SinceOption = None,
    limit: Annotated[
        int, typer.Option("--limit", help=f"At most this many, oldest first (1-{REPLAY_LIMIT_MAX}).")
    ] = 1000,
    as_json: JsonOption = False,
) -> None:
    """Ask the consumer to replay dead letters: by ID, or every one of a tenant matching filters."""
    from registry import store

    problems: list[str] = []
    since_at = _filters(tenant, reason, since, limit, REPLAY_LIMIT_MAX, problems)
    ids = ids or []
    if ids and (tenant or reason or since):
        problems.append("ID: replay either by id or by --tenant/--reason/--since, not both")
    if not ids and tenant is None:
        problems.append("--tenant: is required to replay by filter (or give dead letter ids)")
    if len(ids) > REPLAY_LIMIT_MAX:
        problems.append(f"ID: {len(ids)} ids given, at most {REPLAY_LIMIT_MAX}")
    problems += [
        f"ID: {item} is not a dead letter id (a positive integer)" for item in ids if not 1 <= item <= _ID_MAX
    ]
    refuse(problems)
    with required_registry(registry) as conn:
        result = store.request_replay(
            conn,
            actor=f"{store.default_actor()} (ironlink cli)",
            ids=ids,
            tenant_id=tenant,
            reason=reason,
            since=since_at,
            limit=limit,
        )
    if as_json:
        _print_json(
            {"requested": result.requested, "skipped": {str(k): v for k, v in result.skipped.items()}}
        )
        return
    console.print(
        f"Replay requested for [bold]{len(result.requested)}[/] dead letters; the consumer republishes them "
        "to replay/<topic> within seconds."
    )
    for skipped, why in sorted(result.skipped.items()):
        console.print(f"  [yellow]skipped[/] {skipped}: {why}", highlight=False)
