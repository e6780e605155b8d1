"""The offline planner and ``ironlink plan``: what is recorded, masked and written, and how bad input
is answered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pulumi.runtime import rpc
from typer.testing import CliRunner

from infra.cli import app
from infra.config import StackConfigError, load_stack, parse_platform_stack, settings_from_pulumi_config
from infra.plan import (
    SECRET,
    PlanMocks,
    RecordingMonitor,
    build_plan,
    clean,
    engine_config,
    run_program,
    write_plan,
)
from tests.pulumi_mocks import PLANS, region_plan, stack_plan

pytestmark = PLANS
runner = CliRunner()


def secret(value: object) -> dict[str, object]:
    return {rpc._special_sig_key: rpc._special_secret_sig, "value": value}


# ------------------------------------------------------------------------------------ values
def test_secrets_are_masked_to_the_leaf_keeping_their_shape() -> None:
    assert clean(secret("hunter2")) == SECRET
    assert clean({"stringData": secret({"password": "p", "user": "u"})}) == {
        "stringData": {"password": SECRET, "user": SECRET}
    }
    assert clean([secret(["a", {"b": 1.0}])]) == [[SECRET, {"b": SECRET}]]


def test_wire_doubles_become_integers_only_when_integral() -> None:
    assert clean({"replicas": 3.0, "ratio": 0.5, "flag": True}) == {"flag": True, "ratio": 0.5, "replicas": 3}


def test_the_engine_config_round_trips_to_the_same_platform() -> None:
    config = load_stack("scale-eu-west-1")
    values = engine_config(config)
    assert set(values) >= {"ironlink:phase", "ironlink:broker"}
    assert "ironlink:tenants" not in values, "tenants are stacks of their own"
    platform = parse_platform_stack(settings_from_pulumi_config(values), "scale-eu-west-1")
    assert platform == config.model_copy(update={"tenants": []})


# ------------------------------------------------------------------------------------- plans
def test_a_bad_engine_config_fails_before_any_resource_is_declared() -> None:
    monitor = RecordingMonitor(PlanMocks())
    values = {"ironlink:phase": "C", "ironlink:region": "eu", "ironlink:broker": json.dumps({"nodes": 2})}
    with pytest.raises(StackConfigError) as caught:
        run_program(values, "broken", monitor)
    assert "ironlink:broker.nodes: 2 is too few" in str(caught.value)
    assert "ironlink:broker.nodes: 2 is even" in str(caught.value)
    assert monitor.recorded == []


def test_the_planner_can_run_repeatedly_in_one_process() -> None:
    first = build_plan(load_stack("dev"), "dev")
    other = build_plan(load_stack("mvp-eu"), "mvp-eu")
    again = build_plan(load_stack("dev"), "dev")
    assert first.to_json() == again.to_json(), "two plans of one stack must be identical"
    assert {r.urn for r in first.resources}.isdisjoint({r.urn for r in other.resources})
    assert "mvp-eu" in other.resources[0].urn and "::dev::" not in other.resources[0].urn


def test_each_resource_has_type_name_parent_inputs_and_protect() -> None:
    plan = region_plan("mvp-eu").platform
    document = plan.to_json()
    assert document["stack"] == "mvp-eu"
    urns = {r.urn for r in plan.resources}
    for entry, resource in zip(document["resources"], plan.resources, strict=True):
        assert set(entry) == {"urn", "type", "name", "parent", "inputs", "protect"}
        assert entry["parent"] is None or entry["parent"] in urns, f"{resource.name}: parent outside the plan"
    roots = [r for r in plan.resources if r.parent is None]
    assert [(r.type, r.name) for r in roots] == [
        ("ironlink:regional_platform:RegionalPlatform", "ironlink-eu-central-1")
    ]


def test_parents_come_before_their_children() -> None:
    plan = stack_plan("scale-us-east-1")
    seen: set[str] = set()
    for resource in plan.resources:
        assert resource.parent is None or resource.parent in seen, f"{resource.name} precedes its parent"
        seen.add(resource.urn)


def test_protect_is_read_from_the_registration() -> None:
    """Mocks do not see ``protect``: the flag must come from the monitor's request."""
    protected = {r.name for r in stack_plan("mvp-eu").resources if r.protect}
    assert {"postgres", "influxdb", "emqx", "influxdb-auth"} <= protected
    assert "grafana" not in protected and "ingest" not in protected


def test_every_component_owns_its_kubernetes_objects() -> None:
    plan = stack_plan("mvp-eu")
    statefulset = plan.one("StatefulSet", "postgres")
    component = plan.component_of(statefulset)
    assert component is not None and (component.type, component.name) == (
        "ironlink:postgres:Postgres",
        "postgres",
    )
    assert statefulset in plan.descendants(component)


def test_a_missing_resource_is_reported_with_the_names_there_are() -> None:
    with pytest.raises(LookupError, match=r"expected one StatefulSet 'nope'.*'postgres'"):
        stack_plan("dev").one("StatefulSet", "nope")


def test_exports_are_recorded_and_only_the_tenant_stacks_credentials_are_secret() -> None:
    plan = stack_plan("scale-eu-west-1")
    outputs = plan.outputs
    assert (
        outputs["phase"] == "C"
        and outputs["mqtt_endpoint"] == "mqtts://mqtt.eu-west-1.ironlink.example.com:8883"
    )
    assert outputs["ca_cert_pem"].startswith("-----BEGIN CERTIFICATE-----")
    secret = {key for key, value in outputs.items() if value == SECRET}
    assert secret == {"influxdb_admin_token", "grafana_admin_password", "registry_dsn"}
    reference = region_plan("scale-eu-west-1").platform.reference_outputs
    assert reference is not None and reference.secret_names == secret, "a reference keeps them secret"


def test_write_plan_writes_the_json_and_one_manifest_per_object(tmp_path: Path) -> None:
    plan = stack_plan("poc")
    stale = tmp_path / "poc" / "deployment-gone.yaml"
    stale.parent.mkdir(parents=True)
    stale.write_text("kind: Deployment\n")
    path = write_plan(plan, tmp_path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(plan.to_json()))
    written = {p.name: yaml.safe_load(p.read_text()) for p in (tmp_path / "poc").glob("*.yaml")}
    assert "deployment-gone.yaml" not in written, "manifests of a previous plan must not linger"
    assert sorted(written.values(), key=json.dumps) == sorted(plan.manifests(), key=json.dumps)
    assert written["statefulset-mosquitto.yaml"]["kind"] == "StatefulSet"
    assert list(written["statefulset-mosquitto.yaml"])[:3] == ["apiVersion", "kind", "metadata"]
    assert written["secret-mosquitto-tls.yaml"]["stringData"]["tls.key"] == SECRET


# --------------------------------------------------------------------------------------- CLI
def test_cli_plans_a_stack_into_the_output_dir(tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", "dev", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "StatefulSet mosquitto" in result.output and "MqttBroker" in result.output
    assert json.loads((tmp_path / "dev.json").read_text())["stack"] == "dev"
    assert (tmp_path / "dev" / "statefulset-postgres.yaml").is_file()


def test_cli_refuses_an_unknown_stack_with_code_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", "nope", "--output-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown stack 'nope'" in result.output and "mvp-eu" in result.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["plan"], ["plan", "dev", "--all"]])
def test_cli_needs_exactly_one_of_stack_and_all(argv: list[str]) -> None:
    result = runner.invoke(app, argv)
    assert result.exit_code == 2 and "either a STACK or --all" in result.output


def project_with_stacks(root: Path, stacks: dict[str, str]) -> Path:
    (root / "stacks").mkdir()
    (root / "Pulumi.yaml").write_text("name: ironlink\nruntime: python\n")
    for name, text in stacks.items():
        (root / "stacks" / f"Pulumi.{name}.yaml").write_text(text)
    return root


GOOD = "config:\n  ironlink:phase: A\n  ironlink:region: eu\n"
BAD = GOOD.replace("phase: A", "phase: B") + "  ironlink:broker:\n    allow_plaintext: true\n    nodes: 2\n"


def test_cli_lists_every_problem_of_a_bad_stack_with_code_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project_with_stacks(tmp_path, {"bad": BAD}))
    result = runner.invoke(app, ["plan", "bad"])
    assert result.exit_code == 2
    assert "ironlink:broker.allow_plaintext: true is not allowed in phase B" in result.output
    assert "ironlink:broker.nodes: 2 is even" in result.output
    assert not (tmp_path / "build").exists()


def test_cli_all_plans_the_good_stacks_and_fails_for_the_bad(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project_with_stacks(tmp_path, {"bad": BAD, "good": GOOD}))
    result = runner.invoke(app, ["plan", "--all", "--no-tree"])
    assert result.exit_code == 2
    assert "ironlink:broker.nodes: 2 is even" in result.output and "not planned: bad" in result.output
    assert (tmp_path / "build" / "plan" / "good.json").is_file()
    assert not (tmp_path / "build" / "plan" / "bad.json").exists()


def test_dynamic_providers_serialize_past_a_thousand_resources() -> None:
    """pulumi 3.272 wraps the pickler once per dynamic resource; without the region's fix the
    ~1,000th serialization raises RecursionError (about 160 tenants)."""
    import pickle

    import pulumi.dynamic.dynamic as pulumi_dynamic

    import components.regional_platform  # noqa: F401  (installs the fix)
    from components.providers.registry import RegistryServiceAccountProvider

    stock = pickle._Pickler._batch_setitems  # type: ignore[attr-defined]
    provider = RegistryServiceAccountProvider()
    provider.options = {"timeout": 1}  # type: ignore[attr-defined]  # a dict to pickle, as real providers hold
    serialized = {pulumi_dynamic.serialize_provider(provider) for _ in range(1200)}
    assert len(serialized) == 1, "the provider's serialization must stay deterministic"
    assert pickle._Pickler._batch_setitems is stock  # type: ignore[attr-defined]
