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
)

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
        "bucket and the CA certificate is protected.",
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
]
