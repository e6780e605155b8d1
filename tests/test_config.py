"""The typed stack config: every rule fails with its path and value, all problems at once, presets
give every default, and every stack in stacks/ parses."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from infra.config import (
    PHASE_PRESETS,
    PHASES,
    StackConfigError,
    UnknownStackError,
    duration_seconds,
    is_tenant_stack,
    list_stacks,
    load_platform,
    load_stack,
    load_tenant_stack,
    parse_platform,
    parse_platform_stack,
    parse_tenant_stack,
    platform_stacks,
    read_stack_settings,
    settings_from_pulumi_config,
    source_stack,
    stack_file,
    tenant_stacks,
)


def tenant(tenant_id: str = "acme", **extra: Any) -> dict[str, Any]:
    return {"id": tenant_id, "name": "Acme", "tier": "basic", **extra}


def machine(machine_id: str = "m-1", machine_type: str = "cnc_mill", **extra: Any) -> dict[str, Any]:
    return {"id": machine_id, "type": machine_type, **extra}


def problems_of(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(StackConfigError) as caught:
        parse_platform({"region": "eu", **raw}, "test")
    return [str(problem) for problem in caught.value.problems]


# (settings, the config path, text that must appear in the message: the offending value)
RULES = [
    pytest.param(
        {"phase": "B", "broker": {"allow_plaintext": True}},
        "ironlink:broker.allow_plaintext",
        "true is not allowed in phase B",
        id="plaintext-B",
    ),
    pytest.param(
        {"phase": "C", "broker": {"allow_plaintext": True}},
        "ironlink:broker.allow_plaintext",
        "true is not allowed in phase C",
        id="plaintext-C",
    ),
    pytest.param(
        {"phase": "C", "broker": {"nodes": 1}}, "ironlink:broker.nodes", "1 is too few", id="C-cluster-size"
    ),
    pytest.param(
        {"phase": "C", "broker": {"engine": "mosquitto", "limits": {}}},
        "ironlink:broker.engine",
        "'mosquitto' cannot cluster",
        id="C-engine",
    ),
    pytest.param(
        {"broker": {"nodes": 2}},
        "ironlink:broker.nodes",
        "2 nodes: Mosquitto does not cluster",
        id="mosquitto-nodes",
    ),
    pytest.param(
        {"phase": "B", "broker": {"nodes": 2}}, "ironlink:broker.nodes", "2 is even", id="emqx-even"
    ),
    pytest.param(
        {"broker": {"limits": {"messages_rate": "10/s"}}},
        "ironlink:broker.limits.messages_rate",
        "'10/s' cannot be enforced by Mosquitto",
        id="mosquitto-rate",
    ),
    pytest.param(
        {"phase": "C", "high_availability": False},
        "ironlink:high_availability",
        "false is not allowed in phase C",
        id="C-needs-HA",
    ),
    pytest.param(
        {"influxdb": {"replicas": 2}}, "ironlink:influxdb.replicas", "2 replicas", id="influx-single-node"
    ),
    pytest.param(
        {"phase": "B", "ingest": {"autoscaling": {"min_replicas": 5, "max_replicas": 3}}},
        "ironlink:ingest.autoscaling.min_replicas",
        "5 is above max_replicas 3",
        id="autoscaling-bounds",
    ),
    pytest.param(
        {"phase": "B", "ingest": {"replicas": 9}},
        "ironlink:ingest.replicas",
        "9 is outside the autoscaling bounds 2..6",
        id="replicas-in-bounds",
    ),
    pytest.param(
        {"tenants": [tenant(), tenant()]},
        "ironlink:tenants[1].id",
        "'acme' is already used by tenants[0]",
        id="tenant-unique",
    ),
    pytest.param(
        {"tenants": [tenant("ingest")]},
        "ironlink:tenants[0].id",
        "'ingest' is reserved",
        id="tenant-reserved",
    ),
    pytest.param(
        {"tenants": [tenant("Acme Corp")]},
        "ironlink:tenants[0].id",
        "'Acme Corp' is not a valid tenant id",
        id="tenant-dns-safe",
    ),
    pytest.param(
        {"tenants": [tenant(tier="gold")]},
        "ironlink:tenants[0].tier",
        "'gold' is not a retention tier",
        id="tier-exists",
    ),
    pytest.param(
        {"tenants": [tenant(isolation=3)]},
        "ironlink:tenants[0].isolation",
        "3 is not available in phase A",
        id="isolation-3-needs-C",
    ),
    pytest.param(
        {"default_isolation": 3, "tenants": [tenant()]},
        "ironlink:default_isolation",
        "3 is not available in phase A",
        id="default-isolation",
    ),
    pytest.param(
        {"tenants": [tenant(sites=[{"id": "s", "machines": [machine()]}])]},
        "ironlink:tenants[0].sites",
        "run 'ironlink fleet import test' to move them there",
        id="old-style-fleet",
    ),
    pytest.param(
        {"tenants": [tenant(alert_emails=["ops@acme.example", "noc@acme.example"])]},
        "ironlink:tenants[0].alert_emails",
        "alert recipients are registry routes now; remove it and run "
        "'ironlink alerts route add --tenant acme --name operations --channel email "
        "--target ops@acme.example,noc@acme.example --registry DSN'",
        id="old-style-alert-emails",
    ),
    pytest.param(
        {"tenants": [tenant(machine_types=["toaster"])]},
        "ironlink:tenants[0].machine_types[0]",
        "'toaster' is not a known machine type",
        id="machine-type",
    ),
    pytest.param(
        {"tenants": [tenant(machine_types=["conveyor", "conveyor"])]},
        "ironlink:tenants[0].machine_types[1]",
        "'conveyor' is listed twice",
        id="machine-type-unique",
    ),
    pytest.param(
        {"influxdb": {"retention_tiers": {"basic": {"raw": "30m", "downsampled": "1d"}}}},
        "ironlink:influxdb.retention_tiers.basic.raw",
        "'30m' is shorter than InfluxDB's minimum",
        id="retention-minimum",
    ),
    pytest.param(
        {"influxdb": {"storage": "lots"}},
        "ironlink:influxdb.storage",
        "'lots' is not a valid Kubernetes quantity",
        id="quantity",
    ),
    pytest.param(
        {"phase": "B", "broker": {"limits": {"bytes_rate": "fast"}}},
        "ironlink:broker.limits.bytes_rate",
        "'fast' is not a valid rate",
        id="rate",
    ),
    pytest.param(
        {"broker": {"limits": {"max_packet_size": "1GB"}}},
        "ironlink:broker.limits.max_packet_size",
        "'1GB' is not a valid size",
        id="packet-size",
    ),
    pytest.param(
        {"cluster": {"namespace": "Iron_Link"}},
        "ironlink:cluster.namespace",
        "'Iron_Link' is not a valid Kubernetes name id",
        id="namespace",
    ),
    pytest.param({"phase": "D"}, "ironlink:phase", "'D' is not one of 'A', 'B', 'C'", id="phase"),
    pytest.param({"broker": {"tls": "ssl"}}, "ironlink:broker.tls", "'ssl' is not one of", id="tls-mode"),
    pytest.param({"brokr": {}}, "ironlink:brokr", "unknown setting", id="unknown-top-level"),
    pytest.param(
        {"broker": {"node": 3}}, "ironlink:broker.node", "unknown setting 'node'", id="unknown-nested"
    ),
    pytest.param(
        {"tenants": {"acme": {}}}, "ironlink:tenants", "is not a list of tenants", id="tenants-list"
    ),
    pytest.param(
        {"grafana": {"replicas": 0}}, "ironlink:grafana.replicas", "0 is invalid", id="replicas-positive"
    ),
]


@pytest.mark.parametrize(("settings", "path", "message"), RULES)
def test_every_rule_fails_with_its_path_and_value(settings: dict[str, Any], path: str, message: str) -> None:
    problems = problems_of(settings)
    matching = [p for p in problems if p.startswith(path + ": ") and message in p]
    assert matching, f"expected '{path}: …{message}…' among {problems}"


def test_a_missing_region_is_reported_by_path() -> None:
    with pytest.raises(StackConfigError) as caught:
        parse_platform({"phase": "A"})
    assert "ironlink:region: is required" in str(caught.value)


def test_all_problems_are_reported_at_once() -> None:
    problems = problems_of(
        {
            "phase": "C",
            "broker": {"nodes": 1, "allow_plaintext": True},
            "influxdb": {"replicas": 3},
            "tenants": [tenant("Bad Id"), tenant("ok", tier="gold")],
        }
    )
    paths = {problem.split(": ")[0] for problem in problems}
    assert {
        "ironlink:broker.nodes",
        "ironlink:broker.allow_plaintext",
        "ironlink:influxdb.replicas",
        "ironlink:tenants[0].id",
        "ironlink:tenants[1].tier",
    } <= paths


def test_the_error_message_lists_every_problem_under_the_stack_name() -> None:
    with pytest.raises(StackConfigError) as caught:
        parse_platform({"region": "eu", "phase": "B", "broker": {"nodes": 2, "allow_plaintext": True}}, "mvp")
    text = str(caught.value)
    assert text.startswith("stack 'mvp' has 2 problems:")
    assert "ironlink:broker.nodes: 2 is even" in text and "ironlink:broker.allow_plaintext: true" in text


@pytest.mark.parametrize("phase", PHASES)
def test_a_preset_gives_every_default(phase: str) -> None:
    config = parse_platform({"phase": phase, "region": "eu"})
    assert_within(PHASE_PRESETS[phase], config.model_dump(mode="json"), f"phase {phase}")
    assert config.tenants == []


def assert_within(preset: Any, actual: Any, where: str) -> None:
    """Every value the preset states is the parsed config's (model defaults may add more)."""
    if isinstance(preset, dict):
        for key, value in preset.items():
            assert key in actual, f"{where}.{key} is missing"
            assert_within(value, actual[key], f"{where}.{key}")
    else:
        assert actual == preset, f"{where} is {actual!r}, the preset says {preset!r}"


def test_a_stack_overrides_only_what_it_states() -> None:
    config = parse_platform({"phase": "C", "region": "eu", "broker": {"nodes": 5}})
    assert config.broker.nodes == 5
    assert config.broker.tls == PHASE_PRESETS["C"]["broker"]["tls"] == "mtls"
    assert PHASE_PRESETS["C"]["broker"]["nodes"] == 3, "a stack must not change the preset itself"


def test_presets_are_not_mutated_by_parsing() -> None:
    before = copy.deepcopy(PHASE_PRESETS)
    parse_platform({"phase": "B", "region": "eu", "broker": {"limits": {"messages_rate": "1/s"}}})
    assert before == PHASE_PRESETS


@pytest.mark.parametrize("stack", platform_stacks())
def test_every_platform_stack_parses_with_its_tenant_stacks(stack: str) -> None:
    config = load_stack(stack)
    on_vm = config.aws is not None and config.aws.vm is not None  # poc-vm: a platform, no tenant yet
    assert config.region and (config.tenants or on_vm), (
        f"stack {stack} should declare a region and have tenants"
    )
    assert [t.id for t in config.tenants] == [name.split(".", 1)[1] for name in tenant_stacks(stack)]


def test_every_stack_file_is_a_platform_or_one_of_its_tenants() -> None:
    for stack in list_stacks():
        if is_tenant_stack(stack):
            platform, tenant_id = stack.split(".", 1)
            assert load_tenant_stack(stack).platform == platform and platform in platform_stacks()
            assert load_tenant_stack(stack).tenant.id == tenant_id
        else:
            assert "tenants" not in read_stack_settings(stack_file(stack), stack), stack


def test_a_tenant_stack_is_checked_against_its_platform_naming_every_problem() -> None:
    platform = load_platform("mvp-eu")
    settings = {"platform": "mvp-eu", "tenant": tenant("acme", tier="gold", isolation=3), "extra": 1}
    with pytest.raises(StackConfigError) as caught:
        parse_tenant_stack(settings, "mvp-eu.initech", platform)
    text = str(caught.value)
    assert "ironlink:tenant.tier: 'gold' is not a retention tier" in text
    assert "ironlink:tenant.isolation: 3 is not available in phase B" in text
    assert "ironlink:extra: unknown setting of a tenant stack" in text
    assert "belongs in stack 'mvp-eu.acme', not 'mvp-eu.initech'" in text


def test_a_tenant_stack_setting_alert_emails_is_refused_naming_the_route_command() -> None:
    platform = load_platform("mvp-eu")
    settings = {
        "platform": "mvp-eu",
        "tenant": tenant("acme", tier="gold", alert_emails=["ops@acme.example"]),
    }
    with pytest.raises(StackConfigError) as caught:
        parse_tenant_stack(settings, "mvp-eu.acme", platform)
    assert [str(problem) for problem in caught.value.problems] == [
        "ironlink:tenant.alert_emails: alert recipients are registry routes now; remove it and run "
        "'ironlink alerts route add --tenant acme --name operations --channel email "
        "--target ops@acme.example --registry DSN'",
        "ironlink:tenant.tier: 'gold' is not a retention tier (known: basic, premium, standard)",
    ], "the retired setting is named, and the rest of the tenant is still checked"


def test_an_old_style_platform_file_with_tenants_is_refused_naming_the_migration() -> None:
    with pytest.raises(StackConfigError, match=r"ironlink:tenants: .*run 'ironlink stack split old'"):
        parse_platform_stack({"region": "eu", "tenants": [tenant()]}, "old")


def test_the_issue_stacks_exist_with_their_phases() -> None:
    phases = {stack: load_stack(stack).phase for stack in platform_stacks()}
    assert phases == {
        "dev": "A",
        "poc": "A",
        "poc-vm": "A",
        "mvp-eu": "B",
        "scale-eu-west-1": "C",
        "scale-us-east-1": "C",
    }
    for stack in ("scale-eu-west-1", "scale-us-east-1"):
        config = load_stack(stack)
        assert any(config.isolation_of(t) == 3 for t in config.tenants), f"{stack} needs a level-3 tenant"


def test_an_unknown_stack_names_the_known_ones() -> None:
    with pytest.raises(UnknownStackError) as caught:
        load_stack("nope")
    assert "unknown stack 'nope'" in str(caught.value) and "mvp-eu" in str(caught.value)


def test_a_stack_file_that_is_not_yaml_is_reported_by_file(tmp_path: Path) -> None:
    broken = tmp_path / "Pulumi.x.yaml"
    broken.write_text("config: [unclosed\n")
    with pytest.raises(StackConfigError) as caught:
        read_stack_settings(broken)
    assert str(broken) in str(caught.value) and "is not valid YAML" in str(caught.value)
    broken.write_text("name: x\n")
    with pytest.raises(StackConfigError, match="has no 'config:' mapping"):
        read_stack_settings(broken)


def test_engine_config_values_are_decoded_like_the_stack_file() -> None:
    settings = settings_from_pulumi_config(
        {"ironlink:phase": "B", "ironlink:broker": json.dumps({"nodes": 3}), "aws:region": "eu-west-1"}
    )
    assert settings == {"phase": "B", "broker": {"nodes": 3}}


@pytest.mark.parametrize(
    ("text", "seconds"), [("30d", 2_592_000), ("12h", 43_200), ("forever", 0), ("2w", 1_209_600)]
)
def test_durations(text: str, seconds: int) -> None:
    assert duration_seconds(text) == seconds


def test_a_bad_duration_names_the_value() -> None:
    with pytest.raises(ValueError, match="'10y' is not a valid duration"):
        duration_seconds("10y")


def test_the_age_bound_defaults_to_raw_retention_and_may_only_be_shorter() -> None:
    tiers = parse_platform(
        {
            "region": "eu",
            "influxdb": {
                "retention_tiers": {
                    "short": {"raw": "30d", "downsampled": "365d", "max_age": "2d"},
                    "kept": {"raw": "forever", "downsampled": "forever"},
                }
            },
        }
    ).influxdb.retention_tiers
    assert tiers["basic"].max_age_seconds == 7 * 86_400, "default: raw retention"
    assert tiers["short"].max_age_seconds == 2 * 86_400
    assert tiers["kept"].max_age_seconds is None, "raw data kept forever: no age bound"
    problems = problems_of(
        {"influxdb": {"retention_tiers": {"basic": {"max_age": "30d"}, "standard": {"max_age": "forever"}}}}
    )
    assert "ironlink:influxdb.retention_tiers.basic: max_age '30d' is longer than raw '7d'" in "\n".join(
        problems
    )
    assert any(
        p.startswith("ironlink:influxdb.retention_tiers.standard: max_age 'forever'") for p in problems
    )


def test_the_clock_skew_bound_defaults_to_five_minutes_and_stays_under_a_day() -> None:
    for phase in PHASES:
        assert parse_platform({"region": "eu", "phase": phase}).ingest.max_clock_skew_s == 300
    problems = problems_of({"ingest": {"max_clock_skew_s": 2 * 86_400}})
    assert any(p.startswith("ironlink:ingest.max_clock_skew_s: 172800 is invalid") for p in problems), (
        problems
    )


def test_the_quota_is_shared_by_the_replicas_that_always_run() -> None:
    assert parse_platform({"region": "eu", "phase": "A"}).ingest.min_replicas == 1
    scaled = parse_platform(
        {
            "region": "eu",
            "phase": "B",
            "ingest": {"replicas": 4, "autoscaling": {"min_replicas": 3, "max_replicas": 6}},
        }
    )
    assert scaled.ingest.min_replicas == 3, "the autoscaler's floor, not today's count"


@pytest.mark.parametrize("platform", ["mvp-eu", "pr-12-mvp-eu"])
def test_a_pull_requests_preview_copy_of_a_tenant_stack_passes_the_name_check(platform: str) -> None:
    """``pr-12-mvp-eu.acme`` (infra.preview) runs the file of ``mvp-eu.acme`` on either platform."""
    settings = {"platform": platform, "tenant": tenant("acme")}
    parsed = parse_tenant_stack(settings, "pr-12-mvp-eu.acme", load_platform("mvp-eu"))
    assert parsed.platform == platform and source_stack("pr-12-mvp-eu.acme") == "mvp-eu.acme"
    with pytest.raises(StackConfigError, match=r"belongs in stack 'mvp-eu\.acme'"):
        parse_tenant_stack(settings, "pr-12-mvp-eu.globex", load_platform("mvp-eu"))
