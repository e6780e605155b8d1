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


# A worker process's view of its platform, set once per process by the pool's initializer.
_platform: tuple[PlatformConfig, Plan] | None = None


def _init_worker(config: PlatformConfig, platform_plan: Plan) -> None:
    global _platform
    _platform = (config, platform_plan)


def _plan_tenants(tenants: Sequence[Tenant], output_dir: Path) -> list[PlannedStack]:
    assert _platform is not None, "worker started without its platform"
    config, platform_plan = _platform
    out = []
    for tenant in tenants:
        plan = build_tenant_plan(config, platform_plan, tenant)
        out.append(_summary(plan, write_plan(plan, output_dir)))
    return out


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
    platform_plan = platform_plan or build_plan(config, stack)
    planned = [_summary(platform_plan, write_plan(platform_plan, output_dir))] if include_platform else []
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
        _init_worker(config, platform_plan)
        return planned + _plan_tenants(selected, output_dir)
    # The platform's program result holds live resources; the workers need only its exports.
    shareable = Plan(platform_plan.stack, [], reference_outputs=platform_plan.reference_outputs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, context, initializer=_init_worker, initargs=(config, shareable)
    ) as pool:
        for result in pool.map(_plan_tenants, _chunks(selected, workers * 4), [output_dir] * (workers * 4)):
            planned.extend(result)
    return planned
