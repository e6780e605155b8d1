"""Every rendered Kubernetes manifest of every stack is valid against the pinned Kubernetes API
(kubernetes-validate's bundled schemas, strict mode: unknown fields are errors)."""

from __future__ import annotations

import kubernetes_validate
import pytest

from components.aws.ingress import TARGET_GROUP_BINDING_API
from components.render.monitoring import API_VERSION as MONITORING_API
from tests.pulumi_mocks import PLANS, STACKS, stack_config, stack_plan

pytestmark = PLANS
# Pinned: the clusters' version (cluster.kubernetes_version), not the newest schema the package ships.
KUBERNETES_VERSION = "1.31.0"


@pytest.mark.parametrize("stack", STACKS)
def test_the_pinned_version_is_the_stacks_cluster_version(stack: str) -> None:
    assert KUBERNETES_VERSION.startswith(stack_config(stack).cluster.kubernetes_version + ".")


@pytest.mark.parametrize("stack", STACKS)
def test_every_manifest_passes_kubernetes_validate(stack: str) -> None:
    manifests = stack_plan(stack).manifests()
    kinds = {manifest["kind"] for manifest in manifests}
    assert {"StatefulSet", "Deployment", "Service", "Secret", "NetworkPolicy", "Namespace"} <= kinds
    failures = []
    for manifest in manifests:
        # CRDs: no bundled schema (tests/test_monitoring.py, tests/test_aws_ingress.py)
        if manifest["apiVersion"] in (MONITORING_API, TARGET_GROUP_BINDING_API):
            continue
        try:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            failures.append(f"{manifest['kind']} {manifest['metadata']['name']}: {error.message}")
    assert failures == [], f"{stack}: invalid manifests:\n" + "\n".join(failures)


def test_the_validator_catches_what_the_cluster_would_reject() -> None:
    """Strict mode must refuse an unknown field and a wrong type, or the test above proves nothing."""
    service = next(m for m in stack_plan("dev").manifests() if m["kind"] == "Service")
    typo = {**service, "spec": {**service["spec"], "selectr": {}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)
    wrong = {**service, "spec": {**service["spec"], "ports": [{"port": "8883"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES_VERSION, strict=True)
