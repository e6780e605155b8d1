"""Typed stack configuration: the one model every Ironlink capability reads.

A stack file (``stacks/Pulumi.<stack>.yaml``) states only what differs from its phase preset
(:data:`PHASE_PRESETS`). :func:`parse_platform` merges the two, validates the result and reports
*every* problem at once, each named by its config path and value, before any resource is declared::

    ironlink:tenants[2].id: 'Acme Corp' is not a valid tenant id (lowercase letters, digits, '-')

The Pulumi program, the offline planner, the tenant CLI and the local dev platform all go through
this module, so a tenant, a site or a machine exists in exactly one place.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from ingest.catalog import MACHINE_TYPES

NAMESPACE = "ironlink"
Phase = Literal["A", "B", "C"]
IsolationLevel = Literal[1, 2, 3]
PHASES: tuple[Phase, ...] = ("A", "B", "C")
# The highest isolation level each phase can run: level 3 (dedicated instances) is a Phase C service.
MAX_ISOLATION: dict[str, int] = {"A": 2, "B": 2, "C": 3}


# --------------------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Problem:
    """One config problem: where it is (``ironlink:broker.nodes``) and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class StackConfigError(ValueError):
    """Raised with every problem of a stack config; nothing has been declared when it is raised."""

    def __init__(self, problems: Iterable[Problem], stack: str | None = None) -> None:
        self.problems = sorted(set(problems), key=lambda p: (p.path, p.message))
        self.stack = stack
        header = f"stack {_show(stack)} has" if stack else "stack config has"  # a name may come from a flag
        count = len(self.problems)
        lines = "\n".join(f"  {problem}" for problem in self.problems)
        super().__init__(f"{header} {count} problem{'s' if count != 1 else ''}:\n{lines}")


# Longest value (or key) an error message repeats in full: a megabyte of input is not echoed back.
SHOWN_CHARACTERS = 80


def _clip(text: str) -> str:
    if len(text) <= SHOWN_CHARACTERS:
        return text
    return f"{text[:SHOWN_CHARACTERS]}... ({len(text)} characters)"


def _path(location: Iterable[str | int]) -> str:
    text = NAMESPACE + ":"
    for i, part in enumerate(location):
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += _clip(part) if i == 0 else f".{_clip(part)}"
    return text


def _show(value: Any) -> str:
    """A value as error messages quote it: JSON for true/false/null, else its repr, cut if long."""
    return json.dumps(value) if isinstance(value, bool | None) else _clip(repr(value))


def _problems_from(error: ValidationError, prefix: tuple[str | int, ...]) -> Iterator[Problem]:
    for item in error.errors(include_url=False):
        location = prefix + tuple(part for part in item["loc"] if not _is_union_tag(part))
        kind, value = item["type"], item.get("input")
        if kind == "value_error":
            message = str(item["ctx"]["error"])
        elif kind == "missing":
            message = "is required"
        elif kind == "extra_forbidden":
            message = f"unknown setting {_show(location[-1])}"
        elif kind == "string_too_long":
            message = f"is {len(value)} characters long; at most {item['ctx']['max_length']} are allowed"
        elif kind == "literal_error":
            message = f"{_show(value)} is not one of {item['ctx']['expected']}"
        else:
            message = f"{_show(value)} is invalid: {item['msg'][0].lower()}{item['msg'][1:]}"
        yield Problem(_path(location), message)


def _is_union_tag(part: str | int) -> bool:
    return isinstance(part, str) and ("[" in part or part in {"function-after"})


# ------------------------------------------------------------------------------- value formats
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
# The same rule as a pattern string, for JSON Schema and pydantic-core (ingest/contract.py).
DNS_LABEL_PATTERN = _DNS_LABEL.pattern
_QUANTITY = re.compile(r"^\d+(\.\d+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_RATE = re.compile(r"^\d+(\.\d+)?(KB|MB|GB)?/(s|m|h)$")
_SIZE = re.compile(r"^\d+(KB|MB)?$")
_DURATION = re.compile(r"^(\d+)(m|h|d|w)$")
_DURATION_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 604800}
FOREVER = "forever"


def _identifier(kind: str, max_length: int) -> Callable[[str], str]:
    def check(value: str) -> str:
        if len(value) > max_length or not _DNS_LABEL.fullmatch(value):
            raise ValueError(
                f"{_show(value)} is not a valid {kind} id (lowercase letters, digits, '-'; "
                f"at most {max_length} characters, starting and ending with a letter or digit)"
            )
        return value

    return check


def _pattern(kind: str, pattern: re.Pattern[str], example: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"{_show(value)} is not a valid {kind} (for example {example!r})")
        return value

    return check


def duration_seconds(value: str) -> int:
    """Seconds of a duration such as ``30d`` or ``12h``; 0 for ``forever`` (InfluxDB's convention)."""
    if value == FOREVER:
        return 0
    match = _DURATION.fullmatch(value)
    if not match:
        raise ValueError(f"{_show(value)} is not a valid duration (for example '30d', '12h', or 'forever')")
    return int(match.group(1)) * _DURATION_SECONDS[match.group(2)]


def _retention(value: str) -> str:
    seconds = duration_seconds(value)
    if 0 < seconds < 3600:
        raise ValueError(f"{value!r} is shorter than InfluxDB's minimum retention of 1h")
    return value


TenantId = Annotated[str, AfterValidator(_identifier("tenant", 32))]
SiteId = Annotated[str, AfterValidator(_identifier("site", 32))]
MachineId = Annotated[str, AfterValidator(_identifier("machine", 48))]
RegionName = Annotated[str, AfterValidator(_identifier("region", 32))]
DnsLabel = Annotated[str, AfterValidator(_identifier("Kubernetes name", 63))]
Quantity = Annotated[str, AfterValidator(_pattern("Kubernetes quantity", _QUANTITY, "512Mi"))]
Rate = Annotated[str, AfterValidator(_pattern("rate", _RATE, "100/s"))]
PacketSize = Annotated[str, AfterValidator(_pattern("size", _SIZE, "256KB"))]
Retention = Annotated[str, AfterValidator(_retention)]


def _machine_type(value: str) -> str:
    if value not in MACHINE_TYPES:
        raise ValueError(
            f"{_show(value)} is not a known machine type (known: {', '.join(sorted(MACHINE_TYPES))})"
        )
    return value


MachineTypeName = Annotated[str, AfterValidator(_machine_type)]


def _password_hash(value: str) -> str:
    parts = value.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        raise ValueError("is not a PBKDF2-SHA512 hash in Mosquitto's '$7$<iterations>$<salt>$<hash>' form")
    return value


PasswordHash = Annotated[str, StringConstraints(max_length=256), AfterValidator(_password_hash)]


# Free text: bounded, and on one line, since it reaches terminals, YAML, the registry and labels.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _one_line(value: str) -> str:
    control = _CONTROL_CHARACTERS.search(value)
    if control:
        raise ValueError(f"{_show(value)} contains the control character {control.group()!r}")
    return value


def _dns_name(value: str) -> str:
    if len(value) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in value.split(".")):
        raise ValueError(
            f"{_show(value)} is not a valid DNS name (labels of lowercase letters, digits and '-', "
            "joined by '.'; at most 253 characters)"
        )
    return value


DisplayName = Annotated[str, StringConstraints(min_length=1, max_length=128), AfterValidator(_one_line)]
TierName = Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(_one_line)]
CronSchedule = Annotated[str, StringConstraints(min_length=1, max_length=128), AfterValidator(_one_line)]
KubeContext = Annotated[str, StringConstraints(min_length=1, max_length=253), AfterValidator(_one_line)]
DnsName = Annotated[str, AfterValidator(_dns_name)]
_IMAGE = re.compile(r"[!-~]+")  # printable ASCII, no spaces
ImageRef = Annotated[
    str,
    StringConstraints(max_length=255),
    AfterValidator(_pattern("image reference", _IMAGE, "eclipse-mosquitto:2.0.20")),
]
_KUBERNETES_VERSION = re.compile(r"\d{1,3}\.\d{1,3}")
KubernetesVersion = Annotated[
    str, AfterValidator(_pattern("Kubernetes version", _KUBERNETES_VERSION, "1.31"))
]
# Kubernetes label keys (an optional DNS prefix, then a name) and values (at most 63 characters).
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}")
_LABEL_VALUE = re.compile(rf"({_LABEL_NAME})?")
LabelKey = Annotated[
    str,
    StringConstraints(max_length=317),
    AfterValidator(_pattern("label key", _LABEL_KEY, "app.kubernetes.io/name")),
]
LabelValue = Annotated[
    str, StringConstraints(max_length=63), AfterValidator(_pattern("label value", _LABEL_VALUE, "prometheus"))
]


ProvisioningCAArn = Annotated[
    str,
    Field(
        max_length=256,
        pattern=r"^arn:aws[a-z-]*:acm-pca:[a-z0-9-]+:[0-9]{12}:certificate-authority/[0-9a-f-]+$",
    ),
]


# ------------------------------------------------------------------------------------ the model
class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Amounts(Section):
    cpu: Quantity
    memory: Quantity


class ComputeResources(Section):
    """Kubernetes requests and limits of one container."""

    requests: Amounts
    limits: Amounts


class Prometheus(Section):
    """The cluster's Prometheus: the NetworkPolicies admit exactly these pods to the metrics ports
    (the worker's 9108, the dead-letter consumer's, the provisioning service's, EMQX's 18083)."""

    namespace: DnsLabel = "monitoring"
    """The namespace it runs in (matched by its ``kubernetes.io/metadata.name`` label)."""
    pod_labels: dict[LabelKey, LabelValue] = Field(
        default={"app.kubernetes.io/name": "prometheus"}, min_length=1, max_length=16
    )
    """Labels its server pods carry (kube-prometheus-stack: ``app.kubernetes.io/name: prometheus``)."""
    rule_labels: dict[LabelKey, LabelValue] = Field(default={}, max_length=16)
    """Labels the operator's ``serviceMonitorSelector``/``ruleSelector`` match (kube-prometheus-stack
    selects ``release: <its release name>``); put on every ServiceMonitor, PodMonitor and PrometheusRule."""


class IngressController(Section):
    """The cluster's ingress controller, through which clients reach the API: its NetworkPolicy
    admits exactly these pods (ingress-nginx by default)."""

    namespace: DnsLabel = "ingress-nginx"
    pod_labels: dict[LabelKey, LabelValue] = Field(
        default={"app.kubernetes.io/name": "ingress-nginx"}, min_length=1, max_length=16
    )


class Cluster(Section):
    """Where the region runs: a kubeconfig context (ignored where ``aws.cluster`` is ``eks``: the
    providers then use the EKS cluster's own kubeconfig)."""

    context: KubeContext | None = None
    namespace: DnsLabel = "ironlink"
    storage_class: DnsName | None = None
    domain: DnsName = "ironlink.example.com"
    kubernetes_version: KubernetesVersion = "1.31"
    runner: Literal["in-cluster"] = "in-cluster"
    """Where ``pulumi up`` runs. ``in-cluster``: a pod in ``runner_namespace`` labelled
    ``app.kubernetes.io/component: pulumi-runner`` (README, "Where pulumi up runs";
    ``docs/pulumi-runner.yaml``), which the NetworkPolicies of InfluxDB (8086) and the registry's
    PostgreSQL (5432) admit by namespace and label; Grafana's 3000 is open to the cluster's ingress
    anyway. The InfluxDB, Grafana and registry
    providers of platform and tenant stacks connect to ``*.svc.cluster.local`` addresses, which only
    a pod in the cluster resolves, and those addresses are kept in their state: a workstation
    behind ``kubectl port-forward`` would need other URLs per machine, each a diff of every resource."""
    runner_namespace: DnsLabel = "ironlink-deploy"
    """The runner's own namespace, made once by an administrator with the runner's RBAC: not the
    platform's, which the platform stack itself creates (and ``pulumi destroy`` deletes)."""
    prometheus: Prometheus = Prometheus()
    ingress_controller: IngressController = IngressController()
    prometheus_operator: bool = False
    """Whether the cluster runs the Prometheus operator (its CRDs installed): then the platform
    declares ServiceMonitors/PodMonitors for its metrics and a PrometheusRule of
    :func:`dashboards.platform.platform_rules`. Without it, pods keep their ``prometheus.io/*``
    annotations for an annotation-based scrape config."""


class ClientLimits(Section):
    """Per-client limits at the broker. Rates are EMQX's; Mosquitto enforces only the packet size."""

    messages_rate: Rate | None = None
    bytes_rate: Rate | None = None
    max_conn_rate: Rate | None = None
    max_packet_size: PacketSize = "256KB"


class TenantQuota(Section):
    """What one tenant may use: devices registered and messages per second at the worker."""

    max_devices: int = Field(ge=1)
    messages_per_second: float = Field(gt=0)
    messages_per_month: int | None = Field(default=None, ge=1)
    """A hard monthly quota over the tier's (``RetentionTier.messages_per_month``)."""


class StackSecret(Section):
    """A value Pulumi encrypted in the stack file (``secure: v1:...``). The engine passes the
    program the decrypted text; tools that read the file itself (the offline planner, tenant
    stacks reading their platform's file) see only this ciphertext."""

    secure: str = Field(min_length=1, max_length=65536)


def secret_text(value: SecretStr | StackSecret) -> str:
    """What a secret setting holds: the decrypted text, or the ciphertext where only the file was read."""
    return value.get_secret_value() if isinstance(value, SecretStr) else value.secure


class Broker(Section):
    engine: Literal["emqx", "mosquitto"]
    image: ImageRef
    nodes: int = Field(ge=1)
    tls: Literal["tls", "mtls"]
    allow_plaintext: bool = False
    # Messages the broker keeps per session while its client is slow or away (the worker during a
    # store outage). Both brokers default to 1000 and silently drop the rest.
    max_queued_messages: int = Field(default=200_000, ge=1000)
    dynamic_security_plugin: str = Field(
        default="/usr/lib/mosquitto_dynamic_security.so", max_length=255, pattern=r"^/[A-Za-z0-9._/-]+\.so$"
    )
    """Mosquitto only: the dynamic-security plugin inside ``image``. The default is where the
    eclipse-mosquitto images install it; Debian's package puts it under ``/usr/lib/<arch>/``."""
    storage: Quantity
    resources: ComputeResources
    limits: ClientLimits
    tenant_quota: TenantQuota
    keepalive_s: int = Field(default=60, ge=5, le=3600)
    """EMQX only: the MQTT keepalive devices are told to use, sent to MQTT 5 clients as the Server
    Keep Alive of CONNACK (``mqtt.server_keepalive``), which overrides theirs; MQTT 3.1.1 clients
    keep their own (the edge agent's ``keepalive_s``). Behind the region's NLB it must be below
    :data:`NLB_TCP_IDLE_TIMEOUT_S`, since the NLB drops a connection silent for longer."""
    license: SecretStr | StackSecret | None = None
    """EMQX only: the licence key, as a stack secret (``pulumi config set --secret --path
    'ironlink:broker.license' KEY``). From 5.9.0 EMQX is BSL 1.1 and clusters only with one; it
    reaches the nodes from a Secret (``EMQX_LICENSE__KEY``), never from the rendered file."""


class RetentionTier(Section):
    """How long a tier keeps raw telemetry, its downsampled aggregates and its dead letters."""

    raw: Retention
    downsampled: Retention
    dead_letters: Retention | None = None
    """How long the registry keeps the tenant's dead letters; default: as long as raw telemetry."""
    max_age: Retention | None = None
    """Oldest reading the worker accepts, by its ``ts`` against its arrival; default: ``raw``, so a
    point the bucket would drop (InfluxDB: 422 partial write) is dead-lettered ``ts_too_old`` instead."""
    messages_per_month: int | None = Field(default=None, ge=1)
    """The tier's hard quota: messages a tenant may send per calendar month (UTC), counted once
    each by the worker's usage metering (``ingest/usage.py``); warned at 80 %, beyond it dead-lettered
    ``monthly_quota_exceeded``. None: no monthly quota."""

    @model_validator(mode="after")
    def _max_age_within_raw(self) -> RetentionTier:
        age, raw = self.max_age_seconds, self.raw_seconds
        if raw and (age is None or age > raw):
            raise ValueError(
                f"max_age {self.max_age!r} is longer than raw {self.raw!r}: the bucket would drop "
                "such readings after the worker accepted them"
            )
        return self

    @property
    def raw_seconds(self) -> int:
        return duration_seconds(self.raw)

    @property
    def downsampled_seconds(self) -> int:
        return duration_seconds(self.downsampled)

    @property
    def dead_letter_seconds(self) -> int:
        return duration_seconds(self.dead_letters or self.raw)

    @property
    def max_age_seconds(self) -> int | None:
        """The age bound in seconds; None when raw data is kept forever and no bound is set."""
        return duration_seconds(self.max_age or self.raw) or None


class InfluxDB(Section):
    """InfluxDB 2.x OSS: a single node per instance; HA comes from backups and level-3 instances."""

    image: ImageRef
    replicas: int = Field(ge=1)
    storage: Quantity
    resources: ComputeResources
    shared_org: DnsLabel = "ironlink"
    retention_tiers: dict[TierName, RetentionTier]
    backup_schedule: CronSchedule | None = None


class Postgres(Section):
    image: ImageRef
    storage: Quantity
    resources: ComputeResources
    database: DnsLabel = "ironlink"
    backup_schedule: CronSchedule | None = None


class Grafana(Section):
    image: ImageRef
    replicas: int = Field(ge=1)
    resources: ComputeResources


class Autoscaling(Section):
    min_replicas: int = Field(ge=1)
    max_replicas: int = Field(ge=1)
    target_cpu_percent: int = Field(ge=10, le=100)


IngestColourName = Literal["blue", "green"]


class IngestColour(Section):
    """One colour of a blue/green rollout of the worker: its own StatefulSet and client ids."""

    image: ImageRef
    spool_storage: Quantity | None = None
    """This colour's spool volumes (default ``ingest.spool_storage``): a claim template cannot change
    in place, so a new size arrives with a new colour."""


class Ingest(Section):
    """The ingestion worker's deployment (its runtime settings live in ``ingest/``)."""

    image: ImageRef
    """The image when no ``colours`` are listed (one StatefulSet ``ingest``)."""
    replicas: int = Field(ge=1)
    autoscaling: Autoscaling | None = None
    resources: ComputeResources
    batch_size: int = Field(ge=1, le=50_000)
    flush_interval_ms: int = Field(ge=10, le=60_000)
    share_group: DnsLabel = "ingest"
    max_clock_skew_s: int = Field(default=300, ge=0, le=86_400)
    """How far ahead of its arrival a reading's ``ts`` may be before it is dead-lettered
    ``ts_in_future``. An NTP-synced device is milliseconds off; 5 minutes covers a gateway's drifting
    clock; a point further ahead would be the machine's latest reading, freezing its derived metrics
    until real time catches up, and beyond ~2 days VictoriaMetrics drops it after a 204. At most a day."""
    colours: dict[IngestColourName, IngestColour] = {}
    """Blue/green: each colour runs as its own StatefulSet ``ingest-<colour>`` in the same share group.
    Cut over by adding the new colour, then removing the old one (its pods drain on SIGTERM)."""
    shutdown_grace_s: int = Field(default=20, ge=1, le=600)
    """How long a stopping worker may drain and acknowledge; the pod gets 10 s more before SIGKILL."""
    spool_storage: Quantity = "1Gi"
    """Each replica's volume for its durable spool of held tenants' messages."""

    @property
    def min_replicas(self) -> int:
        """Replicas that always run (the autoscaler's floor): how many share each tenant's quota."""
        return self.autoscaling.min_replicas if self.autoscaling else self.replicas


class ProvisioningCA(Section):
    """Where the issuing CAs' signing keys live: never in the stack or Pulumi state."""

    mode: Literal["in-cluster", "aws-pca"] = "in-cluster"
    """``in-cluster``: the service generates each key on first start, on its own volume.
    ``aws-pca`` (AWS Private CA holds the key) is refused until it is implemented."""
    arn: ProvisioningCAArn | None = None
    """The Private CA's ARN; only with mode ``aws-pca``."""


class Provisioning(Section):
    """The provisioning service's deployment (its runtime settings live in ``provisioning/``)."""

    image: ImageRef
    replicas: int = Field(ge=1, le=10)
    """Several replicas share the CA volume: its storage class must offer ReadWriteMany."""
    resources: ComputeResources
    ca_storage: Quantity = "64Mi"
    """The volume holding the region's and level-3 tenants' CA keys and certificates."""
    ca_storage_class: DnsName | None = None
    """Its storage class (default ``cluster.storage_class``); ReadWriteMany when replicas > 1."""
    cert_validity_days: int = Field(default=90, ge=1, le=825)
    """Validity of a device certificate."""
    renew_before_days: int = Field(default=30, ge=1)
    """A device may renew from this many days before its certificate expires (the overlap window)."""
    claim_rate_per_source: float = Field(default=1.0, gt=0, le=1000)
    """Claims per second one source address may make (token bucket)."""
    claim_burst_per_source: int = Field(default=10, ge=1, le=10_000)
    ca: ProvisioningCA = ProvisioningCA()


_AWS_REGION = re.compile(r"[a-z]{2}(-gov)?-[a-z]+-\d")
AwsRegion = Annotated[str, AfterValidator(_pattern("AWS region", _AWS_REGION, "eu-west-1"))]
_CIDR = re.compile(r"(\d{1,3}\.){3}\d{1,3}/\d{1,2}")
Cidr = Annotated[str, AfterValidator(_pattern("IPv4 CIDR block", _CIDR, "10.10.0.0/16"))]
_INSTANCE_TYPE = re.compile(r"[a-z0-9]+(\.[a-z0-9-]+){1,2}")
InstanceType = Annotated[str, AfterValidator(_pattern("instance type", _INSTANCE_TYPE, "m6i.large"))]


class ApiSmtp(Section):
    """The relay the API submits alert emails to. Its password is not config: the API reads it
    from the Secret ``api-smtp`` (key ``password``) when an operator has created one."""

    host: DnsName
    port: int = Field(default=587, ge=1, le=65535)
    """The egress policy opens this port (to public addresses only)."""
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str | None = Field(default=None, min_length=1, max_length=256)
    sender: str = Field(min_length=3, max_length=256)
    """The ``From`` of every alert email, e.g. ``Ironlink alerts <alerts@example.com>``."""


class Api(Section):
    """The Ironlink API's deployment (``components/api.py``; its runtime settings live in ``api/``)."""

    image: ImageRef
    replicas: int = Field(ge=1, le=20)
    resources: ComputeResources
    smtp: ApiSmtp | None = None
    """None: no email channel (Slack, Teams and webhooks still deliver)."""
    notify_except: list[Cidr] = Field(
        default=["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10"],
        max_length=32,
    )
    """Ranges the API's notifications (SMTP, Slack, Teams, webhooks) may not reach: private
    networks, so a tenant's webhook URL cannot aim at the cluster's own services or the cloud's
    metadata endpoint. An SMTP relay inside one of them needs its range removed here."""


class AwsNodeGroup(Section):
    """An EKS managed node group; auto-named, so a new instance type creates before it deletes."""

    instance_types: list[InstanceType] = Field(min_length=1, max_length=10)
    min_size: int = Field(ge=1, le=100)
    max_size: int = Field(ge=1, le=100)
    desired_size: int = Field(ge=1, le=100)
    disk_gib: int = Field(default=50, ge=20, le=2000)


class AwsDatabase(Section):
    """RDS PostgreSQL for the registry (Phase C): Multi-AZ, encrypted, protected."""

    instance_class: InstanceType = "db.m6g.large"
    engine_version: Annotated[str, Field(pattern=r"^\d{2}$")] = "16"
    """A major version: RDS applies the minor ones."""
    allocated_storage_gib: int = Field(default=100, ge=20, le=65536)
    backup_retention_days: int = Field(default=14, ge=1, le=35)
    multi_az: bool = True


class AwsTelemetryStore(Section):
    """Amazon Timestream for InfluxDB (managed InfluxDB 2.x) with a Multi-AZ standby."""

    instance_type: InstanceType = "db.influx.large"
    allocated_storage_gib: int = Field(default=400, ge=20, le=16384)
    multi_az: bool = True


_HOSTED_ZONE_ID = re.compile(r"Z[0-9A-Z]{1,31}")
HostedZoneId = Annotated[
    str, AfterValidator(_pattern("Route 53 hosted zone id", _HOSTED_ZONE_ID, "Z0123456789ABCDEFGHIJ"))
]


class AwsDns(Section):
    """Route 53: ``mqtt.<region>.<zone>`` per region, and one latency-routed global name."""

    zone_name: DnsName
    zone_id: HostedZoneId
    """The existing public hosted zone of ``zone_name``, by id (``aws route53
    list-hosted-zones-by-name --dns-name ZONE``). The domain's zone is shared by every region and
    outlives any one stack, so no stack creates or deletes it; taken by id, not looked up by name,
    so that a plan needs no AWS call."""
    global_name: DnsName | None = None
    """One latency-routed name over every region's NLB (a record per region, set identifier =
    region, each with a TCP health check on 8883)."""


_AMI = re.compile(r"ami-[0-9a-f]{8,17}")
AmiId = Annotated[str, AfterValidator(_pattern("AMI id", _AMI, "ami-0123456789abcdef0"))]
_PIP_REQUIREMENT = re.compile(r"ironlink(\[[a-z,]+\])?( ?(==|>=)[0-9][0-9a-z.+-]*| @ https://\S+)")
PipRequirement = Annotated[
    str,
    Field(max_length=512),
    AfterValidator(_pattern("pip requirement for ironlink", _PIP_REQUIREMENT, "ironlink==0.1.0")),
]


class AwsVm(Section):
    """Phase A on one EC2 instance instead of a cluster."""

    ami: AmiId
    """The Debian 12 (amd64) AMI, pinned: ``aws ssm get-parameter --name
    /aws/service/debian/release/12/latest/amd64``. A new AMI replaces the instance and the registry
    and store on its disk, so it changes only when this value does, never at the next deploy."""
    instance_type: InstanceType = "t3.small"
    disk_gib: int = Field(default=30, ge=10, le=16384)
    """The encrypted root volume, which holds the registry, the store and the broker's queue."""
    package: PipRequirement
    """Where the VM installs this project's services from (the worker, the provisioning API), as a
    pip requirement: ``ironlink==0.1.0`` from an index, or ``ironlink @ https://.../ironlink.whl``."""
    ssh_cidr: Cidr | None = None
    """Who may reach SSH (22); None: nobody (Session Manager only)."""


class Aws(Section):
    """What the stack declares on AWS. Phase C: the regional substrate; any phase: a backup bucket;
    Phase A: optionally one VM instead of a cluster."""

    region: AwsRegion
    substrate: bool = False
    """A VPC over ``zones`` availability zones and an EKS cluster (``cluster: eks``), or an
    existing cluster by reference (``cluster: existing``, reached through ``cluster.context``)."""
    vpc_cidr: Cidr = "10.0.0.0/16"
    zones: int = Field(default=3, ge=2, le=6)
    cluster: Literal["eks", "existing"] = "eks"
    api_access_cidrs: list[Cidr] = Field(default=[], max_length=40)
    """Who may reach the EKS API from outside the VPC (its public endpoint, on only if this lists
    someone); empty: the private endpoint only, so ``pulumi up`` runs inside the VPC."""
    node_groups: dict[DnsLabel, AwsNodeGroup] = {}
    registry: Literal["in-cluster", "rds"] = "in-cluster"
    """Where the registry's PostgreSQL runs: one value decides."""
    database: AwsDatabase = AwsDatabase()
    telemetry_store: Literal["in-cluster", "timestream"] = "in-cluster"
    """Where InfluxDB 2.x runs: the in-cluster StatefulSet or Timestream for InfluxDB."""
    timestream: AwsTelemetryStore = AwsTelemetryStore()
    backup_bucket: bool = False
    """An S3 bucket for the database backups (``ironlink backup``)."""
    backup_retention_days: int = Field(default=35, ge=1, le=3650)
    """How long the bucket's lifecycle keeps a backup (and an overwritten or deleted version)."""
    backup_image: ImageRef = "ghcr.io/ironlink/backup:0.1.0"
    """The image of the backup CronJobs of in-cluster databases (``backup/Dockerfile``)."""
    dns: AwsDns | None = None
    vm: AwsVm | None = None


class Tenant(Section):
    """A tenant and what it needs. Its sites, machines and devices are runtime state in the
    registry (``infra/fleet.py``), never in a stack file."""

    id: TenantId
    name: DisplayName
    tier: TierName
    isolation: IsolationLevel | None = None
    quota: TenantQuota | None = None
    machine_types: list[MachineTypeName] = []
    """Catalog types its drilldown dashboards and alert rules are built for (none: fleet dashboards only)."""


class PlatformConfig(Section):
    """A whole region: what ``pulumi up`` declares and ``ironlink dev`` runs."""

    phase: Phase
    region: RegionName
    cluster: Cluster
    broker: Broker
    influxdb: InfluxDB
    postgres: Postgres
    grafana: Grafana
    ingest: Ingest
    provisioning: Provisioning
    api: Api
    aws: Aws | None = None
    """AWS resources of the stack (None: none; the cluster exists already)."""
    default_isolation: IsolationLevel
    protect_stateful: bool
    high_availability: bool
    tenants: list[Tenant] = []

    def isolation_of(self, tenant: Tenant) -> int:
        return tenant.isolation if tenant.isolation is not None else self.default_isolation

    def quota_of(self, tenant: Tenant) -> TenantQuota:
        return tenant.quota or self.broker.tenant_quota

    def retention_of(self, tenant: Tenant) -> RetentionTier:
        return self.influxdb.retention_tiers[tenant.tier]

    def monthly_messages_of(self, tenant: Tenant) -> int | None:
        """The tenant's hard monthly message quota: its quota's (``quota_of``), else its tier's
        (None: none)."""
        return self.quota_of(tenant).messages_per_month or self.retention_of(tenant).messages_per_month

    def tenant(self, tenant_id: str) -> Tenant:
        for tenant in self.tenants:
            if tenant.id == tenant_id:
                return tenant
        raise KeyError(tenant_id)


PlatformStackName = Annotated[
    str, AfterValidator(_pattern("platform stack name", re.compile(r"[A-Za-z0-9_-]{1,60}"), "mvp-eu"))
]


class TenantStackConfig(Section):
    """A tenant's own stack (``<platform>.<tenant id>``): the platform stack it runs on, and the
    tenant. Everything else (tiers, phase, images, protection) is the platform's."""

    platform: PlatformStackName
    tenant: Tenant


# ------------------------------------------------------------------------------------- presets
def _compute(cpu: str, memory: str, cpu_limit: str, memory_limit: str) -> dict[str, Any]:
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu_limit, "memory": memory_limit}}


_IMAGES = {
    "emqx": "emqx/emqx:5.8.9",
    "mosquitto": "eclipse-mosquitto:2.0.20",
    "influxdb": "influxdb:2.7.11",
    "postgres": "postgres:16.6",
    "grafana": "grafana/grafana:11.4.0",
    "ingest": "ghcr.io/ironlink/ingest:0.1.0",
    "provisioning": "ghcr.io/ironlink/provisioning:0.1.0",
    "api": "ghcr.io/ironlink/api:0.1.0",
}
_TIERS = {
    # Monthly quotas: basic ~ 40 machines at one message a second, standard ~ 400; premium none.
    "basic": {"raw": "7d", "downsampled": "180d", "messages_per_month": 100_000_000},
    "standard": {"raw": "30d", "downsampled": "365d", "messages_per_month": 1_000_000_000},
    "premium": {"raw": "30d", "downsampled": "730d"},
}

PHASE_PRESETS: dict[str, dict[str, Any]] = {
    "A": {
        "cluster": {},
        "broker": {
            "engine": "mosquitto",
            "image": _IMAGES["mosquitto"],
            "nodes": 1,
            "tls": "tls",
            "allow_plaintext": False,
            "storage": "1Gi",
            "resources": _compute("100m", "64Mi", "500m", "256Mi"),
            "limits": {"max_packet_size": "256KB"},
            "tenant_quota": {"max_devices": 50, "messages_per_second": 100},
        },
        "influxdb": {
            "image": _IMAGES["influxdb"],
            "replicas": 1,
            "storage": "20Gi",
            "resources": _compute("250m", "512Mi", "1", "2Gi"),
            "retention_tiers": _TIERS,
        },
        "postgres": {
            "image": _IMAGES["postgres"],
            "storage": "5Gi",
            "resources": _compute("100m", "256Mi", "500m", "1Gi"),
        },
        "grafana": {
            "image": _IMAGES["grafana"],
            "replicas": 1,
            "resources": _compute("100m", "128Mi", "500m", "512Mi"),
        },
        "ingest": {
            "image": _IMAGES["ingest"],
            "replicas": 1,
            "resources": _compute("100m", "128Mi", "500m", "256Mi"),
            "batch_size": 500,
            "flush_interval_ms": 1000,
        },
        "provisioning": {
            "image": _IMAGES["provisioning"],
            "replicas": 1,
            "resources": _compute("50m", "128Mi", "500m", "256Mi"),
        },
        "api": {
            "image": _IMAGES["api"],
            "replicas": 1,
            "resources": _compute("50m", "128Mi", "500m", "256Mi"),
        },
        "default_isolation": 1,
        "protect_stateful": False,
        "high_availability": False,
    },
    "B": {
        "cluster": {},
        "broker": {
            "engine": "emqx",
            "image": _IMAGES["emqx"],
            "nodes": 1,
            "tls": "tls",
            "allow_plaintext": False,
            "storage": "5Gi",
            "resources": _compute("250m", "512Mi", "1", "1Gi"),
            "limits": {"messages_rate": "100/s", "bytes_rate": "512KB/s", "max_conn_rate": "200/s"},
            "tenant_quota": {"max_devices": 500, "messages_per_second": 1000},
        },
        "influxdb": {
            "image": _IMAGES["influxdb"],
            "replicas": 1,
            "storage": "100Gi",
            "resources": _compute("500m", "2Gi", "2", "4Gi"),
            "retention_tiers": _TIERS,
            "backup_schedule": "0 2 * * *",
        },
        "postgres": {
            "image": _IMAGES["postgres"],
            "storage": "20Gi",
            "resources": _compute("250m", "512Mi", "1", "2Gi"),
            "backup_schedule": "30 2 * * *",
        },
        "grafana": {
            "image": _IMAGES["grafana"],
            "replicas": 1,
            "resources": _compute("200m", "256Mi", "1", "1Gi"),
        },
        "ingest": {
            "image": _IMAGES["ingest"],
            "replicas": 2,
            "autoscaling": {"min_replicas": 2, "max_replicas": 6, "target_cpu_percent": 70},
            "resources": _compute("250m", "256Mi", "1", "512Mi"),
            "batch_size": 1000,
            "flush_interval_ms": 500,
        },
        "provisioning": {
            "image": _IMAGES["provisioning"],
            "replicas": 2,
            "resources": _compute("100m", "128Mi", "500m", "256Mi"),
        },
        "api": {
            "image": _IMAGES["api"],
            "replicas": 2,
            "resources": _compute("100m", "128Mi", "1", "512Mi"),
        },
        "default_isolation": 2,
        "protect_stateful": True,
        "high_availability": False,
    },
    "C": {
        "cluster": {},
        "broker": {
            "engine": "emqx",
            "image": _IMAGES["emqx"],
            "nodes": 3,
            "tls": "mtls",
            "allow_plaintext": False,
            "storage": "20Gi",
            "resources": _compute("1", "2Gi", "2", "4Gi"),
            "limits": {"messages_rate": "200/s", "bytes_rate": "1MB/s", "max_conn_rate": "1000/s"},
            "tenant_quota": {"max_devices": 5000, "messages_per_second": 5000},
        },
        "influxdb": {
            "image": _IMAGES["influxdb"],
            "replicas": 1,
            "storage": "500Gi",
            "resources": _compute("2", "8Gi", "4", "16Gi"),
            "retention_tiers": _TIERS,
            "backup_schedule": "0 */6 * * *",
        },
        "postgres": {
            "image": _IMAGES["postgres"],
            "storage": "100Gi",
            "resources": _compute("1", "2Gi", "2", "4Gi"),
            "backup_schedule": "0 */6 * * *",
        },
        "grafana": {
            "image": _IMAGES["grafana"],
            "replicas": 2,
            "resources": _compute("500m", "512Mi", "2", "2Gi"),
        },
        "ingest": {
            "image": _IMAGES["ingest"],
            "replicas": 3,
            "autoscaling": {"min_replicas": 3, "max_replicas": 12, "target_cpu_percent": 65},
            "resources": _compute("500m", "512Mi", "2", "1Gi"),
            "batch_size": 5000,
            "flush_interval_ms": 250,
        },
        "provisioning": {
            "image": _IMAGES["provisioning"],
            "replicas": 2,
            "resources": _compute("250m", "256Mi", "1", "512Mi"),
        },
        "api": {
            "image": _IMAGES["api"],
            "replicas": 2,
            "resources": _compute("250m", "256Mi", "2", "1Gi"),
        },
        "default_isolation": 2,
        "protect_stateful": True,
        "high_availability": True,
    },
}


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``: mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# --------------------------------------------------------------------------------------- rules
Sections = dict[str, Any]


def _rule_plaintext(s: Sections) -> Iterator[Problem]:
    if s["phase"] in ("B", "C") and s["broker"].allow_plaintext:
        yield Problem(
            _path(["broker", "allow_plaintext"]),
            f"true is not allowed in phase {s['phase']} (plaintext MQTT is refused in phases B and C)",
        )


def _rule_broker_cluster(s: Sections) -> Iterator[Problem]:
    broker: Broker = s["broker"]
    if s["phase"] == "C" and (broker.engine != "emqx" or broker.nodes < 3):
        if broker.engine != "emqx":
            yield Problem(
                _path(["broker", "engine"]), f"{broker.engine!r} cannot cluster; phase C needs 'emqx'"
            )
        if broker.nodes < 3:
            yield Problem(
                _path(["broker", "nodes"]), f"{broker.nodes} is too few; phase C needs a cluster of 3+ nodes"
            )
    if broker.engine == "mosquitto" and broker.nodes != 1:
        yield Problem(
            _path(["broker", "nodes"]), f"{broker.nodes} nodes: Mosquitto does not cluster, use 1 or 'emqx'"
        )
    if broker.engine == "emqx" and broker.nodes % 2 == 0:
        yield Problem(
            _path(["broker", "nodes"]),
            f"{broker.nodes} is even; an EMQX open-source cluster needs an odd size",
        )
    if broker.engine == "mosquitto":
        for name in ("messages_rate", "bytes_rate", "max_conn_rate"):
            if getattr(broker.limits, name) is not None:
                yield Problem(
                    _path(["broker", "limits", name]),
                    f"{getattr(broker.limits, name)!r} cannot be enforced by Mosquitto "
                    "(use engine 'emqx' or unset it)",
                )


def _rule_high_availability(s: Sections) -> Iterator[Problem]:
    if s["phase"] == "C" and not s["high_availability"]:
        yield Problem(_path(["high_availability"]), "false is not allowed in phase C (formal SLAs need HA)")


def _rule_single_node_influxdb(s: Sections) -> Iterator[Problem]:
    if s["influxdb"].replicas != 1:
        yield Problem(
            _path(["influxdb", "replicas"]),
            f"{s['influxdb'].replicas} replicas: InfluxDB 2.x OSS does not cluster; "
            "use backups, or isolation level 3",
        )


def _rule_autoscaling(s: Sections) -> Iterator[Problem]:
    ingest: Ingest = s["ingest"]
    bounds = ingest.autoscaling
    if bounds is None:
        return
    if bounds.min_replicas > bounds.max_replicas:
        yield Problem(
            _path(["ingest", "autoscaling", "min_replicas"]),
            f"{bounds.min_replicas} is above max_replicas {bounds.max_replicas}",
        )
    if not bounds.min_replicas <= ingest.replicas <= bounds.max_replicas:
        yield Problem(
            _path(["ingest", "replicas"]),
            f"{ingest.replicas} is outside the autoscaling bounds "
            f"{bounds.min_replicas}..{bounds.max_replicas}",
        )


def _rule_ingest_colours(s: Sections) -> Iterator[Problem]:
    """Two colours overlap only inside one share group: without shared subscriptions (Mosquitto,
    ``infra.tenancy.ingest_subscription``) each colour would receive every message."""
    colours, engine = list(s["ingest"].colours), s["broker"].engine
    if len(colours) > 1 and engine != "emqx":
        yield Problem(
            _path(["ingest", "colours"]),
            f"{colours} cannot run together on {engine!r}: it has no shared subscription, so each "
            "colour would receive every message (list one colour, or use engine 'emqx')",
        )


def _tenant_problems(
    tenant: Tenant, at: tuple[str | int, ...], tiers: Mapping[str, Any] | None, phase: str | None
) -> Iterator[Problem]:
    """What one tenant asks of its platform that the platform cannot give (``at``: its config path)."""
    if tiers is not None and tenant.tier not in tiers:
        yield Problem(
            _path([*at, "tier"]),
            f"{tenant.tier!r} is not a retention tier (known: {', '.join(sorted(tiers))})",
        )
    if phase is not None and tenant.isolation is not None and tenant.isolation > MAX_ISOLATION[phase]:
        yield Problem(
            _path([*at, "isolation"]),
            f"{tenant.isolation} is not available in phase {phase} (level 3 needs phase C)",
        )
    for type_index, name in enumerate(tenant.machine_types):
        if name in tenant.machine_types[:type_index]:
            yield Problem(_path([*at, "machine_types", type_index]), f"{name!r} is listed twice")
    if tenant.id in RESERVED_TENANT_IDS:
        yield Problem(
            _path([*at, "id"]),
            f"{tenant.id!r} is reserved (svc.{tenant.id} is a platform service's broker identity)",
        )


def _rule_tenants(s: Sections) -> Iterator[Problem]:
    tiers = s["influxdb"].retention_tiers if "influxdb" in s else None
    seen: dict[str, int] = {}
    for index, tenant in s["tenants"]:
        if tenant.id in seen:
            yield Problem(
                _path(["tenants", index, "id"]),
                f"{tenant.id!r} is already used by tenants[{seen[tenant.id]}]",
            )
        seen.setdefault(tenant.id, index)
        yield from _tenant_problems(tenant, ("tenants", index), tiers, s.get("phase"))


# Tenant ids whose derived names would be the platform's own: svc.<tenant> == svc.ingest (the
# worker) or svc.deadletters (the dead-letter consumer).
RESERVED_TENANT_IDS = frozenset({"ingest", "deadletters"})


def _rule_default_isolation(s: Sections) -> Iterator[Problem]:
    if s["default_isolation"] > MAX_ISOLATION[s["phase"]]:
        yield Problem(
            _path(["default_isolation"]),
            f"{s['default_isolation']} is not available in phase {s['phase']} (level 3 needs phase C)",
        )


def _rule_provisioning(s: Sections) -> Iterator[Problem]:
    section: Provisioning = s["provisioning"]
    if section.renew_before_days >= section.cert_validity_days:
        yield Problem(
            _path(["provisioning", "renew_before_days"]),
            f"{section.renew_before_days} must be less than cert_validity_days "
            f"({section.cert_validity_days})",
        )
    ca = section.ca
    if ca.mode == "aws-pca":
        yield Problem(
            _path(["provisioning", "ca", "mode"]),
            "'aws-pca' is not implemented yet (use 'in-cluster': the service generates the CA keys "
            "on its own volume)",
        )
    elif ca.arn is not None:
        yield Problem(_path(["provisioning", "ca", "arn"]), f"{ca.arn!r} is only read with mode 'aws-pca'")


NLB_TCP_IDLE_TIMEOUT_S = 350
"""An NLB closes a TCP flow through its listener after this long without data either way (the
AWS default, set explicitly on the listener by ``components.aws.ingress``)."""


def _has_regional_ingress(aws: Aws | None) -> bool:
    return aws is not None and aws.substrate and aws.cluster == "eks"


def regional_ingress(config: PlatformConfig) -> bool:
    """Whether devices reach the broker through the region's NLB (``components.aws.ingress``):
    Phase C on its own EKS cluster. The NLB speaks proxy protocol v2, so EMQX's listener must read
    it exactly then."""
    return _has_regional_ingress(config.aws)


LICENSED_EMQX = (5, 9)
"""From EMQX 5.9.0 (BSL 1.1) a cluster of more than one node needs a licence; 5.8.x is the
last Apache-2.0 release that clusters."""
_IMAGE_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


def image_version(image: str) -> tuple[int, int, int] | None:
    """The version in an image's tag (``emqx/emqx:5.9.1`` → (5, 9, 1)); None without one
    (``latest``, a digest only)."""
    name = image.split("@", 1)[0].rsplit("/", 1)[-1]
    tag = name.split(":", 1)[1] if ":" in name else ""
    match = _IMAGE_VERSION.match(tag)
    if match is None:
        return None
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def _rule_emqx_license(s: Sections) -> Iterator[Problem]:
    broker: Broker = s["broker"]
    if broker.engine != "emqx":
        if broker.license is not None:
            yield Problem(_path(["broker", "license"]), "is EMQX's licence; Mosquitto takes none")
        return
    if broker.nodes == 1 or broker.license is not None:
        return
    version = image_version(broker.image)
    floor = ".".join(map(str, LICENSED_EMQX))
    if version is None:
        yield Problem(
            _path(["broker", "image"]),
            f"{broker.image!r} names no version: a {broker.nodes}-node EMQX cluster needs a version tag "
            f"(before {floor}), or broker.license",
        )
    elif version[:2] >= LICENSED_EMQX:
        shown = ".".join(map(str, version))
        yield Problem(
            _path(["broker", "license"]),
            f"is required: EMQX {shown} ({broker.image!r}) is BSL 1.1 from {floor} and clusters "
            f"{broker.nodes} nodes only with a licence (set it as a stack secret, or use 5.8.x)",
        )


def _rule_ingress(s: Sections) -> Iterator[Problem]:
    """The NLB's idle timeout bounds the keepalive; the DNS names belong in their zone."""
    aws: Aws | None = s["aws"]
    broker: Broker = s["broker"]
    if _has_regional_ingress(aws) and broker.keepalive_s >= NLB_TCP_IDLE_TIMEOUT_S:
        yield Problem(
            _path(["broker", "keepalive_s"]),
            f"{broker.keepalive_s} is not below the NLB's TCP idle timeout of {NLB_TCP_IDLE_TIMEOUT_S} s: "
            "an idle device would be cut off between two keepalives",
        )
    if aws is None or aws.dns is None:
        return
    if not _has_regional_ingress(aws):
        yield Problem(
            _path(["aws", "dns"]),
            "names the region's NLB, which only a Phase C stack on its own EKS cluster has "
            "(substrate: true, cluster: eks)",
        )
    dns = aws.dns
    if dns.global_name is not None and not dns.global_name.endswith("." + dns.zone_name):
        yield Problem(
            _path(["aws", "dns", "global_name"]), f"{dns.global_name!r} is not inside zone {dns.zone_name!r}"
        )


VPC_PREFIXES = (16, 22)
"""A VPC is /16 to /28 in AWS; /22 at most here, so that each zone's public subnet (1/64 of the
VPC, ``components.aws.network.subnet_layout``) is still the /28 AWS allows at least."""


def _vpc_cidr_problems(cidr: str) -> Iterator[Problem]:
    try:
        network = ipaddress.IPv4Network(cidr)
    except ValueError as error:
        yield Problem(_path(["aws", "vpc_cidr"]), f"{cidr!r} is not an IPv4 network ({error})")
        return
    low, high = VPC_PREFIXES
    if not low <= network.prefixlen <= high:
        yield Problem(_path(["aws", "vpc_cidr"]), f"{cidr!r}: a VPC here is /{low} to /{high}")
    elif not network.is_private:
        yield Problem(_path(["aws", "vpc_cidr"]), f"{cidr!r} is not a private (RFC 1918) range")


def _rule_aws(s: Sections) -> Iterator[Problem]:
    """The Phase C substrate (VPC, EKS, RDS, Timestream) only in phase C; one VM only in phase A."""
    aws: Aws | None = s["aws"]
    if aws is None:
        return
    phase = s["phase"]
    if phase != "C":
        for key, used in (
            ("substrate", aws.substrate),
            ("registry", aws.registry == "rds"),
            ("telemetry_store", aws.telemetry_store == "timestream"),
        ):
            if used:
                yield Problem(_path(["aws", key]), f"is Phase C's regional substrate, not phase {phase}'s")
    if aws.vm is not None and phase != "A":
        yield Problem(_path(["aws", "vm"]), f"one VM is a Phase A deployment, not phase {phase}'s")
    if aws.vm is not None and aws.substrate:
        yield Problem(_path(["aws", "vm"]), "a VM stack has no cluster: drop substrate")
    for key, used in (
        ("registry", aws.registry == "rds"),
        ("telemetry_store", aws.telemetry_store == "timestream"),
    ):
        if used and not (aws.substrate and aws.cluster == "eks"):
            yield Problem(
                _path(["aws", key]),
                "a managed store lives in the substrate's private subnets, reached from its EKS cluster: "
                "it needs substrate: true and cluster: eks",
            )
    if aws.substrate and aws.cluster == "eks" and not aws.node_groups:
        yield Problem(_path(["aws", "node_groups"]), "an EKS cluster needs at least one node group")
    if aws.substrate:
        yield from _vpc_cidr_problems(aws.vpc_cidr)
    for name, group in aws.node_groups.items():
        if not group.min_size <= group.desired_size <= group.max_size:
            yield Problem(
                _path(["aws", "node_groups", name]),
                f"desired_size {group.desired_size} is not between min_size {group.min_size} "
                f"and max_size {group.max_size}",
            )


# Each rule runs only when the sections it reads are valid, so that one bad section does not hide
# the problems of the others.
_RULES: list[tuple[tuple[str, ...], Callable[[Sections], Iterator[Problem]]]] = [
    (("phase", "broker"), _rule_plaintext),
    (("phase", "broker"), _rule_broker_cluster),
    (("phase", "high_availability"), _rule_high_availability),
    (("influxdb",), _rule_single_node_influxdb),
    (("ingest",), _rule_autoscaling),
    (("provisioning",), _rule_provisioning),
    (("broker", "ingest"), _rule_ingest_colours),
    (("tenants",), _rule_tenants),
    (("phase", "default_isolation"), _rule_default_isolation),
    (("phase", "aws"), _rule_aws),
    (("broker",), _rule_emqx_license),
    (("broker", "aws"), _rule_ingress),
]


# ------------------------------------------------------------------------------------- parsing
FLEET_KEY = "sites"
OLD_STYLE_FLEET = (
    "sites and machines live in the registry now, not in a stack file; "
    "run 'ironlink fleet import {stack}' to move them there"
)
ALERT_EMAILS_KEY = "alert_emails"
ALERT_EMAILS_ROUTE = "operations"
"""The name of the email route ``ironlink tenant add --alert-email`` writes (the contact point was
``<tenant>-operations`` when the addresses lived in the stack file)."""


def _old_style_alert_emails(tenant: Mapping[str, Any]) -> str:
    """Why a tenant's ``alert_emails`` is refused, with the command that routes its addresses."""
    emails, tenant_id = tenant.get(ALERT_EMAILS_KEY), _clip(str(tenant.get("id") or "TENANT"))
    addresses = [str(email) for email in emails] if isinstance(emails, list) else []
    target = _clip(",".join(addresses)) if addresses else "ops@example.com"
    return (
        "alert recipients are registry routes now; remove it and run "
        f"'ironlink alerts route add --tenant {tenant_id} --name {ALERT_EMAILS_ROUTE} "
        f"--channel email --target {target} --registry DSN'"
    )


def _without_retired_keys(
    tenant: Any, location: tuple[str | int, ...], stack: str | None
) -> tuple[Any, list[Problem]]:
    """A tenant's settings without the keys that moved to the registry, and one problem per such
    key naming the command that moves it there (the rest of the tenant is still checked)."""
    if not isinstance(tenant, Mapping):
        return tenant, []
    problems = []
    if FLEET_KEY in tenant:
        problems.append(
            Problem(_path([*location, FLEET_KEY]), OLD_STYLE_FLEET.format(stack=stack or "STACK"))
        )
    if ALERT_EMAILS_KEY in tenant:
        problems.append(Problem(_path([*location, ALERT_EMAILS_KEY]), _old_style_alert_emails(tenant)))
    retired = (FLEET_KEY, ALERT_EMAILS_KEY)
    return {key: value for key, value in tenant.items() if key not in retired}, problems


def parse_platform(raw: Mapping[str, Any], stack: str | None = None) -> PlatformConfig:
    """Validate a stack's ``ironlink:`` settings (keys without the namespace) on top of its preset.

    Raises :class:`StackConfigError` listing every problem found.
    """
    problems: list[Problem] = []
    phase = raw.get("phase", "A")
    if phase not in PHASES:
        problems.append(Problem(_path(["phase"]), f"{_show(phase)} is not one of 'A', 'B', 'C'"))
        phase = "A"
    merged = deep_merge(PHASE_PRESETS[phase], raw)
    merged["phase"] = phase
    if "region" not in merged:
        problems.append(Problem(_path(["region"]), "is required"))

    known = PlatformConfig.model_fields
    for key in merged:
        if key not in known:
            problems.append(Problem(_path([key]), f"unknown setting (known: {', '.join(known)})"))

    sections: Sections = {}
    for name, field in known.items():
        if name not in merged or name == "tenants":
            continue
        try:
            sections[name] = TypeAdapter(field.annotation or Any).validate_python(merged[name])
        except ValidationError as error:
            problems.extend(_problems_from(error, (name,)))

    tenants_raw = merged.get("tenants") or []
    if not isinstance(tenants_raw, list):
        problems.append(Problem(_path(["tenants"]), f"{_show(tenants_raw)} is not a list of tenants"))
        tenants_raw = []
    valid_tenants: list[tuple[int, Tenant]] = []
    for index, raw_item in enumerate(tenants_raw):
        item, retired = _without_retired_keys(raw_item, ("tenants", index), stack)
        problems.extend(retired)
        try:
            valid_tenants.append((index, Tenant.model_validate(item)))
        except ValidationError as error:
            problems.extend(_problems_from(error, ("tenants", index)))
    sections["tenants"] = valid_tenants

    for needs, rule in _RULES:
        if all(key in sections for key in needs):
            problems.extend(rule(sections))

    if problems:
        raise StackConfigError(problems, stack)
    return PlatformConfig.model_validate({**merged, "tenants": [tenant for _, tenant in valid_tenants]})


TENANTS_KEY = "tenants"
OLD_STYLE_TENANTS = (
    "tenants have stacks of their own now ('<platform>.<tenant>'); run 'ironlink stack split {stack}' "
    "to move them there"
)


def parse_platform_stack(raw: Mapping[str, Any], stack: str | None = None) -> PlatformConfig:
    """A platform stack's settings: :func:`parse_platform`, with no tenant (they have stacks of
    their own; an old-style file that still lists them is refused, naming the migration)."""
    if TENANTS_KEY in raw:
        problem = Problem(_path([TENANTS_KEY]), OLD_STYLE_TENANTS.format(stack=stack or "STACK"))
        raise StackConfigError([problem], stack)
    return parse_platform(raw, stack)


def tenant_stack_name(platform: str, tenant_id: str) -> str:
    return f"{platform}.{tenant_id}"


def source_stack(name: str) -> str:
    """The stack a pull request's preview copy was made from (``pr-12-mvp-eu.acme`` →
    ``mvp-eu.acme``, ``infra.preview``); any other name is its own source. A copy runs with its
    source's stack file, so every check of a name is made on the source's."""
    match = re.fullmatch(r"pr-[1-9][0-9]{0,8}-(.+)", name)
    return match.group(1) if match else name


def is_tenant_stack(stack: str) -> bool:
    """Platform stack names have no dot; a tenant stack is ``<platform>.<tenant>``."""
    return "." in stack


def parse_tenant_stack(raw: Mapping[str, Any], stack: str, platform: PlatformConfig) -> TenantStackConfig:
    """Validate a tenant stack's settings against its platform's config (tiers, phase); the stack's
    name must be ``<platform>.<tenant id>``. Raises :class:`StackConfigError` listing every problem."""
    problems: list[Problem] = []
    for key in raw:
        if key not in TenantStackConfig.model_fields:
            known = ", ".join(TenantStackConfig.model_fields)
            problems.append(Problem(_path([key]), f"unknown setting of a tenant stack (known: {known})"))
    body = {key: value for key, value in raw.items() if key in TenantStackConfig.model_fields}
    if "tenant" in body:
        body["tenant"], retired = _without_retired_keys(body["tenant"], ("tenant",), stack)
        problems.extend(retired)
    parsed: TenantStackConfig | None = None
    try:
        parsed = TenantStackConfig.model_validate(body)
    except ValidationError as error:
        problems.extend(_problems_from(error, ()))
    if parsed is not None:
        tiers, tenant = platform.influxdb.retention_tiers, parsed.tenant
        problems.extend(_tenant_problems(tenant, ("tenant",), tiers, platform.phase))
        expected = tenant_stack_name(source_stack(parsed.platform), tenant.id)
        if source_stack(stack) != expected:
            problems.append(
                Problem(
                    _path(["tenant", "id"]),
                    f"{tenant.id!r} on platform {parsed.platform!r} belongs in stack {expected!r}, "
                    f"not {stack!r}",
                )
            )
    if problems or parsed is None:
        raise StackConfigError(problems, stack)
    return parsed


# ---------------------------------------------------------------------------------- stack files
def project_root(start: Path | None = None) -> Path:
    """The folder holding ``Pulumi.yaml``: searched upward from ``start`` (or the working directory),
    falling back to the checkout this package was installed from."""
    for folder in [(start or Path.cwd()).resolve(), *(start or Path.cwd()).resolve().parents]:
        if (folder / "Pulumi.yaml").is_file():
            return folder
    return Path(__file__).resolve().parent.parent


def stacks_dir(root: Path | None = None) -> Path:
    return (root or project_root()) / "stacks"


def stack_file(stack: str, root: Path | None = None) -> Path:
    return stacks_dir(root) / f"Pulumi.{stack}.yaml"


def list_stacks(root: Path | None = None) -> list[str]:
    return sorted(p.name[len("Pulumi.") : -len(".yaml")] for p in stacks_dir(root).glob("Pulumi.*.yaml"))


class UnknownStackError(LookupError):
    def __init__(self, stack: str, known: list[str]) -> None:
        super().__init__(f"unknown stack {_show(stack)} (known: {', '.join(known) or 'none'})")
        self.stack = stack


_STACK_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")  # Pulumi's stack names; never a path


def existing_stack_file(stack: str, root: Path | None = None) -> Path:
    """The file of an existing stack; :class:`UnknownStackError` for anything else (a typo, a path)."""
    path = stack_file(stack, root)
    if not _STACK_NAME.fullmatch(stack) or not path.is_file():
        raise UnknownStackError(stack, list_stacks(root))
    return path


MAX_STACK_FILE_BYTES = 1024 * 1024
"""A stack file is hand-edited text: about 5000 machines with their device hashes fit in 1 MiB."""
MAX_STACK_NODES = 200_000
"""Values a stack file may hold, each YAML alias counted as the whole node it repeats: a few hundred
bytes of nested aliases ("billion laughs") would otherwise expand to billions during validation."""
MAX_STACK_DEPTH = 64
"""Nesting a stack file may use; the stack model itself is about 8 levels deep."""
_EVENT_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_stack_text(path: Path, stack: str | None = None) -> str:
    """The text of a stack file, refused (naming the file) unless either YAML loader can build it safely.

    Every reader of stack files (:func:`read_stack_settings`, :class:`infra.stackfile.StackFile`)
    starts here: at most :data:`MAX_STACK_FILE_BYTES`, UTF-8 (one leading byte-order mark allowed,
    as YAML does), nested at most :data:`MAX_STACK_DEPTH` deep, at most :data:`MAX_STACK_NODES` values.
    """

    def refuse(message: str) -> NoReturn:
        raise StackConfigError([Problem(str(path), message)], stack)

    try:
        size = path.stat().st_size
        if size > MAX_STACK_FILE_BYTES:
            refuse(f"is {size} bytes; a stack file may have at most {MAX_STACK_FILE_BYTES} (1 MiB)")
        data = path.read_bytes()
    except OSError as error:
        refuse(f"cannot be read: {error.strerror}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        refuse(f"is not UTF-8 text: byte 0x{data[error.start]:02x} on line {line} (save it as UTF-8)")
    if "\ufeff" in text:
        line = text.count("\n", 0, text.index("\ufeff")) + 1
        refuse(f"has a stray byte-order mark (U+FEFF) on line {line}; only the first character may be one")
    try:
        _check_yaml_shape(text, refuse)
    except yaml.YAMLError as error:
        refuse(f"is not valid YAML: {error}")
    return text


def _check_yaml_shape(text: str, refuse: Callable[[str], NoReturn]) -> None:
    """Bound the nesting and the expanded size of a YAML text from its parser events alone, and
    refuse a mapping key given twice (PyYAML would keep the last silently).

    One pass, no objects built: each anchored node's size is recorded when it closes, and an alias
    adds that size to its parent. An alias of a node still open (recursion) is refused too.
    """
    anchor_sizes: dict[str, int] = {}
    open_anchors: list[str | None] = []
    open_sizes: list[int] = []
    # Per open collection: a mapping's keys seen so far (key -> line) and whether a key comes next.
    open_keys: list[dict[str, int] | None] = []
    key_next: list[bool] = []

    def completed(key: str | None, line: int) -> None:
        if not open_keys or open_keys[-1] is None:
            return
        if key_next[-1] and key is not None:
            if key in open_keys[-1]:
                refuse(f"key {_clip(key)!r} is given twice (lines {open_keys[-1][key]} and {line})")
            open_keys[-1][key] = line
        key_next[-1] = not key_next[-1]

    for event in yaml.parse(text, Loader=_EVENT_LOADER):
        line = event.start_mark.line + 1 if event.start_mark else 0
        if isinstance(event, yaml.CollectionStartEvent):
            if len(open_sizes) == MAX_STACK_DEPTH:
                refuse(f"nests deeper than {MAX_STACK_DEPTH} levels (line {line})")
            open_anchors.append(event.anchor)
            open_sizes.append(1)
            open_keys.append({} if isinstance(event, yaml.MappingStartEvent) else None)
            key_next.append(True)
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, size = open_anchors.pop(), open_sizes.pop()
            open_keys.pop(), key_next.pop()
            completed(None, line)
        elif isinstance(event, yaml.ScalarEvent):
            anchor, size = event.anchor, 1
            completed(event.value, line)
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in anchor_sizes:
                refuse(
                    f"alias *{_clip(event.anchor or '')} on line {line} repeats no node defined before it "
                    "(an undefined anchor, or the node that holds the alias)"
                )
            anchor, size = None, anchor_sizes[event.anchor]
            completed(None, line)
        else:
            continue
        if anchor is not None:
            anchor_sizes[anchor] = size
        if open_sizes:
            open_sizes[-1] += size
            size = open_sizes[-1]
        if size > MAX_STACK_NODES:
            refuse(
                f"expands to more than {MAX_STACK_NODES} values (line {line}): YAML aliases "
                "(*name) repeat their anchor's whole node each time"
            )


def read_stack_settings(path: Path, stack: str | None = None) -> dict[str, Any]:
    """The ``ironlink:`` settings of a stack file, keys without the namespace."""
    text = read_stack_text(path, stack)
    try:
        document = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise StackConfigError([Problem(str(path), f"is not valid YAML: {error}")], stack) from error
    config = document.get("config") if isinstance(document, dict) else None
    if not isinstance(config, dict):
        raise StackConfigError([Problem(str(path), "has no 'config:' mapping")], stack)
    prefix = NAMESPACE + ":"
    return {
        key[len(prefix) :]: value
        for key, value in config.items()
        if isinstance(key, str) and key.startswith(prefix)
    }


def load_platform(stack: str, root: Path | None = None) -> PlatformConfig:
    """A platform stack's own config, no tenant: what its ``pulumi up`` declares."""
    if is_tenant_stack(stack):
        raise UnknownStackError(stack, platform_stacks(root))
    return parse_platform_stack(read_stack_settings(existing_stack_file(stack, root), stack), stack)


def platform_stacks(root: Path | None = None) -> list[str]:
    return [stack for stack in list_stacks(root) if not is_tenant_stack(stack)]


def tenant_stacks(platform: str, root: Path | None = None) -> list[str]:
    """The tenant stacks of ``platform``, by file name (each file's own ``platform`` is checked
    when it is loaded)."""
    return [stack for stack in list_stacks(root) if stack.startswith(platform + ".")]


def load_tenant_stack(
    stack: str, platform: PlatformConfig | None = None, root: Path | None = None
) -> TenantStackConfig:
    """Read and validate ``stacks/Pulumi.<platform>.<tenant>.yaml`` (``platform``: its platform's
    config when the caller has it already)."""
    settings = read_stack_settings(existing_stack_file(stack, root), stack)
    if platform is None:
        name = settings.get("platform")
        if not isinstance(name, str) or is_tenant_stack(name) or not _STACK_NAME.fullmatch(name):
            raise StackConfigError(
                [Problem(_path(["platform"]), f"{_show(name)} is not a platform stack")], stack
            )
        platform = load_platform(name, root)
    return parse_tenant_stack(settings, stack, platform)


def load_stack(stack: str, root: Path | None = None) -> PlatformConfig:
    """A whole region as the tools see it: the platform stack ``stack`` with the tenants of its
    tenant stacks (every tenant stack is validated; all problems are raised together)."""
    platform = load_platform(stack, root)
    tenants: list[Tenant] = []
    problems: list[Problem] = []
    for name in tenant_stacks(stack, root):
        try:
            tenants.append(load_tenant_stack(name, platform, root).tenant)
        except StackConfigError as error:
            problems.extend(Problem(f"{name}: {p.path}", p.message) for p in error.problems)
    if problems:
        raise StackConfigError(problems, stack)
    return platform.model_copy(update={"tenants": tenants})


def settings_from_pulumi_config(values: Mapping[str, str]) -> dict[str, Any]:
    """Turn the engine's flat config (``{"ironlink:broker": "<json>"}``) into settings.

    Structured values arrive as JSON strings; scalars as plain strings.
    """
    prefix = NAMESPACE + ":"
    settings: dict[str, Any] = {}
    for key, text in values.items():
        if not key.startswith(prefix):
            continue
        try:
            settings[key[len(prefix) :]] = json.loads(text)
        except (TypeError, ValueError):
            settings[key[len(prefix) :]] = text
    return settings
