"""``ironlink tenant add|list|remove PLATFORM``: sales-engineer commands.

Each tenant is a stack of its own, ``<platform>.<tenant>`` (``stacks/Pulumi.mvp-eu.acme.yaml``).
``add`` validates the new tenant against its platform's config (tiers, phase) and writes its stack
file; ``remove`` deletes it; both show that one stack's plan, never the region's. With
``--registry DSN`` (or ``IRONLINK_REGISTRY_DSN``) the registry is updated in the same go, with audit
events, and the file is written only if the registry accepted the change. Devices never touch a
stack file: ``ironlink device add`` (:mod:`infra.cli.device`) enrolls them through the
provisioning API. Nor do alert recipients: ``add --alert-email`` (which needs ``--registry``)
becomes the tenant's email route in the registry (:mod:`registry.alerts`, ``ironlink alerts route``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated

import psycopg
import typer
from pydantic import ValidationError
from rich.table import Table

from infra.cli import app
from infra.cli.common import (
    console,
    fail,
    guarded,
    migrated_registry,
    stack_config,
)
from infra.config import (
    ALERT_EMAILS_ROUTE,
    PlatformConfig,
    Problem,
    StackConfigError,
    Tenant,
    _show,
    load_platform,
    load_tenant_stack,
    parse_tenant_stack,
    project_root,
    stack_file,
    tenant_stack_name,
    tenant_stacks,
)
from infra.plan import Plan, build_plan, build_tenant_plan
from infra.tenancy import SHARED_INFLUXDB, store_route
from registry import store
from registry.alerts import RouteSpec, create_route

tenant_app = typer.Typer(help="Add, list and remove the tenants of a platform.", no_args_is_help=True)
app.add_typer(tenant_app, name="tenant")

StackArg = Annotated[str, typer.Argument(help="Platform stack (stacks/Pulumi.<platform>.yaml).")]
RegistryOption = Annotated[
    str | None,
    typer.Option(
        "--registry",
        envvar="IRONLINK_REGISTRY_DSN",
        help="PostgreSQL DSN of the device registry to update as well (with audit events).",
    ),
]


# ---------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _registry(dsn: str | None) -> Iterator[psycopg.Connection | None]:
    """A migrated registry connection inside one transaction, or None without ``--registry``."""
    if not dsn:
        yield None
        return
    with migrated_registry(dsn) as conn:
        try:
            with conn.transaction():
                yield conn
        except store.RegistryError as error:
            fail(f"registry refused the change: {error}")


def _tenant_plan(platform: PlatformConfig, platform_stack: str, tenant: Tenant) -> Plan | None:
    """The tenant stack's plan (its platform planned only to answer its ``StackReference``)."""
    try:
        return build_tenant_plan(platform, build_plan(platform, platform_stack), tenant)
    except Exception as error:  # the file is written already; the plan is a report, not a gate
        stack = tenant_stack_name(platform_stack, tenant.id)
        console.print(f"[yellow]plan:[/] could not be computed ({error}); run `ironlink plan {stack}`")
        return None


def _print_plan(plan: Plan | None, sign: str, verb: str) -> None:
    if plan is None:
        return
    console.print(f"Plan for stack {plan.stack!r}: {verb} {len(plan.resources)} resources")
    for resource in plan.resources:
        mark = " [yellow](protected)[/]" if resource.protect else ""
        console.print(f"  {sign} {resource.type} [bold]{resource.name}[/]{mark}", highlight=False)


def _actor() -> str:
    return f"{store.default_actor()} (ironlink cli)"


def _email_route(tenant_id: str, addresses: list[str], registry: str | None) -> RouteSpec:
    """The email route ``--alert-email`` asks for, or :class:`StackConfigError` naming the flag:
    routes live in the registry, so the flag needs ``--registry``."""
    problems: list[Problem] = []
    if not registry:
        problems.append(
            Problem(
                "--alert-email",
                "alert recipients are routes in the registry: give --registry DSN (or set "
                f"IRONLINK_REGISTRY_DSN) too, or add them later with 'ironlink alerts route add --tenant "
                f"{_show(tenant_id)} --name {ALERT_EMAILS_ROUTE} --channel email --target ...'",
            )
        )
    try:
        spec = RouteSpec(name=ALERT_EMAILS_ROUTE, channel="email", target=",".join(addresses))
    except ValidationError as error:
        for item in error.errors(include_url=False):
            message = item["msg"].removeprefix("Value error, ").removeprefix("target: ")
            problems.append(Problem("--alert-email", message))
    if problems:
        raise StackConfigError(problems)
    return spec


# ---------------------------------------------------------------------------------------- tenants
@tenant_app.command("add")
def tenant_add(
    platform_stack: StackArg,
    tenant_id: Annotated[str, typer.Option("--id", help="Tenant id (DNS label, e.g. 'acme').")],
    name: Annotated[str, typer.Option("--name", help="Display name.")],
    tier: Annotated[str, typer.Option("--tier", help="Retention tier (basic, standard, premium, ...).")],
    isolation: Annotated[int | None, typer.Option("--isolation", help="Isolation level 1-3.")] = None,
    machine_types: Annotated[
        list[str] | None,
        typer.Option("--machine-type", help="Catalog type its dashboards cover; repeat for several."),
    ] = None,
    alert_emails: Annotated[
        list[str] | None,
        typer.Option(
            "--alert-email",
            help=f"Who is emailed its alerts (the registry route {ALERT_EMAILS_ROUTE!r}; needs --registry); "
            "repeat for several.",
        ),
    ] = None,
    registry: RegistryOption = None,
) -> None:
    """Give a new tenant its own stack on a platform (its devices: ``ironlink device add``)."""
    from infra.stackfile import new_tenant_stack_text, write_atomically

    root = project_root()
    platform = guarded(lambda: load_platform(platform_stack, root))
    stack = tenant_stack_name(platform_stack, tenant_id)
    body: dict[str, object] = {"id": tenant_id, "name": name, "tier": tier}
    if isolation is not None:
        body["isolation"] = isolation
    if machine_types:
        body["machine_types"] = machine_types

    def validate() -> tuple[Tenant, RouteSpec | None]:
        # Listed, not stat()ed: an id too long for a file name is a problem to report, not an OSError.
        problems: list[Problem] = []
        if stack in tenant_stacks(platform_stack, root):
            path = stack_file(stack, root)
            problems.append(Problem("ironlink:tenant.id", f"{tenant_id!r} has a stack already: {path}"))
        route: RouteSpec | None = None
        try:
            route = _email_route(tenant_id, alert_emails, registry) if alert_emails else None
        except StackConfigError as error:
            problems += error.problems
        try:
            parsed = parse_tenant_stack({"platform": platform_stack, "tenant": body}, stack, platform)
        except StackConfigError as error:
            raise StackConfigError([*error.problems, *problems], stack) from None
        if problems:
            raise StackConfigError(problems, stack)
        return parsed.tenant, route

    tenant, alert_route = guarded(validate)
    with _registry(registry) as conn:
        if conn is not None:
            isolation_level = platform.isolation_of(tenant)
            store.sync_tenant(conn, tenant, isolation=isolation_level, actor=_actor(), must_be_new=True)
            if alert_route is not None:
                create_route(conn, tenant.id, alert_route, actor=_actor())
        write_atomically(stack_file(stack, root), new_tenant_stack_text(platform_stack, tenant))
    route = store_route(platform, tenant)
    console.print(
        f"Added tenant [bold]{tenant.id}[/] ({tenant.name}, tier {tenant.tier}, isolation "
        f"{platform.isolation_of(tenant)}) as stack {stack}: {stack_file(stack, root)}",
        highlight=False,
    )
    console.print(f"  InfluxDB: {route.instance}/{route.org}/{route.bucket}", highlight=False)
    if alert_route is not None:
        console.print(
            f"  Alerts emailed to {', '.join(alert_route.recipients())} (registry route "
            f"{alert_route.name!r}; more: ironlink alerts route add --tenant {tenant.id} ...)",
            highlight=False,
        )
    _print_plan(_tenant_plan(platform, platform_stack, tenant), "[green]+[/]", "creates")
    console.print(f"Next: pulumi stack init {stack} && pulumi up --stack {stack}", highlight=False)


@tenant_app.command("list")
def tenant_list(platform_stack: StackArg) -> None:
    """List a platform's tenants (one stack each) with their isolation, machine types and store."""
    config = stack_config(platform_stack)
    table = Table(title=f"Tenants of platform {platform_stack!r} (phase {config.phase}, {config.region})")
    for column in ("tenant", "stack", "tier", "level"):
        table.add_column(column, no_wrap=True)
    for column in ("name", "machine types", "InfluxDB org/bucket"):
        table.add_column(column, overflow="fold")
    for tenant in config.tenants:
        route = store_route(config, tenant)
        dedicated = f" on {route.instance}" if route.instance != SHARED_INFLUXDB else ""
        table.add_row(
            tenant.id,
            tenant_stack_name(platform_stack, tenant.id),
            tenant.tier,
            str(config.isolation_of(tenant)),
            tenant.name,
            ", ".join(tenant.machine_types) or "-",
            f"{route.org}/{route.bucket}{dedicated}",
        )
    console.print(table)
    if not config.tenants:
        console.print(
            f"platform {platform_stack!r} has no tenants yet: `ironlink tenant add {platform_stack} --id ...`"
        )


@tenant_app.command("remove")
def tenant_remove(
    platform_stack: StackArg,
    tenant_id: Annotated[str, typer.Argument(help="Id of the tenant to remove.")],
    registry: RegistryOption = None,
) -> None:
    """Remove a tenant's stack file (and, with --registry, its registry rows, devices included)."""
    root = project_root()
    platform = guarded(lambda: load_platform(platform_stack, root))
    stack = tenant_stack_name(platform_stack, tenant_id)

    def existing() -> Tenant:
        if stack not in tenant_stacks(platform_stack, root):
            known = ", ".join(name.split(".", 1)[1] for name in tenant_stacks(platform_stack, root)) or "none"
            problem = Problem(
                "TENANT", f"{_show(tenant_id)} is not a tenant of {platform_stack!r} (tenants: {known})"
            )
            raise StackConfigError([problem], platform_stack)
        return load_tenant_stack(stack, platform, root).tenant

    tenant = guarded(existing)
    plan = _tenant_plan(platform, platform_stack, tenant)
    with _registry(registry) as conn:
        if conn is not None and not store.remove_tenant(conn, tenant_id, actor=_actor()):
            console.print(f"[yellow]registry:[/] tenant {tenant_id!r} was not in the registry")
        stack_file(stack, root).unlink()
    console.print(f"Removed tenant [bold]{tenant_id}[/]: deleted {stack_file(stack, root)}", highlight=False)
    _print_plan(plan, "[red]-[/]", "deletes")
    console.print(
        f"Deployed? Its state still holds it: pulumi destroy --stack {stack} && pulumi stack rm {stack}",
        highlight=False,
    )
