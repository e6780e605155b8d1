"""``ironlink tenant|device`` edit copies of real stack files: comments kept, bad input refused."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import psycopg
import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from infra.cli import app, common
from infra.cli import tenant as tenant_cli
from infra.config import load_stack
from infra.plan import build_plan
from registry import store
from tests.fixtures.registry import STACK

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder holding copies of the real stacks and of the two-tenant fixture stack."""
    shutil.copy(ROOT / "Pulumi.yaml", tmp_path / "Pulumi.yaml")
    shutil.copytree(ROOT / "stacks", tmp_path / "stacks")
    shutil.copy(STACK, tmp_path / "stacks" / "Pulumi.isolation.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IRONLINK_REGISTRY_DSN", raising=False)
    # Wide consoles, so that messages and table cells are not wrapped whatever the terminal.
    monkeypatch.setattr(tenant_cli, "console", Console(width=250, no_color=True))
    monkeypatch.setattr(common, "errors", Console(width=250, no_color=True, stderr=True))
    return tmp_path


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(app, list(args), env=env)


def stack_text(project: Path, stack: str = "isolation") -> str:
    return (project / "stacks" / f"Pulumi.{stack}.yaml").read_text()


def test_tenant_add_appends_the_tenant_and_leaves_every_other_line_alone(project: Path) -> None:
    before = stack_text(project)
    result = run("tenant", "add", "isolation", "--id", "initech", "--name", "Initech: Logistics",
                 "--tier", "basic", "--isolation", "2", "--machine-type", "conveyor",
                 "--machine-type", "cnc_mill")  # fmt: skip
    assert result.exit_code == 0, result.output
    after = stack_text(project)
    assert after.startswith(before), "existing lines, comments and order must be untouched"
    assert after[len(before) :] == (
        "    - id: initech\n"
        "      name: 'Initech: Logistics'\n"
        "      tier: basic\n"
        "      isolation: 2\n"
        "      machine_types: [conveyor, cnc_mill]\n"
    )
    tenant = load_stack("isolation", project).tenant("initech")
    assert (tenant.name, tenant.machine_types) == ("Initech: Logistics", ["conveyor", "cnc_mill"])
    assert "InfluxDB: influxdb/initech/initech-telemetry" in result.output


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--id", "Initech Corp"], "ironlink:tenants[2].id: 'Initech Corp' is not a valid tenant id"),
        (["--tier", "gold"], "ironlink:tenants[2].tier: 'gold' is not a retention tier"),
        (["--isolation", "3"], "ironlink:tenants[2].isolation: 3 is not available in phase A"),
        (["--isolation", "7"], "ironlink:tenants[2].isolation: 7 is not one of 1, 2 or 3"),
        (["--id", "acme"], "ironlink:tenants[0].id: 'acme' already exists in this stack"),
        (["--id", "ingest"], "ironlink:tenants[2].id: 'ingest' is reserved"),
        (
            ["--machine-type", "laser"],
            "ironlink:tenants[2].machine_types[0]: 'laser' is not a known machine type",
        ),
        (
            ["--machine-type", "conveyor", "--machine-type", "conveyor"],
            "ironlink:tenants[2].machine_types[1]: 'conveyor' is listed twice",
        ),
    ],
)
def test_bad_tenant_input_exits_2_naming_field_and_value_and_writes_nothing(
    project: Path, args: list[str], complaint: str
) -> None:
    before = stack_text(project)
    defaults = {"--id": "initech", "--name": "Initech", "--tier": "basic"}
    options = [part for flag, value in defaults.items() if flag not in args for part in (flag, value)]
    result = run("tenant", "add", "isolation", *options, *args)
    assert result.exit_code == 2, result.output
    assert complaint in result.output
    assert stack_text(project) == before


def test_unknown_stack_and_unknown_tenant_are_refused(project: Path) -> None:
    result = run("tenant", "add", "prod", "--id", "initech", "--name", "Initech", "--tier", "basic")
    assert result.exit_code == 2
    assert "unknown stack 'prod' (known: dev, isolation, mvp-eu, poc" in result.output
    result = run("tenant", "remove", "isolation", "hooli")
    assert result.exit_code == 2
    assert "'hooli' is not a tenant of this stack (tenants: acme, globex)" in result.output


def test_tenant_remove_takes_the_tenant_and_its_own_comment_only(project: Path) -> None:
    result = run("tenant", "remove", "isolation", "acme")
    assert result.exit_code == 0, result.output
    text = stack_text(project)
    assert "acme" not in text and "Tenant A has two machines" not in text
    assert "    # Tenant B\n    - id: globex\n" in text, "the comment introducing globex stays with it"
    assert "ironlink:phase: A  # Mosquitto, TLS" in text
    assert [t.id for t in load_stack("isolation", project).tenants] == ["globex"]


def test_tenant_list_shows_levels_machine_types_and_stores(project: Path) -> None:
    listing = run("tenant", "list", "dev")
    assert listing.exit_code == 0, listing.output
    rows = {line.split("│")[1].strip(): line for line in listing.output.splitlines() if line.count("│") > 4}
    assert re.search(
        r"│ globex\s*│ standard\s*│ 1\s*│ Globex Plastics\s*│ air_compressor, injection_molder\s*│",
        rows["globex"],
    )
    assert "ironlink/acme-telemetry" in rows["acme"], "level 1 tenants share the org"
    listing = run("tenant", "list", "scale-eu-west-1")
    assert "umbrella/umbrella-telemetry on influxdb-umbrella" in listing.output, (
        "level 3: own org and instance"
    )


def _plan_lines(output: str) -> set[str]:
    return {line.strip() for line in output.splitlines() if line.strip()[:2] in {"+ ", "~ ", "- "}}


def test_plan_change_is_printed(project: Path) -> None:
    before = load_stack("dev", project)
    result = run("tenant", "add", "dev", "--id", "initech", "--name", "Initech", "--tier", "basic")
    assert result.exit_code == 0, result.output
    # Exactly what the planner declares now and did not before.
    old = {r.urn: r for r in build_plan(before, "dev").resources}
    new = {r.urn: r for r in build_plan(load_stack("dev", project), "dev").resources}
    added = {f"+ {new[urn].type} {new[urn].name}" for urn in new.keys() - old.keys()}
    assert {line for line in _plan_lines(result.output) if line.startswith("+")} == added
    assert re.search(rf"Plan for stack 'dev': \+{len(added)} ~\d+ -0 resources", result.output), result.output

    result = run("tenant", "remove", "dev", "initech")
    assert result.exit_code == 0, result.output
    removed = {line for line in _plan_lines(result.output) if line.startswith("-")}
    assert removed == {"- " + line[2:] for line in added}, (
        "removing the tenant takes back what adding it added"
    )


@pytest.mark.integration
def test_registry_is_updated_and_audited_and_refusals_write_nothing(project: Path, postgres_dsn: str) -> None:
    env = {"IRONLINK_REGISTRY_DSN": postgres_dsn}
    result = run("tenant", "add", "isolation", "--id", "initech", "--name", "Initech", "--tier", "basic",
                 env=env)  # fmt: skip
    assert result.exit_code == 0, result.output
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        events = [(e.action, e.subject) for e in store.audit_events(conn, tenant_id="initech")]
        assert events == [("tenant.created", "initech")]
        assert store.audit_events(conn)[0].actor.endswith("(ironlink cli)")

    # The registry refuses a tenant it already has: the stack file stays as it was.
    (project / "stacks" / "Pulumi.isolation.yaml").write_text(STACK.read_text())
    before = stack_text(project)
    result = run(
        "tenant", "add", "isolation", "--id", "initech", "--name", "Initech", "--tier", "basic", env=env
    )
    assert result.exit_code == 2
    assert "registry refused the change: tenant.id: 'initech' already exists in the registry" in result.output
    assert stack_text(project) == before

    (project / "stacks" / "Pulumi.isolation.yaml").write_text(before.replace("id: globex", "id: initech"))
    result = run("tenant", "remove", "isolation", "initech", "--registry", postgres_dsn)
    assert result.exit_code == 0, result.output
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        assert store.tenant_ids(conn) == []
        assert store.audit_events(conn)[-1].action == "tenant.removed"

    result = run("tenant", "remove", "isolation", "acme", "--registry", "host=/nonexistent dbname=x")
    assert result.exit_code == 1 and "--registry: cannot connect to the registry" in result.output
    assert "id: acme" in stack_text(project), "nothing is written when the registry is unreachable"
