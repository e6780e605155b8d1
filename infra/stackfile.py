"""Rewrite ``stacks/Pulumi.<stack>.yaml`` keeping its comments, key order and layout.

``ironlink fleet import`` and ``ironlink stack split`` take parts out of an old-style file the way a
person would: ruamel.yaml's round-trip mode keeps every comment and the order of keys, and an edit
touches only the lines it changes. Nothing is written unless the whole result validates; writes
are atomic (temporary file + rename).

ruamel.yaml attaches the comment lines *between* two list items to the end of the first item, or,
when that item ends in a flow collection (``[a, b]``), to the list before the second: a moved item
takes the lines above it along (:meth:`StackFile.take_tenants`), and lines below the last one stay
where they were.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark
from ruamel.yaml.tokens import CommentToken

from infra.config import (
    FLEET_KEY,
    NAMESPACE,
    PlatformConfig,
    Problem,
    StackConfigError,
    Tenant,
    existing_stack_file,
    parse_platform,
    read_stack_text,
)
from infra.fleet import Fleet, machine_types, parse_fleet

TENANTS_KEY = f"{NAMESPACE}:tenants"
PLATFORM_KEY = f"{NAMESPACE}:platform"
TENANT_KEY = f"{NAMESPACE}:tenant"


def write_atomically(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (temporary file + rename), keeping an existing file's mode."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)  # the stacks' style: "  key:\n    - item"
    yaml.width = 4096
    return yaml


def plain(node: Any) -> Any:
    """A round-trip node as plain dicts, lists and scalars (what ``parse_platform`` expects)."""
    if isinstance(node, Mapping):
        return {str(key): plain(value) for key, value in node.items()}
    if isinstance(node, list):
        return [plain(item) for item in node]
    return node


# ------------------------------------------------------------------------- comments between items
Leaf = tuple[CommentedMap | CommentedSeq, Any, int]


def _last_leaf(node: Any) -> Leaf | None:
    """Where the comment lines after ``node`` hang: the mapping key or sequence index of its last
    line, and the slot of that comment entry (2 in a mapping, 0 in a block sequence). A flow
    collection (``[a, b]``) holds none: the lines after it hang on its parent."""
    if not isinstance(node, CommentedMap | CommentedSeq) or not len(node) or node.fa.flow_style():
        return None
    key = list(node)[-1] if isinstance(node, CommentedMap) else len(node) - 1
    return _last_leaf(node[key]) or (node, key, 2 if isinstance(node, CommentedMap) else 0)


def _take_trailing_lines(node: Any) -> str:
    """Detach the full-line comments after ``node`` (its end-of-line comment stays)."""
    leaf = _last_leaf(node)
    if leaf is None:
        return ""
    holder, key, slot = leaf
    entry = holder.ca.items.get(key)
    token = entry[slot] if entry and len(entry) > slot else None
    if token is None:
        return ""
    end_of_line, _, lines = token.value.partition("\n")
    if end_of_line.strip():
        token.value = end_of_line + "\n"
    else:
        entry[slot] = None
    return lines


def _comment_lines(tokens: Sequence[CommentToken]) -> str:
    """Full-line comment tokens as text, each at its own column (their values start at '#')."""
    return "".join(" " * token.column + token.value for token in tokens)


def _hang_lines(leaf: Leaf, lines: str) -> None:
    holder, key, slot = leaf
    entry = holder.ca.items.setdefault(key, [None, None, None, None])
    if entry[slot] is None:
        entry[slot] = CommentToken("\n" + lines, CommentMark(0), None)
    else:
        entry[slot].value = entry[slot].value + lines


def _append_trailing_lines(node: Any, lines: str) -> None:
    leaf = _last_leaf(node)
    if lines and leaf is not None:
        _hang_lines(leaf, lines)


# ------------------------------------------------------------------------------------ stack file
class StackFile:
    """One stack file loaded for editing; :meth:`save` validates the whole file, then writes it."""

    def __init__(self, stack: str, path: Path) -> None:
        self.stack, self.path = stack, path
        self._yaml = _yaml()
        text = read_stack_text(path, stack)
        try:
            self.document = self._yaml.load(text)
        except Exception as error:  # ruamel raises several unrelated error types
            raise StackConfigError([Problem(str(path), f"is not valid YAML: {error}")], stack) from error
        if not isinstance(self.document, CommentedMap) or not isinstance(
            self.document.get("config"), CommentedMap
        ):
            raise StackConfigError([Problem(str(path), "has no 'config:' mapping")], stack)

    @classmethod
    def open(cls, stack: str, root: Path | None = None) -> StackFile:
        return cls(stack, existing_stack_file(stack, root))

    @property
    def config_map(self) -> CommentedMap:
        config: CommentedMap = self.document["config"]
        return config

    def settings(self) -> dict[str, Any]:
        """The ``ironlink:`` settings, keys without the namespace, as plain values."""
        prefix = NAMESPACE + ":"
        return {
            key[len(prefix) :]: plain(value)
            for key, value in self.config_map.items()
            if isinstance(key, str) and key.startswith(prefix)
        }

    def validate(self) -> PlatformConfig:
        return parse_platform(self.settings(), self.stack)

    def text(self) -> str:
        out = io.StringIO()
        self._yaml.dump(self.document, out)
        return out.getvalue()

    def save(self) -> PlatformConfig:
        """Validate the whole edited config; write the file only if it is valid."""
        config = self.validate()
        write_atomically(self.path, self.text())
        return config

    # ------------------------------------------------------------------------------- tenants
    def _tenants(self) -> CommentedSeq:
        tenants = self.config_map.get(TENANTS_KEY)
        if tenants is None:
            return CommentedSeq()
        if not isinstance(tenants, CommentedSeq):
            raise StackConfigError([Problem(TENANTS_KEY, "is not a list of tenants")], self.stack)
        return tenants

    def take_tenants(self) -> list[tuple[CommentedMap, str]]:
        """Remove an old-style file's ``ironlink:tenants``: each tenant's node (its own comments
        inside) with the comment lines that stood above it. Comment lines after the last tenant
        stay in this file, above what followed the list. Nothing is written."""
        if TENANTS_KEY not in self.config_map:
            return []
        items = self._tenants()
        header = (items.ca.comment or [None, None])[1] or []
        above = "".join(token.value for token in header)
        taken: list[tuple[CommentedMap, str]] = []
        for index, item in enumerate(items):
            # Lines after an item ending in a flow collection hang on the list, before the next item.
            before = (items.ca.items.get(index) or [None, None])[1] or []
            taken.append((item, above + _comment_lines(before)))
            above = _take_trailing_lines(item)
        above += _comment_lines(items.ca.end or [])
        keys = list(self.config_map)
        position = keys.index(TENANTS_KEY)
        del self.config_map[TENANTS_KEY]
        if above and position > 0:
            previous = keys[position - 1]
            _hang_lines(_last_leaf(self.config_map[previous]) or (self.config_map, previous, 2), above)
        return taken

    def tenant_stack_text(self, tenant: CommentedMap, comments: str) -> str:
        """The text of the tenant stack file for ``tenant`` (a node of :meth:`take_tenants`) on this
        platform, its comments kept."""
        config = CommentedMap([(PLATFORM_KEY, self.stack), (TENANT_KEY, tenant)])
        document = CommentedMap([("config", config)])
        lines = [f"Tenant {tenant.get('id')} on platform stack {self.stack}: a stack of its own."]
        lines += [line.strip().removeprefix("#").strip() for line in comments.splitlines() if line.strip()]
        document.yaml_set_start_comment("\n".join(lines))
        out = io.StringIO()
        self._yaml.dump(document, out)
        return out.getvalue()

    # --------------------------------------------------------------------------------- fleet
    def take_fleet(self) -> tuple[Fleet, str]:
        """Move an old-style file's fleet out: each tenant loses ``sites:`` and gains the
        ``machine_types`` its machines had. Returns the fleet and a fleet file's text holding the
        moved nodes with their own comments; comments around ``sites:`` stay in the stack file.
        Nothing is written: :meth:`save` does that."""
        tenants = self._tenants()
        fleet = parse_fleet(plain(tenants), self.stack)
        moved = CommentedSeq()
        for tenant, tenant_fleet in zip(tenants, fleet.tenants, strict=True):
            if FLEET_KEY not in tenant:
                continue
            following = _take_trailing_lines(tenant)
            position = list(tenant).index(FLEET_KEY)
            sites = tenant.pop(FLEET_KEY)
            wanted = sorted({*(tenant.get("machine_types") or ()), *machine_types(tenant_fleet)})
            if "machine_types" in tenant:
                tenant["machine_types"] = _flow(wanted)
            elif wanted:
                tenant.insert(position, "machine_types", _flow(wanted))
            _append_trailing_lines(tenant, following)
            moved.append(CommentedMap([("id", tenant_fleet.id), (FLEET_KEY, sites)]))
        out = io.StringIO()
        self._yaml.dump(CommentedMap([("tenants", moved)]), out)
        return fleet, out.getvalue()


def new_tenant_stack_text(platform: str, tenant: Tenant) -> str:
    """The stack file of a new tenant, in the stacks' style (short lists on one line)."""
    body = CommentedMap(
        (key, _flow(value) if isinstance(value, list) else value)
        for key, value in tenant.model_dump(mode="json", exclude_defaults=True).items()
    )
    config = CommentedMap([(PLATFORM_KEY, platform), (TENANT_KEY, body)])
    document = CommentedMap([("config", config)])
    document.yaml_set_start_comment(f"Tenant {tenant.id} on platform stack {platform}: a stack of its own.")
    out = io.StringIO()
    _yaml().dump(document, out)
    return out.getvalue()


def _flow(items: Sequence[str]) -> CommentedSeq:
    """A one-line list (``[a, b]``), as a person writes a short list of names."""
    seq = CommentedSeq(items)
    seq.fa.set_flow_style()
    return seq
