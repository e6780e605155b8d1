"""``ironlink fleet import``: an old-style stack's fleet moves into the real registry (PostgreSQL)
without loss, the stack file keeps its comments and loses every machine, and a second run
changes nothing; ``ironlink stack split`` then gives its tenants stacks of their own. The fleet
model refuses bad fleets naming the field."""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg
import pytest
import yaml
from typer.testing import CliRunner

from infra.cli import app
from infra.config import StackConfigError, load_stack
from infra.fleet import load_fleet_file, parse_fleet
from infra.tenancy import device_username
from registry.credentials import verify_password
from registry.store import audit_events

OLD_STACK = Path(__file__).parent / "fixtures" / "registry" / "Pulumi.old-dev.yaml"
runner = CliRunner()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "Pulumi.yaml").write_text("name: ironlink\nruntime: python\n")
    (tmp_path / "stacks").mkdir()
    shutil.copy(OLD_STACK, tmp_path / "stacks" / "Pulumi.old.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _registry_rows(dsn: str) -> tuple[set[tuple[str, ...]], set[tuple[str, ...]], dict[str, str]]:
    with psycopg.connect(dsn) as conn:
        sites = {tuple(r) for r in conn.execute("SELECT tenant_id, id, coalesce(name, '') FROM sites")}
        machines = {tuple(r) for r in conn.execute("SELECT tenant_id, site_id, id, type FROM machines")}
        devices: dict[str, str] = dict(conn.execute("SELECT username, credential FROM devices").fetchall())
    return sites, machines, devices


def test_an_old_style_stack_is_refused_naming_the_field_and_the_command(project: Path) -> None:
    result = runner.invoke(app, ["plan", "old"])
    assert result.exit_code == 2
    assert "ironlink:tenants: tenants have stacks of their own now" in result.output
    assert "ironlink stack split old" in result.output
    # Splitting first is refused too: the fleet has to leave before the tenants can.
    result = runner.invoke(app, ["stack", "split", "old"])
    assert result.exit_code == 2
    assert "ironlink:tenants[0].sites" in result.output and "ironlink:tenants[1].sites" in result.output
    assert "ironlink fleet import old" in result.output
    assert sorted(path.name for path in (project / "stacks").iterdir()) == ["Pulumi.old.yaml"]
    assert (project / "stacks" / "Pulumi.old.yaml").read_text() == OLD_STACK.read_text()


def test_fleet_import_moves_everything_into_the_registry_and_keeps_the_comments(
    project: Path, postgres_dsn: str
) -> None:
    stack = project / "stacks" / "Pulumi.old.yaml"
    before = yaml.safe_load(stack.read_text())["config"]["ironlink:tenants"]
    expected_fleet = parse_fleet(before)
    comments = [line.strip() for line in stack.read_text().splitlines() if line.strip().startswith("#")]

    dry = runner.invoke(app, ["fleet", "import", "old", "--registry", postgres_dsn, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "acme: 1 sites, 3 machines, 1 device credentials" in dry.output
    assert stack.read_text() == OLD_STACK.read_text()

    result = runner.invoke(app, ["fleet", "import", "old", "--registry", postgres_dsn])
    assert result.exit_code == 0, result.output

    sites, machines, devices = _registry_rows(postgres_dsn)
    assert sites == {
        (tenant.id, site.id, site.name or "") for tenant in expected_fleet.tenants for site in tenant.sites
    }
    assert machines == {
        (tenant_id, site.id, machine.id, machine.type)
        for tenant_id, site, machine in expected_fleet.machines()
    }
    assert len(machines) == 5
    conveyor = device_username("acme", "plant-1", "conveyor-01")
    assert set(devices) == {conveyor}
    assert verify_password("lathe-secret", devices[conveyor])

    text = stack.read_text()
    assert "sites:" not in text and "machines:" not in text and "password_hash" not in text
    fleet_comments = {"# bought in 2019", "# a machine whose device already has a credential"}
    for comment in comments:
        if comment not in fleet_comments:
            assert comment in text, comment  # the fleet's own comments left with the fleet

    with psycopg.connect(postgres_dsn) as conn:
        trail = [(e.action, e.subject) for e in audit_events(conn, tenant_id="acme")]
    assert ("machine.added", "plant-1/conveyor-01") in trail
    assert ("credential.issued", conveyor) in trail

    again = runner.invoke(app, ["fleet", "import", "old", "--registry", postgres_dsn])
    assert again.exit_code == 0 and "nothing to move" in again.output
    assert stack.read_text() == text
    assert _registry_rows(postgres_dsn) == (sites, machines, devices)

    # Without its fleet the old file splits into a platform and a stack per tenant, comments kept.
    split = runner.invoke(app, ["stack", "split", "old"])
    assert split.exit_code == 0, split.output
    config = load_stack("old", project)
    assert {t.id: t.machine_types for t in config.tenants} == {
        "acme": ["cnc_mill", "conveyor", "hydraulic_press"],
        "globex": ["air_compressor", "injection_molder"],
    }
    split_text = "".join(path.read_text() for path in (project / "stacks").iterdir())
    for comment in comments:
        if comment not in fleet_comments:
            assert comment in split_text, comment


def test_importing_the_same_fleet_twice_into_the_registry_changes_nothing(postgres_dsn: str) -> None:
    from registry import store
    from registry.fleet_import import import_fleet

    config = load_stack("dev")
    fleet = load_fleet_file(Path(__file__).parents[1] / "localdev" / "demo-fleet.yaml")
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        store.sync_platform(conn, config, actor="test")
        first = import_fleet(conn, fleet, actor="test")
        second = import_fleet(conn, fleet, actor="test")
        # The stack's sync never removes what it did not create.
        store.sync_platform(conn, config, actor="test")
        count = conn.execute("SELECT count(*) FROM machines").fetchone()
    assert sum(len(r.changes) for r in first) == 6  # 2 sites, 4 machines
    assert all(not r.changes for r in second)
    assert count == (4,)


def test_export_writes_a_fleet_file_and_refuses_to_lose_the_fleet(project: Path) -> None:
    lost = runner.invoke(app, ["fleet", "import", "old"])
    assert lost.exit_code == 2 and "--registry or --export" in lost.output
    out = project / "fleet.yaml"
    result = runner.invoke(app, ["fleet", "import", "old", "--export", str(out)])
    assert result.exit_code == 0, result.output
    fleet = load_fleet_file(out)
    assert sum(1 for _ in fleet.machines()) == 5
    assert "# bought in 2019" in out.read_text()


def test_a_bad_fleet_is_refused_with_every_problem_named() -> None:
    with pytest.raises(StackConfigError) as caught:
        parse_fleet(
            [
                {"id": "acme", "sites": [{"id": "s"}, {"id": "s"}]},
                {"id": "globex", "sites": [{"id": "l", "machines": [{"id": "m", "type": "toaster"}]}]},
            ]
        )
    text = str(caught.value)
    assert "ironlink:tenants[0].sites[1].id: 's' is already used by sites[0]" in text
    assert "ironlink:tenants[1].sites[0].machines[0].type: 'toaster' is not a known machine type" in text
