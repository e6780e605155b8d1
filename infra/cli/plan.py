"""``ironlink plan STACK`` / ``ironlink plan --all``: what ``pulumi up`` would declare, offline.

Prints the resource tree and a per-component summary, writes ``<output-dir>/<stack>.json`` and the
Kubernetes manifests under ``<output-dir>/<stack>/``. A bad stack exits with code 2 and every
problem of its config.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.tree import Tree

from infra.cli import app
from infra.cli.common import EXIT_BAD_INPUT, console, errors, fail, stack_config
from infra.config import StackConfigError, UnknownStackError, list_stacks, load_stack, project_root
from infra.plan import Plan, PlannedResource, build_plan, write_plan


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


def _plan_stack(stack: str, output_dir: Path, show_tree: bool) -> Path:
    plan = build_plan(stack_config(stack), stack)
    if show_tree:
        console.print(render_tree(plan))
    console.print(render_summary(plan))
    path = write_plan(plan, output_dir)
    console.print(f"wrote {path} and {len(plan.manifests())} manifests in {output_dir / stack}/")
    return path


@app.command("plan")
def plan_command(
    stack: Annotated[str | None, typer.Argument(help="Stack to plan (stacks/Pulumi.<STACK>.yaml).")] = None,
    all_stacks: Annotated[bool, typer.Option("--all", help="Plan every stack in stacks/.")] = False,
    output_dir: Annotated[
        Path | None,
        typer.Option("--output-dir", help="Where to write <stack>.json and manifests [build/plan]."),
    ] = None,
    tree: Annotated[bool, typer.Option("--tree/--no-tree", help="Print the resource tree.")] = True,
) -> None:
    """Run the Pulumi program offline under the mock engine and show what a stack declares."""
    if all_stacks == (stack is not None):
        fail("give either a STACK or --all (stacks: " + ", ".join(list_stacks()) + ")")
    target = output_dir or project_root() / "build" / "plan"
    if stack is not None:
        _plan_stack(stack, target, tree)
        return
    failed = []
    for name in list_stacks():
        try:
            load_stack(name)
        except (StackConfigError, UnknownStackError) as error:
            errors.print(f"[bold red]error:[/] {error}", highlight=False)
            failed.append(name)
            continue
        _plan_stack(name, target, tree)
    if failed:
        errors.print(f"[bold red]{len(failed)} stack(s) not planned:[/] {', '.join(failed)}")
        raise typer.Exit(EXIT_BAD_INPUT)
