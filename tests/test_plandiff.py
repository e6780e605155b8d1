"""``infra.plandiff``: two real plans of a region compared, what each change does, how it is shown,
and the exit code that refuses losing state."""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest
from pulumi.dynamic import ResourceProvider
from rich.console import Console

from components.providers.influxdb import BucketProvider, OrganizationProvider, TokenProvider
from components.providers.registry import RegistryServiceAccountProvider, RegistryTenantProvider
from components.replacements import FORCE_NEW
from infra.config import PlatformConfig, load_stack
from infra.plan import build_region
from infra.plandiff import (
    COMMENT_LIMIT,
    COMMENT_MARKER,
    EXIT_OK,
    EXIT_POLICY_VIOLATION,
    EXIT_STATEFUL_REFUSED,
    Allowance,
    StackDiff,
    Step,
    diff_plans,
    diff_stacks,
    exit_code,
    record_urn,
    render_json,
    render_markdown,
    render_table,
)
from infra.policy.runner import Violation
from tests.pulumi_mocks import PLANS

pytestmark = PLANS
REGION = "mvp-eu"


def region_documents(config: PlatformConfig, stack: str = REGION) -> dict[str, dict[str, Any]]:
    region = build_region(config, stack)
    return {plan.stack: plan.to_json() for plan in region.plans}


@functools.cache
def _base() -> str:
    return json.dumps(region_documents(load_stack(REGION)))


def base() -> dict[str, dict[str, Any]]:
    """The region's plans as JSON (a fresh copy per test: tests edit them)."""
    return json.loads(_base())


def diff_all(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> dict[str, StackDiff]:
    diffs = (diff_plans(old.get(stack), new.get(stack), stack) for stack in sorted(set(old) | set(new)))
    return {diff.stack: diff for diff in diffs if diff.steps}


def only_step(diff: StackDiff, op: str, type_suffix: str, name: str) -> Step:
    found = [s for s in diff.steps if s.op == op and s.type.endswith(type_suffix) and s.name == name]
    assert len(found) == 1, (
        f"{diff.stack}: want one {op} {type_suffix} {name}, steps: {[(s.op, s.name) for s in diff.steps]}"
    )
    return found[0]


def record(document: dict[str, Any], type_suffix: str, name: str) -> dict[str, Any]:
    found = [r for r in document["resources"] if r["type"].endswith(type_suffix) and r["name"] == name]
    assert len(found) == 1, f"{document['stack']}: no single {type_suffix} {name}"
    return found[0]


# ------------------------------------------------------------------------- real config changes
def test_two_plans_of_unchanged_config_differ_in_nothing() -> None:
    assert diff_all(base(), region_documents(load_stack(REGION))) == {}


def test_a_retention_tier_change_updates_only_that_tenants_buckets_in_place() -> None:
    config = load_stack(REGION)
    acme = config.tenant("acme")
    assert acme.tier != "basic"
    changed = config.model_copy(
        update={
            "tenants": [
                t.model_copy(update={"tier": "basic"}) if t.id == "acme" else t for t in config.tenants
            ]
        }
    )
    diffs = diff_all(base(), region_documents(changed))
    assert set(diffs) == {f"{REGION}.acme"}, "only the tenant's own stack may change"
    steps = diffs[f"{REGION}.acme"].steps
    buckets = [s for s in steps if s.type == "pulumi-python:dynamic/influxdb:Bucket"]
    assert buckets and all(s.op == "update" for s in buckets)
    assert all("retention_seconds" in {c.dotted for c in s.changes} for s in buckets)
    raw = only_step(diffs[f"{REGION}.acme"], "update", "Bucket", "acme-telemetry")
    (change,) = [c for c in raw.changes if c.dotted == "retention_seconds"]
    assert (change.old, change.new) == (30 * 86400, 7 * 86400)
    assert exit_code(diffs.values()) == EXIT_OK, "retention changes in place: nothing refused"


def test_a_new_worker_image_is_an_update_of_the_statefulset_naming_the_container_path() -> None:
    config = load_stack(REGION)
    changed = config.model_copy(
        update={"ingest": config.ingest.model_copy(update={"image": "ghcr.io/ironlink/ingest:0.2.0"})}
    )
    diffs = diff_all(base(), region_documents(changed))
    platform = diffs[REGION]
    step = only_step(platform, "update", "StatefulSet", "ingest")
    paths = {c.dotted: (c.old, c.new) for c in step.changes}
    # a container is named by its name, not its index: one added container shifts nothing
    assert paths["spec.template.spec.containers.worker.image"] == (
        config.ingest.image,
        "ghcr.io/ironlink/ingest:0.2.0",
    )
    assert step.replace_reasons == ()
    assert "ghcr.io/ironlink/ingest:0.2.0" in step.detail()


def test_growing_the_store_volume_replaces_its_protected_statefulset_and_is_refused() -> None:
    config = load_stack(REGION)
    assert config.protect_stateful
    changed = config.model_copy(update={"influxdb": config.influxdb.model_copy(update={"storage": "500Gi"})})
    diffs = diff_all(base(), region_documents(changed))
    step = only_step(diffs[REGION], "replace", "StatefulSet", "influxdb")
    assert [path for path, _ in step.replace_reasons] == ["spec.volumeClaimTemplates"]
    assert "immutable" in step.replace_reasons[0][1]
    assert step.stateful == "protected"
    assert exit_code(diffs.values()) == EXIT_STATEFUL_REFUSED
    assert exit_code(diffs.values(), Allowance(all=True)) == EXIT_OK
    assert exit_code(diffs.values(), Allowance(urns=frozenset({step.urn}))) == EXIT_OK
    assert exit_code(diffs.values(), Allowance(urns=frozenset({"urn:pulumi:other"}))) == EXIT_STATEFUL_REFUSED


def test_removing_a_tenant_deletes_its_whole_stack_and_its_bucket_is_refused() -> None:
    config = load_stack(REGION)
    changed = config.model_copy(update={"tenants": [t for t in config.tenants if t.id != "globex"]})
    diffs = diff_all(base(), region_documents(changed))
    assert set(diffs) == {f"{REGION}.globex"}
    removed = diffs[f"{REGION}.globex"]
    assert removed.status == "removed" and {s.op for s in removed.steps} == {"delete"}
    bucket = only_step(removed, "delete", "Bucket", "globex-telemetry")
    assert bucket.stateful == "protected"
    registry = only_step(removed, "delete", "registry:Tenant", "globex-registry")
    assert registry.stateful and "registry rows" in registry.stateful
    assert exit_code(diffs.values()) == EXIT_STATEFUL_REFUSED


def test_adding_a_tenant_creates_a_new_stack_and_refuses_nothing() -> None:
    config = load_stack(REGION)
    newcomer = config.tenants[0].model_copy(update={"id": "newco", "name": "NewCo Ltd"})
    diffs = diff_all(
        base(), region_documents(config.model_copy(update={"tenants": [*config.tenants, newcomer]}))
    )
    assert set(diffs) == {f"{REGION}.newco"}
    assert diffs[f"{REGION}.newco"].status == "new"
    assert {s.op for s in diffs[f"{REGION}.newco"].steps} == {"create"}
    assert exit_code(diffs.values()) == EXIT_OK


# ----------------------------------------------------------------------- crafted plan variants
def test_a_renamed_stateful_resource_is_a_refused_delete_with_a_rename_hint() -> None:
    old = base()[REGION]
    new = copy.deepcopy(old)
    claim = record(new, "PersistentVolumeClaim", "grafana-data")
    claim["name"] = "grafana-storage"
    claim["urn"] = claim["urn"].replace("::grafana-data", "::grafana-storage")
    diff = diff_plans(old, new)
    gone = only_step(diff, "delete", "PersistentVolumeClaim", "grafana-data")
    made = only_step(diff, "create", "PersistentVolumeClaim", "grafana-storage")
    assert gone.rename == made.urn and made.rename == gone.urn
    assert "looks like a rename" in gone.detail() and "add an alias" in gone.detail()
    assert gone.stateful == "protected"
    assert exit_code([diff]) == EXIT_STATEFUL_REFUSED


def test_a_delete_and_an_unrelated_create_are_not_called_a_rename() -> None:
    old = base()[REGION]
    new = copy.deepcopy(old)
    service = record(new, "core/v1:Service", "grafana")
    new["resources"].remove(service)
    other = copy.deepcopy(record(new, "core/v1:Service", "postgres"))
    other.update(name="metrics", urn=other["urn"].replace("::postgres", "::metrics"))
    other["inputs"]["spec"] = {"ports": [{"port": 9999}], "type": "NodePort"}
    new["resources"].append(other)
    diff = diff_plans(old, new)
    assert only_step(diff, "delete", "Service", "grafana").rename is None
    assert only_step(diff, "create", "Service", "metrics").rename is None


def test_secrets_are_masked_both_sides_and_a_changed_digest_updates_a_secret_in_place() -> None:
    old = base()[REGION]
    new = copy.deepcopy(old)
    secret = record(old, "core/v1:Secret", "grafana-credentials")
    key = sorted(secret["inputs"]["stringData"])[0]
    assert secret["inputs"]["stringData"][key] == "[secret]"
    record(new, "core/v1:Secret", "grafana-credentials")["inputs"]["stringData"][key] = "plain-text-now"
    step = only_step(diff_plans(old, new), "update", "Secret", "grafana-credentials")
    assert "plain-text-now" not in step.detail() and "(secret) changed" in step.detail()
    assert "plain-text-now" not in json.dumps(
        render_json([diff_plans(old, new)])["mvp-eu"]["steps"][0]["detailedDiff"]
    )
    # Two masked values cannot be compared; their digests (when a plan carries them) can.
    assert diff_plans(old, copy.deepcopy(old)).steps == ()
    rotated = copy.deepcopy(old)
    record(old, "core/v1:Secret", "grafana-credentials")["secret_digests"] = {f"stringData.{key}": "aaa"}
    record(rotated, "core/v1:Secret", "grafana-credentials")["secret_digests"] = {f"stringData.{key}": "bbb"}
    # New data is an update: the Kubernetes provider sets enableSecretMutable (components/kube.py).
    step = only_step(diff_plans(old, rotated), "update", "Secret", "grafana-credentials")
    assert step.replace_reasons == ()
    assert f"stringData.{key}" in step.detail()


def test_a_dashboard_is_replaced_only_when_the_uid_inside_its_json_changes() -> None:
    old = base()[f"{REGION}.acme"]
    dashboards = [r for r in old["resources"] if r["type"] == "grafana:oss/dashboard:Dashboard"]
    name = dashboards[0]["name"]
    retitled, reuid = copy.deepcopy(old), copy.deepcopy(old)
    for variant, key, value in ((retitled, "title", "Renamed board"), (reuid, "uid", "another-uid")):
        target = record(variant, "dashboard:Dashboard", name)
        config = json.loads(target["inputs"]["configJson"])
        config[key] = value
        target["inputs"]["configJson"] = json.dumps(config)
    assert only_step(diff_plans(old, retitled), "update", "Dashboard", name).replace_reasons == ()
    step = only_step(diff_plans(old, reuid), "replace", "Dashboard", name)
    assert [path for path, _ in step.replace_reasons] == ["configJson#uid"]


def test_plans_without_urns_match_by_the_urn_the_engine_derives() -> None:
    documents = base()
    for document in documents.values():
        for resource in document["resources"]:
            assert (
                record_urn({k: v for k, v in resource.items() if k != "urn"}, document["stack"])
                == resource["urn"]
            )


def test_diff_stacks_reads_two_folders_and_treats_a_missing_file_as_a_missing_stack(tmp_path: Path) -> None:
    documents = base()
    (tmp_path / "base").mkdir()
    (tmp_path / "head").mkdir()
    for stack, document in documents.items():
        if stack != f"{REGION}.initech":
            (tmp_path / "base" / f"{stack}.json").write_text(json.dumps(document))
        if stack != f"{REGION}.globex":
            (tmp_path / "head" / f"{stack}.json").write_text(json.dumps(document))
    diffs = diff_stacks(tmp_path / "base", tmp_path / "head")
    assert [(d.stack, d.status) for d in diffs] == [
        (f"{REGION}.globex", "removed"),
        (f"{REGION}.initech", "new"),
    ]
    assert [d.stack for d in diff_stacks(None, tmp_path / "head", [REGION])] == [REGION]
    assert diff_stacks(tmp_path / "base", tmp_path / "head", [REGION]) == []
    (tmp_path / "head" / "broken.json").write_text('{"stack": "broken"}')
    with pytest.raises(ValueError, match=r"broken\.json: not a plan document"):
        diff_stacks(tmp_path / "base", tmp_path / "head", ["broken"])


# ---------------------------------------------------------------------------------- rendering
def _refused_diff() -> StackDiff:
    config = load_stack(REGION)
    changed = config.model_copy(update={"influxdb": config.influxdb.model_copy(update={"storage": "500Gi"})})
    return diff_all(base(), region_documents(changed))[REGION]


def test_the_json_follows_pulumi_preview_json_steps() -> None:
    diff = _refused_diff()
    document = render_json([diff])[REGION]
    assert set(document) >= {"steps", "changeSummary"}
    assert document["changeSummary"] == {op: n for op, n in diff.counts().items() if n}
    (step,) = [s for s in document["steps"] if s["urn"].endswith("StatefulSet::influxdb")]
    assert step["op"] == "replace"
    assert step["oldState"]["type"] == step["newState"]["type"] == "kubernetes:apps/v1:StatefulSet"
    assert step["replaceReasons"] == ["spec"] and "spec" in step["diffReasons"]
    path = "spec.volumeClaimTemplates[0].spec.resources.requests.storage"
    assert step["detailedDiff"][path] == {"kind": "update-replace", "inputDiff": True}
    assert any(d["urn"] == step["urn"] and d["severity"] == "warning" for d in document["diagnostics"])


def test_the_rich_table_names_op_type_name_and_flags_the_refused_step() -> None:
    console = Console(width=240, record=True)
    console.print(render_table([_refused_diff()]))
    text = console.export_text()
    assert re.search(r"replace REFUSED\s*│\s*StatefulSet\s*│\s*influxdb", text)
    assert "spec.volumeClaimTemplates" in text


def test_the_markdown_comment_has_the_marker_a_summary_and_a_folded_section_per_stack() -> None:
    text = render_markdown([_refused_diff()])
    assert text.splitlines()[0] == COMMENT_MARKER
    assert f"| {REGION} |" in text
    assert text.count("<details>") == text.count("</details>") == 1
    assert "**replace** :no_entry:" in text and "`--allow-stateful-changes`" in text
    violation = Violation(REGION, "urn:x", "emqx", "t", "pinned-images", "image 'emqx' has no tag")
    assert "pinned-images" in render_markdown([_refused_diff()], violations=[violation])


def _synthetic(stack: str, steps: int) -> StackDiff:
    made = tuple(
        Step(
            "create",
            f"urn:pulumi:{stack}::ironlink::grafana:oss/dashboard:Dashboard::board-{i}",
            "grafana:oss/dashboard:Dashboard",
            f"board-{i}",
            None,
            {"type": "t", "name": f"board-{i}", "inputs": {}},
        )
        for i in range(steps)
    )
    return StackDiff(stack, made, "new")


def test_the_markdown_stays_under_githubs_limit_for_a_thousand_changed_stacks() -> None:
    diffs = [_synthetic(f"scale-eu-west-1.tenant-{i:04d}", 15) for i in range(1000)]
    text = render_markdown(diffs)
    assert len(text) <= COMMENT_LIMIT
    assert text.startswith(COMMENT_MARKER + "\n")
    assert "1000 stack(s) change:** 15000 to create" in text
    assert text.count("<details>") == text.count("</details>") >= 1, "details open and close in pairs"
    assert "Details of" in text and "omitted" in text
    for count in (1000, 3000):
        text = render_markdown([_synthetic(f"scale-eu-west-1.tenant-{i:04d}", 15) for i in range(count)])
        assert len(text) <= COMMENT_LIMIT
        listed = len(re.findall(r"^\| scale-eu-west-1\.tenant-\d{4} \(new\) \|", text, flags=re.MULTILINE))
        more = re.search(r"and (\d+) more stack\(s\) change", text)
        assert listed + (int(more.group(1)) if more else 0) == count, (
            "every stack is either listed or counted"
        )
    assert more, "3000 stacks do not all fit: the rest are counted on one line"


def test_one_huge_stack_is_cut_short_inside_its_section() -> None:
    text = render_markdown([_synthetic("big", 5000)], limit=20_000)
    assert len(text) <= 20_000
    assert re.search(r"\| … \| \| \| \d+ more step\(s\) not shown \|", text)
    assert text.count("<details>") == text.count("</details>") == 1


def test_exit_code_refuses_state_first_then_policy() -> None:
    violation = Violation(REGION, "urn:x", "n", "t", "rule", "message")
    assert exit_code([], violations=[violation]) == EXIT_POLICY_VIOLATION
    assert exit_code([_refused_diff()], violations=[violation]) == EXIT_STATEFUL_REFUSED
    assert exit_code([_refused_diff()], Allowance(all=True), [violation]) == EXIT_POLICY_VIOLATION
    assert EXIT_STATEFUL_REFUSED == 3


# ------------------------------------------------------------- the table agrees with providers
_PROVIDERS: dict[str, ResourceProvider] = {
    "pulumi-python:dynamic/influxdb:Organization": OrganizationProvider(),
    "pulumi-python:dynamic/influxdb:Bucket": BucketProvider(),
    "pulumi-python:dynamic/influxdb:Token": TokenProvider(),
    "pulumi-python:dynamic/registry:Tenant": RegistryTenantProvider(),
    "pulumi-python:dynamic/registry:ServiceAccount": RegistryServiceAccountProvider(),
}


def _inputs_of(type_token: str) -> dict[str, Any]:
    for document in base().values():
        for resource in document["resources"]:
            if resource["type"] == type_token:
                return {k: v for k, v in resource["inputs"].items() if k != "__provider"}
    raise LookupError(f"no {type_token} in the {REGION} region's plans")


@pytest.mark.parametrize("type_token", sorted(_PROVIDERS))
def test_the_force_new_table_agrees_with_each_dynamic_providers_own_diff(type_token: str) -> None:
    olds = _inputs_of(type_token)
    provider = _PROVIDERS[type_token]
    for key in olds:
        news = {**olds, key: ["changed", key] if olds[key] != ["changed", key] else "other"}
        replaces = list(provider.diff("id", olds, news).replaces or [])
        assert replaces == ([key] if key in FORCE_NEW[type_token] else []), (
            f"{type_token}.{key}: provider replaces {replaces}, table says {key in FORCE_NEW[type_token]}"
        )
    assert set(FORCE_NEW[type_token]) <= set(olds), "every table key is an input the provider has"


def test_an_adopted_influx_org_is_also_replaced_on_a_new_name_which_the_table_does_not_list() -> None:
    """The one conditional rule of the providers, stated so that a change to it is noticed."""
    olds = {**_inputs_of("pulumi-python:dynamic/influxdb:Organization"), "adopt": True}
    assert OrganizationProvider().diff("id", olds, {**olds, "name": "renamed"}).replaces == ["name"]
    assert "name" not in FORCE_NEW["pulumi-python:dynamic/influxdb:Organization"]
