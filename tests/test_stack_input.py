"""Bad stack files and oversized values are refused by every command with exit code 2 and a message
naming the file or the field, never a traceback, and the size of what is echoed back is bounded.
A region is a platform stack file plus a file per tenant stack: each kind is checked, platform fields
in the platform's file, tenant fields in the tenant's."""

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
GOOD_PLATFORM = """\
config:
  ironlink:phase: A
  ironlink:region: local
"""


def good_tenant(platform: str) -> str:
    """Tenant ``acme``'s stack file on ``platform``."""
    return f"""\
config:
  ironlink:platform: {platform}
  ironlink:tenant:
    id: acme
    name: Acme Manufacturing
    tier: basic
    machine_types: [hydraulic_press]
"""


def alias_bomb(good: str, levels: int = 7) -> str:
    """Each level repeats the one before ten times: 10**levels values from a few hundred bytes."""
    lines = ["    l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return good + "  ironlink:bomb:\n" + "\n".join(lines) + "\n"


def bad_files(good: str) -> dict[str, tuple[str | bytes, str]]:
    """Each bad version of a good stack file, and what the error says after the file's path."""
    after = good.count("\n") + 1  # the line a case appends
    second = good.splitlines()[1]  # "  ironlink:<key>: <value>"
    too_big = good + "#" + "x" * MAX_STACK_FILE_BYTES + "\n"
    return {
        "not-utf8": (good.encode() + b"# Fran\xe7aise\n", f"is not UTF-8 text: byte 0xe7 on line {after}"),
        "too-big": (
            too_big,
            f"is {len(too_big)} bytes; a stack file may have at most {MAX_STACK_FILE_BYTES}",
        ),
        "alias-bomb": (alias_bomb(good), f"expands to more than {MAX_STACK_NODES} values"),
        "deep": (
            good + "  ironlink:deep: " + "[" * 100 + "]" * 100 + "\n",
            f"nests deeper than {MAX_STACK_DEPTH} levels (line {after})",
        ),
        "recursive-alias": (
            good + "  ironlink:loop: &loop [*loop]\n",
            f"alias *loop on line {after} repeats no node defined before it",
        ),
        "duplicate-key": (
            good + second + "\n",
            f"key {second.split(': ')[0].strip()!r} is given twice (lines 2 and {after})",
        ),
        "two-boms": (
            b"\xef\xbb\xbf\xef\xbb\xbf" + good.encode(),
            "has a stray byte-order mark (U+FEFF) on line 1",
        ),
    }


BAD_FILE_CASES = list(bad_files(GOOD_PLATFORM))
# Every command that reads the platform's file; those marked reads_tenants read acme's file too.
COMMANDS = {
    "plan": ["plan", "{stack}", "--no-tree"],
    "plan tenant": ["plan", "{stack}.acme", "--no-tree"],
    "tenant list": ["tenant", "list", "{stack}"],
    "tenant add": ["tenant", "add", "{stack}", "--id", "initech", "--name", "Initech", "--tier", "basic"],
    "tenant remove": ["tenant", "remove", "{stack}", "acme"],
}
READS_TENANTS = ["plan", "plan tenant", "tenant list", "tenant remove"]


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


def write_region(
    project: Path, stack: str, platform: str | bytes = GOOD_PLATFORM, tenant: str | bytes | None = None
) -> tuple[Path, Path]:
    """Platform ``stack`` and its tenant ``acme`` (a good file unless given)."""
    tenant_path = write_stack(project, f"{stack}.acme", tenant or good_tenant(stack))
    return write_stack(project, stack, platform), tenant_path


def snapshot(project: Path) -> dict[str, bytes]:
    """Every file of the project (stacks, plans, leftovers) with its bytes."""
    return {str(p.relative_to(project)): p.read_bytes() for p in sorted(project.rglob("*")) if p.is_file()}


def run(command: str, stack: str) -> Result:
    return runner.invoke(app, [part.format(stack=stack) for part in COMMANDS[command]])


def assert_refused(result: Result, *complaints: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for complaint in complaints:
        assert complaint in result.output, result.output
    assert len(result.output) < 2000, "an error message must not echo a large value back"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", BAD_FILE_CASES)
def test_a_bad_platform_file_is_refused_naming_the_file_and_left_unchanged(
    project: Path, case: str, command: str
) -> None:
    content, complaint = bad_files(GOOD_PLATFORM)[case]
    path, _ = write_region(project, case, platform=content)
    before = snapshot(project)
    assert_refused(run(command, case), f"{path}: {complaint}")
    assert snapshot(project) == before


@pytest.mark.parametrize("command", READS_TENANTS)
@pytest.mark.parametrize("case", BAD_FILE_CASES)
def test_a_bad_tenant_file_is_refused_naming_the_file_and_left_unchanged(
    project: Path, case: str, command: str
) -> None:
    content, complaint = bad_files(good_tenant(case))[case]
    _, path = write_region(project, case, tenant=content)
    before = snapshot(project)
    assert_refused(run(command, case), f"{path}: {complaint}")
    assert snapshot(project) == before


def test_another_tenants_broken_file_does_not_stop_a_tenant_being_added(project: Path) -> None:
    write_region(project, "region", tenant=bad_files(good_tenant("region"))["not-utf8"][0])
    added = run("tenant add", "region")
    assert added.exit_code == 0, added.output
    assert (project / "stacks" / "Pulumi.region.initech.yaml").is_file()


def test_the_real_command_refuses_a_non_utf8_file_without_a_traceback(project: Path) -> None:
    _, path = write_region(project, "latin", tenant=bad_files(good_tenant("latin"))["not-utf8"][0])
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
    bom = b"\xef\xbb\xbf"
    write_region(
        project, "bom", platform=bom + GOOD_PLATFORM.encode(), tenant=bom + good_tenant("bom").encode()
    )
    listed = run("tenant list", "bom")
    assert listed.exit_code == 0, listed.output
    assert "Acme Manufacturing" in listed.output
    added = run("tenant add", "bom")
    assert added.exit_code == 0, added.output
    assert [tenant.id for tenant in load_stack("bom", project).tenants] == ["acme", "initech"]


def test_anchors_and_aliases_within_the_bound_are_accepted(project: Path) -> None:
    tiers = "    retention_tiers:\n      gold: &gold {raw: 90d, downsampled: 730d}\n      silver: *gold\n"
    tenant = good_tenant("aliases").replace("    id: acme\n    name: Acme Manufacturing\n",
                                            "    id: &id acme\n    name: *id\n")  # fmt: skip
    write_region(project, "aliases", platform=GOOD_PLATFORM + "  ironlink:influxdb:\n" + tiers,
                 tenant=tenant.replace("tier: basic", "tier: silver"))  # fmt: skip
    config = load_stack("aliases", project)
    assert config.influxdb.retention_tiers["silver"] == config.influxdb.retention_tiers["gold"]
    assert [(tenant.name, tenant.tier) for tenant in config.tenants] == [("acme", "silver")]


# (file, text in it, its replacement, what the error says): tenant fields in the tenant's file,
# platform fields in the platform's.
FIELD_CASES = {
    "tenant-name": (
        "tenant", "name: Acme Manufacturing", "name: " + "N" * 200_000,
        "ironlink:tenant.name: is 200000 characters long; at most 128 are allowed",
    ),
    "machine-type": (
        "tenant", "machine_types: [hydraulic_press]", "machine_types: [" + "p" * 129 + "]",
        "ironlink:tenant.machine_types[0]: 'ppp",
    ),
    "name-escape": (
        "tenant", "name: Acme Manufacturing", 'name: "Acme\\e[2J"',
        "ironlink:tenant.name: 'Acme\\x1b[2J' contains the control character '\\x1b'",
    ),
    "tier": (
        "tenant", "tier: basic", "tier: " + "t" * 65,
        "ironlink:tenant.tier: is 65 characters long; at most 64",
    ),
    "alert-emails-retired": (
        "tenant", "    tier: basic\n", "    tier: basic\n    alert_emails: [" + "o" * 300 + "@example.com]\n",
        "ironlink:tenant.alert_emails: alert recipients are registry routes now; remove it and run "
        "'ironlink alerts route add --tenant acme",  # the 312-character address is cut (the length bound)
    ),
    "id-newline": (
        "tenant", "id: acme", 'id: "acme\\n"', "ironlink:tenant.id: 'acme\\n' is not a valid tenant id",
    ),
    "id-elsewhere": (
        "tenant", "id: acme", "id: globex",
        "ironlink:tenant.id: 'globex' on platform 'bad' belongs in stack 'bad.globex', not 'bad.acme'",
    ),
    "other-platform": (
        "tenant", "ironlink:platform: bad", "ironlink:platform: " + "o" * 100,
        "ironlink:platform: '" + "o" * 79 + "... (102 characters) is not a valid platform stack name",
    ),
    "tenant-unknown-key": (
        "tenant", "    tier: basic\n", "    tier: basic\n    colour: " + "c" * 1000 + "\n",
        "ironlink:tenant.colour: unknown setting 'colour'",
    ),
    "tenant-stack-unknown-key": (
        "tenant", "  ironlink:tenant:", "  ironlink:" + "k" * 1000 + ": 1\n  ironlink:tenant:",
        "ironlink:" + "k" * 80 + "... (1000 characters): unknown setting of a tenant stack",
    ),
    "image-length": (
        "platform", "  ironlink:region: local\n",
        "  ironlink:region: local\n  ironlink:broker:\n    image: eclipse-mosquitto:" + "9" * 300 + "\n",
        "ironlink:broker.image: is 318 characters long; at most 255 are allowed",
    ),
    "image-space": (
        "platform", "  ironlink:region: local\n",
        "  ironlink:region: local\n  ironlink:ingest:\n    image: ingest latest\n",
        "ironlink:ingest.image: 'ingest latest' is not a valid image reference",
    ),
    "domain": (
        "platform", "  ironlink:region: local\n",
        "  ironlink:region: local\n  ironlink:cluster:\n    domain: Ironlink_Example.com\n",
        "ironlink:cluster.domain: 'Ironlink_Example.com' is not a valid DNS name",
    ),
    "context": (
        "platform", "  ironlink:region: local\n",
        "  ironlink:region: local\n  ironlink:cluster:\n    context: " + "c" * 300 + "\n",
        "ironlink:cluster.context: is 300 characters long; at most 253 are allowed",
    ),
    "cron": (
        "platform", "  ironlink:region: local\n",
        "  ironlink:region: local\n  ironlink:postgres:\n    backup_schedule: '" + "*" * 200 + "'\n",
        "ironlink:postgres.backup_schedule: is 200 characters long; at most 128 are allowed",
    ),
    "unknown-key": (
        "platform", "  ironlink:region: local\n",
        "  ironlink:region: local\n  ironlink:" + "k" * 1000 + ": 1\n",  # PyYAML's longest plain key
        "ironlink:" + "k" * 80 + "... (1000 characters): unknown setting",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", FIELD_CASES)
@pytest.mark.parametrize("command", ["plan", "plan tenant", "tenant list"])
def test_oversized_or_malformed_values_are_refused_naming_the_field(
    project: Path, command: str, case: str
) -> None:
    file, old, new, complaint = FIELD_CASES[case]
    good = GOOD_PLATFORM if file == "platform" else good_tenant("bad")
    assert good.count(old) == 1
    write_region(project, "bad", **{file: good.replace(old, new)})
    before = snapshot(project)
    assert_refused(run(command, "bad"), "stack 'bad' has", complaint)
    assert snapshot(project) == before


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["add", "good", "--id", "initech", "--name", "N" * 100_000, "--tier", "basic"],
         "ironlink:tenant.name: is 100000 characters long; at most 128 are allowed"),
        (["add", "good", "--id", "i" * 100_000, "--name", "Initech", "--tier", "basic"],
         "ironlink:tenant.id: '" + "i" * 79 + "... (100002 characters) is not a valid tenant id"),
        (["remove", "good", "i" * 100_000],
         "TENANT: '" + "i" * 79 + "... (100002 characters) is not a tenant of 'good' (tenants: acme)"),
        (["add", "good", "--id", "initech", "--name", "Initech", "--tier", "basic",
          "--alert-email", "o" * 100_000 + "@example.com"],
         "--alert-email: String should have at most 2048 characters"),
    ],
    ids=["add-name", "add-id", "remove-id", "add-alert-email"],
)  # fmt: skip
def test_tenant_commands_refuse_a_huge_value_before_writing(
    project: Path, args: list[str], complaint: str
) -> None:
    write_region(project, "good")
    before = snapshot(project)
    assert_refused(runner.invoke(app, ["tenant", *args]), complaint)
    assert snapshot(project) == before


@pytest.mark.parametrize("stack", ["../stacks/Pulumi.good", "s" * 300, "good.acme.x"])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_stack_name_that_is_a_path_or_too_long_is_an_unknown_stack(
    project: Path, command: str, stack: str
) -> None:
    write_region(project, "good")
    assert_refused(run(command, stack), "unknown stack '" + stack[:20], "(known: good")
