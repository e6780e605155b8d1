"""``ironlink tenant add|list|remove``: sales-engineer commands.

The tenant commands edit ``stacks/Pulumi.<stack>.yaml`` in place (comments and key order kept, see
:mod:`infra.stackfile`), validate the whole edited config before writing anything, and print what
the change adds to or removes from the plan. With ``--registry DSN`` (or ``IRONLINK_REGISTRY_DSN``)
the registry is updated in the same go, with audit events, and the file is written only if the
registry accepted the change. Devices never touch a stack file: ``ironlink device add``
(:mod:`infra.cli.device`) enrolls them through the provisioning API.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Annotated

import psycopg
import typer
from rich.table import Table

from infra.cli import app
from infra.cli.common import console, fail, guarded, stack_config
from infra.config import PlatformConfig
from infra.plan import build_plan
from infra.stackfile import StackFile
from infra.tenancy import SHARED_INFLUXDB, store_route
from registry import store
from registry.migrate import apply_migrations

tenant_app = typer.Typer(help="Add, list and remove the tenants of a stack.", no_args_is_help=True)
app.add_typer(tenant_app, name="tenant")

StackArg = Annotated[str, typer.Argument(help="Stack name: edits stacks/Pulumi.<stack>.yaml.")]
RegistryOption = Annotated[
    str | None,
    typer.Option(
        "--registry",
        envvar="IRONLINK_REGISTRY_DSN",
        help="PostgreSQL DSN of the device registry to update as well (with audit events).",
    ),
]
EXIT_REGISTRY_UNAVAILABLE = 1


# ---------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _registry(dsn: str | None) -> Iterator[psycopg.Connection | None]:
    """A migrated registry connection inside one transaction, or None without ``--registry``."""
    if not dsn:
        yield None
        return
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.Error as error:
        fail(f"--registry: cannot connect to the registry: {error}".strip(), EXIT_REGISTRY_UNAVAILABLE)
    with conn:
        apply_migrations(conn)
        try:
            with conn.transaction():
                yield conn
        except store.RegistryError as error:
            fail(f"registry refused the change: {error}")


def _print_plan_change(before: PlatformConfig, after: PlatformConfig, stack: str) -> None:
    """What ``pulumi up`` would add, change (inputs differ; secrets are masked) and remove."""
    try:
        old, new = build_plan(before, stack), build_plan(after, stack)
    except Exception as error:  # the file is written already; the plan is a report, not a gate
        console.print(f"[yellow]plan:[/] could not be computed ({error}); run `ironlink plan {stack}`")
        return
    old_urns = {resource.urn: resource for resource in old.resources}
    new_urns = {resource.urn: resource for resource in new.resources}
    added = [new_urns[urn] for urn in new_urns.keys() - old_urns.keys()]
    removed = [old_urns[urn] for urn in old_urns.keys() - new_urns.keys()]
    changed = [
        new_urns[urn]
        for urn in new_urns.keys() & old_urns.keys()
        if new_urns[urn].inputs != old_urns[urn].inputs
    ]
    counts = f"[green]+{len(added)}[/] [yellow]~{len(changed)}[/] [red]-{len(removed)}[/]"
    console.print(f"Plan for stack {stack!r}: {counts} resources")
    for sign, resources in (("[green]+[/]", added), ("[yellow]~[/]", changed), ("[red]-[/]", removed)):
        for resource in sorted(resources, key=lambda r: (r.type, r.name)):
            console.print(f"  {sign} {resource.type} [bold]{resource.name}[/]", highlight=False)


def _edit(
    stack: str, change: Callable[[StackFile], None]
) -> tuple[StackFile, PlatformConfig, PlatformConfig]:
    """Open, change and validate a stack file (nothing written yet): (file, before, after)."""

    def attempt() -> tuple[StackFile, PlatformConfig, PlatformConfig]:
        stack_file = StackFile.open(stack)
        before = stack_file.validate()
        change(stack_file)
        return stack_file, before, stack_file.validate()

    return guarded(attempt)


def _actor() -> str:
    return f"{store.default_actor()} (ironlink cli)"


# ---------------------------------------------------------------------------------------- tenants
@tenant_app.command("add")
def tenant_add(
    stack: StackArg,
    tenant_id: Annotated[str, typer.Option("--id", help="Tenant id (DNS label, e.g. 'acme').")],
    name: Annotated[str, typer.Option("--name", help="Display name.")],
    tier: Annotated[str, typer.Option("--tier", help="Retention tier (basic, standard, premium, ...).")],
    isolation: Annotated[int | None, typer.Option("--isolation", help="Isolation level 1-3.")] = None,
    machine_types: Annotated[
        list[str] | None,
        typer.Option("--machine-type", help="Catalog type its dashboards cover; repeat for several."),
    ] = None,
    registry: RegistryOption = None,
) -> None:
    """Add a tenant to a stack (its sites and machines go to the registry: ``ironlink device add``)."""
    stack_file, before, after = _edit(
        stack, lambda f: f.add_tenant(tenant_id, name, tier, isolation, machine_types or [])
    )
    tenant = after.tenant(tenant_id)
    with _registry(registry) as conn:
        if conn is not None:
            isolation_level = after.isolation_of(tenant)
            store.sync_tenant(conn, tenant, isolation=isolation_level, actor=_actor(), must_be_new=True)
        stack_file.save()
    route = store_route(after, tenant)
    console.print(
        f"Added tenant [bold]{tenant.id}[/] ({tenant.name}, tier {tenant.tier}, isolation "
        f"{after.isolation_of(tenant)}) to {stack_file.path}",
        highlight=False,
    )
    console.print(f"  InfluxDB: {route.instance}/{route.org}/{route.bucket}", highlight=False)
    _print_plan_change(before, after, stack)


@tenant_app.command("list")
def tenant_list(stack: StackArg) -> None:
    """List a stack's tenants with their isolation, machine types and store (devices: the registry)."""
    config = stack_config(stack)
    table = Table(title=f"Tenants of stack {stack!r} (phase {config.phase}, {config.region})")
    for column in ("tenant", "tier", "level"):
        table.add_column(column, no_wrap=True)
    for column in ("name", "machine types", "InfluxDB org/bucket"):
        table.add_column(column, overflow="fold")
    for tenant in config.tenants:
        route = store_route(config, tenant)
        dedicated = f" on {route.instance}" if route.instance != SHARED_INFLUXDB else ""
        table.add_row(
            tenant.id,
            tenant.tier,
            str(config.isolation_of(tenant)),
            tenant.name,
            ", ".join(tenant.machine_types) or "-",
            f"{route.org}/{route.bucket}{dedicated}",
        )
    console.print(table)
    if not config.tenants:
        console.print(f"stack {stack!r} has no tenants yet: `ironlink tenant add {stack} --id ...`")


@tenant_app.command("remove")
def tenant_remove(
    stack: StackArg,
    tenant_id: Annotated[str, typer.Argument(help="Id of the tenant to remove.")],
    registry: RegistryOption = None,
) -> None:
    """Remove a tenant (its sites, devices and credentials) from a stack."""
    stack_file, before, after = _edit(stack, lambda f: f.remove_tenant(tenant_id))
    with _registry(registry) as conn:
        if conn is not None and not store.remove_tenant(conn, tenant_id, actor=_actor()):
            console.print(f"[yellow]registry:[/] tenant {tenant_id!r} was not in the registry")
        stack_file.save()
    console.print(f"Removed tenant [bold]{tenant_id}[/] from {stack_file.path}", highlight=False)
    _print_plan_change(before, after, stack)
