"""Pull-request preview stacks (``infra.preview``) under a test double of the ``PreviewBackend``
seam: the logic (names, config and secret copying, order, references, cleanup after failures).

Not an integration test: no Pulumi CLI or backend exists here, so the double records what the real
``AutomationBackend`` would be asked to do. The last tests construct that real backend against the
installed ``pulumi.automation`` classes and check its refusal when the CLI is missing.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from infra.cli import app
from infra.cli.preview import stack_settings, stacks_from_diff
from infra.config import project_root, source_stack
from infra.preview import (
    AutomationBackend,
    PreviewInputError,
    PreviewResult,
    PreviewStep,
    PulumiCliMissing,
    StackNotFound,
    StackSettings,
    cleanup_pull_request,
    engine_values,
    preview_pull_request,
    preview_stack_name,
)

runner = CliRunner()


@dataclass
class RecordingBackend:
    """Keeps stacks in memory and records each call; ``fail`` maps (operation, stack) to an error."""

    stacks: dict[str, tuple[dict[str, str], set[str]]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    fail: dict[tuple[str, str], Exception] = field(default_factory=dict)

    def _call(self, op: str, stack: str) -> None:
        self.calls.append((op, stack))
        if (op, stack) in self.fail:
            raise self.fail[(op, stack)]

    def create_or_select(self, stack_name: str, config: dict[str, str], secrets: set[str]) -> None:
        self._call("create_or_select", stack_name)
        self.stacks[stack_name] = (dict(config), set(secrets))

    def preview(self, stack_name: str) -> PreviewResult:
        self._call("preview", stack_name)
        return PreviewResult({"create": 1}, [PreviewStep("create", f"urn:{stack_name}", "t")])

    def destroy(self, stack_name: str) -> None:
        self._call("destroy", stack_name)
        if stack_name not in self.stacks:
            raise StackNotFound(stack_name)

    def remove(self, stack_name: str) -> None:
        self._call("remove", stack_name)
        if self.stacks.pop(stack_name, None) is None:
            raise StackNotFound(stack_name)

    def list_stacks(self) -> list[str]:
        return sorted(self.stacks)


SETTINGS = {
    "mvp-eu": StackSettings({"ironlink:phase": "B", "ironlink:db": "s3cret"}, frozenset({"ironlink:db"})),
    "mvp-eu.acme": engine_values({"platform": "mvp-eu", "tenant": {"id": "acme"}}),
    "mvp-eu.globex": engine_values({"platform": "mvp-eu", "tenant": {"id": "globex"}}),
}


def test_copies_are_named_pr_number_stack_and_stay_valid_bounded_pulumi_names() -> None:
    assert preview_stack_name(12, "mvp-eu") == "pr-12-mvp-eu"
    assert preview_stack_name(12, "mvp-eu.acme") == "pr-12-mvp-eu.acme"
    assert source_stack("pr-12-mvp-eu.acme") == "mvp-eu.acme" and source_stack("mvp-eu") == "mvp-eu"
    with pytest.raises(PreviewInputError, match=r"has 106 characters \(Pulumi allows 100\)"):
        preview_stack_name(12, "a" * 100)
    with pytest.raises(PreviewInputError) as refused:
        preview_stack_name(0, "../etc")
    assert len(refused.value.problems) == 2, "both the number and the name are named"


def test_platform_first_then_tenants_each_with_config_and_secrets_copied() -> None:
    backend = RecordingBackend()
    results = preview_pull_request(backend, 7, ["mvp-eu.acme", "mvp-eu"], SETTINGS)
    assert [c for c in backend.calls if c[0] == "create_or_select"] == [
        ("create_or_select", "pr-7-mvp-eu"),
        ("create_or_select", "pr-7-mvp-eu.acme"),
    ]
    config, secrets = backend.stacks["pr-7-mvp-eu"]
    assert config == SETTINGS["mvp-eu"].config and secrets == {"ironlink:db"}
    tenant_config, _ = backend.stacks["pr-7-mvp-eu.acme"]
    assert tenant_config["ironlink:tenant"] == json.dumps({"id": "acme"})
    assert [(r.stack, r.copy, r.ok) for r in results] == [
        ("mvp-eu", "pr-7-mvp-eu", True),
        ("mvp-eu.acme", "pr-7-mvp-eu.acme", True),
    ]
    assert results[1].result == PreviewResult(
        {"create": 1}, [PreviewStep("create", "urn:pr-7-mvp-eu.acme", "t")]
    )


def test_a_tenant_references_the_platforms_copy_only_when_the_platform_is_touched() -> None:
    with_platform = preview_pull_request(RecordingBackend(), 7, ["mvp-eu", "mvp-eu.acme"], SETTINGS)
    alone = RecordingBackend()
    tenant_only = preview_pull_request(alone, 7, ["mvp-eu.acme"], SETTINGS)
    assert with_platform[1].references == "pr-7-mvp-eu"
    assert tenant_only[0].references == "mvp-eu"
    assert alone.stacks["pr-7-mvp-eu.acme"][0]["ironlink:platform"] == "mvp-eu"
    assert "pr-7-mvp-eu" not in alone.stacks, "an untouched platform gets no copy"


def test_a_failed_platform_copy_skips_its_tenants_and_the_rest_still_runs() -> None:
    backend = RecordingBackend(fail={("create_or_select", "pr-7-mvp-eu"): RuntimeError("backend down")})
    results = preview_pull_request(
        backend, 7, ["mvp-eu", "mvp-eu.acme", "poc"], SETTINGS | {"poc": SETTINGS["mvp-eu"]}
    )
    by_stack = {r.stack: r for r in results}
    assert by_stack["mvp-eu"].error == "RuntimeError: backend down"
    assert by_stack["mvp-eu.acme"].error == "pr-7-mvp-eu failed first"
    assert ("create_or_select", "pr-7-mvp-eu.acme") not in backend.calls
    assert by_stack["poc"].ok


def test_bad_input_is_refused_whole_before_any_stack_is_created() -> None:
    backend = RecordingBackend()
    bad = {"mvp-eu": StackSettings({"a": "1"}, frozenset({"b"}))}
    with pytest.raises(PreviewInputError) as refused:
        preview_pull_request(backend, 7, ["mvp-eu", "poc"], bad)
    assert refused.value.problems == [
        "stack 'mvp-eu': secret keys without a value: b",
        "stack 'poc': no settings given for it",
    ]
    assert backend.calls == []


def test_cleanup_destroys_and_removes_every_copy_of_the_pull_request_despite_failures() -> None:
    backend = RecordingBackend()
    preview_pull_request(backend, 7, ["mvp-eu", "mvp-eu.acme", "mvp-eu.globex"], SETTINGS)
    preview_pull_request(backend, 70, ["mvp-eu"], SETTINGS)
    backend.fail = {("destroy", "pr-7-mvp-eu.acme"): RuntimeError("resource busy")}
    backend.calls.clear()
    report = cleanup_pull_request(backend, 7, backend.list_stacks())
    assert report.failures == {"pr-7-mvp-eu.acme": ["destroy: RuntimeError: resource busy"]}
    assert report.removed == ["pr-7-mvp-eu.globex", "pr-7-mvp-eu"], "tenants before their platform"
    assert ("remove", "pr-7-mvp-eu.acme") in backend.calls, "remove is tried after a failed destroy"
    assert backend.list_stacks() == ["pr-70-mvp-eu"], "another pull request's copy is untouched"


def test_cleanup_twice_is_harmless() -> None:
    backend = RecordingBackend()
    preview_pull_request(backend, 7, ["mvp-eu"], SETTINGS)
    first = cleanup_pull_request(backend, 7, backend.list_stacks())
    again = cleanup_pull_request(backend, 7, ["pr-7-mvp-eu"])  # a stale listing
    assert first.removed == ["pr-7-mvp-eu"] and first.ok
    assert again.already_gone == ["pr-7-mvp-eu"] and again.ok and again.removed == []


def test_the_repositorys_stack_files_become_engine_config() -> None:
    found = stack_settings(["mvp-eu.acme"], project_root())
    config = found["mvp-eu.acme"].config
    assert config["ironlink:platform"] == "mvp-eu"
    assert json.loads(config["ironlink:tenant"])["id"] == "acme"
    with pytest.raises(PreviewInputError, match="unknown stack 'nope'"):
        stack_settings(["nope"], project_root())


def test_touched_stacks_are_read_from_a_plan_diff_json_document(tmp_path: Path) -> None:
    document = tmp_path / "diff.json"
    document.write_text(json.dumps({"mvp-eu.acme": {"steps": []}, "mvp-eu": {"steps": []}}))
    assert stacks_from_diff(document) == ["mvp-eu", "mvp-eu.acme"]
    document.write_text("[1, 2]")
    with pytest.raises(PreviewInputError, match="is not a `plan diff --format json` document"):
        stacks_from_diff(document)


# -------------------------------------------------------------------------- the real backend
@pytest.mark.skipif(shutil.which("pulumi") is not None, reason="the pulumi CLI is installed here")
def test_the_automation_backend_names_the_missing_pulumi_cli(tmp_path: Path) -> None:
    with pytest.raises(PulumiCliMissing, match=r"Pulumi CLI is not installed \(`pulumi` on PATH not found\)"):
        AutomationBackend(project_root())
    with pytest.raises(PulumiCliMissing, match=rf"{tmp_path}/bin/pulumi not found"):
        AutomationBackend(project_root(), pulumi_root=str(tmp_path))


@pytest.mark.skipif(shutil.which("pulumi") is not None, reason="the pulumi CLI is installed here")
def test_the_cli_without_pulumi_exits_1_with_that_message() -> None:
    result = runner.invoke(app, ["preview", "cleanup", "--number", "3"])
    assert result.exit_code == 1
    assert "Pulumi CLI is not installed" in result.output


def test_the_cli_refuses_unknown_stacks_with_code_2() -> None:
    result = runner.invoke(app, ["preview", "pr", "--number", "3", "--base", "main", "--stack", "nope"])
    assert result.exit_code == 2
    assert "--stack: nope not in stacks/" in result.output
