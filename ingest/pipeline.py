"""From one MQTT message to either a point for the store or a dead letter: no I/O here.

The worker feeds every delivery through :meth:`Pipeline.process`; the order of checks is the
contract (:func:`ingest.contract.decode`), the tenant's route, the tenant's quota, then the
derived metrics and the line protocol. Nothing that a message contains can make it raise: an
unforeseen error becomes a dead letter with reason ``internal_error``, because an exception here
would leave the message unacknowledged, redelivered, and failing again forever.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime

from ingest.contract import Accepted, Reason, Rejected, decode, parse_topic
from ingest.derive import DerivedMetrics
from ingest.points import to_line
from ingest.settings import WorkerSettings

UNKNOWN_TENANT_LABEL = "_unknown"


@dataclass(frozen=True, slots=True)
class Point:
    """An accepted message as the line the store gets."""

    tenant_id: str
    line: str
    ts: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A rejected message: why, and the JSON document published to its dead-letter topic."""

    tenant_label: str
    reason: Reason
    detail: str
    document: bytes


def dead_letter_document(
    rejected: Rejected, topic: str, payload: bytes, received_at: float, max_payload_bytes: int
) -> bytes:
    """``{reason, detail, topic, payload, payload_encoding, payload_bytes, truncated, received_at}``:
    the payload as text when it is UTF-8, else base64, cut to ``max_payload_bytes``."""
    kept = payload[:max_payload_bytes]
    try:
        text, encoding = kept.decode("utf-8"), "text"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(kept).decode("ascii"), "base64"
    document = {
        "reason": rejected.reason.value,
        "detail": rejected.detail,
        "topic": topic,
        "payload": text,
        "payload_encoding": encoding,
        "payload_bytes": len(payload),
        "truncated": len(kept) < len(payload),
        "received_at": datetime.fromtimestamp(received_at, UTC).isoformat(timespec="milliseconds"),
    }
    return json.dumps(document).encode()


class TenantQuota:
    """Messages per second per tenant, counted on *payload* time in 10 s buckets.

    Counting on payload time rather than arrival time means a backlog drained after an outage
    (minutes of telemetry arriving in seconds) is not mistaken for a flood.
    """

    BUCKET_S = 10
    KEEP_BUCKETS = 12

    def __init__(self, messages_per_second: float) -> None:
        self.limit = max(1, math.ceil(messages_per_second * self.BUCKET_S))
        self._counts: dict[int, int] = {}

    def admit(self, ts: float) -> bool:
        bucket = int(ts // self.BUCKET_S)
        count = self._counts.get(bucket, 0)
        if count >= self.limit:
            return False
        self._counts[bucket] = count + 1
        if len(self._counts) > self.KEEP_BUCKETS:
            for old in sorted(self._counts)[: -self.KEEP_BUCKETS]:
                del self._counts[old]
        return True


class Pipeline:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self._machine_types = settings.machine_types()
        self._quotas = {
            tenant: TenantQuota(route.messages_per_second)
            for tenant, route in settings.tenants.items()
            if route.messages_per_second is not None
        }
        self.derived = DerivedMetrics(settings.derived_window_s, settings.derived_max_gap_s)

    def tenant_label(self, topic: str) -> str:
        """The tenant a topic names, as a metric label (bounded: only configured tenants)."""
        key = parse_topic(topic)
        return key[0] if key is not None and key[0] in self.settings.tenants else UNKNOWN_TENANT_LABEL

    def process(self, topic: str, payload: bytes, received_at: float) -> Point | DeadLetter:
        try:
            outcome = self._process(topic, payload)
        except Exception as error:  # a bug must not become a poison message: see module docstring
            outcome = Rejected(Reason.INTERNAL_ERROR, f"{type(error).__name__}: {error}")
        if isinstance(outcome, Point):
            return outcome
        document = dead_letter_document(
            outcome, topic, payload, received_at, self.settings.dead_letter_payload_bytes
        )
        return DeadLetter(self.tenant_label(topic), outcome.reason, outcome.detail, document)

    def _process(self, topic: str, payload: bytes) -> Point | Rejected:
        result = decode(
            topic, payload, machine_types=self._machine_types, max_bytes=self.settings.max_payload_bytes
        )
        if not isinstance(result, Accepted):
            return result
        sample = result.telemetry
        if sample.tenant_id not in self.settings.tenants:
            return Rejected(
                Reason.UNKNOWN_TENANT, f"tenant_id: {sample.tenant_id!r} is not a tenant of this platform"
            )
        quota = self._quotas.get(sample.tenant_id)
        if quota is not None and not quota.admit(sample.ts):
            return Rejected(
                Reason.QUOTA_EXCEEDED,
                f"tenant {sample.tenant_id!r} is over its quota of "
                f"{self.settings.tenants[sample.tenant_id].messages_per_second} messages/s",
            )
        return Point(sample.tenant_id, to_line(sample, self.derived.update(sample)), sample.ts)
