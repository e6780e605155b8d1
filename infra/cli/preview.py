"""``ironlink preview pr|cleanup``: a pull request's ephemeral preview stacks, for CI with Pulumi
credentials (``PULUMI_ACCESS_TOKEN``) and the ``pulumi`` CLI.

``pr`` creates ``pr-<N>-<stack>`` for each touched stack (``--stack``, repeated, or the stacks of a
``plan diff --format json`` document given with ``--from-diff``), copies the stack's config from
this checkout and runs ``pulumi preview`` on it; ``cleanup`` destroys and removes every
``pr-<N>-*`` stack. Both exit 1 when a stack failed (each failure listed) and 2 on bad input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from infra.cli import app
from infra.cli.common import console, errors, fail
from infra.config import (
    StackConfigError,
    UnknownStackError,
    existing_stack_file,
    list_stacks,
    project_root,
    read_stack_settings,
)
from infra.preview import (
    MAX_PULL_REQUEST,
    AutomationBackend,
    PreviewBackend,
    PreviewInputError,
    PulumiCliMissing,
    StackSettings,
    cleanup_pull_request,
    engine_values,
    preview_pull_request,
)

preview_app = typer.Typer(
    help="Ephemeral preview stacks per pull request (Automation API; needs the pulumi CLI)."
)
app.add_typer(preview_app, name="preview")
MAX_DIFF_BYTES = 64 * 1024 * 1024
EXIT_FAILED = 1

Number = Annotated[
    int, typer.Option("--number", min=1, max=MAX_PULL_REQUEST, help="The pull request's number.")
]


def _encrypted_keys(settings: dict[str, Any]) -> list[str]:
    """Settings the stack file holds encrypted (``secure:``): this checkout cannot copy their value."""
    return sorted(
        key for key, value in settings.items() if isinstance(value, dict) and set(value) == {"secure"}
    )


def stack_settings(stacks: list[str], root: Path) -> dict[str, StackSettings]:
    """Each stack's ``ironlink:`` config from its stack file in this checkout, as engine config."""
    problems: list[str] = []
    found: dict[str, StackSettings] = {}
    for stack in stacks:
        try:
            settings = read_stack_settings(existing_stack_file(stack, root), stack)
        except (StackConfigError, UnknownStackError) as error:
            problems.append(str(error))
            continue
        encrypted = _encrypted_keys(settings)
        if encrypted:
            problems.append(
                f"stack {stack!r}: {', '.join(encrypted)} encrypted in its stack file; "
                "a preview copy needs the value (give it through the environment)"
            )
            continue
        found[stack] = engine_values(settings)
    if problems:
        raise PreviewInputError(problems)
    return found


def stacks_from_diff(path: Path) -> list[str]:
    """The stacks of a ``plan diff --format json`` document: its keys."""
    try:
        if path.stat().st_size > MAX_DIFF_BYTES:
            raise PreviewInputError([f"--from-diff: {path} is larger than {MAX_DIFF_BYTES} bytes"])
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PreviewInputError([f"--from-diff: {path}: {error}"]) from None
    if not isinstance(document, dict) or not all(isinstance(key, str) for key in document):
        raise PreviewInputError([f"--from-diff: {path} is not a `plan diff --format json` document"])
    return sorted(document)


def _backend(root: Path) -> PreviewBackend:
    try:
        return AutomationBackend(
            root, on_output=lambda line: errors.print(line, markup=False, highlight=False)
        )
    except PulumiCliMissing as error:
        fail(str(error), EXIT_FAILED)


@preview_app.command("pr")
def preview_pr(
    number: Number,
    base: Annotated[
        str, typer.Option("--base", help="The pull request's base: the touched stacks are found against it.")
    ],
    stacks: Annotated[
        list[str] | None,
        typer.Option("--stack", help="Preview this stack (repeat) instead of the touched ones."),
    ] = None,
    from_diff: Annotated[
        Path | None,
        typer.Option("--from-diff", help="`ironlink plan diff --format json` output: its stacks."),
    ] = None,
) -> None:
    """Create, configure and preview pr-<N>-<stack> for each touched stack."""
    root = project_root()
    try:
        touched = list(stacks or []) + (stacks_from_diff(from_diff) if from_diff else [])
        if not stacks and not from_diff:
            touched = _touched_since(root, base)
        if not touched:
            console.print(f"no stack touched against {base}: nothing to preview")
            return
        unknown = sorted(set(touched) - set(list_stacks(root)))
        if unknown:
            raise PreviewInputError(
                [f"--stack: {', '.join(unknown)} not in stacks/ (have: {', '.join(list_stacks(root))})"]
            )
        settings = stack_settings(touched, root)
        results = preview_pull_request(_backend(root), number, touched, settings)
    except PreviewInputError as error:
        fail("\n  ".join(["bad input:", *error.problems]))
    table = Table(title=f"pull request {number}: previews against {base}")
    for column in ("stack", "preview stack", "references", "changes"):
        table.add_column(column, no_wrap=column != "changes")
    for item in results:
        changes = (
            ", ".join(f"{op} {count}" for op, count in sorted(item.result.change_summary.items()))
            if item.result
            else f"[red]failed: {item.error}[/]"
        )
        table.add_row(item.stack, item.copy, item.references or "", changes)
    console.print(table)
    if not all(item.ok for item in results):
        raise typer.Exit(EXIT_FAILED)


def _touched_since(root: Path, base: str) -> list[str]:
    """The stacks the working tree's change since ``base`` touches, as ``ironlink plan diff`` finds them."""
    from infra.revisions import RevisionError, changed_files, resolve, stacks_at, touched_stacks

    try:
        commit = resolve(root, base)
        touched = touched_stacks(
            changed_files(root, commit, None), stacks_at(root, commit), stacks_at(root, None)
        )
    except RevisionError as error:
        raise PreviewInputError([f"--base: {error}"]) from error
    return touched.head


@preview_app.command("cleanup")
def preview_cleanup(number: Number) -> None:
    """Destroy and remove every pr-<N>-* stack (each failure reported; safe to run twice)."""
    backend = _backend(project_root())
    report = cleanup_pull_request(backend, number, backend.list_stacks())
    for name in report.removed:
        console.print(f"destroyed and removed {name}")
    for name in report.already_gone:
        console.print(f"{name} was already gone")
    for name, failures in report.failures.items():
        errors.print(f"[bold red]error:[/] {name}: {'; '.join(failures)}", highlight=False)
    if not (report.removed or report.already_gone or report.failures):
        console.print(f"no preview stack of pull request {number}")
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)
