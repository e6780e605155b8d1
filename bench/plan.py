"""Plan time and peak memory for 10, 100 and 1,000 generated tenants (``make bench``).

Each size runs in a fresh Python process, so its peak RSS is its own: the child parses a generated
stack config (``infra.config.parse_platform``, as a stack file would be), plans a 1-tenant stack
once to load the SDKs, then times ``infra.plan.build_plan`` for the generated stack (best of
``--repeat``). Growth ratios are against the smaller size measured in the same run.

    python bench/plan.py [--sizes 10 100 1000] [--phase C] [--repeat 3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# `python bench/plan.py` puts bench/ first on sys.path, where bench/ingest.py would shadow the
# `ingest` package that the program imports.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

from infra.config import PlatformConfig, parse_platform  # noqa: E402

TIERS = ("basic", "standard", "premium")
MACHINE_TYPES = ("cnc_mill", "hydraulic_press", "conveyor")


def generated_config(tenants: int, phase: str) -> PlatformConfig:
    """``tenants`` tenants of one site and three machines each; in phase C every 20th is level 3."""
    raw: dict[str, Any] = {
        "phase": phase,
        "region": "bench",
        "tenants": [
            {
                "id": f"tenant-{index:05d}",
                "name": f"Tenant {index}",
                "tier": TIERS[index % len(TIERS)],
                **({"isolation": 3} if phase == "C" and index % 20 == 0 else {}),
                "sites": [
                    {
                        "id": "site-1",
                        "machines": [{"id": f"m-{m}", "type": kind} for m, kind in enumerate(MACHINE_TYPES)],
                    }
                ],
            }
            for index in range(tenants)
        ],
    }
    return parse_platform(raw, f"bench-{tenants}")


def measure(tenants: int, phase: str, repeat: int) -> dict[str, Any]:
    """Runs in the child process."""
    from infra.plan import build_plan

    build_plan(generated_config(1, phase), "warmup")
    config = generated_config(tenants, phase)
    best, count = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter()
        plan = build_plan(config, f"bench-{tenants}")
        best = min(best, time.perf_counter() - start)
        count = len(plan.resources)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"tenants": tenants, "resources": count, "seconds": best, "peak_rss_mib": peak_kib / 1024}


def run_child(tenants: int, phase: str, repeat: int) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", str(tenants), "--phase", phase, "--repeat", str(repeat)]
    completed = subprocess.run(argv, check=True, capture_output=True, text=True)
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--phase", choices=["A", "B", "C"], default="C")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.phase, args.repeat)))
        return

    rows = [run_child(size, args.phase, args.repeat) for size in sorted(args.sizes)]
    print(f"offline plan, phase {args.phase}, best of {args.repeat} (each size in its own process)")
    print(f"{'tenants':>8} {'resources':>10} {'plan s':>8} {'peak RSS MiB':>13} {'s/tenant':>9}")
    for row in rows:
        per_tenant = row["seconds"] / row["tenants"]
        print(
            f"{row['tenants']:>8} {row['resources']:>10} {row['seconds']:>8.3f} "
            f"{row['peak_rss_mib']:>13.1f} {per_tenant * 1000:>7.2f}ms"
        )
    base = rows[0]
    for previous, row in itertools.pairwise(rows):
        print(
            f"t{row['tenants']}/t{previous['tenants']} = {row['seconds'] / previous['seconds']:.2f}"
            f" (x{row['tenants'] / previous['tenants']:.0f} tenants)"
        )
    if len(rows) > 1:
        ratio = rows[-1]["seconds"] / base["seconds"]
        last, first = rows[-1]["tenants"], base["tenants"]
        print(f"t{last}/t{first} = {ratio:.2f} against the {first}-tenant baseline")


if __name__ == "__main__":
    main()
