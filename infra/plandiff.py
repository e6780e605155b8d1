"""What a change does to each stack: two offline plans of a stack compared resource by resource.

Pure functions over plan JSON documents (``infra.plan.Plan.to_json()``, one per stack, as
``ironlink plan --output-dir DIR`` writes them); nothing here runs the program. Public API::

    diff_plans(base: dict | None, head: dict | None, stack: str | None = None) -> StackDiff
    diff_stacks(base_dir: Path | None, head_dir: Path | None, stacks: Iterable[str] | None = None)
        -> list[StackDiff]                  # stacks changed, in name order; None: every <stack>.json
    render_table(diffs, allowed: Allowance = Allowance()) -> rich.console.Group
    render_markdown(diffs, allowed=Allowance(), violations=(), limit=COMMENT_LIMIT) -> str
    render_json(diffs) -> dict[str, dict]   # stack -> `pulumi preview --json` digest
    exit_code(diffs, allowed=Allowance(), violations=()) -> int     # EXIT_OK / 3 / 4
    refused_steps(diffs, allowed=Allowance()) -> list[tuple[str, Step]]
    run_policies(plan_json, protect_stateful=None, namespace=None) -> list[Violation]
                                            # from infra.policy.runner

A resource is matched across the two plans by URN (the record's ``"urn"``, or, in plans written
before records carried it, the URN the mock engine derives from type, name and parent). Each
differing resource becomes a :class:`Step`: ``create``, ``update`` (with the changed input paths),
``replace`` (with the force-new path and why, from :mod:`components.replacements`) or ``delete``;
unchanged resources are left out. A delete and a create of the same type whose inputs are (nearly)
equal are flagged as a probable rename: an alias keeps the resource. Secrets are ``"[secret]"`` in
plans: a value that is a secret on either side is never shown; two secrets are reported changed
only when the record's ``"secret_digests"`` (``{dotted path: digest}``, optional) differ.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Group
from rich.table import Table

from components.replacements import STATEFUL_ONLY_IF, STATEFUL_TYPES, force_new_patterns
from infra.policy.runner import Violation, run_policies

__all__ = [
    "COMMENT_LIMIT",
    "COMMENT_MARKER",
    "EXIT_OK",
    "EXIT_POLICY_VIOLATION",
    "EXIT_STATEFUL_REFUSED",
    "Allowance",
    "Change",
    "StackDiff",
    "Step",
    "diff_plans",
    "diff_stacks",
    "exit_code",
    "refused_steps",
    "render_json",
    "render_markdown",
    "render_table",
    "run_policies",
]

SECRET = "[secret]"  # what infra.plan writes for a secret value
EXIT_OK = 0
EXIT_STATEFUL_REFUSED = 3
"""A stateful resource would be replaced or deleted and nobody allowed it."""
EXIT_POLICY_VIOLATION = 4
COMMENT_MARKER = "<!-- ironlink-plan-diff -->"
COMMENT_LIMIT = 65_536
"""GitHub's limit on the body of one issue or pull-request comment, in characters."""
RENAME_SIMILARITY = 0.9
"""Share of input leaves a deleted and a created resource of one type must have in common to be
reported as a probable rename."""
RENAME_PAIR_LIMIT = 10_000
VALUE_CLIP = 60
STACK_TYPE = "pulumi:pulumi:Stack"
PROJECT = "ironlink"

Op = Literal["create", "update", "replace", "delete"]
OPS: tuple[Op, ...] = ("create", "update", "replace", "delete")
Path_ = tuple[str | int, ...]


# ----------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Change:
    """One changed input leaf. ``old``/``new`` are :data:`ABSENT` when the leaf was added/removed;
    ``secret`` means neither value may be shown."""

    path: Path_
    old: Any
    new: Any
    secret: bool = False

    @property
    def dotted(self) -> str:
        return dotted(self.path)


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


ABSENT: Any = _Absent()


@dataclass(frozen=True)
class Step:
    op: Op
    urn: str
    type: str
    name: str
    old: Mapping[str, Any] | None
    new: Mapping[str, Any] | None
    changes: tuple[Change, ...] = ()
    replace_reasons: tuple[tuple[str, str], ...] = ()
    """(concrete dotted path, why) for each force-new input that changed."""
    stateful: str | None = None
    """Why losing this resource loses data (``protected`` or the stateful table's reason)."""
    rename: str | None = None
    """For a delete: the URN of the create that probably renames it; for a create: the URN it renames."""

    @property
    def destructive(self) -> bool:
        return self.op in ("replace", "delete")

    def detail(self, clip: int = VALUE_CLIP) -> str:
        """One line for humans: what changes, why it replaces, the rename hint."""
        parts: list[str] = []
        if self.replace_reasons:
            parts.append("replaces: " + "; ".join(f"{path} ({why})" for path, why in self.replace_reasons))
        if self.changes and self.op in ("update", "replace"):
            parts.append(", ".join(_change_text(change, clip) for change in self.changes))
        if self.rename and self.op == "delete":
            parts.append(f"looks like a rename to {_short(self.rename)}: add an alias")
        if self.rename and self.op == "create":
            parts.append(f"looks like a rename of {_short(self.rename)}: add an alias")
        if self.stateful and self.destructive:
            parts.append(f"stateful: {self.stateful}")
        return "; ".join(parts)


@dataclass(frozen=True)
class StackDiff:
    stack: str
    steps: tuple[Step, ...]
    status: Literal["changed", "new", "removed"] = "changed"
    kind: str | None = None
    """``platform`` or ``tenant`` when the plan says so."""

    def counts(self) -> dict[str, int]:
        return {op: sum(step.op == op for step in self.steps) for op in OPS}


@dataclass(frozen=True)
class Allowance:
    """Stateful changes allowed knowingly: all of them (``--allow-stateful-changes``) or by URN."""

    all: bool = False
    urns: frozenset[str] = field(default_factory=frozenset)

    def allows(self, step: Step) -> bool:
        return self.all or step.urn in self.urns


# ------------------------------------------------------------------------------------- paths
_IDENTIFIER = re.compile(r"^[A-Za-z_$][\w$-]*$")


def dotted(path: Path_) -> str:
    """``spec.template.spec.containers.0.image``; a key with a dot in it is quoted:
    ``metadata.labels["app.kubernetes.io/name"]``."""
    out = ""
    for part in path:
        if part == "#" or out.endswith("#"):
            out += str(part)
        elif isinstance(part, str) and "." in part:
            out += f"[{json.dumps(part)}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def pulumi_path(path: Path_) -> str:
    """The property path syntax of ``detailedDiff``: ``spec.containers[0].image``, ``labels["a.b/c"]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENTIFIER.match(part):
            out += ("." if out else "") + part
        else:
            out += f"[{json.dumps(part)}]"
    return out


def _clip(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _change_text(change: Change, clip: int) -> str:
    if change.secret:
        return f"{change.dotted}: (secret) changed"
    old = "(absent)" if change.old is ABSENT else _clip(change.old, clip)
    new = "(absent)" if change.new is ABSENT else _clip(change.new, clip)
    return f"{change.dotted}: {old} → {new}"


def _short(urn: str) -> str:
    """``<type>::<name>`` of a URN."""
    parts = urn.split("::")
    return f"{parts[-2].rsplit('$', 1)[-1]}::{parts[-1]}" if len(parts) >= 4 else urn


# ------------------------------------------------------------------------------------ values
def _has_secret(value: Any) -> bool:
    if value == SECRET:
        return True
    if isinstance(value, Mapping):
        return any(_has_secret(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_secret(item) for item in value)
    return False


def _by_name(items: list[Any]) -> dict[str, Any] | None:
    """A list of uniquely named mappings (Kubernetes containers, env, ports, volumes) by name."""
    names = [item.get("name") if isinstance(item, Mapping) else None for item in items]
    if not items or not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
        return None
    return dict(zip(names, items, strict=True))  # type: ignore[arg-type]


def changed_leaves(old: Any, new: Any, path: Path_ = ()) -> Iterator[Change]:
    """Every leaf that differs, dicts by key, lists of named items by name (one added variable is
    one change, not a shift of every index after it), other lists by index; secrets masked."""
    named_old = _by_name(old) if isinstance(old, list) else None
    named_new = _by_name(new) if isinstance(new, list) else None
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new)):
            yield from changed_leaves(old.get(key, ABSENT), new.get(key, ABSENT), (*path, key))
    elif named_old is not None and named_new is not None:
        for name in sorted(set(named_old) | set(named_new)):
            yield from changed_leaves(named_old.get(name, ABSENT), named_new.get(name, ABSENT), (*path, name))
        kept_old = [name for name in named_old if name in named_new]
        kept_new = [name for name in named_new if name in named_old]
        if kept_old != kept_new:  # Kubernetes expands $(VAR) only from variables listed before
            yield Change((*path, "order"), kept_old, kept_new, False)
    elif isinstance(old, list) and isinstance(new, list):
        for index in range(max(len(old), len(new))):
            yield from changed_leaves(
                old[index] if index < len(old) else ABSENT,
                new[index] if index < len(new) else ABSENT,
                (*path, index),
            )
    elif old is ABSENT and new is ABSENT:
        return
    elif old != new or type(old) is not type(new):
        secret = _has_secret(old) or _has_secret(new)
        yield Change(path, SECRET if secret else old, SECRET if secret else new, secret)


def _split(pattern: str) -> list[str]:
    return pattern.split(".")


def values_at(value: Any, pattern: str) -> dict[Path_, Any]:
    """Concrete path → value for every match of a pattern (``*`` any key or index, ``#`` parse JSON)."""
    head, _, inner = pattern.partition("#")
    found: dict[Path_, Any] = {}

    def walk(node: Any, parts: list[str], path: Path_) -> None:
        if not parts:
            found[path] = node
            return
        part, rest = parts[0], parts[1:]
        if isinstance(node, Mapping):
            keys = list(node) if part == "*" else [part] if part in node else []
            for key in keys:
                walk(node[key], rest, (*path, key))
        elif isinstance(node, list):
            indexes = range(len(node)) if part == "*" else [int(part)] if part.isdigit() else []
            for index in indexes:
                if index < len(node):
                    walk(node[index], rest, (*path, index))

    walk(value, _split(head), ())
    if not inner:
        return found
    nested: dict[Path_, Any] = {}
    for path, text in found.items():
        try:
            document = json.loads(text) if isinstance(text, str) else None
        except ValueError:
            document = None
        for inner_path, item in values_at(document, inner).items():
            nested[(*path, "#", *inner_path)] = item
    return nested


def replace_reasons(
    type_token: str, old: Mapping[str, Any], new: Mapping[str, Any], secret_paths: Iterable[Path_] = ()
) -> list[tuple[str, str]]:
    """(concrete path, why) for each force-new input of ``type_token`` that differs."""
    reasons: dict[str, str] = {}
    for pattern, why in force_new_patterns(type_token).items():
        before, after = values_at(old, pattern), values_at(new, pattern)
        for path in sorted(set(before) | set(after), key=str):
            if before.get(path, ABSENT) != after.get(path, ABSENT):
                reasons.setdefault(dotted(path), why)
        for path in secret_paths:
            if _under(path, pattern):
                reasons.setdefault(dotted(path), why)
    return sorted(reasons.items())


def _under(path: Path_, pattern: str) -> bool:
    """``path`` lies at or below a match of ``pattern`` (the ``#`` part is not looked into)."""
    parts = _split(pattern.partition("#")[0])
    return len(path) >= len(parts) and all(p == "*" or p == str(s) for p, s in zip(parts, path, strict=False))


# ---------------------------------------------------------------------------- stateful, urns
def record_urn(record: Mapping[str, Any], stack: str, project: str = PROJECT) -> str:
    """The record's URN, or the one the mock engine gives it: the parent's own type (the stack's for
    a top-level resource), ``$``, the type, ``::``, the name."""
    if record.get("urn"):
        return str(record["urn"])
    parent = record.get("parent")
    parent_type = parent.split("::")[2].rsplit("$", 1)[-1] if parent else STACK_TYPE
    return f"urn:pulumi:{stack}::{project}::{parent_type}${record['type']}::{record['name']}"


def stateful_reason(record: Mapping[str, Any]) -> str | None:
    """Why losing this resource loses data, or None."""
    if record.get("protect"):
        return "protected"
    type_token = record["type"]
    why = STATEFUL_TYPES.get(type_token)
    condition = STATEFUL_ONLY_IF.get(type_token)
    if why is None or condition is None:
        return why
    kind, _, target = condition.partition(":")
    if kind == "input":
        values = values_at(record.get("inputs", {}), target)
        return why if any(values.values()) else None
    parent = record.get("parent") or ""
    return why if f"{target}::" in parent.split("$")[-1] + "::" else None


# ----------------------------------------------------------------------------------- diffing
def _records(document: Mapping[str, Any] | None, stack: str) -> dict[str, Mapping[str, Any]]:
    if not document:
        return {}
    return {record_urn(record, stack): record for record in document.get("resources", [])}


def _secret_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    before, after = old.get("secret_digests") or {}, new.get("secret_digests") or {}
    return [
        Change(tuple(_path_from_dotted(path)), SECRET, SECRET, True)
        for path in sorted(set(before) | set(after))
        if before.get(path) != after.get(path)
    ]


def _path_from_dotted(text: str) -> Path_:
    return tuple(int(part) if part.isdigit() else part for part in text.split("."))


def _compare(urn: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> Step | None:
    old_inputs, new_inputs = old.get("inputs", {}), new.get("inputs", {})
    changes = list(changed_leaves(old_inputs, new_inputs))
    seen = {change.path for change in changes}
    secrets = [change for change in _secret_changes(old, new) if change.path not in seen]
    changes += secrets
    if bool(old.get("protect")) != bool(new.get("protect")):
        changes.append(Change(("(protect)",), bool(old.get("protect")), bool(new.get("protect"))))
    if not changes:
        return None
    reasons = replace_reasons(new["type"], old_inputs, new_inputs, [change.path for change in secrets])
    return Step(
        "replace" if reasons else "update",
        urn,
        new["type"],
        new["name"],
        old,
        new,
        tuple(changes),
        tuple(reasons),
        stateful_reason(old) or stateful_reason(new),
    )


def _leaves(value: Any, path: Path_ = ()) -> dict[Path_, Any]:
    if isinstance(value, Mapping) and value:
        return {k: v for key, item in value.items() for k, v in _leaves(item, (*path, key)).items()}
    if isinstance(value, list) and value:
        return {k: v for index, item in enumerate(value) for k, v in _leaves(item, (*path, index)).items()}
    return {path: value}


def _canonical(record: Mapping[str, Any] | None) -> str:
    return json.dumps((record or {}).get("inputs", {}), sort_keys=True)


def similarity(old: Mapping[str, Any], new: Mapping[str, Any]) -> float:
    """Share of input leaves (paths and values) two records have in common."""
    left, right = _leaves(old.get("inputs", {})), _leaves(new.get("inputs", {}))
    paths = set(left) | set(right)
    if not paths:
        return 1.0
    return sum(left.get(path, ABSENT) == right.get(path, ABSENT) for path in paths) / len(paths)


def _renames(deleted: list[Step], created: list[Step]) -> dict[str, str]:
    """Deleted URN ↔ created URN for the best-matching pairs of one type above the threshold.
    Identical inputs pair first; near matches are searched only while a type's pairs stay under
    :data:`RENAME_PAIR_LIMIT` (a removed and an added tenant of 1,000 resources each stay fast)."""
    pairs: dict[str, str] = {}
    exact: dict[tuple[str, str], list[str]] = {}
    for gone in deleted:
        exact.setdefault((gone.type, _canonical(gone.old)), []).append(gone.urn)
    for made in created:
        waiting = exact.get((made.type, _canonical(made.new)))
        if waiting:
            gone_urn = waiting.pop(0)
            pairs[gone_urn], pairs[made.urn] = made.urn, gone_urn
    by_type: dict[str, tuple[list[Step], list[Step]]] = {}
    for step in deleted:
        if step.urn not in pairs:
            by_type.setdefault(step.type, ([], []))[0].append(step)
    for step in created:
        if step.urn not in pairs:
            by_type.setdefault(step.type, ([], []))[1].append(step)
    candidates = sorted(
        (
            (similarity(gone.old or {}, made.new or {}), gone.urn, made.urn)
            for gones, mades in by_type.values()
            if len(gones) * len(mades) <= RENAME_PAIR_LIMIT
            for gone in gones
            for made in mades
        ),
        reverse=True,
    )
    for score, gone_urn, made_urn in candidates:
        if score >= RENAME_SIMILARITY and gone_urn not in pairs and made_urn not in pairs:
            pairs[gone_urn], pairs[made_urn] = made_urn, gone_urn
    return pairs


def diff_plans(
    base: Mapping[str, Any] | None, head: Mapping[str, Any] | None, stack: str | None = None
) -> StackDiff:
    """The steps from ``base`` to ``head`` (either None: a new or a removed stack), plan order."""
    name = stack or str((head or base or {}).get("stack") or "")
    if not name:
        raise ValueError("diff_plans needs a stack name when neither plan names one")
    old, new = _records(base, name), _records(head, name)
    steps: list[Step] = []
    for urn, record in new.items():
        if urn not in old:
            steps.append(Step("create", urn, record["type"], record["name"], None, record))
        elif (step := _compare(urn, old[urn], record)) is not None:
            steps.append(step)
    for urn, record in old.items():
        if urn not in new:
            steps.append(
                Step(
                    "delete",
                    urn,
                    record["type"],
                    record["name"],
                    record,
                    None,
                    stateful=stateful_reason(record),
                )
            )
    renames = _renames([s for s in steps if s.op == "delete"], [s for s in steps if s.op == "create"])
    steps = [
        Step(
            s.op,
            s.urn,
            s.type,
            s.name,
            s.old,
            s.new,
            s.changes,
            s.replace_reasons,
            s.stateful,
            renames[s.urn],
        )
        if s.urn in renames
        else s
        for s in steps
    ]
    status: Literal["changed", "new", "removed"] = (
        "new" if base is None else "removed" if head is None else "changed"
    )
    kind = (head or base or {}).get("kind")
    return StackDiff(name, tuple(steps), status, kind if isinstance(kind, str) else None)


def _load(directory: Path | None, stack: str) -> dict[str, Any] | None:
    if directory is None:
        return None
    path = directory / f"{stack}.json"
    if not path.is_file():
        return None
    document = json.loads(path.read_text())
    if not isinstance(document, dict) or not isinstance(document.get("resources"), list):
        raise ValueError(f"{path}: not a plan document (no 'resources' list)")
    return document


def diff_stacks(
    base_dir: Path | None, head_dir: Path | None, stacks: Iterable[str] | None = None
) -> list[StackDiff]:
    """Diff ``<base_dir>/<stack>.json`` against ``<head_dir>/<stack>.json`` for each stack (default:
    every plan file in either folder); a folder that is None or lacks the file means the stack does
    not exist on that side. Only stacks with at least one step are returned, by name."""
    if stacks is None:
        names: set[str] = set()
        for directory in (base_dir, head_dir):
            if directory is not None and directory.is_dir():
                names |= {path.stem for path in directory.glob("*.json")}
        stacks = names
    diffs = []
    for stack in sorted(set(stacks)):
        base, head = _load(base_dir, stack), _load(head_dir, stack)
        if base is None and head is None:
            continue
        diff = diff_plans(base, head, stack)
        if diff.steps:
            diffs.append(diff)
    return diffs


# ------------------------------------------------------------------------------- exit, refusals
def refused_steps(diffs: Iterable[StackDiff], allowed: Allowance = Allowance()) -> list[tuple[str, Step]]:
    """(stack, step) for each stateful replacement or deletion not allowed knowingly."""
    return [
        (diff.stack, step)
        for diff in diffs
        for step in diff.steps
        if step.destructive and step.stateful and not allowed.allows(step)
    ]


def exit_code(
    diffs: Iterable[StackDiff], allowed: Allowance = Allowance(), violations: Sequence[Violation] = ()
) -> int:
    """:data:`EXIT_STATEFUL_REFUSED` if a stateful resource would be replaced or deleted unallowed
    (the costlier mistake, so it wins), else :data:`EXIT_POLICY_VIOLATION` if a policy failed, else 0."""
    if refused_steps(diffs, allowed):
        return EXIT_STATEFUL_REFUSED
    if violations:
        return EXIT_POLICY_VIOLATION
    return EXIT_OK


# ------------------------------------------------------------------------------------ render
_OP_STYLE = {"create": "green", "update": "yellow", "replace": "magenta", "delete": "red"}
_OP_SIGN = {"create": "+", "update": "~", "replace": "+-", "delete": "-"}


def _kind(type_token: str) -> str:
    return type_token.rsplit(":", 1)[-1]


def render_table(diffs: Sequence[StackDiff], allowed: Allowance = Allowance()) -> Group:
    """One rich table per stack: op, type, name, detail; refused stateful steps flagged."""
    tables = []
    for diff in diffs:
        counts = ", ".join(f"{n} to {op}" for op, n in diff.counts().items() if n)
        table = Table(
            title=f"{diff.stack}{f' ({diff.status})' if diff.status != 'changed' else ''}: {counts}"
        )
        for column in ("op", "type", "name", "detail"):
            table.add_column(column, overflow="fold", no_wrap=column != "detail")
        for step in diff.steps:
            style = _OP_STYLE[step.op]
            flag = (
                " [bold red]REFUSED[/]"
                if step.destructive and step.stateful and not allowed.allows(step)
                else ""
            )
            table.add_row(f"[{style}]{step.op}[/]{flag}", _kind(step.type), step.name, step.detail())
        tables.append(table)
    return Group(*tables)


def _cell(text: str) -> str:
    """Safe inside a Markdown table cell and an HTML ``<details>`` block."""
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("|", "\\|")
        .replace("\n", " ")
        .replace("`", "'")
    )


def _priority(diff: StackDiff, refused: set[str]) -> tuple[int, int, str]:
    danger = any(step.urn in refused for step in diff.steps)
    destructive = sum(step.destructive for step in diff.steps)
    return (0 if danger else 1, -destructive, diff.stack)


def render_markdown(
    diffs: Sequence[StackDiff],
    allowed: Allowance = Allowance(),
    violations: Sequence[Violation] = (),
    limit: int = COMMENT_LIMIT,
) -> str:
    """One pull-request comment, at most ``limit`` characters however many stacks change: full
    details per stack while they fit, then counts only, then a line saying how many more stacks."""
    refused = refused_steps(diffs, allowed)
    refused_urns = {step.urn for _, step in refused}
    totals = {op: sum(diff.counts()[op] for diff in diffs) for op in OPS}
    head = [COMMENT_MARKER, "### Ironlink plan diff", ""]
    if not diffs:
        head.append("No stack changes.")
    else:
        head.append(
            f"**{len(diffs)} stack(s) change:** " + ", ".join(f"{totals[op]} to {op}" for op in OPS) + "."
        )
    if refused:
        head.append(
            f"\n:no_entry: **{len(refused)} stateful resource(s) would be replaced or deleted** "
            f"(exit {EXIT_STATEFUL_REFUSED}); allow knowingly with `--allow-stateful-changes`."
        )
    if violations:
        head.append(
            f"\n:no_entry: **{len(violations)} policy violation(s)** (exit {EXIT_POLICY_VIOLATION}):\n"
        )
        head += [
            f"- `{_cell(v.rule)}` {_cell(v.stack)} {_cell(v.name)}: {_cell(v.message)}"
            for v in violations[:50]
        ]
        if len(violations) > 50:
            head.append(f"- … and {len(violations) - 50} more")
    text = "\n".join(head) + "\n"
    if not diffs:
        return text
    ordered = sorted(diffs, key=lambda d: _priority(d, refused_urns))
    table_head = (
        "\n| stack | create | update | replace | delete | stateful refused |\n"
        "|---|---:|---:|---:|---:|---:|\n"
    )
    more_line = "\n_… and {n} more stack(s) change: not listed, the comment limit is reached._\n"
    omitted_line = "\n_Details of {n} stack(s) omitted to stay under the comment limit._\n"
    reserve = len(more_line) + len(omitted_line) + 40
    budget = limit - len(text) - len(table_head) - reserve
    rows, listed = [], []
    for diff in ordered:
        counts = diff.counts()
        flagged = sum(step.urn in refused_urns for step in diff.steps)
        status = "" if diff.status == "changed" else f" ({diff.status})"
        row = (
            f"| {_cell(diff.stack)}{status} | "
            + " | ".join(str(counts[op]) for op in OPS)
            + f" | {flagged} |\n"
        )
        if len(row) > budget:
            break
        budget -= len(row)
        rows.append(row)
        listed.append(diff)
    text += table_head + "".join(rows)
    unlisted = len(ordered) - len(listed)
    details, detailed = [], 0
    for diff in listed:
        section = _details(diff, refused_urns, budget)
        if section is None:
            break
        budget -= len(section)
        details.append(section)
        detailed += 1
    if unlisted:
        text += more_line.format(n=unlisted)
    text += "".join(details)
    if detailed < len(listed):
        text += omitted_line.format(n=len(listed) - detailed)
    return text


def _details(diff: StackDiff, refused: set[str], budget: int) -> str | None:
    """A folded section of the stack's steps within ``budget`` characters (rows cut short with a
    count line if needed), or None if not even its frame fits."""
    counts = ", ".join(f"{_OP_SIGN[op]}{n}" for op, n in diff.counts().items() if n)
    opening = (
        f"\n<details><summary><b>{_cell(diff.stack)}</b> {counts}</summary>\n\n"
        "| op | type | name | detail |\n|---|---|---|---|\n"
    )
    closing = "\n</details>\n"
    cut_line = "| … | | | {n} more step(s) not shown |\n"
    room = budget - len(opening) - len(closing) - len(cut_line) - 10
    if room < 0:
        return None
    rows = []
    for index, step in enumerate(diff.steps):
        op = f"**{step.op}** :no_entry:" if step.urn in refused else step.op
        row = f"| {op} | {_cell(_kind(step.type))} | {_cell(step.name)} | {_cell(step.detail())} |\n"
        if len(row) > room:
            rows.append(cut_line.format(n=len(diff.steps) - index))
            break
        room -= len(row)
        rows.append(row)
    return opening + "".join(rows) + closing


def _state(record: Mapping[str, Any] | None, urn: str) -> dict[str, Any] | None:
    if record is None:
        return None
    return {
        "urn": urn,
        "custom": not str(record["type"]).startswith("ironlink:"),
        "type": record["type"],
        "inputs": record.get("inputs", {}),
        "parent": record.get("parent") or "",
        "protect": bool(record.get("protect")),
    }


def _diff_kind(change: Change, replaces: bool) -> str:
    kind = "add" if change.old is ABSENT else "delete" if change.new is ABSENT else "update"
    return f"{kind}-replace" if replaces else kind


def _preview_step(step: Step) -> dict[str, Any]:
    out: dict[str, Any] = {"op": step.op, "urn": step.urn}
    if step.op != "create":
        out["oldState"] = _state(step.old, step.urn)
    if step.op != "delete":
        out["newState"] = _state(step.new, step.urn)
    if step.op in ("update", "replace"):
        out["diffReasons"] = sorted({str(change.path[0]) for change in step.changes})
    reason_roots = {path.split(".")[0].split("[")[0] for path, _ in step.replace_reasons}
    if step.op == "replace":
        out["replaceReasons"] = sorted(reason_roots)
    replacing = {path for path, _ in step.replace_reasons}
    out["detailedDiff"] = {
        pulumi_path(tuple(p for p in change.path if p != "#")): {
            "kind": _diff_kind(change, any(change.dotted.startswith(path) for path in replacing)),
            "inputDiff": True,
        }
        for change in step.changes
    }
    return out


def render_json(diffs: Sequence[StackDiff]) -> dict[str, dict[str, Any]]:
    """Per stack, a document shaped like ``pulumi preview --json`` (its ``PreviewDigest``: ``steps``
    with ``op``, ``urn``, ``oldState``/``newState``, ``diffReasons``, ``replaceReasons``,
    ``detailedDiff``; ``changeSummary``), with the stateful and rename findings as ``diagnostics``."""
    documents: dict[str, dict[str, Any]] = {}
    for diff in diffs:
        diagnostics = []
        for step in diff.steps:
            if step.stateful and step.destructive:
                diagnostics.append(
                    {
                        "urn": step.urn,
                        "prefix": "stateful: ",
                        "message": f"{step.op} of a stateful resource ({step.stateful})",
                        "severity": "warning",
                    }
                )
            if step.rename:
                diagnostics.append(
                    {"urn": step.urn, "prefix": "rename: ", "message": step.detail(), "severity": "info"}
                )
        document: dict[str, Any] = {
            "steps": [_preview_step(step) for step in diff.steps],
            "changeSummary": {op: n for op, n in diff.counts().items() if n},
        }
        if diagnostics:
            document["diagnostics"] = diagnostics
        documents[diff.stack] = document
    return documents
