"""Run the policy pack offline: the same validate functions on every resource of a plan JSON.

No Pulumi CLI and no gRPC: for each resource, the arguments are built with pulumi_policy's own
classes (``ResourceValidationArgs``, ``PolicyResourceOptions``, its unknown-checking proxy over
the deserialized inputs), as its analyzer server does for ``pulumi preview --policy-pack``, and
each policy's own ``validate`` runs on them::

    violations = run_policies(json.loads(Path("build/plan/mvp-eu.json").read_text()))
    for v in violations:
        print(v.stack, v.urn, v.rule, v.message)
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from inspect import isawaitable
from typing import Any

from pulumi_policy import (
    EnforcementLevel,
    PolicyCustomTimeouts,
    PolicyResourceOptions,
    ResourceValidationArgs,
    ResourceValidationPolicy,
)
from pulumi_policy.deserialize import deserialize_properties
from pulumi_policy.policy import _NotApplicableError
from pulumi_policy.proxy import UnknownValueError, unknown_checking_proxy

from infra.policy.rules import DEFAULT_NAMESPACE, POLICIES

NAMESPACE_TYPE = "kubernetes:core/v1:Namespace"


@dataclass(frozen=True)
class Violation:
    stack: str
    urn: str
    name: str
    type: str
    rule: str
    message: str

    def __str__(self) -> str:
        kind = self.type.rsplit(":", 1)[-1]
        return f"{self.stack}: {self.rule}: {kind} {self.name} ({self.urn}): {self.message}"


def _urn(record: Mapping[str, Any], stack: str) -> str:
    from infra.plandiff import record_urn  # the one URN rule; imported late (plandiff imports us)

    return record_urn(record, stack)


def stack_config(
    plan_json: Mapping[str, Any], protect_stateful: bool | None = None, namespace: str | None = None
) -> dict[str, Any]:
    """The pack's config for one stack: given values first, else what the plan shows (its
    ``namespace`` output or Namespace object; protection on if the plan protects anything: a stack
    that protects stateful resources must protect every one of them)."""
    resources = plan_json.get("resources", [])
    if namespace is None:
        outputs = plan_json.get("outputs") or {}
        declared = [
            r["inputs"].get("metadata", {}).get("name") for r in resources if r["type"] == NAMESPACE_TYPE
        ]
        namespace = outputs.get("namespace") or next((n for n in declared if n), None) or DEFAULT_NAMESPACE
    if protect_stateful is None:
        protect_stateful = any(r.get("protect") for r in resources)
    return {"namespace": namespace, "protect_stateful": protect_stateful}


def validation_args(record: Mapping[str, Any], urn: str, config: Mapping[str, Any]) -> ResourceValidationArgs:
    """A plan record as pulumi_policy's analyzer hands a resource to a validate function."""
    props = unknown_checking_proxy(deserialize_properties(dict(record.get("inputs", {}))))
    options = PolicyResourceOptions(
        protect=bool(record.get("protect")),
        ignore_changes=[],
        delete_before_replace=None,
        aliases=[],
        custom_timeouts=PolicyCustomTimeouts(0, 0, 0),
        additional_secret_outputs=[],
        parent=record.get("parent"),
    )
    return ResourceValidationArgs(record["type"], props, urn, record["name"], options, None, dict(config))


def _validate(policy: ResourceValidationPolicy, args: ResourceValidationArgs, messages: list[str]) -> None:
    def report(message: str, _urn: str | None = None) -> None:
        messages.append(message)

    try:
        result = policy.validate(args, report)
        if isawaitable(result):
            asyncio.run(_awaited(result))
    except (UnknownValueError, _NotApplicableError):
        return  # as the analyzer does: an unknown input or a rule that does not apply is no violation


async def _awaited(result: Any) -> None:
    await result


def run_policies(
    plan_json: Mapping[str, Any],
    protect_stateful: bool | None = None,
    namespace: str | None = None,
    policies: Sequence[ResourceValidationPolicy] = POLICIES,
) -> list[Violation]:
    """Every violation of a mandatory policy on every resource of one stack's plan document."""
    stack = str(plan_json.get("stack") or "")
    config = stack_config(plan_json, protect_stateful, namespace)
    violations = []
    for record in plan_json.get("resources", []):
        urn = _urn(record, stack)
        for policy in policies:
            if policy.enforcement_level == EnforcementLevel.DISABLED:
                continue
            args = validation_args(record, urn, config)
            messages: list[str] = []
            _validate(policy, args, messages)
            violations += [
                Violation(stack, urn, record["name"], record["type"], policy.name, message)
                for message in messages
            ]
    return violations
