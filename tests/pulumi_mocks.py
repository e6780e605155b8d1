"""The shared mock-engine helper of the component, plan and manifest tests.

``stack_plan(stack)`` runs the real program for a stack under :class:`infra.plan.PlanMocks` once per
test process and caches the result; tests assert many properties on the same plan. Modules using it
run in one xdist group (``pytestmark = PLANS``), so the plans are built once per session.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest

from infra.config import PlatformConfig, list_stacks, load_stack
from infra.plan import Plan, PlannedResource, build_plan

PLANS = pytest.mark.xdist_group("pulumi-plans")
STACKS = list_stacks()


@functools.cache
def stack_plan(stack: str) -> Plan:
    return build_plan(load_stack(stack), stack)


@functools.cache
def stack_config(stack: str) -> PlatformConfig:
    return load_stack(stack)


def stacks_of(*phases: str) -> list[str]:
    return [stack for stack in STACKS if stack_config(stack).phase in phases]


WORKLOAD_KINDS = ("StatefulSet", "Deployment", "CronJob")


def pod_spec(resource: PlannedResource) -> dict[str, Any]:
    """The pod spec of a StatefulSet, Deployment or CronJob."""
    if resource.kind == "CronJob":
        return resource.get("spec.jobTemplate.spec.template.spec")
    return resource.get("spec.template.spec")


def workloads(plan: Plan) -> Iterator[PlannedResource]:
    for kind in WORKLOAD_KINDS:
        yield from plan.find(kind)


def env_of(resource: PlannedResource, container: int = 0) -> dict[str, Any]:
    """name → value (plain) or the ``valueFrom`` mapping."""
    entries = pod_spec(resource)["containers"][container].get("env", [])
    return {entry["name"]: entry.get("value", entry.get("valueFrom")) for entry in entries}


def broker(plan: Plan) -> PlannedResource:
    """The broker's StatefulSet."""
    return plan.one("StatefulSet", stack_config(plan.stack).broker.engine)
