"""``ironlink alerts route add|list|remove``: a tenant's alert routing rules in the registry.

Routing is data, edited here or through the API (``/v1/alert-routes``), never by a Pulumi update.
Every flag is checked before the registry is asked, all problems at once (exit 2); an
unreachable registry exits 1. A generic webhook's Authorization header is read from the
environment variable ``--authorization-env`` names, never from the command line.
"""

from __future__ import annotations

import json
import os
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
    from registry.alerts import Route

alerts_app = typer.Typer(help="Alert notification routing kept in the registry.", no_args_is_help=True)
route_app = typer.Typer(help="A tenant's routing rules: add, list, remove.", no_args_is_help=True)
alerts_app.add_typer(route_app, name="route")
app.add_typer(alerts_app, name="alerts")

_ID_MAX = 2**63 - 1
_FLAGS = {
    "name": "--name",
    "site_id": "--site",
    "severities": "--severity",
    "hours": "--hours",
    "time_zone": "--tz",
    "channel": "--channel",
    "target": "--target",
    "authorization": "--authorization-env",
}

TenantOption = Annotated[str, typer.Option("--tenant", help="The tenant whose routes these are.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _as_json(route: Route) -> dict[str, Any]:
    from registry.alerts import shown_target

    spec = route.spec
    return {
        "id": route.id,
        **spec.model_dump(mode="json", exclude={"authorization", "target"}),
        "target": shown_target(spec.channel, spec.target),
        "authorization": spec.authorization is not None,
    }


@route_app.command("add")
def route_add(
    tenant: TenantOption,
    name: Annotated[str, typer.Option("--name", help="Unique within the tenant.")],
    channel: Annotated[str, typer.Option("--channel", help="email, slack, teams or webhook.")],
    target: Annotated[
        str, typer.Option("--target", help="email: addresses, comma-separated; otherwise the URL.")
    ],
    registry: RegistryOption = None,
    site: Annotated[
        str | None, typer.Option("--site", help="Only this site's alerts (default: any).")
    ] = None,
    severity: Annotated[
        list[str] | None, typer.Option("--severity", help="info, warning or critical; repeat (default: any).")
    ] = None,
    hours: Annotated[
        list[str] | None,
        typer.Option("--hours", help="'mon-fri 08:00-18:00', 'daily 22:00-24:00'; repeat (default: always)."),
    ] = None,
    tz: Annotated[str, typer.Option("--tz", help="IANA time zone the hours are read in.")] = "UTC",
    authorization_env: Annotated[
        str | None,
        typer.Option("--authorization-env", help="webhook: env variable holding the Authorization header."),
    ] = None,
    resolved: Annotated[
        bool, typer.Option("--resolved/--no-resolved", help="Notify resolutions too.")
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """Add a routing rule to a tenant."""
    from pydantic import ValidationError

    from registry.alerts import RouteRefused, RouteSpec, create_route, parse_hours
    from registry.store import default_actor

    problems: list[str] = []
    check_tenant(tenant, problems)
    windows = []
    for text in hours or []:
        try:
            windows.append(parse_hours(text).model_dump())
        except (ValueError, ValidationError) as error:
            problems.append(
                f"--hours: {str(error).splitlines()[-1] if isinstance(error, ValidationError) else error}"
            )
    authorization = None
    if authorization_env is not None:
        authorization = os.environ.get(authorization_env)
        if not authorization:
            problems.append(f"--authorization-env: ${authorization_env} is not set or empty")
    document = {
        "name": name,
        "site_id": site,
        "severities": severity or None,
        "hours": windows or None,
        "time_zone": tz,
        "channel": channel,
        "target": target,
        "authorization": authorization,
        "send_resolved": resolved,
    }
    spec = None
    try:
        spec = RouteSpec.model_validate(document)
    except ValidationError as error:
        for item in error.errors(include_url=False):
            loc = item["loc"]
            flag = _FLAGS.get(str(loc[0]), str(loc[0])) if loc else "route"
            problems.append(f"{flag}: {item['msg'].removeprefix('Value error, ')}")
    refuse(problems)
    assert spec is not None
    with required_registry(registry) as conn:
        try:
            route = create_route(conn, tenant, spec, actor=default_actor())
        except RouteRefused as error:
            fail(str(error))
    if as_json:
        console.print_json(json.dumps(_as_json(route)))
    else:
        console.print(f"route {route.id} ({spec.name}) added to tenant {tenant}")


@route_app.command("list")
def route_list(tenant: TenantOption, registry: RegistryOption = None, as_json: JsonOption = False) -> None:
    """List a tenant's routing rules."""
    from registry.alerts import routes_of

    problems: list[str] = []
    check_tenant(tenant, problems)
    refuse(problems)
    with required_registry(registry) as conn:
        routes = routes_of(conn, tenant)
    documents = [_as_json(route) for route in routes]
    if as_json:
        console.print_json(json.dumps(documents))
        return
    table = Table(title=f"Alert routes of tenant {tenant!r} ({len(routes)})")
    for column in ("id", "name", "channel", "target", "site", "severities", "hours", "resolved", "enabled"):
        table.add_column(column, overflow="fold")
    for document in documents:
        windows = document["hours"] or []
        table.add_row(
            str(document["id"]),
            document["name"],
            document["channel"],
            document["target"],
            document["site_id"] or "any",
            ",".join(document["severities"] or []) or "any",
            "; ".join(f"{','.join(w['days'])} {w['start']}-{w['end']}" for w in windows)
            + f" {document['time_zone']}"
            if windows
            else "always",
            "yes" if document["send_resolved"] else "no",
            "yes" if document["enabled"] else "no",
        )
    console.print(table)


@route_app.command("remove")
def route_remove(
    route_id: Annotated[int, typer.Argument(metavar="ID", help="The route's id (from list).")],
    tenant: TenantOption,
    registry: RegistryOption = None,
) -> None:
    """Remove a routing rule (its pending notifications are canceled)."""
    from registry.alerts import delete_route
    from registry.store import default_actor

    problems: list[str] = []
    check_tenant(tenant, problems)
    if not 1 <= route_id <= _ID_MAX:
        problems.append(f"ID: {route_id} is not a route id (a positive integer)")
    refuse(problems)
    with required_registry(registry) as conn:
        removed = delete_route(conn, tenant, route_id, actor=default_actor())
    if not removed:
        fail(f"ID: tenant {tenant!r} has no route {route_id}", EXIT_REGISTRY_UNAVAILABLE)
    console.print(f"route {route_id} removed from tenant {tenant}")
