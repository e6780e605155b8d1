"""Plan many stacks at once: platforms first, then their tenants, in parallel processes.

A tenant stack's plan needs its platform's planned exports (they answer its ``StackReference``),
so each platform is planned once in this process; its tenants are then planned in chunks by worker
processes, each writing its stacks' plan files. The workers are spawned, not forked: a process that
has run the SDK holds threads (its event loop's executor), and a fork copies their locks held.
A thousand tenants of one region are a thousand small plans: the SDK's fixed cost per resource
(about 3 ms) is paid once per tenant instead of in one process holding the whole region.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

from infra.config import (
    PlatformConfig,
    Problem,
    StackConfigError,
    Tenant,
    is_tenant_stack,
    platform_stacks,
)
from infra.plan import Plan, build_plan, build_tenant_plan, write_plan


@dataclass(frozen=True)
class PlannedStack:
    """What was written for one stack."""

    stack: str
    resources: int
    protected: int
    path: Path


@dataclass(frozen=True)
class Selection:
    """Which stacks to plan: per platform, its own plan and which of its tenants (None: all)."""

    platform: str
    include_platform: bool
    tenants: frozenset[str] | None


def select(names: Sequence[str], all_stacks: bool) -> list[Selection]:
    """Turn stack names (platforms or ``<platform>.<tenant>``) into selections, one per platform.
    A platform name means its region: the platform and every tenant."""
    wanted = platform_stacks() if all_stacks else []
    chosen: dict[str, tuple[bool, set[str] | None]] = {name: (True, None) for name in wanted}
    for name in names:
        platform, _, tenant = name.partition(".")
        include, tenants = chosen.get(platform, (False, set()))
        if not is_tenant_stack(name):
            chosen[platform] = (True, None)
        elif tenants is not None:
            chosen[platform] = (include, {*tenants, tenant})
    return [
        Selection(platform, include, None if tenants is None else frozenset(tenants))
        for platform, (include, tenants) in chosen.items()
    ]


def _summary(plan: Plan, path: Path) -> PlannedStack:
    return PlannedStack(plan.stack, len(plan.resources), sum(r.protect for r in plan.resources), path)


def _plan_tenants(
    config: PlatformConfig, platform_plan: Plan, tenants: Sequence[Tenant], output_dir: Path
) -> list[PlannedStack]:
    out = []
    for tenant in tenants:
        plan = build_tenant_plan(config, platform_plan, tenant)
        out.append(_summary(plan, write_plan(plan, output_dir)))
    return out


def _ready() -> None:
    """A worker's first task: load the program and the SDK while the platform is being planned."""
    import infra.program  # noqa: F401


def _chunks(items: Sequence[Tenant], count: int) -> list[Sequence[Tenant]]:
    size = max(1, -(-len(items) // count))
    return [items[start : start + size] for start in range(0, len(items), size)]


def plan_region(
    config: PlatformConfig,
    stack: str,
    output_dir: Path,
    *,
    include_platform: bool = True,
    tenants: Iterable[str] | None = None,
    jobs: int | None = None,
    platform_plan: Plan | None = None,
) -> list[PlannedStack]:
    """Plan platform ``stack`` (``config`` with its tenants; ``platform_plan`` if planned already)
    and the chosen tenants; write each plan."""
    chosen = set(tenants) if tenants is not None else None
    unknown = sorted(chosen - {t.id for t in config.tenants}) if chosen is not None else []
    if unknown:
        known = ", ".join(t.id for t in config.tenants) or "none"
        problem = Problem(
            "STACK", f"no tenant stack {', '.join(f'{stack}.{t}' for t in unknown)} (tenants: {known})"
        )
        raise StackConfigError([problem], stack)
    selected = [t for t in config.tenants if chosen is None or t.id in chosen]
    workers = min(jobs or os.cpu_count() or 1, max(1, len(selected) // 50))
    if workers <= 1:
        platform_plan = platform_plan or build_plan(config, stack)
        return _platform_summary(platform_plan, output_dir, include_platform) + _plan_tenants(
            config, platform_plan, selected, output_dir
        )
    with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn")) as pool:
        warming = [pool.submit(_ready) for _ in range(workers)]  # they start while the platform plans
        platform_plan = platform_plan or build_plan(config, stack)
        planned = _platform_summary(platform_plan, output_dir, include_platform)
        # The platform's program result holds live resources; the workers need only its exports.
        shareable = Plan(platform_plan.stack, [], reference_outputs=platform_plan.reference_outputs)
        for future in warming:
            future.result()
        chunks = _chunks(selected, workers * 4)
        for result in pool.map(_plan_tenants, repeat(config), repeat(shareable), chunks, repeat(output_dir)):
            planned.extend(result)
    return planned


def _platform_summary(plan: Plan, output_dir: Path, include: bool) -> list[PlannedStack]:
    return [_summary(plan, write_plan(plan, output_dir))] if include else []
