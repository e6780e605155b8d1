"""The shared mock-engine helper of the component, plan and manifest tests.

``region_plan(stack)`` runs the real program for a platform stack and each of its tenant stacks
under :class:`infra.plan.PlanMocks` once per test process and caches the result; ``stack_plan``
is the region's resources in one view (platform and tenants), for properties that span them. Modules using it
run in one xdist group (``pytestmark = PLANS``), so the plans are built once per session.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest

from infra.config import Aws, PlatformConfig, load_stack, platform_stacks
from infra.plan import Plan, PlannedResource, RegionPlan, build_region

PLANS = pytest.mark.xdist_group("pulumi-plans")
_NO_VM = Aws(region="eu-west-1")
VM_STACKS = [stack for stack in platform_stacks() if (load_stack(stack).aws or _NO_VM).vm is not None]
"""Phase A platform stacks on one EC2 instance (``aws.vm``): no Kubernetes (``tests/test_aws_vm.py``)."""
STACKS = [stack for stack in platform_stacks() if stack not in VM_STACKS]
"""The platform stacks on a cluster: one region each, their tenants in stacks of their own."""


@functools.cache
def region_plan(stack: str) -> RegionPlan:
    return build_region(stack_config(stack), stack)


@functools.cache
def stack_plan(stack: str) -> Plan:
    """Platform stack ``stack`` and its tenant stacks, as one view."""
    return region_plan(stack).merged()


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
