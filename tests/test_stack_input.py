"""Bad stack files and oversized values are refused by every command with exit code 2 and a message
naming the file or the field, never a traceback, and the size of what is echoed back is bounded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from infra.cli import app, common
from infra.cli import tenant as tenant_cli
from infra.config import MAX_STACK_DEPTH, MAX_STACK_FILE_BYTES, MAX_STACK_NODES, load_stack

runner = CliRunner()
GOOD = """\
config:
  ironlink:phase: A
  ironlink:region: local
  ironlink:tenants:
    - id: acme
      name: Acme Manufacturing
      tier: basic
      machine_types: [hydraulic_press]
"""


def alias_bomb(levels: int = 7) -> str:
    """Each level repeats the one before ten times: 10**levels values from a few hundred bytes."""
    lines = ["    l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return GOOD.replace(
        "  ironlink:tenants:", "  ironlink:bomb:\n" + "\n".join(lines) + "\n  ironlink:tenants:"
    )


TOO_BIG = GOOD + "#" + "x" * MAX_STACK_FILE_BYTES + "\n"
# Each bad file, and what the error says after the file's path.
BAD_FILES: dict[str, tuple[str | bytes, str]] = {
    "not-utf8": (
        GOOD.encode().replace(b"Acme Manufacturing", b"Acme Fran\xe7aise"),
        "is not UTF-8 text: byte 0xe7 on line 6",
    ),
    "too-big": (TOO_BIG, f"is {len(TOO_BIG)} bytes; a stack file may have at most {MAX_STACK_FILE_BYTES}"),
    "alias-bomb": (alias_bomb(), f"expands to more than {MAX_STACK_NODES} values"),
    "deep": (
        GOOD + "  ironlink:deep: " + "[" * 100 + "]" * 100 + "\n",
        f"nests deeper than {MAX_STACK_DEPTH} levels (line 9)",
    ),
    "recursive-alias": (
        GOOD + "  ironlink:loop: &loop [*loop]\n",
        "alias *loop on line 9 repeats no node defined before it",
    ),
    "duplicate-key": (
        GOOD + "  ironlink:region: elsewhere\n",
        "key 'ironlink:region' is given twice (lines 3 and 9)",
    ),
    "two-boms": (
        b"\xef\xbb\xbf\xef\xbb\xbf" + GOOD.encode(),
        "has a stray byte-order mark (U+FEFF) on line 1",
    ),
}
COMMANDS = {
    "plan": ["plan", "{stack}", "--no-tree"],
    "tenant list": ["tenant", "list", "{stack}"],
    "tenant add": ["tenant", "add", "{stack}", "--id", "initech", "--name", "Initech", "--tier", "basic"],
}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "stacks").mkdir()
    (tmp_path / "Pulumi.yaml").write_text("name: ironlink\nruntime: python\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IRONLINK_REGISTRY_DSN", raising=False)
    monkeypatch.setattr(tenant_cli, "console", Console(width=250, no_color=True))
    monkeypatch.setattr(common, "errors", Console(width=250, no_color=True, stderr=True))
    return tmp_path


def write_stack(project: Path, stack: str, content: str | bytes) -> Path:
    path = project / "stacks" / f"Pulumi.{stack}.yaml"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def run(command: str, stack: str) -> Result:
    return runner.invoke(app, [part.format(stack=stack) for part in COMMANDS[command]])


def assert_refused(result: Result, *complaints: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for complaint in complaints:
        assert complaint in result.output
    assert len(result.output) < 2000, "an error message must not echo a large value back"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_stack_file_is_refused_naming_the_file_and_left_unchanged(
    project: Path, case: str, command: str
) -> None:
    content, complaint = BAD_FILES[case]
    path = write_stack(project, case, content)
    before = path.read_bytes()
    assert_refused(run(command, case), f"{path}: {complaint}")
    assert path.read_bytes() == before
    assert not (project / "build").exists()


def test_the_real_command_refuses_a_non_utf8_file_without_a_traceback(project: Path) -> None:
    path = write_stack(project, "latin", BAD_FILES["not-utf8"][0])
    ironlink = Path(sys.executable).parent / "ironlink"
    done = subprocess.run(
        [ironlink, "plan", "latin"],
        cwd=project,
        env={**os.environ, "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "is not UTF-8 text" in done.stderr and path.name in done.stderr


def test_a_leading_byte_order_mark_is_read_like_any_utf8_file(project: Path) -> None:
    write_stack(project, "bom", b"\xef\xbb\xbf" + GOOD.encode())
    listed = run("tenant list", "bom")
    assert listed.exit_code == 0, listed.output
    assert "Acme Manufacturing" in listed.output
    added = run("tenant add", "bom")
    assert added.exit_code == 0, added.output
    assert [tenant.id for tenant in load_stack("bom", project).tenants] == ["acme", "initech"]


def test_anchors_and_aliases_within_the_bound_are_accepted(project: Path) -> None:
    shared = GOOD.replace("      tier: basic\n", "      tier: &tier basic\n", 1)
    shared += "    - id: globex\n      name: Globex\n      tier: *tier\n"
    write_stack(project, "aliases", shared)
    assert [tenant.tier for tenant in load_stack("aliases", project).tenants] == ["basic", "basic"]


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        (
            "name: Acme Manufacturing",
            "name: " + "N" * 200_000,
            "ironlink:tenants[0].name: is 200000 characters long; at most 128 are allowed",
        ),
        (
            "machine_types: [hydraulic_press]",
            "machine_types: [" + "p" * 129 + "]",
            "ironlink:tenants[0].machine_types[0]: 'ppp",
        ),
        (
            "name: Acme Manufacturing",
            'name: "Acme\\e[2J"',
            "ironlink:tenants[0].name: 'Acme\\x1b[2J' contains the control character '\\x1b'",
        ),
        ("tier: basic", "tier: " + "t" * 65, "ironlink:tenants[0].tier: is 65 characters long; at most 64"),
        (
            "      tier: basic\n",
            "      tier: basic\n      alert_emails: [" + "o" * 300 + "@example.com]\n",
            "ironlink:tenants[0].alert_emails[0]: is 312 characters long; at most 254 are allowed",
        ),
        ("- id: acme", '- id: "acme\\n"', "ironlink:tenants[0].id: 'acme\\n' is not a valid tenant id"),
        (
            "  ironlink:tenants:",
            "  ironlink:broker:\n    image: eclipse-mosquitto:" + "9" * 300 + "\n  ironlink:tenants:",
            "ironlink:broker.image: is 318 characters long; at most 255 are allowed",
        ),
        (
            "  ironlink:tenants:",
            "  ironlink:ingest:\n    image: ingest latest\n  ironlink:tenants:",
            "ironlink:ingest.image: 'ingest latest' is not a valid image reference",
        ),
        (
            "  ironlink:tenants:",
            "  ironlink:cluster:\n    domain: Ironlink_Example.com\n  ironlink:tenants:",
            "ironlink:cluster.domain: 'Ironlink_Example.com' is not a valid DNS name",
        ),
        (
            "  ironlink:tenants:",
            "  ironlink:cluster:\n    context: " + "c" * 300 + "\n  ironlink:tenants:",
            "ironlink:cluster.context: is 300 characters long; at most 253 are allowed",
        ),
        (
            "  ironlink:tenants:",
            "  ironlink:postgres:\n    backup_schedule: '" + "*" * 200 + "'\n  ironlink:tenants:",
            "ironlink:postgres.backup_schedule: is 200 characters long; at most 128 are allowed",
        ),
        (
            "  ironlink:tenants:",
            "  ironlink:" + "k" * 1000 + ": 1\n  ironlink:tenants:",  # PyYAML's longest plain key
            "ironlink:" + "k" * 80 + "... (1000 characters): unknown setting",
        ),
    ],
    ids=[
        "tenant-name", "machine-type", "name-escape", "tier", "email", "id-newline", "image-length",
        "image-space", "domain", "context", "cron", "unknown-key",
    ],
)  # fmt: skip
@pytest.mark.parametrize("command", ["plan", "tenant list"])
def test_oversized_or_malformed_values_are_refused_naming_the_field(
    project: Path, command: str, old: str, new: str, complaint: str
) -> None:
    assert old in GOOD
    write_stack(project, "bad", GOOD.replace(old, new, 1))
    assert_refused(run(command, "bad"), "stack 'bad' has", complaint)


def test_tenant_add_refuses_a_long_name_before_writing(project: Path) -> None:
    path = write_stack(project, "good", GOOD)
    result = runner.invoke(
        app, ["tenant", "add", "good", "--id", "initech", "--name", "N" * 100_000, "--tier", "basic"]
    )
    assert_refused(result, "ironlink:tenants[1].name: is 100000 characters long; at most 128 are allowed")
    assert path.read_text() == GOOD


@pytest.mark.parametrize("stack", ["../stacks/Pulumi.good", "s" * 300])
@pytest.mark.parametrize("command", ["plan", "tenant list", "tenant add"])
def test_a_stack_name_that_is_a_path_or_too_long_is_an_unknown_stack(
    project: Path, command: str, stack: str
) -> None:
    write_stack(project, "good", GOOD)
    assert_refused(run(command, stack), "unknown stack", "(known: good)")
