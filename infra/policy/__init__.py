"""The project's rules as a Pulumi policy pack (``pulumi preview --policy-pack infra/policy``) and an
offline runner of the same rules on plan JSON (:func:`infra.policy.runner.run_policies`)."""
