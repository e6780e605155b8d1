"""The worker's image: pinned, non-root, with a healthcheck, and holding everything it imports."""

from __future__ import annotations

import ast
import re
from importlib.metadata import packages_distributions, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "ingest" / "Dockerfile").read_text()
INSTRUCTIONS = re.sub(r"\\\n\s*", " ", DOCKERFILE)


def instruction(name: str) -> list[str]:
    return [
        line[len(name) + 1 :].strip() for line in INSTRUCTIONS.splitlines() if line.startswith(name + " ")
    ]


def test_the_base_image_is_a_pinned_slim_python() -> None:
    (base,) = instruction("FROM")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base


def test_the_worker_runs_as_a_numeric_non_root_user_with_a_healthcheck() -> None:
    (user,) = instruction("USER")
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) > 0
    (healthcheck,) = instruction("HEALTHCHECK")
    assert '"-m", "ingest.healthcheck"' in healthcheck
    assert instruction("ENTRYPOINT") == ['["python", "-m", "ingest"]']


def test_the_image_pins_every_distribution_the_worker_imports_at_the_version_tested() -> None:
    """Each third-party import of the code the image copies is pinned (pip brings their own
    dependencies), nothing else is, and each pin is the version this suite runs against."""
    owners = packages_distributions()
    imported: set[str] = set()
    for path in [
        *(ROOT / "ingest").glob("*.py"),
        ROOT / "infra" / "config.py",
        ROOT / "infra" / "tenancy.py",
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            imported |= {_norm(dist) for name in names for dist in owners.get(name.split(".")[0], [])}
    pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', " ".join(instruction("RUN"))))
    assert {_norm(name) for name in pins} == imported - {"ironlink"}
    for name, pinned_version in pins.items():
        assert version(name) == pinned_version, (
            f"{name}: the image pins {pinned_version}, tests run {version(name)}"
        )


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def test_the_image_copies_the_modules_the_worker_imports_from_the_project() -> None:
    copied = " ".join(instruction("COPY"))
    for path in ("infra/config.py", "infra/tenancy.py", "ingest/"):
        assert path in copied
    ignore = (ROOT / "ingest" / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[1] == "*" and {"!infra/config.py", "!infra/tenancy.py", "!ingest/"} <= set(ignore)
