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
    PolicyResource,
    PolicyResourceOptions,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)
from pulumi_policy.deserialize import deserialize_properties
from pulumi_policy.policy import _NotApplicableError
from pulumi_policy.proxy import UnknownValueError, unknown_checking_proxy

from components.replacements import STATEFUL_TYPES
from infra.policy.rules import DEFAULT_NAMESPACE, POLICIES, STACK_POLICIES

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
    plan_json: Mapping[str, Any],
    protect_stateful: bool | None = None,
    namespace: str | None = None,
    phase: str | None = None,
) -> dict[str, Any]:
    """The pack's config for one stack: given values first, else what the plan shows (its
    ``namespace`` output or Namespace object; protection on if the plan protects a stateful type: a stack
    that protects stateful resources must protect every one of them; the phase its platform
    exports, or, for a tenant stack, its platform's stack file, which its program reads too)."""
    resources = plan_json.get("resources", [])
    if namespace is None:
        outputs = plan_json.get("outputs") or {}
        declared = [
            r["inputs"].get("metadata", {}).get("name") for r in resources if r["type"] == NAMESPACE_TYPE
        ]
        namespace = outputs.get("namespace") or next((n for n in declared if n), None) or DEFAULT_NAMESPACE
    if protect_stateful is None:
        # A stateful type, not just anything: first-start passwords are protected in every phase.
        protect_stateful = any(r.get("protect") and r["type"] in STATEFUL_TYPES for r in resources)
    if phase is None:
        phase = (plan_json.get("outputs") or {}).get("phase") or _platform_phase(plan_json)
    return {"namespace": namespace, "protect_stateful": protect_stateful, "phase": phase}


def _platform_phase(plan_json: Mapping[str, Any]) -> str | None:
    from infra.config import StackConfigError, load_stack  # the runner needs the model only here

    platform = plan_json.get("platform")
    if not isinstance(platform, str) or platform == plan_json.get("stack"):
        return None
    try:
        return load_stack(platform).phase
    except (StackConfigError, OSError):
        return None


def _options(record: Mapping[str, Any]) -> PolicyResourceOptions:
    return PolicyResourceOptions(
        protect=bool(record.get("protect")),
        ignore_changes=[],
        delete_before_replace=None,
        aliases=[],
        custom_timeouts=PolicyCustomTimeouts(0, 0, 0),
        additional_secret_outputs=[],
        parent=record.get("parent"),
    )


def validation_args(record: Mapping[str, Any], urn: str, config: Mapping[str, Any]) -> ResourceValidationArgs:
    """A plan record as pulumi_policy's analyzer hands a resource to a validate function."""
    props = unknown_checking_proxy(deserialize_properties(dict(record.get("inputs", {}))))
    return ResourceValidationArgs(
        record["type"], props, urn, record["name"], _options(record), None, dict(config)
    )


def stack_args(
    records: Sequence[Mapping[str, Any]], stack: str, config: Mapping[str, Any]
) -> StackValidationArgs:
    """A plan as the analyzer hands a stack to a stack policy: each resource's inputs, and the id
    the mock engine gave it (``<name>-id``), which references to it carry."""
    resources = [
        PolicyResource(
            record["type"],
            unknown_checking_proxy(
                {**deserialize_properties(dict(record.get("inputs", {}))), "id": f"{record['name']}-id"}
            ),
            _urn(record, stack),
            record["name"],
            _options(record),
            None,
            None,
            [],
            {},
        )
        for record in records
    ]
    return StackValidationArgs(resources, dict(config))


def _validate(
    policy: ResourceValidationPolicy | StackValidationPolicy,
    args: Any,
    messages: list[tuple[str, str | None]],
) -> None:
    def report(message: str, urn: str | None = None) -> None:
        messages.append((message, urn))

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
    stack_policies: Sequence[StackValidationPolicy] = STACK_POLICIES,
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
            messages: list[tuple[str, str | None]] = []
            _validate(policy, args, messages)
            violations += [
                Violation(stack, urn, record["name"], record["type"], policy.name, message)
                for message, _ in messages
            ]
    by_urn = {_urn(record, stack): record for record in plan_json.get("resources", [])}
    for stack_policy in stack_policies:
        if stack_policy.enforcement_level == EnforcementLevel.DISABLED:
            continue
        found: list[tuple[str, str | None]] = []
        _validate(stack_policy, stack_args(plan_json.get("resources", []), stack, config), found)
        for message, where in found:
            record = by_urn.get(where or "", {})
            violations.append(
                Violation(
                    stack,
                    where or "",
                    record.get("name", ""),
                    record.get("type", ""),
                    stack_policy.name,
                    message,
                )
            )
    return violations
