"""``ironlink plan diff`` on a copy of this repository: known changes, committed as a reviewer's pull
request would be, planned at both revisions in git worktrees by each revision's own code.

Each test asserts which stacks were planned (only those the change touches), what the diff names
(operation, input path, reason) and the exit code. The diffs' rendering limits for a thousand
changed stacks are in tests/test_plandiff.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from infra.cli import app
from infra.config import project_root
from infra.plandiff import EXIT_OK, EXIT_STATEFUL_REFUSED
from infra.revisions import touched_stacks

PROGRAM = ("infra", "components", "dashboards", "ingest", "registry", "provisioning", "stacks")
FILES = ("Pulumi.yaml", "pyproject.toml")
runner = CliRunner()
pytestmark = pytest.mark.xdist_group("plan-diff-repo")


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True, timeout=60)
    return done.stdout


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repository holding this checkout's program and stacks, one commit."""
    source, target = project_root(), tmp_path / "repo"
    target.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in PROGRAM:
        shutil.copytree(source / folder, target / folder, ignore=ignore)
    for name in FILES:
        shutil.copy2(source / name, target / name)
    git(target, "init", "-q", "-b", "main")
    git(target, "-c", "user.email=ci@ironlink.example", "-c", "user.name=ci", "add", "-A")
    git(target, "-c", "user.email=ci@ironlink.example", "-c", "user.name=ci", "commit", "-qm", "base")
    monkeypatch.chdir(target)
    return target


def change(repo: Path, edit: Callable[[Path], None]) -> None:
    edit(repo)
    git(repo, "add", "-A")
    git(repo, "-c", "user.email=ci@ironlink.example", "-c", "user.name=ci", "commit", "-qm", "change")


def edit(relative: str, old: str, new: str) -> Callable[[Path], None]:
    """A change replacing ``old`` (which must be there) with ``new`` in one file of the copy."""

    def apply(root: Path) -> None:
        path = root / relative
        text = path.read_text()
        assert old in text, f"{relative} no longer holds {old!r}"
        path.write_text(text.replace(old, new))

    return apply


def diff(repo: Path, *flags: str) -> tuple[int, dict[str, Any], list[str], list[str]]:
    """Exit code, the JSON diff per stack, and the stacks planned at base and at head."""
    plans = repo.parent / "plans"
    result = runner.invoke(
        app,
        [
            "plan",
            "diff",
            "main~1",
            "main",
            "--format",
            "json",
            "--output",
            str(repo.parent / "d.json"),
            "--plans-dir",
            str(plans),
            *flags,
        ],
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    planned = [sorted(p.stem for p in (plans / side).glob("*.json")) for side in ("base", "head")]
    return result.exit_code, json.loads((repo.parent / "d.json").read_text()), planned[0], planned[1]


def steps(document: dict[str, Any], stack: str, op: str) -> list[dict[str, Any]]:
    return [step for step in document[stack]["steps"] if step["op"] == op]


def names(found: list[dict[str, Any]]) -> list[str]:
    return sorted(step["urn"].rsplit("::", 1)[-1] for step in found)


# ------------------------------------------------------------------------------ the changes
def test_adding_a_tenant_plans_and_creates_only_its_stack(repo: Path) -> None:
    def add(root: Path) -> None:
        (root / "stacks" / "Pulumi.mvp-eu.soylent.yaml").write_text(
            "config:\n  ironlink:platform: mvp-eu\n  ironlink:tenant:\n"
            "    id: soylent\n    name: Soylent Foods\n    tier: basic\n"
        )

    change(repo, add)
    code, document, base, head = diff(repo)
    assert (base, head) == ([], ["mvp-eu.soylent"]), "only the new tenant's stack is planned"
    assert list(document) == ["mvp-eu.soylent"]
    created = steps(document, "mvp-eu.soylent", "create")
    assert "soylent" in names(created) and len(created) == len(document["mvp-eu.soylent"]["steps"])
    assert code == EXIT_OK


def test_changing_a_tenants_retention_tier_updates_its_buckets_in_place(repo: Path) -> None:
    path = repo / "stacks" / "Pulumi.mvp-eu.acme.yaml"
    change(repo, lambda _: path.write_text(path.read_text().replace("tier: standard", "tier: premium")))
    code, document, base, head = diff(repo)
    assert base == head == ["mvp-eu.acme"], "a tenant's file touches its stack alone"
    updated = steps(document, "mvp-eu.acme", "update")
    buckets = [s for s in updated if s["newState"]["type"].endswith(":Bucket")]
    assert buckets and all("retention_seconds" in " ".join(s["diffReasons"]) for s in buckets), updated
    assert steps(document, "mvp-eu.acme", "replace") == [] and code == EXIT_OK


def test_changing_the_platform_plans_its_tenants_and_shows_only_what_changed(repo: Path) -> None:
    path = repo / "stacks" / "Pulumi.mvp-eu.yaml"
    change(
        repo,
        lambda _: path.write_text(path.read_text() + "  ironlink:broker:\n    image: emqx/emqx:5.8.10\n"),
    )
    code, document, base, head = diff(repo)
    assert base == head == ["mvp-eu", "mvp-eu.acme", "mvp-eu.globex", "mvp-eu.initech"]
    assert list(document) == ["mvp-eu"], "the tenants read the platform's config yet did not change"
    (update,) = [s for s in steps(document, "mvp-eu", "update") if s["urn"].endswith("StatefulSet::emqx")]
    assert (
        update["diffReasons"] == ["spec"]
        and "spec.template.spec.containers.emqx.image" in update["detailedDiff"]
    )
    assert code == EXIT_OK


def test_renaming_a_stateful_resource_is_a_delete_and_create_refused_unless_allowed(repo: Path) -> None:
    change(repo, edit("components/grafana.py", 'claim = f"{name}-data"', 'claim = f"{name}-sqlite"'))
    code, document, base, head = diff(repo)
    assert base == head and "mvp-eu" in head and len(head) > 5, "a program change plans every stack"
    deleted = [
        s
        for s in steps(document, "mvp-eu", "delete")
        if s["urn"].endswith("PersistentVolumeClaim::grafana-data")
    ]
    created = [
        s
        for s in steps(document, "mvp-eu", "create")
        if s["urn"].endswith("PersistentVolumeClaim::grafana-sqlite")
    ]
    assert deleted and created, names(document["mvp-eu"]["steps"])
    said = json.dumps(document["mvp-eu"])
    assert "looks like a rename" in said and "alias" in said, "the diff names the likely fix"
    assert code == EXIT_STATEFUL_REFUSED, "Grafana's protected SQLite volume would be deleted"
    allowed, _, _, _ = diff(repo, "--allow-stateful-changes")
    assert allowed == EXIT_OK


def test_a_force_new_change_to_a_database_is_a_replacement_with_its_reason(repo: Path) -> None:
    change(
        repo, edit("components/postgres.py", 'volume_claim_template("data"', 'volume_claim_template("pgdata"')
    )
    code, document, _, _ = diff(repo)
    (replaced,) = [
        s for s in steps(document, "mvp-eu", "replace") if s["urn"].endswith("StatefulSet::postgres")
    ]
    assert replaced["replaceReasons"] == ["spec"]
    assert replaced["detailedDiff"]["spec.volumeClaimTemplates[0].metadata.name"]["kind"] == "update-replace"
    assert code == EXIT_STATEFUL_REFUSED


def test_removing_a_tenant_deletes_its_stack_and_refuses_its_buckets(repo: Path) -> None:
    change(repo, lambda root: (root / "stacks" / "Pulumi.mvp-eu.globex.yaml").unlink())
    code, document, base, head = diff(repo)
    assert (base, head) == (["mvp-eu.globex"], []), "only the removed tenant's stack is planned"
    deleted = steps(document, "mvp-eu.globex", "delete")
    assert len(deleted) == len(document["mvp-eu.globex"]["steps"]) and deleted
    assert code == EXIT_STATEFUL_REFUSED, "its buckets hold the tenant's data"


def test_a_bad_revision_is_named_with_exit_2(repo: Path) -> None:
    result = runner.invoke(app, ["plan", "diff", "no-such-branch"])
    assert result.exit_code == 2 and "'no-such-branch' is not a commit" in result.output


# ------------------------------------------------------------------------- touched stacks
STACKS = ["dev", "dev.acme", "mvp-eu", "mvp-eu.acme", "mvp-eu.globex"]


@pytest.mark.parametrize(
    ("changed", "expected"),
    [
        (["stacks/Pulumi.mvp-eu.acme.yaml"], ["mvp-eu.acme"]),
        (["stacks/Pulumi.mvp-eu.yaml"], ["mvp-eu", "mvp-eu.acme", "mvp-eu.globex"]),
        (["README.md", "tests/test_plan.py", "docs/architecture.md", "bench/plan.py"], []),
        (["components/tenant.py"], STACKS),
        (["stacks/README.txt"], []),
    ],
)
def test_touched_stacks_follow_the_files_a_change_touches(changed: list[str], expected: list[str]) -> None:
    touched = touched_stacks(changed, STACKS, STACKS)
    assert touched.base == touched.head == expected
    assert touched.everything == (expected == STACKS)
