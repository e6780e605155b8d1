"""``ironlink stack split``: an old-style region stack (every tenant inside) becomes a platform stack
and a stack per tenant, losing no setting and no comment; refusals write nothing. And ``ironlink
tenant add|remove`` on the result: a tenant stack file appears and disappears, nothing else moves."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from infra.cli import app, common
from infra.cli import stack as stack_cli
from infra.cli import tenant as tenant_cli
from infra.cli.stack import split_files
from infra.config import (
    load_platform,
    load_stack,
    parse_platform,
    read_stack_settings,
    stack_file,
    tenant_stacks,
)

runner = CliRunner()
STACK = "scale-eu-west-1"
# stacks/Pulumi.scale-eu-west-1.yaml as it was before the split (commit 4cae375), with comments
# above, inside and after the tenants, and a setting after the list.
OLD_STYLE = """\
# Phase C "Scale", EU region: 3-node EMQX with mutual TLS, HA Grafana, and one enterprise tenant
# (umbrella) on isolation level 3 with its own InfluxDB instance.
config:
  ironlink:phase: C
  ironlink:region: eu-west-1
  ironlink:cluster:
    context: ironlink-scale-eu-west-1
    domain: eu-west-1.ironlink.example.com
    storage_class: gp3
  # The provisioning replicas share the volume of the issuing CAs' keys: ReadWriteMany, which gp3
  # (EBS) cannot do. efs-sc: the EFS CSI driver's class, to be present on the cluster.
  ironlink:provisioning:
    ca_storage_class: efs-sc
  ironlink:broker:
    nodes: 3
  ironlink:tenants:
    # The region's first client, signed in 2021.
    - id: acme
      name: Acme Manufacturing  # legal name since 2021
      tier: standard
      machine_types: [cnc_mill, hydraulic_press]
    # Globex moved to premium after its audit.
    - id: globex
      name: Globex Plastics
      tier: premium
      machine_types: [injection_molder]
    - id: umbrella
      name: Umbrella Chemicals
      tier: premium
      isolation: 3
      # Contract: 20,000 devices, reviewed yearly.
      quota:
        max_devices: 20000
        messages_per_second: 20000
      machine_types: [air_compressor]
    # Hooli is on a trial.
    - id: hooli
      name: Hooli Hardware
      tier: basic
      machine_types:
        - conveyor
    # The worker below is sized for these tenants.
  ironlink:ingest:
    replicas: 4
"""
# Where each comment belongs after the split: its tenant's stack, or the platform's.
COMMENT_HOMES = {
    'Phase C "Scale", EU region': STACK,
    "The provisioning replicas share the volume": STACK,
    "The region's first client, signed in 2021.": f"{STACK}.acme",
    "legal name since 2021": f"{STACK}.acme",
    "Globex moved to premium after its audit.": f"{STACK}.globex",
    "Contract: 20,000 devices, reviewed yearly.": f"{STACK}.umbrella",
    "Hooli is on a trial.": f"{STACK}.hooli",
    "The worker below is sized for these tenants.": STACK,
}
TENANT_IDS = ["acme", "globex", "hooli", "umbrella"]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "stacks").mkdir()
    (tmp_path / "Pulumi.yaml").write_text("name: ironlink\nruntime: python\n")
    stack_file(STACK, tmp_path).write_text(OLD_STYLE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IRONLINK_REGISTRY_DSN", raising=False)
    wide = Console(width=250, no_color=True)
    monkeypatch.setattr(stack_cli, "console", wide)
    monkeypatch.setattr(tenant_cli, "console", wide)
    monkeypatch.setattr(common, "errors", Console(width=250, no_color=True, stderr=True))
    return tmp_path


def snapshot(project: Path) -> dict[str, bytes]:
    """Every file in stacks/ (a leftover temporary file included) with its bytes."""
    return {path.name: path.read_bytes() for path in sorted((project / "stacks").iterdir())}


def run(*args: str) -> Result:
    return runner.invoke(app, list(args))


def assert_refused(result: Result, *complaints: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for complaint in complaints:
        assert complaint in result.output, result.output
    assert len(result.output) < 3000, "an error message must not echo a large value back"


@pytest.mark.parametrize(
    "command",
    [["plan", STACK], ["tenant", "list", STACK], ["tenant", "remove", STACK, "acme"],
     ["tenant", "add", STACK, "--id", "initech", "--name", "Initech", "--tier", "basic"]],
    ids=["plan", "tenant-list", "tenant-remove", "tenant-add"],
)  # fmt: skip
def test_an_old_style_file_is_refused_by_every_command_naming_the_split(
    project: Path, command: list[str]
) -> None:
    files = snapshot(project)
    assert_refused(
        run(*command),
        "ironlink:tenants: tenants have stacks of their own now ('<platform>.<tenant>'); "
        f"run 'ironlink stack split {STACK}' to move them there",
    )
    assert snapshot(project) == files


def test_split_moves_every_tenant_into_a_stack_of_its_own_losing_nothing(project: Path) -> None:
    before = parse_platform(read_stack_settings(stack_file(STACK, project), STACK), STACK)
    assert sorted(t.id for t in before.tenants) == TENANT_IDS

    result = run("stack", "split", STACK)
    assert result.exit_code == 0, result.output

    assert tenant_stacks(STACK, project) == [f"{STACK}.{tenant_id}" for tenant_id in TENANT_IDS]
    assert load_platform(STACK, project).tenants == [], "the platform stack holds no tenant"
    after = load_stack(STACK, project)
    assert after.model_dump(exclude={"tenants"}) == before.model_dump(exclude={"tenants"})
    assert {t.id: t for t in after.tenants} == {t.id: t for t in before.tenants}

    texts = {name: stack_file(name, project).read_text() for name in [STACK, *tenant_stacks(STACK, project)]}
    assert "ironlink:tenants" not in texts[STACK]
    for comment, home in COMMENT_HOMES.items():
        assert [name for name, text in texts.items() if comment in text] == [home], comment
    platform_text = texts[STACK]
    assert platform_text.index("sized for these tenants") < platform_text.index("ironlink:ingest:"), (
        "a comment after the last tenant stays above what followed the list"
    )
    for tenant_id in TENANT_IDS:
        assert f"pulumi state move --source {STACK} --dest {STACK}.{tenant_id} " in result.output


def test_a_second_split_finds_nothing_to_move(project: Path) -> None:
    assert run("stack", "split", STACK).exit_code == 0
    files = snapshot(project)
    again = run("stack", "split", STACK)
    assert again.exit_code == 0, again.output
    assert f"stack {STACK!r} lists no tenants: nothing to split" in again.output
    assert snapshot(project) == files


def test_dry_run_lists_the_tenant_stacks_and_writes_nothing(project: Path) -> None:
    files = snapshot(project)
    result = run("stack", "split", STACK, "--dry-run")
    assert result.exit_code == 0, result.output
    for tenant_id in TENANT_IDS:
        assert f"stacks/Pulumi.{STACK}.{tenant_id}.yaml" in result.output
    assert "--dry-run: nothing written" in result.output
    assert snapshot(project) == files


def test_a_tenant_file_left_by_an_interrupted_run_is_reused_when_it_says_the_same(project: Path) -> None:
    platform_text, tenant_texts = split_files(STACK, project)
    assert set(snapshot(project)) == {f"Pulumi.{STACK}.yaml"}, "split_files writes nothing"
    stack_file(f"{STACK}.acme", project).write_text(tenant_texts[f"{STACK}.acme"])

    result = run("stack", "split", STACK)
    assert result.exit_code == 0, result.output
    assert stack_file(STACK, project).read_text() == platform_text
    for name, text in tenant_texts.items():
        assert stack_file(name, project).read_text() == text


def test_an_existing_different_tenant_file_is_refused_and_nothing_is_written(project: Path) -> None:
    theirs = stack_file(f"{STACK}.globex", project)
    theirs.write_text(
        f"config:\n  ironlink:platform: {STACK}\n  ironlink:tenant:\n"
        "    id: globex\n    name: Globex Plastics\n    tier: basic\n"
    )
    files = snapshot(project)
    result = run("stack", "split", STACK)
    assert_refused(result, f"{theirs}: exists with other content; move it away or merge it by hand")
    assert snapshot(project) == files


def test_a_bad_old_file_is_refused_with_every_problem_and_nothing_is_written(project: Path) -> None:
    bad = OLD_STYLE.replace("tier: premium\n      machine_types: [injection_molder]",
                            "tier: gold\n      machine_types: [injection_molder]")  # fmt: skip
    bad = bad.replace(
        "      machine_types:\n        - conveyor\n",
        "      machine_types:\n        - conveyor\n"
        "      sites:\n        - id: plant-1\n          machines: []\n"
        "      alert_emails: [ops@hooli.example.com, noc@hooli.example.com]\n",
    )
    bad = bad.replace("    nodes: 3\n", "    nodes: 4\n")
    assert bad.count("tier: gold") == 1 and bad.count("sites:") == 1 and bad.count("alert_emails") == 1
    stack_file(STACK, project).write_text(bad)
    files = snapshot(project)

    result = run("stack", "split", STACK)
    assert_refused(
        result,
        f"stack {STACK!r} has 4 problems",
        "ironlink:tenants[1].tier: 'gold' is not a retention tier (known: basic, premium, standard)",
        f"ironlink:tenants[3].sites: sites and machines live in the registry now, not in a stack file; "
        f"run 'ironlink fleet import {STACK}'",
        "ironlink:tenants[3].alert_emails: alert recipients are registry routes now; remove it and run "
        "'ironlink alerts route add --tenant hooli --name operations "
        "--channel email --target ops@hooli.example.com,noc@hooli.example.com --registry DSN'",
        "ironlink:broker.nodes: 4 is even",
    )
    assert snapshot(project) == files


def test_an_unknown_stack_is_refused(project: Path) -> None:
    assert_refused(run("stack", "split", "scale-eu-west-2"), "unknown stack 'scale-eu-west-2'")
    assert_refused(run("stack", "split", "../stacks/Pulumi.scale-eu-west-1"), "unknown stack")


def test_tenant_add_then_remove_round_trips_on_the_split_platform(project: Path) -> None:
    assert run("stack", "split", STACK).exit_code == 0
    files = snapshot(project)

    added = run("tenant", "add", STACK, "--id", "initech", "--name", "Initech", "--tier", "basic",
                "--machine-type", "conveyor")  # fmt: skip
    assert added.exit_code == 0, added.output
    assert set(snapshot(project)) - set(files) == {f"Pulumi.{STACK}.initech.yaml"}
    assert {name: data for name, data in snapshot(project).items() if name in files} == files
    assert f"Plan for stack '{STACK}.initech': creates" in added.output
    assert load_stack(STACK, project).tenant("initech").machine_types == ["conveyor"]

    removed = run("tenant", "remove", STACK, "initech")
    assert removed.exit_code == 0, removed.output
    assert f"Plan for stack '{STACK}.initech': deletes" in removed.output
    assert snapshot(project) == files
    assert sorted(t.id for t in load_stack(STACK, project).tenants) == TENANT_IDS


@pytest.mark.parametrize(
    ("args", "complaints"),
    [
        (
            ["--id", "globex"],
            ["ironlink:tenant.id: 'globex' has a stack already: "
             "{project}/stacks/Pulumi.scale-eu-west-1.globex.yaml"],
        ),
        (
            ["--id", "initech", "--tier", "gold"],
            ["ironlink:tenant.tier: 'gold' is not a retention tier (known: basic, premium, standard)"],
        ),
        (
            ["--id", "globex", "--tier", "gold"],
            ["stack 'scale-eu-west-1.globex' has 2 problems",
             "ironlink:tenant.id: 'globex' has a stack already",
             "ironlink:tenant.tier: 'gold' is not a retention tier"],
        ),
    ],
    ids=["duplicate", "unknown-tier", "both-at-once"],
)  # fmt: skip
def test_tenant_add_refuses_a_duplicate_or_a_tier_the_platform_lacks_naming_the_field(
    project: Path, args: list[str], complaints: list[str]
) -> None:
    assert run("stack", "split", STACK).exit_code == 0
    files = snapshot(project)
    options = ["--name", "Initech", *(["--tier", "basic"] if "--tier" not in args else [])]
    result = run("tenant", "add", STACK, *options, *args)
    assert_refused(result, *(complaint.format(project=project) for complaint in complaints))
    assert snapshot(project) == files
