"""Plan speed of a large region, end to end, as a user runs it (``make bench``).

A copy of this repository is made with a generated Phase C platform stack ``bench`` and
``--tenants`` tenant stacks (every 20th on isolation level 3), committed in git. Each figure is the
wall time of the real command in a fresh process, and the peak RSS of the largest process it ran:

- ``one-tenant change``: ``ironlink plan diff main~1 main`` after one tenant's tier changed;
- ``tenant add``: ``ironlink tenant add`` to the plan it shows;
- ``region N tenants``: ``ironlink plan bench`` (the platform and every tenant, in parallel).

The baseline, measured in the same run, is ``ironlink plan`` of one tenant stack; each figure is
also printed as a ratio to it (process start and SDK import are in both).

    python bench/plan.py [--tenants 1000] [--jobs N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ("infra", "components", "dashboards", "ingest", "registry", "provisioning")
TIERS = ("basic", "standard", "premium")
MACHINE_TYPES = ("cnc_mill", "hydraulic_press", "conveyor")
IRONLINK = [sys.executable, "-c", "from infra.cli import main; main()"]
# Runs one command and prints the peak RSS (KiB) of the largest process it ran, pool workers included:
# RUSAGE_CHILDREN reports the largest descendant reaped, so each command is measured on its own.
PEAK = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)"
)


def tenant_file(index: int) -> str:
    level = "    isolation: 3\n" if index % 20 == 0 else ""
    kinds = ", ".join(MACHINE_TYPES[: 1 + index % len(MACHINE_TYPES)])
    return (
        "config:\n  ironlink:platform: bench\n  ironlink:tenant:\n"
        f"    id: t-{index:05d}\n    name: Tenant {index}\n    tier: {TIERS[index % len(TIERS)]}\n"
        f"{level}    machine_types: [{kinds}]\n"
    )


def git(repo: Path, *args: str) -> None:
    identity = ["-c", "user.email=bench@ironlink.example", "-c", "user.name=bench"]
    subprocess.run(["git", *identity, *args], cwd=repo, check=True, capture_output=True, timeout=300)


def make_repo(where: Path, tenants: int) -> Path:
    repo = where / "repo"
    (repo / "stacks").mkdir(parents=True)
    for folder in PROGRAM:
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("Pulumi.yaml", "pyproject.toml"):
        shutil.copy2(ROOT / name, repo / name)
    platform = (ROOT / "stacks" / "Pulumi.scale-eu-west-1.yaml").read_text()
    (repo / "stacks" / "Pulumi.bench.yaml").write_text(platform.replace("region: eu-west-1", "region: bench"))
    for index in range(tenants):
        (repo / "stacks" / f"Pulumi.bench.t-{index:05d}.yaml").write_text(tenant_file(index))
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "bench region")
    return repo


def timed(repo: Path, *argv: str, ok: tuple[int, ...] = (0,)) -> tuple[float, float]:
    """Wall seconds and the peak RSS (MiB) of the largest process of ``ironlink ARGV`` (its pool's
    workers included: the kernel reports the largest descendant reaped)."""
    env = {**os.environ, "PYTHONPATH": str(repo), "COLUMNS": "200"}
    command = [sys.executable, "-c", PEAK, *IRONLINK, *argv]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - start
    if done.returncode not in ok:
        raise SystemExit(f"ironlink {' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, int(done.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=None, help="planning processes [CPU count]")
    args = parser.parse_args()
    if not 1 <= args.tenants <= 10_000:
        parser.error(f"--tenants: {args.tenants} is not between 1 and 10000")
    jobs = ["--jobs", str(args.jobs)] if args.jobs else []
    with tempfile.TemporaryDirectory(prefix="ironlink-bench-plan-") as scratch:
        repo = make_repo(Path(scratch), args.tenants)
        out = Path(scratch) / "plans"
        baseline, _ = timed(repo, "plan", "bench.t-00001", "--no-tree", "--output-dir", str(out))
        print(f"baseline: plan of one tenant stack {baseline:.2f} s")

        target = repo / "stacks" / "Pulumi.bench.t-00002.yaml"
        target.write_text(target.read_text().replace("tier: premium", "tier: basic"))
        git(repo, "commit", "-qam", "one tenant's tier")
        change, _ = timed(repo, "plan", "diff", "main~1", "main", *jobs, ok=(0, 3))
        print(f"one-tenant change {change:.2f} s (x{change / baseline:.2f} baseline)")

        added, _ = timed(
            repo, "tenant", "add", "bench", "--id", "newco", "--name", "New Co", "--tier", "basic"
        )
        print(f"tenant add {added:.2f} s (x{added / baseline:.2f} baseline)")

        region, peak = timed(repo, "plan", "bench", "--no-tree", "--output-dir", str(out), *jobs)
        planned = len(list(out.glob("bench*.json")))
        print(
            f"region {args.tenants} tenants {region:.2f} s, peak RSS {peak:.0f} MiB "
            f"(x{region / baseline:.1f} baseline; {planned} stacks, {os.cpu_count()} CPUs)"
        )


if __name__ == "__main__":
    main()
