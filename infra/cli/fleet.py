"""``ironlink fleet import STACK``: move an old-style stack file's sites, machines and device
credentials into the registry (``--registry``) or a fleet file (``--export``), then rewrite the
stack file without them, comments kept.

Nothing is lost: the file is written (atomically) only after the registry committed and the fleet
file was written; a second run finds nothing left to move. Heavy modules load only when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from infra.cli import app
from infra.cli.common import console, fail, guarded, migrated_registry
from infra.config import PlatformConfig
from infra.fleet import Fleet

fleet_app = typer.Typer(
    help="Move fleets (sites, machines, devices) out of stack files.", no_args_is_help=True
)
app.add_typer(fleet_app, name="fleet")


def summary(fleet: Fleet) -> list[str]:
    """One line per tenant: what moves."""
    lines = []
    for tenant in fleet.tenants:
        machines = list(tenant.machines)
        credentials = sum(1 for _, machine in machines if machine.password_hash)
        counts = f"{len(tenant.sites)} sites, {len(machines)} machines, {credentials} device credentials"
        lines.append(f"{tenant.id}: {counts}")
    return lines


@fleet_app.command("import")
def import_command(
    stack: Annotated[str, typer.Argument(help="Stack name: stacks/Pulumi.<stack>.yaml.")],
    registry: Annotated[
        str | None,
        typer.Option(
            "--registry", envvar="IRONLINK_REGISTRY_DSN", help="Registry DSN to move the fleet into."
        ),
    ] = None,
    export: Annotated[
        Path | None, typer.Option("--export", help="Also write the fleet to this (new) YAML fleet file.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would move; change nothing.")] = False,
) -> None:
    """Move the stack's sites, machines and credentials into the registry and rewrite the file."""
    from infra.stackfile import StackFile, write_atomically

    stack_file = guarded(lambda: StackFile.open(stack))
    fleet, fleet_text = guarded(stack_file.take_fleet)
    config = guarded(stack_file.validate)
    moved = summary(fleet) if any(tenant.sites for tenant in fleet.tenants) else []
    if not moved:
        console.print(f"stack {stack!r} holds no fleet: nothing to move")
        return
    for line in moved:
        console.print(f"  {line}", highlight=False)
    if dry_run:
        console.print(f"[yellow]dry run:[/] nothing written; {stack_file.path} would lose its sites")
        return
    problems = (
        [] if registry or export else ["--registry or --export: give at least one, or the fleet is lost"]
    )
    if export is not None and export.exists():
        problems.append(f"--export: {str(export)!r} exists already; choose a new file")
    if problems:
        fail("; ".join(problems))
    if export is not None:
        write_atomically(
            export, f"# Fleet moved out of stack {stack!r} by `ironlink fleet import`.\n" + fleet_text
        )
        console.print(f"Wrote the fleet to {export}", highlight=False)
    if registry:
        _into_registry(registry, config, fleet)
    guarded(stack_file.save)
    console.print(f"Rewrote {stack_file.path} without its fleet (comments kept)", highlight=False)


def _into_registry(dsn: str, config: PlatformConfig, fleet: Fleet) -> None:

    from registry import store
    from registry.fleet_import import import_fleet

    actor = f"{store.default_actor()} (ironlink fleet import)"
    with migrated_registry(dsn) as conn:
        try:
            with conn.transaction():
                for tenant in config.tenants:
                    store.sync_tenant(conn, tenant, isolation=config.isolation_of(tenant), actor=actor)
                results = import_fleet(conn, fleet, actor=actor)
        except store.RegistryError as error:
            fail(f"registry refused the import: {error}")
    changed = sum(len(result.changes) for result in results)
    console.print(f"Registry: {changed} changes committed", highlight=False)
