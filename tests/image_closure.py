"""What a service image must hold: the project files a package imports (followed through the
project's own imports) and the third-party distributions they need; and a Dockerfile's
instructions. Shared by the image tests of the services."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = {"infra", "ingest", "registry", "components", "provisioning", "api", "edge", "localdev", "backup"}
# Every service image starts from a slim Python 3.11 of a fixed patch release (digest optional).
_SLIM_PYTHON = re.compile(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?")


def instructions(dockerfile: Path) -> dict[str, list[str]]:
    """Each instruction's arguments, continuation lines joined."""
    found: dict[str, list[str]] = {}
    for line in re.sub(r"\\\n\s*", " ", dockerfile.read_text()).splitlines():
        if line and not line.startswith("#") and " " in line:
            name, rest = line.split(" ", 1)
            found.setdefault(name, []).append(rest.strip())
    return found


def _module_file(module: str) -> Path | None:
    path = ROOT / Path(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def closure(package: str, *, skip: set[str]) -> tuple[set[Path], set[str]]:
    """The project files ``package`` (every module but ``skip``) imports, and the third-party
    distributions (normalised names) those files import."""
    files: set[Path] = set()
    modules: set[str] = set()
    todo = [p for p in (ROOT / package).rglob("*.py") if p.name not in skip]
    while todo:
        path = todo.pop()
        if path in files:
            continue
        files.add(path)
        for module in _imports(path):
            top = module.split(".")[0]
            if top in PROJECT:
                parts = module.split(".")
                for i in range(1, len(parts) + 1):
                    found = _module_file(".".join(parts[:i]))
                    if found is not None and found not in files:
                        todo.append(found)
            elif top != "__future__" and top not in sys.stdlib_module_names:
                modules.add(top)
    owners = packages_distributions()
    return files, {normalised(dist) for module in modules for dist in owners.get(module, [])} - {"ironlink"}


def normalised(name: str) -> str:
    return name.lower().replace("_", "-")


def non_root_uid(found: dict[str, list[str]]) -> int:
    """The uid the image runs as, checking its base is a pinned slim Python and its user not root."""
    (base,) = found["FROM"]
    assert _SLIM_PYTHON.fullmatch(base), f"FROM {base}: not a pinned python:3.11.N-slim image"
    (user,) = found["USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"USER {user}: not a numeric non-root user"
    return int(uid)


def pins(found: dict[str, list[str]]) -> dict[str, str]:
    """The ``"name==version"`` pins the RUN instructions install."""
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', " ".join(found["RUN"])))


def version_drift(pinned: dict[str, str]) -> list[str]:
    """Each pin that is not the version this suite runs against."""
    return [
        f"{name}: the image pins {at}, tests run {version(name)}"
        for name, at in pinned.items()
        if version(name) != at
    ]


def left_out(files: set[Path], dockerfile: Path) -> list[str]:
    """Each of ``files`` that no COPY source takes, or that ``<dockerfile>.dockerignore`` (which
    starts from an empty context, ``*``) keeps out of the build context."""
    sources = [source for line in instructions(dockerfile).get("COPY", []) for source in line.split()[:-1]]
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
    allowed = [line[1:] for line in ignore if line.startswith("!")]
    problems = [] if ignore[1] == "*" else [f"{ignore[1]!r}: the context does not start empty"]
    for path in sorted(files):
        relative = path.relative_to(ROOT).as_posix()
        if not _taken(relative, sources):
            problems.append(f"{relative} is imported but not copied")
        if not _taken(relative, allowed):
            problems.append(f"{relative} is left out of the build context")
    return problems


def _taken(relative: str, patterns: list[str]) -> bool:
    return any(relative == p or (p.endswith("/") and relative.startswith(p)) for p in patterns)
