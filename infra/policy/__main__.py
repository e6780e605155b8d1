"""The policy pack's entry point: ``pulumi preview --policy-pack infra/policy`` runs this file,
which serves :data:`infra.policy.rules.POLICIES` to the engine (it blocks: never import it in tests)."""

from pulumi_policy import Policy, PolicyPack

from infra.policy.rules import POLICIES, STACK_POLICIES

policies: list[Policy] = [*POLICIES, *STACK_POLICIES]
PolicyPack("ironlink", policies=policies)
