"""``ironlink plan [STACK...] [--all]``: what ``pulumi up`` would declare, offline.

A platform stack's name plans its region (the platform and every tenant stack on it); a tenant
stack's name (``mvp-eu.acme``) plans that tenant alone (its platform is planned only to answer its
``StackReference``). Tenants are planned in parallel processes (``--jobs``). Writes
``<output-dir>/<stack>.json`` and the Kubernetes manifests under ``<output-dir>/<stack>/`` for each;
one stack prints its resource tree and per-component summary, many print one line each. A bad
stack exits with code 2 and every problem of its config; the others are still planned.
"""

from __future__ import annotations

import enum
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree
from typer.core import TyperGroup

from infra.cli import app
from infra.cli.common import EXIT_BAD_INPUT, console, errors, fail, guarded
from infra.config import (
    StackConfigError,
    UnknownStackError,
    existing_stack_file,
    list_stacks,
    load_stack,
    project_root,
)
from infra.plan import Plan, PlannedResource, build_plan, build_tenant_plan, write_plan
from infra.planner import PlannedStack, plan_region, select


def _label(resource: PlannedResource) -> str:
    kind = resource.type if resource.is_component else resource.kind
    text = f"[bold]{kind}[/] {resource.name}"
    if resource.is_component:
        text = f"[cyan]{text}[/]"
    return f"{text} [yellow]\\[protected][/]" if resource.protect else text


def render_tree(plan: Plan) -> Tree:
    root = Tree(f"[bold]stack {plan.stack}[/] ({len(plan.resources)} resources)")

    def add(branch: Tree, parent: PlannedResource | None) -> None:
        for child in plan.children(parent):
            add(branch.add(_label(child)), child)

    add(root, None)
    return root


def render_summary(plan: Plan) -> Table:
    """One row per Ironlink component: what it declares (directly), and how much of it is protected."""
    owned: dict[str, list[PlannedResource]] = {}
    for resource in plan.resources:
        component = None if resource.is_component else plan.component_of(resource)
        if component is not None:
            owned.setdefault(component.urn, []).append(resource)
    table = Table(title=f"{plan.stack}: per component")
    table.add_column("component", no_wrap=True)
    table.add_column("name", no_wrap=True)
    table.add_column("declares")
    table.add_column("protected", justify="right")
    for component in (r for r in plan.resources if r.is_component):
        resources = owned.get(component.urn, [])
        kinds = Counter(r.kind for r in resources)
        declares = ", ".join(
            f"{kind} x{count}" if count > 1 else kind for kind, count in sorted(kinds.items())
        )
        table.add_row(component.kind, component.name, declares, str(sum(r.protect for r in resources)))
    return table


def _plan_one(stack: str, output_dir: Path, show_tree: bool, jobs: int | None, graph: bool) -> None:
    """One stack in detail (its tree and per-component summary, ``graph``: its picture); a
    platform's tenants after it, a line each."""
    existing_stack_file(stack)  # a typo or a path is refused by its own name, before it is split
    platform_name, _, tenant_id = stack.partition(".")
    config = load_stack(platform_name)
    platform = plan = build_plan(config, platform_name)
    if tenant_id:
        if tenant_id not in {t.id for t in config.tenants}:
            raise UnknownStackError(stack, list_stacks())
        plan = build_tenant_plan(config, platform, config.tenant(tenant_id))
    if show_tree:
        console.print(render_tree(plan))
    console.print(render_summary(plan))
    path = write_plan(plan, output_dir)
    console.print(f"wrote {path} and {len(plan.manifests())} manifests in {output_dir / stack}/")
    if graph:
        from infra.graph import GraphError, graph_command_hook

        try:
            console.print(f"wrote {graph_command_hook(plan, output_dir)}")
        except GraphError as error:
            fail(f"--graph: {error}")
    if not tenant_id and config.tenants:
        tenants = plan_region(
            config, platform_name, output_dir, include_platform=False, jobs=jobs, platform_plan=plan
        )
        console.print(render_stacks(tenants))


def _shown(path: Path) -> str:
    """A path relative to the working directory where it is below it."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def render_stacks(planned: list[PlannedStack]) -> Table:
    table = Table(title=f"{len(planned)} stacks planned")
    for column in ("stack", "resources", "protected", "plan"):
        table.add_column(
            column, no_wrap=True, justify="right" if column in ("resources", "protected") else "left"
        )
    for item in planned:
        table.add_row(item.stack, str(item.resources), str(item.protected), _shown(item.path))
    return table


class DiffFormat(enum.StrEnum):
    table = "table"
    markdown = "markdown"
    json = "json"


class PlanGroup(TyperGroup):
    """``ironlink plan diff ...`` is the diff; ``ironlink plan ANYTHING ELSE`` plans stacks."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = [STACKS_COMMAND, *args]
        return super().parse_args(ctx, args)


STACKS_COMMAND = "stacks"
plan_app = typer.Typer(
    cls=PlanGroup,
    help="Plan stacks offline (ironlink plan [STACK...] | --all), or diff two revisions (plan diff).",
)
app.add_typer(plan_app, name="plan")


@plan_app.command(STACKS_COMMAND)
def plan_command(
    stacks: Annotated[
        list[str] | None,
        typer.Argument(help="Platform stacks (their whole region) or tenant stacks (<platform>.<tenant>)."),
    ] = None,
    all_stacks: Annotated[bool, typer.Option("--all", help="Plan every region in stacks/.")] = False,
    output_dir: Annotated[
        Path | None,
        typer.Option("--output-dir", help="Where to write <stack>.json and manifests [build/plan]."),
    ] = None,
    tree: Annotated[
        bool, typer.Option("--tree/--no-tree", help="Print the resource tree (one stack).")
    ] = True,
    jobs: Annotated[
        int | None, typer.Option("--jobs", min=1, max=64, help="Processes planning tenants [CPU count].")
    ] = None,
    graph: Annotated[
        bool, typer.Option("--graph", help="Also draw the stack's components and links: <stack>.svg.")
    ] = False,
) -> None:
    """Run the Pulumi program offline under the mock engine and show what stacks declare (the
    default: ``ironlink plan dev`` is ``ironlink plan stacks dev``)."""
    names = list(stacks or [])
    if all_stacks == bool(names):
        fail("give either a STACK or --all (stacks: " + ", ".join(list_stacks()) + ")")
    target = output_dir or project_root() / "build" / "plan"
    if len(names) == 1:
        guarded(lambda: _plan_one(names[0], target, tree, jobs, graph))
        return
    if graph:
        fail("--graph draws one stack: give exactly one STACK")
    failed: list[str] = []
    planned: list[PlannedStack] = []
    for selection in select(names, all_stacks):
        try:
            config = load_stack(selection.platform)
            planned += plan_region(
                config,
                selection.platform,
                target,
                include_platform=selection.include_platform,
                tenants=selection.tenants,
                jobs=jobs,
            )
        except (StackConfigError, UnknownStackError) as error:
            errors.print(f"[bold red]error:[/] {error}", highlight=False)
            failed.append(selection.platform)
    if planned:
        console.print(render_stacks(planned))
    if failed:
        errors.print(f"[bold red]{len(failed)} stack(s) not planned:[/] {', '.join(failed)}")
        raise typer.Exit(EXIT_BAD_INPUT)


@plan_app.command("diff")
def diff_command(
    base: Annotated[str, typer.Argument(help="The revision to compare with (a pull request's base).")],
    head: Annotated[
        str | None, typer.Argument(help="The changed revision [the working tree, uncommitted changes too].")
    ] = None,
    output_format: Annotated[
        DiffFormat, typer.Option("--format", help="table (terminal), markdown (a PR comment), json.")
    ] = DiffFormat.table,
    output: Annotated[Path | None, typer.Option("--output", help="Write there instead of stdout.")] = None,
    allow_stateful: Annotated[
        bool,
        typer.Option(
            "--allow-stateful-changes", help="Knowingly allow replacing or deleting stateful resources."
        ),
    ] = False,
    plans_dir: Annotated[
        Path | None, typer.Option("--plans-dir", help="Keep both revisions' plans here [a temporary folder].")
    ] = None,
    jobs: Annotated[int | None, typer.Option("--jobs", min=1, max=64, help="Planning processes.")] = None,
) -> None:
    """Plan only the stacks a change touches, at both revisions, and show what it creates, updates
    (which inputs), replaces (why) and deletes in each; the project's policies run on the head's
    plans. Exit 3: a stateful resource would be replaced or deleted; 4: a policy is violated."""
    import tempfile

    from infra import plandiff
    from infra.revisions import RevisionError, plan_revisions

    root = project_root()
    with tempfile.TemporaryDirectory(prefix="ironlink-diff-") as scratch:
        where = plans_dir or Path(scratch)
        base_dir, head_dir = where / "base", where / "head"
        for folder in (base_dir, head_dir):
            folder.mkdir(parents=True, exist_ok=True)
        try:
            touched = plan_revisions(root, base, head, base_dir, head_dir, jobs)
        except RevisionError as error:
            fail(str(error))
        diffs = plandiff.diff_stacks(base_dir, head_dir, touched.union)
        violations = [
            violation
            for stack in touched.head
            if (path := head_dir / f"{stack}.json").is_file()
            for violation in plandiff.run_policies(json.loads(path.read_text()))
        ]
    allowed = plandiff.Allowance(all=allow_stateful)
    code = plandiff.exit_code(diffs, allowed, violations)
    scope = "every stack (the program changed)" if touched.everything else f"{len(touched.union)} stack(s)"
    if output_format is DiffFormat.table:
        target = Console(file=output.open("w"), width=160) if output else console
        target.print(f"planned {scope} at {base} and {head or 'the working tree'}")
        target.print(plandiff.render_table(diffs, allowed))
        for violation in violations:
            target.print(f"[red]policy[/] {violation}", highlight=False)
    else:
        text = (
            plandiff.render_markdown(diffs, allowed, violations)
            if output_format is DiffFormat.markdown
            else json.dumps(plandiff.render_json(diffs), indent=2, sort_keys=True) + "\n"
        )
        if output:
            output.write_text(text)
        else:
            sys.stdout.write(text)
    raise typer.Exit(code)
