"""The pack's AWS rules, each called through its own ``validate`` on crafted resources (never by
starting the pack): what each rejects, and the nearby cases it must let pass."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pulumi_policy import ResourceValidationPolicy

from infra.policy.rules import POLICIES, STACK_POLICIES, wildcard_resources
from infra.policy.runner import stack_args, stack_config, validation_args

BY_NAME = {policy.name: policy for policy in POLICIES}


def violations(
    rule: str, type_token: str, inputs: dict[str, Any], *, protect: bool = False, **config: Any
) -> list[str]:
    policy: ResourceValidationPolicy = BY_NAME[rule]
    record = {"type": type_token, "name": "crafted", "inputs": inputs, "protect": protect}
    args = validation_args(record, f"urn:pulumi:s::p::{type_token}::crafted", config)
    found: list[str] = []

    def report(message: str, _urn: str | None = None) -> None:
        found.append(message)

    policy.validate(args, report)
    return found


def _document(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


ALLOW_ALL = {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}
ALLOW_OWN = {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::backups/*"}


# ----------------------------------------------------------------------------- public buckets
@pytest.mark.parametrize("acl", ["public-read", "public-read-write", "authenticated-read"])
def test_a_public_acl_is_refused_on_a_bucket_and_on_its_acl_resource(acl: str) -> None:
    assert violations("aws-bucket-acl-private", "aws:s3/bucket:Bucket", {"acl": acl})
    assert violations("aws-bucket-acl-private", "aws:s3/bucketAclV2:BucketAclV2", {"acl": acl})
    assert violations("aws-bucket-acl-private", "aws:s3/bucket:Bucket", {"acl": "private"}) == []


def test_a_partial_public_access_block_names_the_missing_flags() -> None:
    flags = {"blockPublicAcls": True, "blockPublicPolicy": True, "ignorePublicAcls": True}
    (message,) = violations(
        "aws-bucket-public-access-blocked", "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock", flags
    )
    assert "restrictPublicBuckets" in message
    whole = {**flags, "restrictPublicBuckets": True}
    assert (
        violations(
            "aws-bucket-public-access-blocked",
            "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock",
            whole,
        )
        == []
    )


def test_a_bucket_without_a_public_access_block_of_its_own_is_refused() -> None:
    (policy,) = STACK_POLICIES
    records = [
        {"type": "aws:s3/bucket:Bucket", "name": "kept", "inputs": {}},
        {"type": "aws:s3/bucket:Bucket", "name": "open", "inputs": {}},
        {
            "type": "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock",
            "name": "kept-block",
            "inputs": {"bucket": "kept-id"},
        },
    ]
    found: list[tuple[str, str | None]] = []

    def report(message: str, urn: str | None = None) -> None:
        found.append((message, urn))

    policy.validate(stack_args(records, "s", {}), report)
    assert [message for message, _ in found] == ["bucket 'open' has no BucketPublicAccessBlock"]
    assert found[0][1] is not None and found[0][1].endswith("::open")


# ---------------------------------------------------------------------------------- databases
def test_an_unencrypted_rds_database_is_refused_even_when_the_flag_is_left_out() -> None:
    rule = "aws-database-encrypted"
    assert violations(rule, "aws:rds/instance:Instance", {"storageEncrypted": False})
    assert violations(rule, "aws:rds/instance:Instance", {})
    assert violations(rule, "aws:rds/cluster:Cluster", {"storageEncrypted": False})
    assert violations(rule, "aws:rds/instance:Instance", {"storageEncrypted": True}) == []


def test_a_single_zone_database_is_refused_in_phase_c_only() -> None:
    rule = "aws-database-multi-az-in-phase-c"
    rds, store = "aws:rds/instance:Instance", "aws:timestreaminfluxdb/dbInstance:DbInstance"
    assert violations(rule, rds, {"multiAz": False}, phase="C")
    assert violations(rule, rds, {}, phase="C")
    assert violations(rule, store, {"deploymentType": "SINGLE_AZ"}, phase="C")
    assert violations(rule, rds, {"multiAz": True}, phase="C") == []
    assert violations(rule, store, {"deploymentType": "WITH_MULTIAZ_STANDBY"}, phase="C") == []
    assert violations(rule, rds, {"multiAz": False}, phase="B") == []
    assert violations(rule, store, {"deploymentType": "SINGLE_AZ"}, phase="B") == []


def test_a_tenant_stack_is_judged_by_its_platforms_phase() -> None:
    tenant = {"stack": "scale-eu-west-1.umbrella", "platform": "scale-eu-west-1", "resources": []}
    assert stack_config(tenant)["phase"] == "C"
    assert stack_config({"stack": "mvp-eu", "platform": "mvp-eu", "outputs": {"phase": "B"}})["phase"] == "B"


# ----------------------------------------------------------------------------------- protection
@pytest.mark.parametrize(
    "type_token",
    [
        "aws:rds/instance:Instance",
        "aws:s3/bucket:Bucket",
        "aws:timestreaminfluxdb/dbInstance:DbInstance",
        "aws:ec2/instance:Instance",
        "aws:eks/cluster:Cluster",
    ],
)
def test_an_unprotected_stateful_aws_resource_is_refused_where_the_stack_protects(type_token: str) -> None:
    rule = "stateful-resources-protected"
    assert violations(rule, type_token, {}, protect=False, protect_stateful=True)
    assert violations(rule, type_token, {}, protect=True, protect_stateful=True) == []
    assert violations(rule, type_token, {}, protect=False, protect_stateful=False) == []


# ------------------------------------------------------------------------------------------ IAM
@pytest.mark.parametrize(
    ("type_token", "inputs"),
    [
        ("aws:iam/policy:Policy", {"policy": _document(ALLOW_OWN, ALLOW_ALL)}),
        ("aws:iam/rolePolicy:RolePolicy", {"policy": _document({**ALLOW_ALL, "Resource": ["*"]})}),
        ("aws:iam/role:Role", {"inlinePolicies": [{"name": "wide", "policy": _document(ALLOW_ALL)}]}),
        ("aws:iam/policy:Policy", {"policy": _document({**ALLOW_OWN, "Resource": "arn:aws:s3:::*"})}),
        ("aws:iam/policy:Policy", {"policy": json.dumps({"Statement": ALLOW_ALL})}),
    ],
)
def test_a_policy_allowing_every_resource_is_refused(type_token: str, inputs: dict[str, Any]) -> None:
    (message,) = violations("aws-iam-resources-named", type_token, inputs)
    assert "every resource" in message


def test_named_resources_and_denials_pass_and_garbage_is_refused() -> None:
    rule = "aws-iam-resources-named"
    deny_all = {"Effect": "Deny", "Action": "s3:DeleteBucket", "Resource": "*"}
    assert violations(rule, "aws:iam/policy:Policy", {"policy": _document(ALLOW_OWN, deny_all)}) == []
    assert violations(rule, "aws:iam/policy:Policy", {"policy": "{not json"}) == ["policy is not JSON"]
    assert violations(rule, "aws:iam/policy:Policy", {"policy": json.dumps("text")})
    assert wildcard_resources({"Statement": [{"Effect": "Allow", "NotResource": "arn:aws:s3:::a"}]}) == [
        "Statement[0].NotResource"
    ]
