"""docs/architecture.md: every test it cites as the proof of a guarantee exists, and every picture
it shows is there (their content is checked by tests/test_graph.py)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"


def cited_tests() -> list[tuple[str, str]]:
    """(file, test) pairs; ``::test_x`` alone continues the file cited before it."""
    cited, current = [], ""
    for file, name in re.findall(r"(?:(test_\w+\.py))?::(test_\w+)", DOC.read_text()):
        current = file or current
        cited.append((current, name))
    return cited


def test_every_cited_test_exists() -> None:
    cited = cited_tests()
    assert len(cited) >= 20, "the guarantees table cites its tests"
    missing = [
        f"{file}::{name}"
        for file, name in cited
        if not re.search(rf"^def {name}\(", (ROOT / "tests" / file).read_text(), re.MULTILINE)
    ]
    assert missing == []


def test_every_picture_is_committed() -> None:
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", DOC.read_text())
    assert pictures == ["graphs/mvp-eu.svg", "graphs/scale-eu-west-1.umbrella.svg"]
    assert all((DOC.parent / picture).is_file() for picture in pictures)
