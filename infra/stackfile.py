"""Edit ``stacks/Pulumi.<stack>.yaml`` in place, keeping its comments, key order and layout.

The tenant CLI changes a stack file the way a person would: ruamel.yaml's round-trip mode keeps
every comment and the order of keys, and an edit touches only the lines it changes. Before
anything is written, the *whole* edited file is validated with :func:`infra.config.parse_platform`;
a file that would not validate is never written. Writes are atomic (temporary file + rename).

ruamel.yaml attaches the comment lines *between* two list items to the end of the first item. An
edit therefore moves them along: a comment introducing the next tenant stays above that tenant
when an item is appended before it or the item it hangs on is removed.
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
    existing_stack_file,
    parse_platform,
    read_stack_text,
)
from infra.fleet import Fleet, machine_types, parse_fleet

TENANTS_KEY = f"{NAMESPACE}:tenants"


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
def _last_leaf(node: Any) -> tuple[CommentedMap, Any] | None:
    """The mapping and key whose line is the last one of ``node`` (where trailing comments hang)."""
    if isinstance(node, CommentedSeq) and len(node):
        return _last_leaf(node[-1])
    if isinstance(node, CommentedMap) and len(node):
        key = list(node)[-1]
        deeper = _last_leaf(node[key]) if isinstance(node[key], CommentedMap | CommentedSeq) else None
        return deeper or (node, key)
    return None


def _take_trailing_lines(node: Any) -> str:
    """Detach the full-line comments after ``node`` (its end-of-line comment stays)."""
    leaf = _last_leaf(node)
    if leaf is None:
        return ""
    holder, key = leaf
    entry = holder.ca.items.get(key)
    token = entry[2] if entry and len(entry) > 2 else None
    if token is None:
        return ""
    end_of_line, _, lines = token.value.partition("\n")
    if end_of_line.strip():
        token.value = end_of_line + "\n"
    else:
        entry[2] = None
    return lines


def _append_trailing_lines(node: Any, lines: str) -> None:
    leaf = _last_leaf(node)
    if not lines or leaf is None:
        return
    holder, key = leaf
    entry = holder.ca.items.setdefault(key, [None, None, None, None])
    if entry[2] is None:
        entry[2] = CommentToken("\n" + lines, CommentMark(0), None)
    else:
        entry[2].value = entry[2].value + lines


def _set_header(parent: CommentedMap, key: str, lines: str) -> None:
    """Put comment lines above the first item of ``parent[key]`` (or drop them: ``lines=""``)."""
    items = parent[key]
    column = items.lc.col if getattr(items.lc, "col", None) is not None else 0
    tokens = [
        CommentToken(line.strip() + "\n", CommentMark(column), None)
        for line in lines.splitlines()
        if line.strip()
    ]
    entry = parent.ca.items.setdefault(key, [None, None, None, None])
    entry[3] = tokens or None
    items.ca.comment = [None, tokens] if tokens else None


def append_item(items: CommentedSeq, item: CommentedMap) -> None:
    """Append, keeping the comments that followed the old last item after the new one."""
    lines = _take_trailing_lines(items[-1]) if len(items) else ""
    items.append(item)
    _append_trailing_lines(item, lines)


def add_key(mapping: CommentedMap, key: str, value: Any) -> None:
    """Add a key at the end of ``mapping``, keeping the comments that followed it after the new value."""
    lines = _take_trailing_lines(mapping)
    mapping[key] = value
    _append_trailing_lines(mapping, lines)


def remove_item(parent: CommentedMap, key: str, index: int) -> None:
    """Remove ``parent[key][index]`` with the comment lines above it; those below it stay put."""
    items: CommentedSeq = parent[key]
    following = _take_trailing_lines(items[index])
    if index == 0:
        _set_header(parent, key, following)
    else:
        _take_trailing_lines(items[index - 1])  # the removed item's own header
        _append_trailing_lines(items[index - 1], following)
    del items[index]


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
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(handle, "w") as out:
                out.write(self.text())
            os.chmod(temporary, self.path.stat().st_mode & 0o777)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return config

    # ------------------------------------------------------------------------------- tenants
    def _tenants(self, create: bool = False) -> CommentedSeq:
        tenants = self.config_map.get(TENANTS_KEY)
        if tenants is None and create:
            tenants = self.config_map[TENANTS_KEY] = CommentedSeq()
        if tenants is None:
            return CommentedSeq()
        if not isinstance(tenants, CommentedSeq):
            raise StackConfigError([Problem(TENANTS_KEY, "is not a list of tenants")], self.stack)
        return tenants

    def _find(self, items: Sequence[Any], item_id: str) -> int | None:
        return next(
            (i for i, item in enumerate(items) if isinstance(item, Mapping) and item.get("id") == item_id),
            None,
        )

    def _problem(self, path: str, message: str) -> StackConfigError:
        return StackConfigError([Problem(f"{NAMESPACE}:{path}", message)], self.stack)

    def tenant_index(self, tenant_id: str) -> int:
        index = self._find(self._tenants(), tenant_id)
        if index is None:
            known = ", ".join(str(t.get("id")) for t in self._tenants() if isinstance(t, Mapping)) or "none"
            raise self._problem("tenants", f"{tenant_id!r} is not a tenant of this stack (tenants: {known})")
        return index

    def add_tenant(
        self,
        tenant_id: str,
        name: str,
        tier: str,
        isolation: int | None = None,
        machine_types: Sequence[str] = (),
    ) -> None:
        tenants = self._tenants(create=True)
        index = self._find(tenants, tenant_id)
        if index is not None:
            raise self._problem(f"tenants[{index}].id", f"{tenant_id!r} already exists in this stack")
        tenant = CommentedMap([("id", tenant_id), ("name", name), ("tier", tier)])
        if isolation is not None:
            tenant["isolation"] = isolation
        if machine_types:
            tenant["machine_types"] = _flow(machine_types)
        append_item(tenants, tenant)

    def remove_tenant(self, tenant_id: str) -> None:
        remove_item(self.config_map, TENANTS_KEY, self.tenant_index(tenant_id))

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


def _flow(items: Sequence[str]) -> CommentedSeq:
    """A one-line list (``[a, b]``), as a person writes a short list of names."""
    seq = CommentedSeq(items)
    seq.fa.set_flow_style()
    return seq
