"""The project's rules as Pulumi CrossGuard resource policies.

Each rule is a :class:`pulumi_policy.ResourceValidationPolicy` whose validate function reads only
``args.resource_type``, ``args.props`` (the inputs, wire names), ``args.opts.protect`` and
``args.get_config()``, so the same functions run in ``pulumi preview --policy-pack infra/policy``
and, through :mod:`infra.policy.runner`, on every resource of an offline plan. ``args.props`` is
pulumi_policy's unknown-checking proxy: read it as a ``Mapping``/``Sequence``, never as dict/list.

Each rule states what the components already guarantee, so a regression fails the check by name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pulumi_policy import (
    EnforcementLevel,
    PolicyConfigSchema,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

from components.replacements import STATEFUL_TYPES

DEFAULT_NAMESPACE = "ironlink"
TLS_PORTS = (443, 8443, 8883, 8884)
"""Ports a Service reachable from outside the cluster may expose: HTTPS, the provisioning API, MQTT
over TLS, and Mosquitto's certificate (mTLS) listener."""

_WORKLOAD_POD_SPEC = {
    "kubernetes:apps/v1:StatefulSet": ("spec", "template", "spec"),
    "kubernetes:apps/v1:Deployment": ("spec", "template", "spec"),
    "kubernetes:apps/v1:DaemonSet": ("spec", "template", "spec"),
    "kubernetes:batch/v1:Job": ("spec", "template", "spec"),
    "kubernetes:batch/v1:CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    "kubernetes:core/v1:Pod": ("spec",),
}
CLUSTER_SCOPED_KINDS = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "StorageClass",
        "PriorityClass",
        "PersistentVolume",
        "CustomResourceDefinition",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
        "IngressClass",
        "RuntimeClass",
    }
)
MUST_PROTECT = {
    "kubernetes:core/v1:PersistentVolumeClaim": "a volume claim",
    "kubernetes:core/v1:Namespace": "the platform namespace",
    "pulumi-python:dynamic/influxdb:Bucket": "a telemetry bucket",
    "tls:index/selfSignedCert:SelfSignedCert": "the region's CA certificate",
}
"""What the components protect wherever the stack sets ``protect_stateful`` (phases B and C)."""
MUST_PROTECT.update({kind: why for kind, why in STATEFUL_TYPES.items() if kind.startswith("aws:")})
BUCKET_TYPES = ("aws:s3/bucket:Bucket", "aws:s3/bucketV2:BucketV2")
PUBLIC_ACCESS_BLOCK = "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock"
PUBLIC_ACCESS_FLAGS = ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")
PUBLIC_ACLS = ("public-read", "public-read-write", "authenticated-read")
RDS_TYPES = ("aws:rds/instance:Instance", "aws:rds/cluster:Cluster")
TIMESTREAM_INSTANCE = "aws:timestreaminfluxdb/dbInstance:DbInstance"
TIMESTREAM_MULTI_AZ = "WITH_MULTIAZ_STANDBY"
IAM_POLICY_INPUTS = {
    "aws:iam/policy:Policy": "policy",
    "aws:iam/rolePolicy:RolePolicy": "policy",
    "aws:iam/userPolicy:UserPolicy": "policy",
    "aws:iam/groupPolicy:GroupPolicy": "policy",
}
"""IAM resources whose ``policy`` input is a policy document (JSON text); a Role's are in
``inlinePolicies[].policy``."""
_CREDENTIAL_KEY = re.compile(r"token|password|secret|api.?key|credential", re.IGNORECASE)


def _get(value: Any, *path: str) -> Any:
    for part in path:
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _seq(value: Any) -> Sequence[Any]:
    return value if isinstance(value, Sequence) and not isinstance(value, str) else ()


def pod_spec(args: ResourceValidationArgs) -> Mapping[str, Any] | None:
    path = _WORKLOAD_POD_SPEC.get(args.resource_type)
    spec = _get(args.props, *path) if path else None
    return spec if isinstance(spec, Mapping) else None


def containers(spec: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for key in ("initContainers", "containers"):
        yield from (item for item in _seq(spec.get(key)) if isinstance(item, Mapping))


# --------------------------------------------------------------------------------- validators
def _container_limits(args: ResourceValidationArgs, report: ReportViolation) -> None:
    spec = pod_spec(args)
    if spec is None:
        return
    for container in containers(spec):
        limits = _get(container, "resources", "limits")
        missing = [key for key in ("cpu", "memory") if not isinstance(limits, Mapping) or not limits.get(key)]
        if missing:
            report(
                f"container {container.get('name')!r} has no resources.limits.{' or '.join(missing)}", None
            )


def _container_hardened(args: ResourceValidationArgs, report: ReportViolation) -> None:
    spec = pod_spec(args)
    if spec is None:
        return
    pod_non_root = _get(spec, "securityContext", "runAsNonRoot") is True
    for container in containers(spec):
        context = container.get("securityContext")
        context = context if isinstance(context, Mapping) else {}
        problems = []
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append("readOnlyRootFilesystem is not true")
        if not (context.get("runAsNonRoot") is True or (pod_non_root and "runAsNonRoot" not in context)):
            problems.append("runAsNonRoot is not true")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append("allowPrivilegeEscalation is not false")
        if problems:
            report(f"container {container.get('name')!r}: {', '.join(problems)}", None)


def image_problem(image: Any) -> str | None:
    """Why an image reference is not pinned (no tag, or ``latest``), or None."""
    if not isinstance(image, str) or not image:
        return f"image {image!r} is not a reference"
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"image {image!r} has no tag (means latest)"
    if last.rsplit(":", 1)[-1] == "latest":
        return f"image {image!r} is tagged latest"
    return None


def _pinned_images(args: ResourceValidationArgs, report: ReportViolation) -> None:
    spec = pod_spec(args)
    if spec is None:
        return
    for container in containers(spec):
        problem = image_problem(container.get("image"))
        if problem:
            report(f"container {container.get('name')!r}: {problem}", None)


def _namespace(args: ResourceValidationArgs) -> str:
    return str(args.get_config().get("namespace") or DEFAULT_NAMESPACE)


def _in_stack_namespace(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if not args.resource_type.startswith("kubernetes:") or "kind" not in args.props:
        return
    if args.props.get("kind") in CLUSTER_SCOPED_KINDS:
        return
    expected = _namespace(args)
    actual = _get(args.props, "metadata", "namespace")
    if actual != expected:
        report(f"{args.props.get('kind')} is in namespace {actual!r}, not the stack's {expected!r}", None)


def _restricted_namespace(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type != "kubernetes:core/v1:Namespace":
        return
    level = _get(args.props, "metadata", "labels", "pod-security.kubernetes.io/enforce")
    if level != "restricted":
        report(f"pod-security.kubernetes.io/enforce is {level!r}, not 'restricted'", None)


def _no_open_ingress(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type != "kubernetes:networking.k8s.io/v1:NetworkPolicy":
        return
    for index, rule in enumerate(_seq(_get(args.props, "spec", "ingress"))):
        if not isinstance(rule, Mapping):
            continue
        if not _seq(rule.get("from")) and not _seq(rule.get("ports")):
            report(f"spec.ingress[{index}] names neither 'from' nor 'ports': it admits all traffic", None)


def _public_services_tls_only(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type != "kubernetes:core/v1:Service":
        return
    kind = _get(args.props, "spec", "type")
    if kind not in ("LoadBalancer", "NodePort"):
        return
    allowed = tuple(args.get_config().get("tls_ports") or TLS_PORTS)
    for port in _seq(_get(args.props, "spec", "ports")):
        number = port.get("port") if isinstance(port, Mapping) else None
        if number not in allowed:
            report(
                f"{kind} Service exposes port {number!r}: only TLS ports {list(allowed)} may be public", None
            )


def _stateful_protected(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if not args.get_config().get("protect_stateful"):
        return
    what = MUST_PROTECT.get(args.resource_type)
    if what is None:
        return
    if (
        args.resource_type == "tls:index/selfSignedCert:SelfSignedCert"
        and args.props.get("isCaCertificate") is not True
    ):
        return
    if not args.opts.protect:
        report(f"{what} is not protected although the stack protects stateful resources", None)


def _datasource_secrets_secure(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type != "grafana:oss/dataSource:DataSource":
        return
    for key in ("basicAuthPassword", "password"):
        if args.props.get(key):
            report(f"{key} is set: credentials belong in secureJsonDataEncoded", None)
    text = args.props.get("jsonDataEncoded")
    try:
        document = json.loads(text) if isinstance(text, str) else {}
    except ValueError:
        report("jsonDataEncoded is not JSON", None)
        return
    leaked = sorted(
        key for key in (document if isinstance(document, dict) else {}) if _CREDENTIAL_KEY.search(key)
    )
    if leaked:
        report(
            f"jsonDataEncoded carries {', '.join(leaked)}: credentials belong in secureJsonDataEncoded", None
        )


def _store_tokens_scoped(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type != "pulumi-python:dynamic/influxdb:Token":
        return
    grants = [grant for grant in _seq(args.props.get("permissions")) if isinstance(grant, Mapping)]
    actions = sorted({str(grant.get("action")) for grant in grants})
    if len(actions) != 1:
        report(
            f"a store token grants {actions or 'nothing'}: one action per token "
            "(the worker writes, Grafana reads)",
            None,
        )
    for index, grant in enumerate(grants):
        if not grant.get("bucket_id"):
            report(
                f"permissions[{index}] names no bucket: wildcard grants reach every bucket of the org", None
            )


# --------------------------------------------------------------------------------------- AWS
def _bucket_acl_private(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type in BUCKET_TYPES or args.resource_type == "aws:s3/bucketAclV2:BucketAclV2":
        acl = args.props.get("acl")
        if acl in PUBLIC_ACLS:
            report(f"acl is {acl!r}: a bucket's objects are for the platform only", None)


def _public_access_blocked(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type != PUBLIC_ACCESS_BLOCK:
        return
    missing = [flag for flag in PUBLIC_ACCESS_FLAGS if args.props.get(flag) is not True]
    if missing:
        report(f"{', '.join(missing)} not true: public access is only partly blocked", None)


def _every_bucket_blocked(args: StackValidationArgs, report: ReportViolation) -> None:
    """Every bucket has a public access block naming it (by id or name), on the bucket's own
    resource: without one, a later ACL or bucket policy can make it public."""
    blocked = {str(r.props.get("bucket")) for r in args.resources if r.resource_type == PUBLIC_ACCESS_BLOCK}
    for bucket in (r for r in args.resources if r.resource_type in BUCKET_TYPES):
        names = {str(bucket.props.get(key)) for key in ("id", "bucket") if bucket.props.get(key)}
        if not names & blocked:
            report(f"bucket {bucket.name!r} has no BucketPublicAccessBlock", bucket.urn)


def _database_encrypted(args: ResourceValidationArgs, report: ReportViolation) -> None:
    # Timestream for InfluxDB always encrypts its storage (an AWS-owned key): nothing to switch off.
    if args.resource_type in RDS_TYPES and args.props.get("storageEncrypted") is not True:
        report("storageEncrypted is not true: the registry's data would rest unencrypted", None)


def _phase(args: ResourceValidationArgs) -> str | None:
    phase = args.get_config().get("phase")
    return phase if isinstance(phase, str) else None


def _database_multi_az(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if _phase(args) != "C":
        return
    if args.resource_type == "aws:rds/instance:Instance" and args.props.get("multiAz") is not True:
        report("multiAz is not true: a Phase C database must survive the loss of a zone", None)
    if args.resource_type == TIMESTREAM_INSTANCE:
        deployment = args.props.get("deploymentType")
        if deployment != TIMESTREAM_MULTI_AZ:
            report(
                f"deploymentType is {deployment!r}, not {TIMESTREAM_MULTI_AZ!r}: a Phase C store must "
                "survive the loss of a zone",
                None,
            )


def policy_documents(args: ResourceValidationArgs) -> Iterator[tuple[str, Any]]:
    """(where, policy text) of every IAM policy document the resource carries."""
    key = IAM_POLICY_INPUTS.get(args.resource_type)
    if key is not None:
        yield key, args.props.get(key)
    if args.resource_type == "aws:iam/role:Role":
        for index, inline in enumerate(_seq(args.props.get("inlinePolicies"))):
            if isinstance(inline, Mapping):
                yield f"inlinePolicies[{index}].policy", inline.get("policy")


def wildcard_resources(document: Any) -> list[str]:
    """Where an allowing statement names every resource (``*``, an ARN whose resource part is
    ``*``, or ``NotResource``)."""
    statements = document.get("Statement") if isinstance(document, Mapping) else None
    if isinstance(statements, Mapping):
        statements = [statements]
    found = []
    for index, statement in enumerate(_seq(statements)):
        if not isinstance(statement, Mapping) or statement.get("Effect") == "Deny":
            continue
        if "NotResource" in statement:
            found.append(f"Statement[{index}].NotResource")
        resources = statement.get("Resource")
        for resource in [resources] if isinstance(resources, str) else _seq(resources):
            if resource == "*" or (isinstance(resource, str) and resource.split(":")[-1] == "*"):
                found.append(f"Statement[{index}].Resource {resource!r}")
    return found


def _iam_resources_named(args: ResourceValidationArgs, report: ReportViolation) -> None:
    for where, text in policy_documents(args):
        try:
            document = json.loads(text) if isinstance(text, str) else text
        except ValueError:
            report(f"{where} is not JSON", None)
            continue
        if not isinstance(document, Mapping):
            report(f"{where} is not a policy document (a JSON object)", None)
            continue
        for found in wildcard_resources(document):
            report(f"{where}: {found} reaches every resource: name the bucket, key or role", None)


# ---------------------------------------------------------------------------------- policies
_MANDATORY = EnforcementLevel.MANDATORY


def _policy(
    name: str, description: str, validate: Any, config: PolicyConfigSchema | None = None
) -> ResourceValidationPolicy:
    return ResourceValidationPolicy(
        name=name,
        description=description,
        validate=validate,
        enforcement_level=_MANDATORY,
        config_schema=config,
    )


POLICIES: list[ResourceValidationPolicy] = [
    _policy(
        "container-resource-limits",
        "Every container and init container declares CPU and memory limits "
        "(one tenant's load cannot starve the node).",
        _container_limits,
    ),
    _policy(
        "container-hardened",
        "Every container runs non-root, with a read-only root filesystem and no privilege escalation "
        "(the namespace enforces the restricted Pod Security Standard).",
        _container_hardened,
    ),
    _policy("pinned-images", "Every image is pinned: a tag other than latest, or a digest.", _pinned_images),
    _policy(
        "objects-in-stack-namespace",
        "Every namespace-scoped Kubernetes object lives in the stack's namespace.",
        _in_stack_namespace,
        PolicyConfigSchema(properties={"namespace": {"type": "string", "default": DEFAULT_NAMESPACE}}),
    ),
    _policy(
        "namespace-restricted-pod-security",
        "The namespace enforces the restricted Pod Security Standard.",
        _restricted_namespace,
    ),
    _policy(
        "no-open-ingress-rule",
        "No NetworkPolicy ingress rule admits all traffic (neither peers nor ports named).",
        _no_open_ingress,
    ),
    _policy(
        "public-services-tls-only",
        "A LoadBalancer or NodePort Service exposes only TLS ports "
        "(no plaintext MQTT or HTTP outside the cluster).",
        _public_services_tls_only,
        PolicyConfigSchema(properties={"tls_ports": {"type": "array", "items": {"type": "integer"}}}),
    ),
    _policy(
        "stateful-resources-protected",
        "Where the stack protects stateful resources, every volume claim, the namespace, every telemetry "
        "bucket, the CA certificate and every stateful AWS resource (buckets, databases, clusters, keys, "
        "the Phase A VM) is protected.",
        _stateful_protected,
        # Off unless given: dev and Phase A stacks protect nothing by design. CI passes it per stack
        # (``--policy-pack-config``); the offline runner reads it from the plan.
        PolicyConfigSchema(properties={"protect_stateful": {"type": "boolean", "default": False}}),
    ),
    _policy(
        "grafana-datasource-secrets-secure",
        "A Grafana datasource carries credentials only in secureJsonDataEncoded.",
        _datasource_secrets_secure,
    ),
    _policy(
        "store-tokens-scoped",
        "An InfluxDB token grants one action on named buckets only.",
        _store_tokens_scoped,
    ),
    _policy(
        "aws-bucket-acl-private",
        "No S3 bucket or bucket ACL grants public (or any-AWS-account) read.",
        _bucket_acl_private,
    ),
    _policy(
        "aws-bucket-public-access-blocked",
        "A bucket's public access block sets all four flags (ACLs, policies, both ignored and blocked).",
        _public_access_blocked,
    ),
    _policy(
        "aws-database-encrypted",
        "Every RDS database encrypts its storage.",
        _database_encrypted,
    ),
    _policy(
        "aws-database-multi-az-in-phase-c",
        "In phase C, RDS is Multi-AZ and Timestream for InfluxDB has a Multi-AZ standby.",
        _database_multi_az,
        PolicyConfigSchema(properties={"phase": {"type": "string", "enum": ["A", "B", "C"]}}),
    ),
    _policy(
        "aws-iam-resources-named",
        "No IAM policy (managed, role, user, group or a role's inline one) allows actions on every resource.",
        _iam_resources_named,
    ),
]

STACK_POLICIES: list[StackValidationPolicy] = [
    StackValidationPolicy(
        name="aws-every-bucket-blocks-public-access",
        description="Every S3 bucket has a BucketPublicAccessBlock of its own.",
        validate=_every_bucket_blocked,
        enforcement_level=_MANDATORY,
    )
]
"""Rules over the whole stack: what one resource's inputs cannot show (a resource that is missing)."""
