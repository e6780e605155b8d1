"""The canonical telemetry contract: payload versions, their mapping forward, and :func:`decode`.

A machine publishes JSON to ``ironlink/<tenant>/<site>/<machine>/telemetry``. The payload names its
``schema_version``; every version is mapped forward to the newest (:data:`CURRENT_SCHEMA_VERSION`),
so the rest of the platform only ever sees a :class:`TelemetryV2`:

- **v1** is the PoC gateway format: whole-second ``ts``, a list of ``signals`` that may carry the
  vendor's signal names (``T_OIL``); the machine type comes from the registry.
- **v2** is canonical: it declares its ``machine_type``, ``ts`` may carry sub-second precision and
  ``metrics`` uses the catalog's canonical names only, within the catalog's bounds.
- **v3** is v2 with the gateway's sequence id ``seq`` (gateway, boot, n): the worker confirms what
  it stored on the machine's receipts topic, so a gateway forgets a reading only once it is stored.
- **v4** is v3 with an optional ``historical: true`` (a reading backfilled from a gateway's history
  lane, stored as such so dashboards and alerts can tell it from live data), and a second document
  kind, the **gap record** (``"kind": "gap"``, :class:`GapRecordV4`): readings a gateway had to drop
  before they were confirmed (machine, time range, count, reason, seq range), stored in the
  registry's ``telemetry_gaps`` and confirmed on the receipts topic like readings.
- A **batch** (:func:`unpack`) carries several v4 documents of one machine in one MQTT message:
  :data:`BATCH_MAGIC`, then a zlib (deflate) stream of the documents, one JSON text per line. It is
  marked in the payload, not by an MQTT property, so it stays a batch wherever the payload goes
  (the worker's spool, a dead letter and its replay). Every line is decoded on its own, as if it had
  come alone: one bad line is dead-lettered, the others are stored.

:func:`decode` never raises on input: it answers :class:`Accepted` or :class:`Rejected` with a
machine-readable :class:`Reason`, which the worker puts on the dead-letter topic. The JSON Schema
files in ``ingest/schemas/`` are generated from these models (``python -m ingest.jsonschema``).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from infra.config import DNS_LABEL_PATTERN, MachineTypeName
from infra.tenancy import TELEMETRY_LEAF, TOPIC_ROOT
from ingest.catalog import MACHINE_TYPES, MachineType, Metric

CURRENT_SCHEMA_VERSION = 4
SCHEMA_VERSIONS = (1, 2, 3, 4)
# A telemetry message is a few hundred bytes; anything far larger is a broken or hostile sender.
# A compressed batch counts its compressed bytes here; what it decompresses to is bounded apart.
DEFAULT_MAX_PAYLOAD_BYTES = 16 * 1024
BATCH_MAGIC = b"ironlink.batch.v4+zlib\n"
# Bounds of one batch once decompressed: a zip bomb stops at the first byte past them.
DEFAULT_MAX_BATCH_BYTES = 1024 * 1024
DEFAULT_MAX_BATCH_DOCUMENTS = 2000
# Why a gateway dropped readings (its store's caps: edge/store.py DROP_REASONS).
GapReason = Literal["max_bytes", "disk_headroom", "max_age"]
# ``ts`` is epoch *seconds*: this range refuses milliseconds (13 digits) and nonsense dates.
EPOCH_MIN = 946_684_800  # 2000-01-01T00:00:00Z
EPOCH_MAX = 4_102_444_800  # 2100-01-01T00:00:00Z

Status = Literal["running", "stopped", "fault"]
MachineKey = tuple[str, str, str]  # (tenant_id, site_id, machine_id)


class Reason(StrEnum):
    """Why a message was dead-lettered (the ``reason`` of a dead letter, a metric label)."""

    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    UNKNOWN_SCHEMA_VERSION = "unknown_schema_version"
    BATCH_TOO_LARGE = "batch_too_large"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    INVALID_VALUE = "invalid_value"
    UNKNOWN_FIELD = "unknown_field"
    UNKNOWN_METRIC = "unknown_metric"
    OUT_OF_BOUNDS = "out_of_bounds"
    BAD_TOPIC = "bad_topic"
    TOPIC_MISMATCH = "topic_mismatch"
    UNKNOWN_MACHINE = "unknown_machine"
    MACHINE_TYPE_MISMATCH = "machine_type_mismatch"
    UNKNOWN_TENANT = "unknown_tenant"
    TS_IN_FUTURE = "ts_in_future"
    TS_TOO_OLD = "ts_too_old"
    QUOTA_EXCEEDED = "quota_exceeded"
    MONTHLY_QUOTA_EXCEEDED = "monthly_quota_exceeded"  # the tier's messages per month (ingest/usage.py)
    STORE_REJECTED = "store_rejected"
    STORE_UNAVAILABLE = "store_unavailable"
    INTERNAL_ERROR = "internal_error"


class ContractError(ValueError):
    """A payload that parses but breaks a rule of the contract."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ------------------------------------------------------------------------------------- models
def check_metric(machine_type: MachineType, name: str, value: float) -> None:
    """A canonical metric of ``machine_type`` within its bounds, or a pydantic error saying why."""
    metric = machine_type.metric(name)
    if metric is None:
        canonical = machine_type.canonical_name(name)
        hint = f"; v2 takes the canonical name {canonical!r}" if canonical else ""
        raise PydanticCustomError(
            "unknown_metric",
            "'{name}' is not a metric of {machine_type}{hint}",
            {"name": name, "machine_type": machine_type.name, "hint": hint},
        )
    if not metric.minimum <= value <= metric.maximum:
        raise PydanticCustomError(
            "out_of_bounds",
            "{name}={value} is outside {minimum}..{maximum} {unit}",
            {
                "name": name,
                "value": value,
                "minimum": metric.minimum,
                "maximum": metric.maximum,
                "unit": metric.unit,
            },
        )


def _signal_names(machine_type: MachineType) -> list[str]:
    return [name for metric in machine_type.metrics for name in (metric.name, *metric.vendor_signals)]


def _catalog_schema(schema: dict[str, Any]) -> None:
    """Spell the catalog into the v2 JSON Schema: per machine type, its metrics, units and bounds."""
    schema["allOf"] = [
        {
            "if": {"properties": {"machine_type": {"const": machine_type.name}}},
            "then": {
                "properties": {
                    "metrics": {
                        "additionalProperties": False,
                        "properties": {
                            metric.name: _metric_schema(metric) for metric in machine_type.metrics
                        },
                    }
                }
            },
        }
        for machine_type in MACHINE_TYPES.values()
    ]


def _metric_schema(metric: Metric) -> dict[str, Any]:
    return {
        "type": "number",
        "minimum": metric.minimum,
        "maximum": metric.maximum,
        "description": f"{metric.unit}; vendor signals (v1): {', '.join(metric.vendor_signals)}",
    }


_MACHINE_TYPE_NAMES: list[JsonValue] = [*sorted(MACHINE_TYPES)]
# JSON Schema counts 2.0 as the integer 2 and cannot say otherwise; the decoder does not (see below).
_VERSION_DESCRIPTION = 'Payload version: a JSON integer (2.0, true or "2" are refused by the worker).'


class _Document(BaseModel):
    """What every document shares. Strict (no "12" for 12, no extra keys): the contract is the moat,
    and a field nobody validates today is a field nobody can rely on tomorrow. Ids follow the stack
    config's rules (``infra.config.TenantId`` & co.), checked in pydantic-core rather than Python
    because every message pays for them; they also keep tags safe to write unescaped."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    tenant_id: str = Field(
        pattern=DNS_LABEL_PATTERN,
        max_length=32,
        description="Tenant id; must equal the topic's tenant level.",
    )
    site_id: str = Field(
        pattern=DNS_LABEL_PATTERN, max_length=32, description="Site id; must equal the topic's site level."
    )
    machine_id: str = Field(
        pattern=DNS_LABEL_PATTERN,
        max_length=48,
        description="Machine id; must equal the topic's machine level.",
    )


class _Payload(_Document):
    """What every reading shares: its machine's ids and state."""

    status: Status = Field(description="Operating state of the machine at `ts`.")


class Signal(BaseModel):
    """One v1 signal: a canonical metric name or one of the vendor names the catalog maps."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=64)
    value: float


class TelemetryV2(_Payload):
    """Version 2, canonical: declared machine type, canonical metric names, sub-second ``ts``."""

    model_config = ConfigDict(json_schema_extra=_catalog_schema)

    schema_version: Literal[2] = Field(description=_VERSION_DESCRIPTION)
    machine_type: MachineTypeName = Field(
        description="Catalog machine type; must match the registry where the machine is registered.",
        json_schema_extra={"enum": _MACHINE_TYPE_NAMES},
    )
    ts: float = Field(ge=EPOCH_MIN, lt=EPOCH_MAX, description="Sample time, epoch seconds (UTC).")
    metrics: dict[str, float] = Field(
        min_length=1, description="Canonical metric name -> value, within the catalog's bounds."
    )

    @field_validator("metrics")
    @classmethod
    def _within_catalog(cls, metrics: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        machine_type = MACHINE_TYPES.get(info.data.get("machine_type", ""))
        if machine_type is not None:
            for name, value in metrics.items():
                metric = machine_type.metric(name)
                if metric is None or not metric.minimum <= value <= metric.maximum:
                    check_metric(machine_type, name, value)
        return metrics


class SequenceId(BaseModel):
    """Where a reading stands in its gateway's stream: ``n`` counts up from 0 in each ``boot``.

    The worker confirms, per gateway and boot, the ranges of ``n`` it has stored (receipts on the
    machine's ``receipts`` topic), so a gateway forgets a reading only once it is in the store."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    gateway: str = Field(pattern=DNS_LABEL_PATTERN, max_length=63, description="The gateway's id.")
    boot: int = Field(ge=0, lt=2**32, description="The gateway's boot epoch (a new one per start).")
    n: int = Field(ge=0, lt=2**53, description="Counter within the boot.")


class TelemetryV3(TelemetryV2):
    """Version 3: version 2 and the gateway's sequence id (:class:`SequenceId`), for end-to-end
    receipts. The measurement is v2's: everything downstream reads a v3 message as a v2 one."""

    schema_version: Literal[3] = Field(description=_VERSION_DESCRIPTION)  # type: ignore[assignment]
    seq: SequenceId


class TelemetryV4(TelemetryV3):
    """Version 4 (a reading): version 3 and ``historical``, true for a reading a gateway backfills
    from its history lane rather than sending it live. Stored as the field ``historical=1`` of the
    same point (:mod:`ingest.points`); absent or false, the reading is live."""

    schema_version: Literal[4] = Field(description=_VERSION_DESCRIPTION)  # type: ignore[assignment]
    historical: bool = Field(
        default=False, description="True: backfilled by the gateway after an outage, not live."
    )


class GapSequence(BaseModel):
    """The seq range of a gap, within one boot of its gateway: the dropped readings' ``n`` lie in
    ``first_n..last_n`` (a range that may hold other machines' readings, never fewer than ``count``)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    gateway: str = Field(pattern=DNS_LABEL_PATTERN, max_length=63, description="The gateway's id.")
    boot: int = Field(ge=0, lt=2**32, description="The boot epoch of the dropped readings.")
    first_n: int = Field(ge=0, lt=2**53, description="Seq counter of the first dropped reading.")
    last_n: int = Field(ge=0, lt=2**53, description="Seq counter of the last dropped reading.")

    @model_validator(mode="after")
    def _ordered(self) -> GapSequence:
        if self.first_n > self.last_n:
            raise ValueError(f"first_n {self.first_n} is after last_n {self.last_n}")
        return self


class GapRecordV4(_Document):
    """A gap record (v4, ``"kind": "gap"``): readings of one machine a gateway dropped before the
    platform confirmed them, so that a loss is visible rather than silent. The gateway keeps
    sending it, its ``count`` growing while it drops more, until the worker confirms it stored
    (``telemetry_gaps`` in the registry, one row per gateway, boot, first seq and reason)."""

    schema_version: Literal[4] = Field(description=_VERSION_DESCRIPTION)
    kind: Literal["gap"] = Field(description="This document is a gap record, not a reading.")
    reason: GapReason = Field(description="The gateway's cap that dropped the readings.")
    count: int = Field(ge=1, lt=2**53, description="Readings dropped.")
    first_ts: float = Field(ge=EPOCH_MIN, lt=EPOCH_MAX, description="Oldest dropped reading, epoch s.")
    last_ts: float = Field(ge=EPOCH_MIN, lt=EPOCH_MAX, description="Newest dropped reading, epoch s.")
    seq: GapSequence

    @model_validator(mode="after")
    def _consistent(self) -> GapRecordV4:
        if self.first_ts > self.last_ts:
            raise ValueError(f"first_ts {self.first_ts} is after last_ts {self.last_ts}")
        span = self.seq.last_n - self.seq.first_n + 1
        if self.count > span:
            raise ValueError(f"count {self.count} is more than the {span} seqs of first_n..last_n")
        return self


class TelemetryV1(_Payload):
    """Version 1, the PoC gateway format: vendor signal names, whole seconds, no machine type."""

    schema_version: Literal[1] = Field(description=_VERSION_DESCRIPTION)
    ts: int = Field(ge=EPOCH_MIN, lt=EPOCH_MAX, description="Sample time, whole epoch seconds (UTC).")
    signals: list[Signal] = Field(min_length=1, max_length=256)

    def to_v2(self, machine_type: str) -> TelemetryV2:
        """Map forward: vendor signal names become canonical metric names of ``machine_type``.

        Raises :class:`ContractError` for an unknown or repeated signal, ``ValidationError`` for a
        value outside the catalog's bounds.
        """
        catalog = MACHINE_TYPES[machine_type]
        metrics: dict[str, float] = {}
        for index, signal in enumerate(self.signals):
            name = catalog.canonical_name(signal.name)
            if name is None:
                raise ContractError(
                    Reason.UNKNOWN_METRIC,
                    f"signals[{index}].name: {signal.name!r} is not a signal of {machine_type} "
                    f"(known: {', '.join(_signal_names(catalog))})",
                )
            if name in metrics:
                raise ContractError(
                    Reason.INVALID_VALUE, f"signals[{index}].name: {signal.name!r} repeats metric {name!r}"
                )
            metrics[name] = signal.value
        return TelemetryV2(
            schema_version=2,
            tenant_id=self.tenant_id,
            site_id=self.site_id,
            machine_id=self.machine_id,
            machine_type=machine_type,
            ts=float(self.ts),
            status=self.status,
            metrics=metrics,
        )


_GAP_TAG = "4-gap"


def _version_tag(value: Any) -> str | None:
    """The union's tag: ``schema_version`` only when it is a JSON integer. A ``Literal`` tag would
    look it up by Python equality, where ``True == 1.0 == 1``, and take ``true`` or ``1.0`` for
    version 1. None (no such tag) for a missing or non-integer version or a payload not an object.
    A v4 document with ``"kind": "gap"`` is a gap record; any other v4 document is read as a reading
    (so a ``kind`` of another value is an unknown field of it)."""
    version = value.get("schema_version") if isinstance(value, dict) else None
    if type(version) is not int:
        return None
    return _GAP_TAG if version == 4 and value.get("kind") == "gap" else str(version)


Telemetry = Annotated[
    Annotated[TelemetryV1, Tag("1")]
    | Annotated[TelemetryV2, Tag("2")]
    | Annotated[TelemetryV3, Tag("3")]
    | Annotated[TelemetryV4, Tag("4")]
    | Annotated[GapRecordV4, Tag(_GAP_TAG)],
    Discriminator(_version_tag),
]
_TELEMETRY: TypeAdapter[TelemetryV1 | TelemetryV2 | TelemetryV3 | TelemetryV4 | GapRecordV4] = TypeAdapter(
    Telemetry
)
# The reading of each version, and the other document kinds (their JSON Schema files).
MODELS: dict[int, type[_Payload]] = {1: TelemetryV1, 2: TelemetryV2, 3: TelemetryV3, 4: TelemetryV4}
DOCUMENT_KINDS: dict[str, type[_Document]] = {"gap-v4": GapRecordV4}


# ------------------------------------------------------------------------------------- decode
@dataclass(frozen=True, slots=True)
class Accepted:
    """A valid message, mapped forward to the canonical version."""

    telemetry: TelemetryV2
    schema_version: int
    seq: SequenceId | None = None
    historical: bool = False


@dataclass(frozen=True, slots=True)
class AcceptedGap:
    """A valid gap record."""

    gap: GapRecordV4


@dataclass(frozen=True, slots=True)
class Rejected:
    """An invalid message: the reason is machine-readable, the detail names the field and value."""

    reason: Reason
    detail: str


def parse_topic(topic: str) -> MachineKey | None:
    """``(tenant, site, machine)`` of a telemetry topic, None for any other topic."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != TOPIC_ROOT or parts[4] != TELEMETRY_LEAF or not all(parts[1:4]):
        return None
    return parts[1], parts[2], parts[3]


def decode(
    topic: str,
    payload: bytes,
    *,
    machine_types: Mapping[MachineKey, str] | None = None,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> Accepted | AcceptedGap | Rejected:
    """Validate one document against the contract and map a reading forward to :class:`TelemetryV2`.

    ``machine_types`` is the registry's view (machine → type): v1 payloads need it to resolve
    their type, and a v2 payload's declared type must agree with it. A batch is not one document:
    :func:`unpack` it first. Never raises on input.
    """
    if len(payload) > max_bytes:
        return Rejected(Reason.OVERSIZED, f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    key = parse_topic(topic)
    if key is None:
        return Rejected(
            Reason.BAD_TOPIC, f"topic {topic[:200]!r} is not {TOPIC_ROOT}/<tenant>/<site>/<machine>/telemetry"
        )
    try:
        message = _TELEMETRY.validate_json(payload)
    except ValidationError as error:
        return _rejection(error, tagged=True)
    mismatch = _topic_mismatch(key, message)
    if mismatch:
        return Rejected(Reason.TOPIC_MISMATCH, mismatch)
    if isinstance(message, GapRecordV4):
        return AcceptedGap(message)
    known = machine_types.get(key) if machine_types is not None else None
    if isinstance(message, TelemetryV2):
        if known is not None and known != message.machine_type:
            return Rejected(
                Reason.MACHINE_TYPE_MISMATCH,
                f"machine_type: {message.machine_type!r} but the registry has {known!r} for this machine",
            )
        seq = message.seq if isinstance(message, TelemetryV3) else None
        historical = isinstance(message, TelemetryV4) and message.historical
        return Accepted(message, message.schema_version, seq, historical)
    if known is None:
        return Rejected(
            Reason.UNKNOWN_MACHINE, f"machine {'/'.join(key)!r} is not registered (v1 needs its type)"
        )
    try:
        return Accepted(message.to_v2(known), 1)
    except ContractError as error:
        return Rejected(error.reason, error.detail)
    except ValidationError as error:
        return _rejection(error, tagged=False)


def unpack(
    topic: str,
    payload: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    max_batch_documents: int = DEFAULT_MAX_BATCH_DOCUMENTS,
) -> list[bytes] | Rejected:
    """The documents of one MQTT message, each to :func:`decode` on its own: the payload itself, or
    a batch's lines. A batch is refused whole only when it cannot be read (too large compressed,
    past ``max_batch_bytes`` or ``max_batch_documents`` once decompressed, not a zlib stream, on a
    topic outside the contract); then it is one dead letter. Never raises on input."""
    if not payload.startswith(BATCH_MAGIC):
        return [payload]
    if len(payload) > max_bytes:
        return Rejected(Reason.OVERSIZED, f"batch of {len(payload)} bytes exceeds the limit of {max_bytes}")
    if parse_topic(topic) is None:
        return Rejected(
            Reason.BAD_TOPIC, f"topic {topic[:200]!r} is not {TOPIC_ROOT}/<tenant>/<site>/<machine>/telemetry"
        )
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(payload[len(BATCH_MAGIC) :], max_batch_bytes + 1)
    except zlib.error as error:
        return Rejected(Reason.MALFORMED, f"batch: not a zlib (deflate) stream after its marker: {error}")
    if len(body) > max_batch_bytes:
        return Rejected(
            Reason.BATCH_TOO_LARGE, f"batch: decompresses to more than the limit of {max_batch_bytes} bytes"
        )
    if not inflater.eof:
        return Rejected(Reason.MALFORMED, "batch: the zlib stream is truncated")
    if inflater.unused_data:
        return Rejected(Reason.MALFORMED, f"batch: {len(inflater.unused_data)} bytes after its zlib stream")
    documents = body.removesuffix(b"\n").split(b"\n") if body else []
    if not documents:
        return Rejected(Reason.MALFORMED, "batch: holds no document")
    if len(documents) > max_batch_documents:
        return Rejected(
            Reason.BATCH_TOO_LARGE,
            f"batch: {len(documents)} documents, more than the limit of {max_batch_documents}",
        )
    return documents


def pack(documents: list[bytes]) -> bytes:
    """A batch of v4 documents (each a JSON text without a newline), as :func:`unpack` reads it."""
    return BATCH_MAGIC + zlib.compress(b"\n".join(documents))


def _topic_mismatch(key: MachineKey, message: _Document) -> str | None:
    """A device may only speak for the machine its topic (and so its broker identity) names."""
    if (message.tenant_id, message.site_id, message.machine_id) == key:
        return None
    for field, value, expected in zip(
        ("tenant_id", "site_id", "machine_id"),
        (message.tenant_id, message.site_id, message.machine_id),
        key,
        strict=True,
    ):
        if value != expected:
            return f"{field}: {value!r} does not match the topic's {expected!r}"
    return None


_REASON_OF_ERROR = {
    "json_invalid": Reason.MALFORMED,
    "dict_type": Reason.MALFORMED,
    "union_tag_invalid": Reason.UNKNOWN_SCHEMA_VERSION,
    "union_tag_not_found": Reason.UNKNOWN_SCHEMA_VERSION,
    "missing": Reason.MISSING_FIELD,
    "extra_forbidden": Reason.UNKNOWN_FIELD,
    "unknown_metric": Reason.UNKNOWN_METRIC,
    "out_of_bounds": Reason.OUT_OF_BOUNDS,
}


def _rejection(error: ValidationError, *, tagged: bool) -> Rejected:
    """The first problem decides the reason; the detail names the field and the value found.
    ``tagged``: the error came through the version union, whose tag leads every location."""
    first = error.errors(include_url=False)[0]
    kind = first["type"]
    reason = _REASON_OF_ERROR.get(kind)
    if reason is None:
        reason = Reason.WRONG_TYPE if kind.endswith("_type") else Reason.INVALID_VALUE
    if reason is Reason.UNKNOWN_SCHEMA_VERSION and not isinstance(first["input"], dict):
        reason, detail = (
            Reason.MALFORMED,
            f"payload: Input should be an object (got {_short(first['input'])})",
        )
    elif reason is Reason.UNKNOWN_SCHEMA_VERSION:
        detail = _version_problem(first["input"])
    elif reason is Reason.MALFORMED:
        detail = f"payload: {first['msg']}" + (
            f" (got {_short(first['input'])})" if kind == "dict_type" else ""
        )
    elif kind == "value_error":  # our own validators name the value already
        detail = f"{_location(first['loc'][1:] if tagged else first['loc'])}: {first['ctx']['error']}"
    else:
        detail = f"{_location(first['loc'][1:] if tagged else first['loc'])}: {first['msg']}"
        if kind not in ("missing", "unknown_metric", "out_of_bounds"):
            detail += f" (got {_short(first['input'])})"
    if error.error_count() > 1:
        detail += f" (+{error.error_count() - 1} more)"
    return Rejected(reason, detail)


_JSON_KINDS = {
    bool: "a boolean",
    float: "a decimal number",
    str: "a string",
    list: "an array",
    dict: "an object",
}


def _version_problem(payload: dict[str, Any]) -> str:
    if "schema_version" not in payload:
        return "schema_version: is required"
    found = payload["schema_version"]
    supported = ", ".join(map(str, SCHEMA_VERSIONS))
    kind = (
        ""
        if type(found) is int
        else f"; a version is a JSON integer, not {_JSON_KINDS.get(type(found), 'null')}"
    )
    return (
        f"schema_version: {_short(found, render=json.dumps)} is not supported (supported: {supported}{kind})"
    )


def _location(parts: tuple[int | str, ...]) -> str:
    """``signals[2].value`` for pydantic's ``("signals", 2, "value")`` (the version tag dropped)."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "payload"


def _short(value: Any, limit: int = 80, render: Callable[[Any], str] = repr) -> str:
    text = render(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
