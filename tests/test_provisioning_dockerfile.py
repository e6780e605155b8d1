"""The provisioning service's image: pinned, non-root, a volume for the CA keys, and holding every
module the service imports (followed from ``provisioning/`` through the project's own imports)."""

from __future__ import annotations

import ast
import re
from importlib.metadata import packages_distributions, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "provisioning" / "Dockerfile").read_text()
INSTRUCTIONS = re.sub(r"\\\n\s*", " ", DOCKERFILE)
PROJECT = {"infra", "ingest", "registry", "components", "provisioning"}


def instruction(name: str) -> list[str]:
    return [
        line[len(name) + 1 :].strip() for line in INSTRUCTIONS.splitlines() if line.startswith(name + " ")
    ]


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


def service_closure() -> tuple[set[Path], set[str]]:
    """The project files the service imports, and the third-party top-level modules they import."""
    files: set[Path] = set()
    third_party: set[str] = set()
    todo = [p for p in (ROOT / "provisioning").glob("*.py") if p.name != "openapi.py"]
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
            elif top not in {"__future__"} and top not in __import__("sys").stdlib_module_names:
                third_party.add(top)
    return files, third_party


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def test_the_service_runs_as_a_numeric_non_root_user_with_a_volume_for_its_ca_keys() -> None:
    (base,) = instruction("FROM")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    (user,) = instruction("USER")
    assert int(user.split(":")[0]) > 0
    assert instruction("VOLUME") == ["/ca"] and "IRONLINK_PROV_CA_DIR=/ca" in instruction("ENV")
    assert instruction("ENTRYPOINT") == ['["python", "-m", "provisioning"]']
    assert len(instruction("HEALTHCHECK")) == 1


def test_the_image_pins_every_distribution_the_service_imports_at_the_version_tested() -> None:
    owners = packages_distributions()
    _, modules = service_closure()
    imported = {_norm(dist) for module in modules for dist in owners.get(module, [])}
    pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', " ".join(instruction("RUN"))))
    # psycopg's binary build and pool are extras of psycopg (imported as psycopg / psycopg_pool).
    assert imported - {"ironlink"} <= {_norm(name) for name in pins}, imported
    for name, pinned in pins.items():
        assert version(name) == pinned, f"{name}: the image pins {pinned}, tests run {version(name)}"


def test_the_image_copies_every_project_module_the_service_imports() -> None:
    files, _ = service_closure()
    copied = " ".join(instruction("COPY")).split()
    ignore = set((ROOT / "provisioning" / "Dockerfile.dockerignore").read_text().splitlines())
    for path in files:
        relative = path.relative_to(ROOT).as_posix()
        assert any(relative == c or (c.endswith("/") and relative.startswith(c)) for c in copied), relative
        assert any(relative == i[1:] or (i.endswith("/") and relative.startswith(i[1:])) for i in ignore), (
            relative
        )
