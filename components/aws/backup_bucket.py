"""The region's S3 bucket for database backups, and the one identity that may write to it.

pulumi-aws v7's separate bucket resources: versioning (an overwritten or deleted backup stays
recoverable as a noncurrent version), SSE-S3 encryption (AES256: S3's own keys, so the backup
identity needs no KMS permission and its policy names S3 actions on this bucket alone), every
public-access block on, ownership enforced to the bucket owner (no ACLs), and a lifecycle that is
the retention: current and noncurrent versions expire after ``aws.backup_retention_days``,
``staging/`` after a day, incomplete multipart uploads are aborted after a day. The bucket is
protected and retained on delete: it may hold the last copy of a region's data.

Credentials: on the stack's own EKS cluster, an IRSA role (``components.aws.irsa``) that only the
``backup`` ServiceAccount of the namespace may assume, carrying :func:`backup_policy` and nothing
else. On an existing cluster (no substrate) the cluster must supply them: attach the exported
``backup_policy_json`` to a role that IRSA or EKS Pod Identity gives that ServiceAccount. No IAM
user and no access key is ever created.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import NotRequired, TypedDict

import pulumi
import pulumi_aws as aws

from backup.layout import STAGING
from components.aws.irsa import service_account_role
from components.backup import BACKUP_SERVICE_ACCOUNT
from infra.config import PlatformConfig

ROLE_ARN_ANNOTATION = "eks.amazonaws.com/role-arn"
STAGING_DAYS = 1
OBJECT_ACTIONS = [
    "s3:PutObject",
    "s3:GetObject",
    "s3:GetObjectVersion",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
]
"""Write a backup in parts, read one back (``ironlink backup restore`` from a pod, the server-side
copy out of staging)."""
STAGING_ACTIONS = ["s3:DeleteObject", "s3:DeleteObjectVersion"]
"""Only under ``staging/``: the job removes its own staged upload, never a published backup."""
BUCKET_ACTIONS = ["s3:ListBucket"]


def backup_policy(bucket_arn: str) -> str:
    """The backup identity's only permissions: this bucket's ARN and its objects, nothing wider."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Sid": "ListBackups", "Effect": "Allow", "Action": BUCKET_ACTIONS, "Resource": bucket_arn},
                {
                    "Sid": "ReadWriteBackups",
                    "Effect": "Allow",
                    "Action": OBJECT_ACTIONS,
                    "Resource": f"{bucket_arn}/*",
                },
                {
                    "Sid": "DiscardStagedUploads",
                    "Effect": "Allow",
                    "Action": STAGING_ACTIONS,
                    "Resource": f"{bucket_arn}/{STAGING}/*",
                },
            ],
        },
        sort_keys=True,
    )


@dataclass(frozen=True)
class ClusterIdentity:
    """The stack's EKS cluster's OIDC provider, for IRSA."""

    oidc_provider_arn: pulumi.Input[str]
    oidc_issuer: pulumi.Input[str]


class BackupBucketArgs(TypedDict):
    config: PlatformConfig
    """The region's config: ``aws.backup_retention_days``, ``cluster.namespace``, ``region``."""
    provider: aws.Provider
    """The region's AWS provider."""
    cluster: NotRequired[ClusterIdentity | None]
    """The stack's EKS cluster (substrate) for an IRSA role; None on an existing cluster."""


class BackupBucket(pulumi.ComponentResource):
    bucket: pulumi.Output[str]
    """The bucket's name (``--bucket`` of ``ironlink backup``)."""
    arn: pulumi.Output[str]
    policy_json: pulumi.Output[str]
    """The backup identity's IAM policy document (attach it where the cluster gives credentials)."""
    role_arn: pulumi.Output[str] | None
    """The IRSA role of the ``backup`` ServiceAccount; None without the stack's own EKS cluster."""

    def __init__(self, name: str, args: BackupBucketArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("ironlink:backup_bucket:BackupBucket", name, None, opts)
        config, provider = args["config"], args["provider"]
        assert config.aws is not None, "a backup bucket is declared only where aws.backup_bucket is set"
        retention = config.aws.backup_retention_days
        tags = {"ironlink:region": config.region, "ironlink:purpose": "backups"}
        bucket = aws.s3.Bucket(
            name,
            tags=tags,
            opts=pulumi.ResourceOptions(parent=self, provider=provider, protect=True, retain_on_delete=True),
        )
        # Each setting guards the data: protected like the bucket, so no update silently drops one.
        guarded = pulumi.ResourceOptions(parent=self, provider=provider, protect=True, depends_on=[bucket])
        aws.s3.BucketOwnershipControls(
            f"{name}-ownership",
            bucket=bucket.id,
            rule={"object_ownership": "BucketOwnerEnforced"},
            opts=guarded,
        )
        aws.s3.BucketPublicAccessBlock(
            f"{name}-public-access",
            bucket=bucket.id,
            block_public_acls=True,
            block_public_policy=True,
            ignore_public_acls=True,
            restrict_public_buckets=True,
            opts=guarded,
        )
        versioning = aws.s3.BucketVersioning(
            f"{name}-versioning",
            bucket=bucket.id,
            versioning_configuration={"status": "Enabled"},
            opts=guarded,
        )
        aws.s3.BucketServerSideEncryptionConfiguration(
            f"{name}-encryption",
            bucket=bucket.id,
            rules=[{"apply_server_side_encryption_by_default": {"sse_algorithm": "AES256"}}],
            opts=guarded,
        )
        aws.s3.BucketLifecycleConfiguration(
            f"{name}-lifecycle",
            bucket=bucket.id,
            rules=[
                {
                    "id": "retention",
                    "status": "Enabled",
                    "filter": {"prefix": ""},
                    "expiration": {"days": retention},
                    "noncurrent_version_expiration": {"noncurrent_days": retention},
                    "abort_incomplete_multipart_upload": {"days_after_initiation": 1},
                },
                {
                    "id": "staging",
                    "status": "Enabled",
                    "filter": {"prefix": f"{STAGING}/"},
                    "expiration": {"days": STAGING_DAYS},
                    "noncurrent_version_expiration": {"noncurrent_days": STAGING_DAYS},
                },
            ],
            # S3 requires versioning to be configured before a lifecycle that names versions.
            opts=pulumi.ResourceOptions.merge(guarded, pulumi.ResourceOptions(depends_on=[versioning])),
        )
        self.bucket, self.arn = bucket.bucket, bucket.arn
        self.policy_json = bucket.arn.apply(backup_policy)
        cluster = args.get("cluster")
        self.role_arn = None
        if cluster is not None:
            role = service_account_role(
                f"{name}-backup",
                oidc_provider_arn=cluster.oidc_provider_arn,
                oidc_issuer=cluster.oidc_issuer,
                namespace=config.cluster.namespace,
                service_account=BACKUP_SERVICE_ACCOUNT,
                policy_json=self.policy_json,
                provider=provider,
                parent=self,
            )
            self.role_arn = role.arn
        self.register_outputs(
            {
                "bucket": self.bucket,
                "arn": self.arn,
                "policy_json": self.policy_json,
                "role_arn": self.role_arn,
            }
        )

    def service_account_annotations(self) -> dict[str, pulumi.Output[str]]:
        """What the ``backup`` ServiceAccount carries for IRSA (nothing without a role)."""
        return {ROLE_ARN_ANNOTATION: self.role_arn} if self.role_arn is not None else {}
