"""Kubernetes object fragments every Ironlink workload shares, as plain camelCase dicts.

Pure functions: the components pass their results to pulumi-kubernetes unchanged, so what a test
reads here is what the API server receives (and what ``ironlink plan`` writes as manifests). The
hardening lives in one place — non-root, read-only root filesystem, no capabilities, seccomp
``RuntimeDefault`` — so no component can forget it, and the namespace can enforce the
``restricted`` Pod Security Standard.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

from infra.config import ComputeResources, IngressController, PlatformConfig, Prometheus

Manifest = dict[str, Any]
PART_OF = "ironlink"

# app.kubernetes.io/component values; NetworkPolicies select peers by them.
ROLE_BROKER = "broker"
ROLE_INGEST = "ingest"
ROLE_GRAFANA = "grafana"
ROLE_INFLUXDB = "influxdb"
ROLE_POSTGRES = "postgres"
ROLE_BACKUP = "backup"
ROLE_DEAD_LETTERS = "dead-letters"
ROLE_PROVISIONING = "provisioning"
ROLE_API = "api"
# The pod that runs `pulumi up` (cluster.runner "in-cluster"): its providers call the databases' APIs.
ROLE_RUNNER = "pulumi-runner"

CLUSTER_DOMAIN = "svc.cluster.local"
# Which side of a blue/green rollout a pod belongs to (the ingest worker's colours).
COLOUR_LABEL = "ironlink.io/colour"


# ------------------------------------------------------------------------------------ metadata
def labels(name: str, instance: str, role: str) -> dict[str, str]:
    """The recommended ``app.kubernetes.io/*`` labels of one object."""
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/component": role,
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": "pulumi",
    }


def selector(object_labels: Mapping[str, str]) -> dict[str, str]:
    """The immutable subset a workload selects its pods by (name + instance)."""
    return {key: object_labels[key] for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance")}


def role_selector(role: str) -> dict[str, str]:
    """Every Ironlink pod of one role (all brokers, all workers...), for NetworkPolicy peers."""
    return {"app.kubernetes.io/part-of": PART_OF, "app.kubernetes.io/component": role}


def object_meta(
    name: str,
    namespace: str | None,
    object_labels: Mapping[str, str],
    annotations: Mapping[str, str] | None = None,
) -> Manifest:
    meta: Manifest = {"name": name, "labels": dict(object_labels)}
    if namespace is not None:
        meta["namespace"] = namespace
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def service_host(service: str, namespace: str) -> str:
    """In-cluster DNS name of a Service."""
    return f"{service}.{namespace}.{CLUSTER_DOMAIN}"


# ------------------------------------------------------------------------------------ security
def namespace_labels() -> dict[str, str]:
    """Pod Security Admission: the namespace refuses any pod that is not ``restricted``."""
    return {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
        "pod-security.kubernetes.io/warn": "restricted",
    }


def pod_security_context(user: int, group: int | None = None) -> Manifest:
    group = user if group is None else group
    return {
        "runAsNonRoot": True,
        "runAsUser": user,
        "runAsGroup": group,
        "fsGroup": group,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> Manifest:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def scratch_volumes(paths: Mapping[str, str]) -> tuple[list[Manifest], list[Manifest]]:
    """emptyDir volumes and their mounts for the paths a program writes to (the root FS is read-only)."""
    volumes = [{"name": name, "emptyDir": {}} for name in paths]
    mounts = [{"name": name, "mountPath": path} for name, path in paths.items()]
    return volumes, mounts


# --------------------------------------------------------------------------------- containers
def compute_resources(resources: ComputeResources) -> Manifest:
    return {
        "requests": {"cpu": resources.requests.cpu, "memory": resources.requests.memory},
        "limits": {"cpu": resources.limits.cpu, "memory": resources.limits.memory},
    }


def http_probe(
    path: str,
    port: int | str,
    *,
    period: int = 10,
    failures: int = 3,
    delay: int = 0,
    scheme: str = "HTTP",
) -> Manifest:
    """``scheme="HTTPS"`` for a server that speaks only TLS (the kubelet does not verify its certificate)."""
    http_get: Manifest = {"path": path, "port": port}
    if scheme != "HTTP":
        http_get["scheme"] = scheme
    probe: Manifest = {
        "httpGet": http_get,
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }
    if delay:
        probe["initialDelaySeconds"] = delay
    return probe


class ServiceProbes(TypedDict):
    readiness: Manifest
    liveness: Manifest


def service_probes(port: int | str, *, scheme: str = "HTTP") -> ServiceProbes:
    """The probes of the project's own services (``container(..., **service_probes(port))``): ready
    on ``/readyz`` while what they serve answers, alive on ``/healthz``: restarted only after a
    10 s start-up grace and three missed checks 20 s apart."""
    return {
        "readiness": http_probe("/readyz", port, scheme=scheme),
        "liveness": http_probe("/healthz", port, period=20, failures=3, delay=10, scheme=scheme),
    }


def scrape_annotations(port: int, *, path: str = "/metrics", scheme: str | None = None) -> dict[str, str]:
    """The pod annotations by which Prometheus finds a metrics endpoint (``scheme``: where it is
    not plain HTTP)."""
    return {
        "prometheus.io/scrape": "true",
        **({"prometheus.io/scheme": scheme} if scheme is not None else {}),
        "prometheus.io/port": str(port),
        "prometheus.io/path": path,
    }


def tcp_probe(port: int | str, *, period: int = 10, failures: int = 3) -> Manifest:
    return {
        "tcpSocket": {"port": port},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }


def exec_probe(command: list[str], *, period: int = 10, failures: int = 3) -> Manifest:
    return {
        "exec": {"command": command},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }


def env_list(values: Mapping[str, str]) -> list[Manifest]:
    """Plain ``name``/``value`` entries, in the mapping's order (``$(VAR)`` may refer to earlier ones)."""
    return [{"name": name, "value": value} for name, value in values.items()]


def secret_env(name: str, secret: str, key: str, *, optional: bool = False) -> Manifest:
    """``optional``: a Secret an operator creates (or not) beside the stack; absent, the variable is unset."""
    reference: Manifest = {"name": secret, "key": key}
    if optional:
        reference["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": reference}}


def field_env(name: str, field_path: str) -> Manifest:
    """Downward API: e.g. ``metadata.name`` or ``status.podIP``."""
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


def container_port(name: str, port: int, protocol: str = "TCP") -> Manifest:
    return {"name": name, "containerPort": port, "protocol": protocol}


# ----------------------------------------------------------------------------- availability
def spreads(config: PlatformConfig, replicas: int) -> bool:
    """Whether a workload needs a PodDisruptionBudget and anti-affinity: HA phases, or several replicas."""
    return config.high_availability or replicas > 1


def anti_affinity(pod_selector: Mapping[str, str], *, required: bool) -> Manifest:
    """Replicas on different nodes: required where losing two at once breaks the SLA, else preferred."""
    term = {"labelSelector": {"matchLabels": dict(pod_selector)}, "topologyKey": "kubernetes.io/hostname"}
    if required:
        return {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}
    return {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": term}]
        }
    }


def majority(replicas: int) -> int:
    """How many members of a cluster must stay up: a strict majority (2 of 3, 3 of 5)."""
    return replicas // 2 + 1


def pod_disruption_budget_spec(
    pod_selector: Mapping[str, str], *, min_available: int | None = None, max_unavailable: int | None = None
) -> Manifest:
    if (min_available is None) == (max_unavailable is None):
        raise ValueError("a PodDisruptionBudget takes exactly one of min_available and max_unavailable")
    spec: Manifest = {"selector": {"matchLabels": dict(pod_selector)}}
    if min_available is not None:
        spec["minAvailable"] = min_available
    else:
        spec["maxUnavailable"] = max_unavailable
    return spec


def volume_claim_template(name: str, storage: str, storage_class: str | None) -> Manifest:
    spec: Manifest = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": storage}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    return {"metadata": {"name": name}, "spec": spec}


# ---------------------------------------------------------------------------- network policy
def default_deny_spec() -> Manifest:
    """Selects every pod of the namespace and allows no ingress: each component opens its own ports."""
    return {"podSelector": {}, "policyTypes": ["Ingress"]}


def pod_peer(pod_labels: Mapping[str, str]) -> Manifest:
    return {"podSelector": {"matchLabels": dict(pod_labels)}}


def ingress_rule(ports: Iterable[tuple[int, str]], peers: list[Manifest] | None) -> Manifest:
    """Allow ``ports`` (port, protocol) from ``peers``; ``None`` means from anywhere (devices, users)."""
    rule: Manifest = {"ports": [{"port": port, "protocol": protocol} for port, protocol in ports]}
    if peers is not None:
        rule["from"] = peers
    return rule


def ingress_policy_spec(pod_selector: Mapping[str, str], rules: list[Manifest]) -> Manifest:
    return {"podSelector": {"matchLabels": dict(pod_selector)}, "policyTypes": ["Ingress"], "ingress": rules}


def egress_rule(ports: Iterable[tuple[int, str]], peers: list[Manifest] | None) -> Manifest:
    """Allow connections to ``ports`` of ``peers``; ``None`` means to anywhere."""
    rule: Manifest = {"ports": [{"port": port, "protocol": protocol} for port, protocol in ports]}
    if peers is not None:
        rule["to"] = peers
    return rule


# Name resolution, which every pod with restricted egress still needs (kube-dns / CoreDNS).
DNS_EGRESS: Manifest = egress_rule([(53, "UDP"), (53, "TCP")], [{"namespaceSelector": {}}])


def isolated_policy_spec(
    pod_selector: Mapping[str, str], ingress: list[Manifest], egress: list[Manifest]
) -> Manifest:
    """Ingress *and* egress limited to the rules (the namespace's default deny covers ingress only)."""
    return {
        "podSelector": {"matchLabels": dict(pod_selector)},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": ingress,
        "egress": [*egress, DNS_EGRESS],
    }


def runner_peer(namespace: str) -> Manifest:
    """The ``pulumi up`` runner pods in their namespace (``cluster.runner: in-cluster``), whose
    dynamic providers manage orgs, buckets, tokens and registry rows through the databases' APIs."""
    return {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
        "podSelector": {"matchLabels": role_selector(ROLE_RUNNER)},
    }


def prometheus_peer(prometheus: Prometheus) -> Manifest:
    """The cluster's Prometheus pods, in their own namespace (namespace and pod selector: both must match)."""
    return {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": prometheus.namespace}},
        "podSelector": {"matchLabels": dict(prometheus.pod_labels)},
    }


def ingress_controller_peer(controller: IngressController) -> Manifest:
    """The cluster's ingress controller pods, in their own namespace: how clients come in."""
    return {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": controller.namespace}},
        "podSelector": {"matchLabels": dict(controller.pod_labels)},
    }


def metrics_rule(port: int, prometheus: Prometheus) -> Manifest:
    """Let the cluster's Prometheus scrape one metrics port, and nothing else."""
    return ingress_rule([(port, "TCP")], [prometheus_peer(prometheus)])


def backup_peer(instance: str) -> Manifest:
    """The backup CronJob pods of one database instance."""
    return pod_peer({**role_selector(ROLE_BACKUP), "app.kubernetes.io/instance": instance})


# ------------------------------------------------------------------------------------ pods
def container(
    name: str,
    image: str,
    *,
    resources: ComputeResources,
    env: list[Manifest] | None = None,
    ports: list[Manifest] | None = None,
    mounts: list[Manifest] | None = None,
    readiness: Manifest | None = None,
    liveness: Manifest | None = None,
    command: list[str] | None = None,
    args: list[str] | None = None,
) -> Manifest:
    """One hardened container: the security context is not a parameter, so none can opt out."""
    spec: Manifest = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "securityContext": container_security_context(),
        "resources": compute_resources(resources),
    }
    optional = {
        "command": command,
        "args": args,
        "env": env,
        "ports": ports,
        "volumeMounts": mounts,
        "readinessProbe": readiness,
        "livenessProbe": liveness,
    }
    spec.update({key: value for key, value in optional.items() if value})
    return spec


def pod_template(
    pod_labels: Mapping[str, str],
    containers: list[Manifest],
    *,
    user: int,
    service_account: str,
    init_containers: list[Manifest] | None = None,
    group: int | None = None,
    volumes: list[Manifest] | None = None,
    affinity: Manifest | None = None,
    annotations: Mapping[str, str] | None = None,
    api_access: bool = False,
    restart_policy: str | None = None,
    termination_grace_s: int | None = None,
) -> Manifest:
    """A pod template; the API token is mounted only for pods that call the Kubernetes API (EMQX).
    ``termination_grace_s``: how long after SIGTERM the kubelet waits before SIGKILL (default 30)."""
    spec: Manifest = {
        "serviceAccountName": service_account,
        "automountServiceAccountToken": api_access,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(user, group),
        "containers": containers,
    }
    if init_containers:
        spec["initContainers"] = init_containers
    if volumes:
        spec["volumes"] = volumes
    if affinity:
        spec["affinity"] = affinity
    if restart_policy:
        spec["restartPolicy"] = restart_policy
    if termination_grace_s is not None:
        spec["terminationGracePeriodSeconds"] = termination_grace_s
    metadata: Manifest = {"labels": dict(pod_labels)}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {"metadata": metadata, "spec": spec}


def cron_job_spec(schedule: str, pod: Manifest) -> Manifest:
    """A CronJob that never overlaps itself (two backups of one database at once help nobody)."""
    return {
        "schedule": schedule,
        "concurrencyPolicy": "Forbid",
        "successfulJobsHistoryLimit": 3,
        "failedJobsHistoryLimit": 3,
        "jobTemplate": {"spec": {"backoffLimit": 2, "template": pod}},
    }
