"""``ironlink stack split STACK``: move an old-style region stack's tenants into stacks of their own.

A region used to be one stack holding every tenant. Now the platform stack (``mvp-eu``) holds what
the region shares, and each tenant is a stack ``<platform>.<tenant>`` of its own
(``stacks/Pulumi.mvp-eu.acme.yaml``), so one tenant's change plans, locks and fails alone. The
command writes each tenant's stack file (its comments kept), then rewrites the platform file
without ``ironlink:tenants``; everything is validated first and nothing is written if anything is
wrong. A second run finds nothing left to move; a tenant file left by an interrupted run is reused
when it says the same.

Deployed stacks need their state moved too (the Pulumi CLI does it, which is not run here): the
command prints, per tenant, the ``pulumi stack init`` and ``pulumi state move`` to run. The tenant
program aliases the moved component to its old place under the region, so the move changes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from infra.cli import app
from infra.cli.common import console, guarded
from infra.config import (
    Problem,
    StackConfigError,
    existing_stack_file,
    parse_platform,
    parse_platform_stack,
    parse_tenant_stack,
    project_root,
    read_stack_settings,
    stack_file,
    tenant_stack_name,
)
from infra.tenancy import legacy_tenant_urn

stack_app = typer.Typer(help="Reshape stacks: split a region's tenants into stacks of their own.")
app.add_typer(stack_app, name="stack")


def split_files(stack: str, root: Path | None = None) -> tuple[str, dict[str, str]]:
    """The platform file's new text and each tenant stack's text, all validated; nothing written.

    Raises :class:`StackConfigError` with every problem: of the old file as a whole (an old-style
    fleet included), of the platform without its tenants, of each tenant stack, and of a tenant
    stack file that exists already with other content.
    """
    from infra.stackfile import StackFile, plain

    old = StackFile.open(stack, root)
    parse_platform(old.settings(), stack)  # the old file as it is: every problem, sites too
    taken = old.take_tenants()
    platform = parse_platform_stack(old.settings(), stack)
    texts: dict[str, str] = {}
    problems: list[Problem] = []
    for node, comments in taken:
        name = tenant_stack_name(stack, str(node.get("id")))
        text = old.tenant_stack_text(node, comments)
        try:
            parse_tenant_stack({"platform": stack, "tenant": plain(node)}, name, platform)
        except StackConfigError as error:
            problems.extend(error.problems)
        path = stack_file(name, root)
        if path.exists() and path.read_text() != text:
            problems.append(Problem(str(path), "exists with other content; move it away or merge it by hand"))
        texts[name] = text
    if problems:
        raise StackConfigError(problems, stack)
    return old.text(), texts


@stack_app.command("split")
def split_command(
    stack: Annotated[str, typer.Argument(help="Old-style region stack: stacks/Pulumi.<stack>.yaml.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be written; write nothing.")
    ] = False,
) -> None:
    """Give each tenant of a region stack a stack of its own; the region's file keeps the platform."""
    from infra.stackfile import write_atomically

    root = project_root()
    path = guarded(lambda: existing_stack_file(stack, root))
    if "tenants" not in guarded(lambda: read_stack_settings(path, stack)):
        console.print(f"stack {stack!r} lists no tenants: nothing to split")
        return
    platform_text, tenants = guarded(lambda: split_files(stack, root))
    table = Table(title=f"{stack}: tenants moving to stacks of their own")
    for column in ("tenant stack", "file"):
        table.add_column(column, no_wrap=True)
    for name in tenants:
        table.add_row(name, str(stack_file(name, root).relative_to(root)))
    console.print(table)
    if dry_run:
        console.print("--dry-run: nothing written")
        return
    for name, text in tenants.items():
        target = stack_file(name, root)
        if not target.exists():
            write_atomically(target, text)
    write_atomically(path, platform_text)
    console.print(f"rewrote {path.relative_to(root)} without its tenants")
    console.print("Deployed already? Move each tenant's state with the Pulumi CLI:")
    for name in tenants:
        tenant_id = name.split(".", 1)[1]
        urn = legacy_tenant_urn(stack, tenant_id)
        console.print(f"  pulumi stack init {name}", highlight=False, soft_wrap=True)
        console.print(
            f"  pulumi state move --source {stack} --dest {name} '{urn}'", highlight=False, soft_wrap=True
        )
