"""``ironlink tenant add|list|remove`` on copies of real stack files: a tenant is a stack file of its
own, created and deleted without touching the platform's or any other tenant's file (comments
kept); bad input refused, naming field and value, before anything is written."""

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
from infra.plan import build_plan, build_tenant_plan
from registry import store
from registry.alerts import routes_of
from tests.fixtures.registry import STACK

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder holding copies of the real stacks and the two-tenant fixture region
    (an old-style file, split into platform ``isolation`` and its tenants ``acme`` and ``globex``)."""
    shutil.copy(ROOT / "Pulumi.yaml", tmp_path / "Pulumi.yaml")
    shutil.copytree(ROOT / "stacks", tmp_path / "stacks")
    shutil.copy(STACK, tmp_path / "stacks" / "Pulumi.isolation.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IRONLINK_REGISTRY_DSN", raising=False)
    # Wide consoles, so that messages and table cells are not wrapped whatever the terminal.
    monkeypatch.setattr(tenant_cli, "console", Console(width=250, no_color=True))
    monkeypatch.setattr(common, "errors", Console(width=250, no_color=True, stderr=True))
    split = runner.invoke(app, ["stack", "split", "isolation"])
    assert split.exit_code == 0, split.output
    return tmp_path


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(app, list(args), env=env)


def stack_text(project: Path, stack: str) -> str:
    return (project / "stacks" / f"Pulumi.{stack}.yaml").read_text()


def stack_files(project: Path) -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted((project / "stacks").iterdir())}


def test_tenant_add_writes_its_own_stack_and_leaves_every_other_file_alone(project: Path) -> None:
    before = stack_files(project)
    result = run("tenant", "add", "isolation", "--id", "initech", "--name", "Initech: Logistics",
                 "--tier", "basic", "--isolation", "2", "--machine-type", "conveyor",
                 "--machine-type", "cnc_mill")  # fmt: skip
    assert result.exit_code == 0, result.output
    after = stack_files(project)
    assert after.pop("Pulumi.isolation.initech.yaml") == (
        "# Tenant initech on platform stack isolation: a stack of its own.\n"
        "config:\n"
        "  ironlink:platform: isolation\n"
        "  ironlink:tenant:\n"
        "    id: initech\n"
        "    name: 'Initech: Logistics'\n"
        "    tier: basic\n"
        "    isolation: 2\n"
        "    machine_types: [conveyor, cnc_mill]\n"
    )
    assert after == before, "the platform's and the other tenants' files, comments included, are untouched"
    tenant = load_stack("isolation", project).tenant("initech")
    assert (tenant.name, tenant.machine_types) == ("Initech: Logistics", ["conveyor", "cnc_mill"])
    assert "InfluxDB: influxdb/initech/initech-telemetry" in result.output


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--id", "Initech Corp"], "ironlink:tenant.id: 'Initech Corp' is not a valid tenant id"),
        (["--tier", "gold"], "ironlink:tenant.tier: 'gold' is not a retention tier (known: basic, premium"),
        (["--isolation", "3"], "ironlink:tenant.isolation: 3 is not available in phase A"),
        (["--isolation", "7"], "ironlink:tenant.isolation: 7 is not one of 1, 2 or 3"),
        (["--id", "acme"], "ironlink:tenant.id: 'acme' has a stack already: "),
        (["--id", "ingest"], "ironlink:tenant.id: 'ingest' is reserved"),
        (["--machine-type", "laser"], "ironlink:tenant.machine_types[0]: 'laser' is not a known machine"),
        (
            ["--machine-type", "conveyor", "--machine-type", "conveyor"],
            "ironlink:tenant.machine_types[1]: 'conveyor' is listed twice",
        ),
        (["--alert-email", "ops"], "--alert-email: 'ops' is not 1 to 10 email addresses ('ops' is not one)"),
        (
            ["--alert-email", "ops@initech.example"],
            "--alert-email: alert recipients are routes in the registry: give --registry DSN (or set "
            "IRONLINK_REGISTRY_DSN) too, or add them later with 'ironlink alerts route add "
            "--tenant 'initech' --name operations --channel email --target ...'",
        ),
    ],
)  # fmt: skip
def test_bad_tenant_input_exits_2_naming_field_and_value_and_writes_nothing(
    project: Path, args: list[str], complaint: str
) -> None:
    before = stack_files(project)
    defaults = {"--id": "initech", "--name": "Initech", "--tier": "basic"}
    options = [part for flag, value in defaults.items() if flag not in args for part in (flag, value)]
    result = run("tenant", "add", "isolation", *options, *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert complaint in result.output
    assert stack_files(project) == before


def test_unknown_stack_and_unknown_tenant_are_refused(project: Path) -> None:
    result = run("tenant", "add", "prod", "--id", "initech", "--name", "Initech", "--tier", "basic")
    assert result.exit_code == 2
    assert "unknown stack 'prod' (known: dev, " in result.output and "isolation" in result.output
    result = run("tenant", "add", "isolation.acme", "--id", "initech", "--name", "Initech", "--tier", "basic")
    assert result.exit_code == 2, "a tenant stack is no platform"
    known = "known: dev, isolation, mvp-eu, poc, poc-vm, scale-"
    assert f"unknown stack 'isolation.acme' ({known}" in result.output
    result = run("tenant", "remove", "isolation", "hooli")
    assert result.exit_code == 2
    assert "'hooli' is not a tenant of 'isolation' (tenants: acme, globex)" in result.output


def test_tenant_remove_deletes_the_tenants_stack_file_only(project: Path) -> None:
    before = stack_files(project)
    assert "# Tenant A has two machines" in before["Pulumi.isolation.acme.yaml"]
    result = run("tenant", "remove", "isolation", "acme")
    assert result.exit_code == 0, result.output
    after = stack_files(project)
    assert set(before) - set(after) == {"Pulumi.isolation.acme.yaml"}
    assert after == {name: text for name, text in before.items() if name in after}
    assert "# Tenant B\n" in after["Pulumi.isolation.globex.yaml"], "the other tenant keeps its comment"
    assert "ironlink:phase: A  # Mosquitto, TLS" in after["Pulumi.isolation.yaml"]
    assert [t.id for t in load_stack("isolation", project).tenants] == ["globex"]


def test_tenant_list_shows_stacks_levels_machine_types_and_stores(project: Path) -> None:
    listing = run("tenant", "list", "dev")
    assert listing.exit_code == 0, listing.output
    rows = {line.split("│")[1].strip(): line for line in listing.output.splitlines() if line.count("│") > 4}
    assert re.search(
        r"│ globex\s*│ dev\.globex\s*│ standard\s*│ 1\s*│ Globex Plastics\s*│"
        r" air_compressor, injection_molder\s*│",
        rows["globex"],
    )
    assert "ironlink/acme-telemetry" in rows["acme"], "level 1 tenants share the org"
    listing = run("tenant", "list", "scale-eu-west-1")
    assert "umbrella/umbrella-telemetry on influxdb-umbrella" in listing.output, (
        "level 3: own org and instance"
    )


def _plan_lines(output: str) -> set[str]:
    return {line.strip() for line in output.splitlines() if line.strip()[:2] in {"+ ", "- "}}


def test_the_tenant_stacks_plan_is_printed_and_the_platforms_is_untouched(project: Path) -> None:
    platform_before = build_plan(load_stack("dev", project), "dev")
    result = run("tenant", "add", "dev", "--id", "initech", "--name", "Initech", "--tier", "basic")
    assert result.exit_code == 0, result.output
    config = load_stack("dev", project)
    platform_after = build_plan(config, "dev")
    assert [(r.urn, r.inputs) for r in platform_after.resources] == [
        (r.urn, r.inputs) for r in platform_before.resources
    ], "adding a tenant declares nothing new in the platform stack"
    # Exactly what `ironlink plan dev.initech` declares: the tenant stack alone.
    tenant_plan = build_tenant_plan(config, platform_after, config.tenant("initech"))
    added = {f"+ {r.type} {r.name}" + (" (protected)" if r.protect else "") for r in tenant_plan.resources}
    assert added and _plan_lines(result.output) == added
    assert f"Plan for stack 'dev.initech': creates {len(tenant_plan.resources)} resources" in result.output

    result = run("tenant", "remove", "dev", "initech")
    assert result.exit_code == 0, result.output
    assert f"Plan for stack 'dev.initech': deletes {len(tenant_plan.resources)} resources" in result.output
    assert _plan_lines(result.output) == {"- " + line[2:] for line in added}, (
        "removing the tenant takes back what adding it added"
    )


@pytest.mark.integration
def test_registry_is_updated_and_audited_and_refusals_write_nothing(project: Path, postgres_dsn: str) -> None:
    env = {"IRONLINK_REGISTRY_DSN": postgres_dsn}
    result = run("tenant", "add", "isolation", "--id", "initech", "--name", "Initech", "--tier", "basic",
                 env=env)  # fmt: skip
    assert result.exit_code == 0, result.output
    initech = stack_text(project, "isolation.initech")
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        events = [(e.action, e.subject) for e in store.audit_events(conn, tenant_id="initech")]
        assert events == [("tenant.created", "initech")]
        assert store.audit_events(conn)[0].actor.endswith("(ironlink cli)")

    # The registry refuses a tenant it already has (its stack file lost): no file is written.
    (project / "stacks" / "Pulumi.isolation.initech.yaml").unlink()
    before = stack_files(project)
    result = run(
        "tenant", "add", "isolation", "--id", "initech", "--name", "Initech", "--tier", "basic", env=env
    )
    assert result.exit_code == 2
    assert "registry refused the change: tenant.id: 'initech' already exists in the registry" in result.output
    assert stack_files(project) == before

    (project / "stacks" / "Pulumi.isolation.initech.yaml").write_text(initech)
    result = run("tenant", "remove", "isolation", "initech", "--registry", postgres_dsn)
    assert result.exit_code == 0, result.output
    assert not (project / "stacks" / "Pulumi.isolation.initech.yaml").exists()
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        assert store.tenant_ids(conn) == []
        assert store.audit_events(conn)[-1].action == "tenant.removed"

    before = stack_files(project)
    result = run("tenant", "remove", "isolation", "acme", "--registry", "host=/nonexistent dbname=x")
    assert result.exit_code == 1 and "--registry: cannot connect to the registry" in result.output
    assert stack_files(project) == before, "nothing is deleted when the registry is unreachable"


@pytest.mark.integration
def test_alert_emails_become_the_new_tenants_email_route_in_the_registry_never_its_stack_file(
    project: Path, postgres_dsn: str
) -> None:
    addresses = ["ops@initech.example", "noc@initech.example"]
    emails = ["--alert-email", addresses[0], "--alert-email", addresses[1]]
    result = run("tenant", "add", "isolation", "--id", "initech", "--name", "Initech", "--tier", "basic",
                 *emails, "--registry", postgres_dsn)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Alerts emailed to ops@initech.example, noc@initech.example (registry route 'operations'" in (
        result.output
    )
    assert "alert" not in stack_text(project, "isolation.initech"), "recipients never go to a stack file"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        routes = routes_of(conn, "initech")
        actions = [event.action for event in store.audit_events(conn, tenant_id="initech")]
    shown = [(route.spec.name, route.spec.channel, route.spec.recipients(), route.spec.site_id,
              route.spec.severities, route.spec.hours) for route in routes]  # fmt: skip
    assert shown == [("operations", "email", addresses, None, None, None)], "any site, severity, hour"
    assert actions == ["tenant.created", "alert_route.created"]

    # A refused address refuses the whole command: no tenant in the registry, no stack file.
    before = stack_files(project)
    emails = ["--alert-email", "ops@hooli.example", "--alert-email", "noc"]
    result = run("tenant", "add", "isolation", "--id", "hooli", "--name", "Hooli", "--tier", "basic",
                 *emails, "--registry", postgres_dsn)  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--alert-email: 'ops@hooli.example,noc' is not 1 to 10 email addresses ('noc' is not one)" in (
        result.output
    )
    assert stack_files(project) == before
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        assert store.tenant_ids(conn) == ["initech"]
