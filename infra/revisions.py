"""Plan the stacks a change touches at two git revisions, each in a worktree of its own.

Which stacks a change touches, from the files it changes (:func:`touched_stacks`):

- a tenant stack file → that tenant stack;
- a platform stack file → the platform and every tenant on it (a tenant's program reads its
  platform's config: tiers, phase, images);
- anything the program imports or reads (``infra/``, ``components/``, ``dashboards/``, ``ingest/``,
  ``registry/``, ``provisioning/``, ``Pulumi.yaml``, ``pyproject.toml``) → every stack, since no
  static reading can tell which resources a code change reaches; the diff then shows the stacks
  whose plans really changed;
- tests, docs, benchmarks, the local dev platform, CI files, other files in ``stacks/`` → no stack.

Each revision is checked out with ``git worktree add --detach`` (the working tree itself stands for
"HEAD" when no head revision is given, uncommitted changes included) and planned by that
revision's own code (``python -m infra.cli plan``), the two revisions in parallel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from infra.config import is_tenant_stack

STACKS_DIR = "stacks/"
# Paths that cannot change a plan; everything else outside stacks/ is treated as the program.
INERT_PREFIXES = ("tests/", "docs/", "bench/", "localdev/", ".github/", ".ci/", "fleets/", "build/")
INERT_SUFFIXES = (".md",)
GIT_TIMEOUT_S = 120
PLAN_TIMEOUT_S = 1800


class RevisionError(RuntimeError):
    """A revision that cannot be read or planned; the message names it and what git or the planner said."""


@dataclass(frozen=True)
class Touched:
    """The stacks to plan at each revision (a stack new in head is absent from base, and so on)."""

    base: list[str]
    head: list[str]
    everything: bool
    """A program file changed: every stack is planned."""

    @property
    def union(self) -> list[str]:
        return sorted({*self.base, *self.head})


def stack_name_of(path: str) -> str | None:
    """``stacks/Pulumi.mvp-eu.acme.yaml`` → ``mvp-eu.acme``; None for any other path."""
    name = path.removeprefix(STACKS_DIR)
    if (
        path.startswith(STACKS_DIR)
        and "/" not in name
        and name.startswith("Pulumi.")
        and name.endswith(".yaml")
    ):
        return name[len("Pulumi.") : -len(".yaml")]
    return None


def _inert(path: str) -> bool:
    return path.startswith(INERT_PREFIXES) or path.endswith(INERT_SUFFIXES)


def touched_stacks(changed: Iterable[str], base_stacks: Sequence[str], head_stacks: Sequence[str]) -> Touched:
    """The stacks a change of ``changed`` files touches, among those that exist at each revision."""
    names: set[str] = set()
    everything = False
    for path in changed:
        stack = stack_name_of(path)
        if stack is not None:
            names.add(stack)
        elif not path.startswith(STACKS_DIR) and not _inert(path):
            everything = True
    if everything:
        return Touched(sorted(base_stacks), sorted(head_stacks), True)
    platforms = {name for name in names if not is_tenant_stack(name)}

    def chosen(stacks: Sequence[str]) -> list[str]:
        return sorted(s for s in stacks if s in names or s.split(".", 1)[0] in platforms)

    return Touched(chosen(base_stacks), chosen(head_stacks), False)


# ----------------------------------------------------------------------------------------- git
def git(root: Path, *args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RevisionError(f"git {' '.join(args)}: {error}") from error
    if done.returncode != 0:
        raise RevisionError(f"git {' '.join(args)}: {done.stderr.strip()[:500]}")
    return done.stdout


def resolve(root: Path, revision: str) -> str:
    """The commit ``revision`` names, or :class:`RevisionError` naming it."""
    if revision.startswith("-") or not revision.strip():
        raise RevisionError(f"{revision!r} is not a revision")
    try:
        return git(root, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}").strip()
    except RevisionError as error:
        raise RevisionError(f"{revision!r} is not a commit of {root}") from error


def changed_files(root: Path, base: str, head: str | None) -> list[str]:
    """Files that differ between ``base`` and ``head`` (None: the working tree, untracked files too)."""
    if head is not None:
        return git(root, "diff", "--name-only", base, head).splitlines()
    tracked = git(root, "diff", "--name-only", base).splitlines()
    untracked = git(root, "ls-files", "--others", "--exclude-standard").splitlines()
    return sorted({*tracked, *untracked})


def stacks_at(root: Path, revision: str | None) -> list[str]:
    """The stacks a revision has (None: the working tree)."""
    if revision is None:
        paths = [str(p.relative_to(root)) for p in (root / "stacks").glob("Pulumi.*.yaml")]
    else:
        paths = git(root, "ls-tree", "--name-only", revision, STACKS_DIR).splitlines()
    return sorted(name for path in paths if (name := stack_name_of(path)) is not None)


@contextmanager
def checkout(root: Path, revision: str | None) -> Iterator[Path]:
    """A detached worktree of ``revision``, removed afterwards (None: the working tree itself)."""
    if revision is None:
        yield root
        return
    with tempfile.TemporaryDirectory(prefix="ironlink-rev-") as scratch:
        tree = Path(scratch) / "tree"
        git(root, "worktree", "add", "--detach", "--quiet", str(tree), revision)
        try:
            yield tree
        finally:
            git(root, "worktree", "remove", "--force", str(tree))


def plan_at(tree: Path, stacks: Sequence[str], output_dir: Path, jobs: int | None) -> None:
    """Plan ``stacks`` with the code of ``tree`` into ``output_dir``; nothing to do for no stack."""
    if not stacks:
        return
    # main() rather than -m: every revision since the CLI began has it.
    entry = "from infra.cli import main; main()"
    argv = [sys.executable, "-c", entry, "plan", *stacks, "--no-tree", "--output-dir", str(output_dir)]
    if jobs:
        argv += ["--jobs", str(jobs)]
    # That tree's own packages first: the environment's editable install points at another checkout.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(
            argv, cwd=tree, env=env, capture_output=True, text=True, timeout=PLAN_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise RevisionError(f"planning {tree} took longer than {PLAN_TIMEOUT_S} s") from error
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip()[-2000:]
        raise RevisionError(f"planning the stacks of {tree} failed (exit {done.returncode}):\n{said}")


def planned_stacks(stacks: Sequence[str]) -> list[str]:
    """What to ask the planner for: a platform whose every tenant is touched is asked as the region."""
    platforms = {s for s in stacks if not is_tenant_stack(s)}
    return sorted(platforms | {s for s in stacks if s.split(".", 1)[0] not in platforms})


def plan_revisions(
    root: Path, base: str, head: str | None, base_dir: Path, head_dir: Path, jobs: int | None = None
) -> Touched:
    """Plan, into ``base_dir`` and ``head_dir``, the stacks the change from ``base`` to ``head``
    touches at each revision; returns them."""
    base_commit = resolve(root, base)
    head_commit = resolve(root, head) if head is not None else None
    touched = touched_stacks(
        changed_files(root, base_commit, head_commit),
        stacks_at(root, base_commit),
        stacks_at(root, head_commit),
    )
    share = max(1, (jobs or os.cpu_count() or 1) // 2) if touched.base and touched.head else jobs

    def run(revision: str | None, stacks: list[str], output: Path) -> None:
        with checkout(root, revision) as tree:
            plan_at(tree, planned_stacks(stacks), output, share)

    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(run, base_commit, touched.base, base_dir),
            pool.submit(run, head_commit, touched.head, head_dir),
        ]
        for future in futures:
            future.result()
    return touched
