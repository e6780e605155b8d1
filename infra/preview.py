"""Ephemeral preview stacks per pull request, through the Pulumi Automation API behind a small seam.

For pull request N, every stack the change touches gets a copy ``pr-<N>-<stack>`` (``mvp-eu`` →
``pr-12-mvp-eu``, ``mvp-eu.acme`` → ``pr-12-mvp-eu.acme``: still ``<platform>.<tenant>``, so the
program still takes it for a tenant stack). Each copy gets the stack's config from the pull
request's checkout — secrets set as secrets — and is previewed; when the pull request closes, every
``pr-<N>-*`` stack is destroyed and removed, each failure reported and none stopping the rest.

Which platform a tenant's copy references (its ``ironlink:platform``, which names both the
``StackReference`` and the platform whose stack file the program reads the tiers and phase from):

- the platform is touched too → ``pr-<N>-<platform>``: the tenant is previewed against the
  platform the pull request makes, not the one it replaces. The platform's copy is created (and
  previewed) first, so the reference names a stack that exists; a copy that was only previewed
  exports nothing, so a tenant preview that needs an output the copy lacks fails naming it — the
  honest answer ("this tenant cannot be previewed before its platform is updated") rather than a
  preview against outputs the pull request changes;
- the platform is untouched → the real ``<platform>``: its outputs are the ones the tenant will
  meet, and the pull request cannot change them.

The program checks a tenant stack's name (``<its platform>.<tenant>``) on source names
(:func:`infra.config.source_stack`) and reads a platform copy's config from its source's stack
file, so both kinds of copy (``pr-12-mvp-eu.acme`` on ``mvp-eu`` or on ``pr-12-mvp-eu``) run.

Copies are never ``pulumi up``-ed here: a platform copy would deploy a second region into the
namespace of the first. :func:`preview_pull_request` creates, :func:`cleanup_pull_request` always
destroys (a no-op on a stack that holds nothing) and removes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from infra.config import NAMESPACE

MAX_STACK_NAME = 100
"""Pulumi's limit on a stack's name."""
MAX_PULL_REQUEST = 999_999_999
_STACK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
PLATFORM_KEY = f"{NAMESPACE}:platform"


class PreviewInputError(ValueError):
    """Bad input to a preview: every problem, named, before any stack is created."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class StackNotFound(LookupError):
    """The backend holds no such stack (cleanup counts it as already gone)."""


class PulumiCliMissing(RuntimeError):
    """The Automation API drives the ``pulumi`` CLI, which is not installed."""


# ------------------------------------------------------------------------------------- seam
@dataclass(frozen=True)
class PreviewStep:
    """One step of a preview, as the engine announces it (``pulumi preview --json`` steps)."""

    op: str
    urn: str
    type: str


@dataclass(frozen=True)
class PreviewResult:
    change_summary: dict[str, int]
    """Operation (``create``, ``update``, ``replace``, ``delete``, ``same``…) → count."""
    steps: list[PreviewStep] = field(default_factory=list)


class PreviewBackend(Protocol):
    """The few Automation API operations previews need; :class:`AutomationBackend` is the real one."""

    def create_or_select(self, stack_name: str, config: dict[str, str], secrets: set[str]) -> None:
        """Make ``stack_name`` exist with exactly ``config`` set (keys in ``secrets`` as secrets)."""

    def preview(self, stack_name: str) -> PreviewResult: ...

    def destroy(self, stack_name: str) -> None:
        """Delete the stack's resources; raises :class:`StackNotFound` when there is no such stack."""

    def remove(self, stack_name: str) -> None:
        """Remove the stack itself; raises :class:`StackNotFound` when there is no such stack."""

    def list_stacks(self) -> list[str]: ...


# ------------------------------------------------------------------------------------ names
def _prefix(number: int) -> str:
    return f"pr-{number}-"


def check_pull_request(number: int) -> list[str]:
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_PULL_REQUEST:
        return [f"--number: {number!r} is not a pull request number (1..{MAX_PULL_REQUEST})"]
    return []


def preview_stack_name(number: int, stack: str) -> str:
    """``pr-<number>-<stack>``; raises :class:`PreviewInputError` when it is not a valid Pulumi stack
    name of at most 100 characters."""
    problems = check_pull_request(number)
    if not _STACK_NAME.fullmatch(stack) or len(stack) > MAX_STACK_NAME:
        problems.append(f"stack: {stack[:80]!r} is not a stack name")
    elif not problems and len(name := _prefix(number) + stack) > MAX_STACK_NAME:
        problems.append(
            f"stack: {stack!r}: its preview copy {name!r} has {len(name)} characters "
            f"(Pulumi allows {MAX_STACK_NAME})"
        )
    if problems:
        raise PreviewInputError(problems)
    return _prefix(number) + stack


def is_preview_copy(name: str, number: int) -> bool:
    return name.startswith(_prefix(number)) and len(name) > len(_prefix(number))


# ----------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class StackSettings:
    """A stack's config as the engine receives it (``ironlink:broker`` → JSON text), and which keys
    are secret."""

    config: dict[str, str]
    secrets: frozenset[str] = frozenset()


def engine_values(settings: Mapping[str, Any], secret_keys: Iterable[str] = ()) -> StackSettings:
    """A stack file's ``ironlink:`` settings (keys without the namespace) as engine config:
    strings as they are, everything else as JSON (the program decodes both)."""
    config = {
        f"{NAMESPACE}:{key}": value if isinstance(value, str) else json.dumps(value)
        for key, value in settings.items()
    }
    return StackSettings(config, frozenset(f"{NAMESPACE}:{key}" for key in secret_keys))


@dataclass(frozen=True)
class PreviewCopy:
    """A stack to create for a pull request: its name, its source, the platform it references."""

    name: str
    source: str
    references: str | None
    config: dict[str, str]
    secrets: frozenset[str]


def plan_copies(
    number: int, touched_stacks: Sequence[str], stack_settings: Mapping[str, StackSettings]
) -> list[PreviewCopy]:
    """The copies to create, platforms before their tenants (a tenant's reference must name a stack
    that exists); raises :class:`PreviewInputError` with every problem."""
    problems = check_pull_request(number)
    touched = list(dict.fromkeys(touched_stacks))
    if not touched:
        problems.append("no touched stack to preview")
    copies: list[PreviewCopy] = []
    for stack in sorted(touched, key=lambda s: ("." in s, s)):
        settings = stack_settings.get(stack)
        if settings is None:
            problems.append(f"stack {stack!r}: no settings given for it")
            continue
        unknown = sorted(settings.secrets - settings.config.keys())
        if unknown:
            problems.append(f"stack {stack!r}: secret keys without a value: {', '.join(unknown)}")
        try:
            name = preview_stack_name(number, stack)
        except PreviewInputError as error:
            problems.extend(p for p in error.problems if p not in problems)
            continue
        config, references = dict(settings.config), None
        if "." in stack:
            platform = stack.split(".", 1)[0]
            references = preview_stack_name(number, platform) if platform in touched else platform
            config[PLATFORM_KEY] = references
        copies.append(PreviewCopy(name, stack, references, config, settings.secrets))
    if problems:
        raise PreviewInputError(problems)
    return copies


# ---------------------------------------------------------------------------------- running
@dataclass(frozen=True)
class StackPreview:
    """What happened to one touched stack's copy: its preview, or the error that stopped it."""

    stack: str
    copy: str
    references: str | None
    result: PreviewResult | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:500]


def preview_pull_request(
    backend: PreviewBackend,
    number: int,
    touched_stacks: Sequence[str],
    stack_settings: Mapping[str, StackSettings],
) -> list[StackPreview]:
    """Create ``pr-<number>-<stack>`` for each touched stack, copy its config, preview it.

    A stack whose copy fails is reported and the others still run, except the tenants of a platform
    whose copy could not be created (their reference would name nothing)."""
    results: list[StackPreview] = []
    failed: set[str] = set()
    for copy in plan_copies(number, touched_stacks, stack_settings):
        if copy.references in failed:
            results.append(
                StackPreview(copy.source, copy.name, copy.references, error=f"{copy.references} failed first")
            )
            continue
        try:
            backend.create_or_select(copy.name, copy.config, set(copy.secrets))
        except Exception as error:
            failed.add(copy.name)
            results.append(StackPreview(copy.source, copy.name, copy.references, error=_reason(error)))
            continue
        try:
            result = backend.preview(copy.name)
        except Exception as error:
            results.append(StackPreview(copy.source, copy.name, copy.references, error=_reason(error)))
            continue
        results.append(StackPreview(copy.source, copy.name, copy.references, result))
    return results


@dataclass(frozen=True)
class CleanupReport:
    removed: list[str]
    already_gone: list[str]
    failures: dict[str, list[str]]
    """Copy → what failed (destroy, remove)."""

    @property
    def ok(self) -> bool:
        return not self.failures


def cleanup_pull_request(
    backend: PreviewBackend, number: int, existing_stacks: Iterable[str]
) -> CleanupReport:
    """Destroy and remove every ``pr-<number>-*`` stack among ``existing_stacks``, tenants before
    their platforms. Every stack is tried whatever failed before it; a stack already gone counts as
    removed, so running it twice is harmless."""
    problems = check_pull_request(number)
    if problems:
        raise PreviewInputError(problems)
    copies = sorted(
        {name for name in existing_stacks if is_preview_copy(name, number)}, key=lambda s: ("." not in s, s)
    )
    removed: list[str] = []
    gone: list[str] = []
    failures: dict[str, list[str]] = {}
    for name in copies:
        outcome = {
            step: _attempt(action, name)
            for step, action in (("destroy", backend.destroy), ("remove", backend.remove))
        }
        errors = [f"{step}: {text}" for step, text in outcome.items() if text not in (_DONE, _GONE)]
        if errors:
            failures[name] = errors
        elif set(outcome.values()) == {_GONE}:
            gone.append(name)
        else:
            removed.append(name)
    return CleanupReport(removed, gone, failures)


_DONE, _GONE = "done", "gone"


def _attempt(action: Callable[[str], None], name: str) -> str:
    """``done``, ``gone`` (no such stack: nothing to do) or the failure."""
    try:
        action(name)
    except StackNotFound:
        return _GONE
    except Exception as error:
        return _reason(error)
    return _DONE


# ----------------------------------------------------------------------------- the real one
class AutomationBackend:
    """:class:`PreviewBackend` on ``pulumi.automation``: a ``LocalWorkspace`` on the project
    directory (``Pulumi.yaml``), driving the ``pulumi`` CLI. Needs the CLI on PATH (or ``pulumi_root``)
    and the backend's credentials in the environment (``PULUMI_ACCESS_TOKEN``)."""

    def __init__(
        self,
        project_dir: Path,
        *,
        pulumi_root: str | None = None,
        env_vars: Mapping[str, str] | None = None,
        on_output: Callable[[str], Any] | None = None,
    ) -> None:
        from pulumi import automation

        self._auto = automation
        self.project_dir = project_dir
        self.on_output = on_output
        try:
            self.command = automation.PulumiCommand(root=pulumi_root)
        except FileNotFoundError as error:
            where = f"{pulumi_root}/bin/pulumi" if pulumi_root else "`pulumi` on PATH"
            raise PulumiCliMissing(
                f"the Pulumi CLI is not installed ({where} not found): the Automation API drives it; "
                "install it (https://www.pulumi.com/docs/install/) or use `ironlink plan diff` offline"
            ) from error
        self.options = automation.LocalWorkspaceOptions(
            work_dir=str(project_dir), pulumi_command=self.command, env_vars=dict(env_vars or {})
        )

    def _stack(self, stack_name: str) -> Any:
        return self._auto.create_or_select_stack(
            stack_name, work_dir=str(self.project_dir), opts=self.options
        )

    def _select(self, stack_name: str) -> Any:
        try:
            return self._auto.select_stack(stack_name, work_dir=str(self.project_dir), opts=self.options)
        except self._auto.StackNotFoundError as error:
            raise StackNotFound(stack_name) from error

    def create_or_select(self, stack_name: str, config: dict[str, str], secrets: set[str]) -> None:
        stack = self._stack(stack_name)
        values = {key: self._auto.ConfigValue(value, secret=key in secrets) for key, value in config.items()}
        stack.set_all_config(values)

    def preview(self, stack_name: str) -> PreviewResult:
        steps: list[PreviewStep] = []

        def on_event(event: Any) -> None:
            pre = getattr(event, "resource_pre_event", None)
            if pre is not None:
                meta = pre.metadata
                steps.append(PreviewStep(str(getattr(meta.op, "value", meta.op)), meta.urn, meta.type))

        result = self._select(stack_name).preview(on_output=self.on_output, on_event=on_event)
        summary = {str(getattr(op, "value", op)): count for op, count in result.change_summary.items()}
        return PreviewResult(summary, steps)

    def destroy(self, stack_name: str) -> None:
        self._select(stack_name).destroy(on_output=self.on_output)

    def remove(self, stack_name: str) -> None:
        try:
            self._select(stack_name).workspace.remove_stack(stack_name)
        except self._auto.StackNotFoundError as error:
            raise StackNotFound(stack_name) from error

    def list_stacks(self) -> list[str]:
        workspace = self._auto.LocalWorkspace(**self._workspace_kwargs())
        return [summary.name for summary in workspace.list_stacks()]

    def _workspace_kwargs(self) -> dict[str, Any]:
        return {
            "work_dir": str(self.project_dir),
            "pulumi_command": self.command,
            "env_vars": self.options.env_vars,
        }
