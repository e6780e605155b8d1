"""The project's GitHub Actions workflow (.github/workflows/ci.yml): the jobs, steps, permissions
and comment marker the reviewers rely on, read from the YAML; and actionlint's verdict on it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.plandiff import COMMENT_MARKER

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


@pytest.fixture(scope="module")
def workflow() -> dict[Any, Any]:
    document = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(document, dict)
    return document


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job["steps"])


def runs(job: dict[str, Any]) -> str:
    return "\n".join(step.get("run", "") for step in steps(job))


def test_it_runs_on_pull_requests_and_pushes_to_main(workflow: dict[Any, Any]) -> None:
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as a boolean
    assert triggers["push"]["branches"] == ["main"]
    assert "closed" in triggers["pull_request"]["types"], "cleanup runs when a pull request closes"
    assert workflow["permissions"] == {"contents": "read"}, "least privilege by default"


def test_the_test_job_runs_what_ci_runs(workflow: dict[Any, Any]) -> None:
    job = workflow["jobs"]["test"]
    assert any(step.get("uses", "").startswith("actions/checkout@") for step in steps(job))
    assert "bash .ci/run" in runs(job)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_plan_diff_posts_one_comment_found_by_its_marker_and_fails_with_the_diffs_code(
    workflow: dict[Any, Any],
) -> None:
    job = workflow["jobs"]["plan-diff"]
    assert "pull_request" in job["if"]
    assert job["permissions"]["pull-requests"] == "write"
    checkout = next(s for s in steps(job) if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0, "the base revision must be there for worktrees"
    assert "make deps" in runs(job)
    diff = next(s for s in steps(job) if s.get("id") == "diff")
    assert (
        '.venv/bin/ironlink plan diff "origin/${BASE_REF}" HEAD --format markdown --output plan-diff.md'
        in diff["run"]
    )
    assert diff["env"]["BASE_REF"] == "${{ github.base_ref }}"
    assert "set +e" in diff["run"] and "exit-code=${code}" in diff["run"]
    script = next(s for s in steps(job) if s.get("uses", "").startswith("actions/github-script@"))
    body = script["with"]["script"]
    assert COMMENT_MARKER in body and COMMENT_MARKER == "<!-- ironlink-plan-diff -->"
    for call in ("issues.listComments", "issues.updateComment", "issues.createComment"):
        assert call in body
    names = [s.get("name", "") for s in steps(job)]
    upload = next(s for s in steps(job) if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert "build/graphs/*.svg" in upload["with"]["path"] and "build/plan/*.json" in upload["with"]["path"]
    assert "GITHUB_STEP_SUMMARY" in runs(job) and ".svg" in runs(job)
    last = steps(job)[-1]
    assert last["run"] == 'exit "${CODE:-1}"' and last["env"]["CODE"] == "${{ steps.diff.outputs.exit-code }}"
    posted, failed = names.index("post the diff as one pull-request comment"), len(names) - 1
    assert posted < failed and script.get("if") == "${{ always() }}", "the comment is posted before failing"


def test_previews_run_only_with_pulumi_credentials_checked_in_a_step(workflow: dict[Any, Any]) -> None:
    job = workflow["jobs"]["preview"]
    assert "secrets" not in job["if"], "secrets are not available in a job's if:"
    assert job["env"]["PULUMI_ACCESS_TOKEN"] == "${{ secrets.PULUMI_ACCESS_TOKEN }}"
    check = next(s for s in steps(job) if s.get("id") == "credentials")
    assert '[ -n "${PULUMI_ACCESS_TOKEN}" ]' in check["run"]
    gated = [s for s in steps(job) if s is not check]
    assert all("steps.credentials.outputs.present == 'true'" in s["if"] for s in gated)
    assert 'ironlink preview pr --number "${NUMBER}" --base "origin/${BASE_REF}"' in runs(job)
    cleanup = next(s for s in gated if "preview cleanup" in s.get("run", ""))
    assert "github.event.action == 'closed'" in cleanup["if"]
    assert job["env"]["NUMBER"] == "${{ github.event.pull_request.number }}"


def _actionlint() -> str | None:
    beside = Path(sys.executable).parent / "actionlint"
    return str(beside) if beside.exists() else shutil.which("actionlint")


@pytest.mark.skipif(_actionlint() is None, reason="actionlint is not installed (pip install -e '.[dev]')")
def test_actionlint_finds_nothing_wrong() -> None:
    done = subprocess.run(
        [str(_actionlint()), "-no-color", str(WORKFLOW)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
