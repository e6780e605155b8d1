"""IAM roles for service accounts (IRSA): an AWS role that exactly one Kubernetes service account
of one EKS cluster may assume, through the cluster's OIDC provider.

Least privilege twice over: the trust policy names one ``system:serviceaccount:<ns>:<sa>`` (and
the STS audience), never a wildcard, and the role carries only the inline policy its caller gives.
"""

from __future__ import annotations

import json

import pulumi
import pulumi_aws as aws

STS_AUDIENCE = "sts.amazonaws.com"


def service_account_subject(namespace: str, service_account: str) -> str:
    """The ``sub`` claim EKS puts in a pod's projected token for that service account."""
    return f"system:serviceaccount:{namespace}:{service_account}"


def trust_policy(oidc_provider_arn: str, oidc_issuer: str, namespace: str, service_account: str) -> str:
    """The role's trust policy: web-identity tokens of that one service account, for STS only.

    ``oidc_issuer`` is the cluster's issuer URL; IAM's condition keys name it without its scheme.
    """
    issuer = oidc_issuer.removeprefix("https://")
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Federated": oidc_provider_arn},
                    "Action": "sts:AssumeRoleWithWebIdentity",
                    "Condition": {
                        "StringEquals": {
                            f"{issuer}:sub": service_account_subject(namespace, service_account),
                            f"{issuer}:aud": STS_AUDIENCE,
                        }
                    },
                }
            ],
        },
        sort_keys=True,
    )


def service_account_role(
    name: str,
    *,
    oidc_provider_arn: pulumi.Input[str],
    oidc_issuer: pulumi.Input[str],
    namespace: str,
    service_account: str,
    policy_json: pulumi.Input[str],
    provider: aws.Provider,
    parent: pulumi.Resource,
) -> aws.iam.Role:
    """A role for ``namespace/service_account`` with ``policy_json`` as its only permissions.

    Annotate the service account with ``eks.amazonaws.com/role-arn: <role.arn>``.
    """
    opts = pulumi.ResourceOptions(parent=parent, provider=provider)
    role = aws.iam.Role(
        name,
        assume_role_policy=pulumi.Output.all(oidc_provider_arn, oidc_issuer).apply(
            lambda values: trust_policy(values[0], values[1], namespace, service_account)
        ),
        description=f"IRSA: {service_account_subject(namespace, service_account)}",
        opts=opts,
    )
    aws.iam.RolePolicy(f"{name}-policy", role=role.id, policy=policy_json, opts=opts)
    return role
