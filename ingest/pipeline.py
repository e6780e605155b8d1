"""From one MQTT message to either a point for the store or a dead letter: no I/O here.

The worker feeds every delivery through :meth:`Pipeline.process_message`, which unpacks a batch
(:func:`ingest.contract.unpack`) and takes each of its documents through :meth:`Pipeline.process`
on its own, as if it had come alone. The order of checks is the
contract (:func:`ingest.contract.decode`), the tenant's route, ``ts`` against the arrival time
(neither further ahead than the clock skew allowed nor older than the tenant's tier keeps), the
tenant's quota (each reading of a batch counts), then the derived metrics and the line protocol.
A gap record is checked for its tenant and machine and becomes a :class:`GapRecord` for the
registry. Nothing that a message contains
can make it raise: an unforeseen error becomes a dead letter with reason ``internal_error``,
because an exception here would leave the message unacknowledged, redelivered, and failing again
forever.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from ingest.contract import (
    Accepted,
    AcceptedGap,
    MachineKey,
    Reason,
    Rejected,
    decode,
    parse_topic,
    unpack,
)
from ingest.derive import DerivedMetrics
from ingest.points import to_line
from ingest.settings import WorkerSettings
from registry.gaps import GapRow, epoch
from registry.tenant_routes import TenantStoreRoute

UNKNOWN_TENANT_LABEL = "_unknown"
Sequence = tuple[str, int, int]  # a v3 message's (gateway, boot, n)


@dataclass(frozen=True, slots=True)
class Point:
    """An accepted message as the line the store gets."""

    tenant_id: str
    line: str
    ts: float
    seq: Sequence | None = None
    """(gateway, boot, n) of a v3 message: what the worker's receipts confirm once stored."""


@dataclass(frozen=True, slots=True)
class GapRecord:
    """An accepted gap record as the registry row the worker stores (and then confirms)."""

    tenant_id: str
    row: GapRow


@dataclass(frozen=True, slots=True)
class Deferred:
    """A sequenced reading (v3, v4) refused *for now*: not stored, not dead-lettered, and so not
    in any receipt. Its gateway keeps every reading until a receipt covers it and sends it again
    later, so a backfill faster than the tenant's quota is slowed down to it, instead of being
    dead-lettered, resent and dead-lettered again. Counted ``ironlink_ingest_deferred_total``."""

    tenant_id: str
    reason: str
    """Why, as the metric's label: :data:`DEFERRED_QUOTA`."""
    detail: str
    seq: Sequence


DEFERRED_QUOTA = "quota"
"""The per-second quota's bucket was empty (:class:`TenantQuota`)."""


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
    """One tenant's messages per second at this replica: a token bucket on *arrival* time.

    Arrival, on the worker's monotonic clock, because the payload's ``ts`` is the sender's to
    choose: counted on it, a flood spread over made-up timestamps passed. The bucket starts full
    and holds ``burst_s`` seconds of the rate, so a backlog the broker queued during a worker
    restart (tens of seconds) or a short burst passes. Beyond it, an unsequenced message is
    dead-lettered ``quota_exceeded``, counted and replayable, never dropped; a sequenced reading
    is :class:`Deferred` (its gateway holds it and sends it again).
    """

    def __init__(
        self, messages_per_second: float, burst_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = messages_per_second
        self.capacity = max(1.0, messages_per_second * burst_s)
        self._clock = clock
        self._tokens = self.capacity
        self._last = clock()

    def admit(self) -> bool:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


@dataclass(frozen=True, slots=True)
class KnownTenant:
    """What the pipeline checks a tenant's messages against: its route and its quota here."""

    route: TenantStoreRoute
    quota: TenantQuota | None


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def _seconds(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")


class Pipeline:
    def __init__(self, settings: WorkerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        """``clock``: the monotonic clock the quota counts arrivals on."""
        self.settings = settings
        self._machine_types: Mapping[MachineKey, str] = settings.machine_types()
        # With a registry its fleet is the whole truth: a machine it lacks is unknown_machine in
        # every schema version (from settings, v2/v3 of a known tenant pass without a type check).
        self._registry_fleet = settings.registry_dsn is not None
        self._clock = clock
        self._tenants: Mapping[str, KnownTenant] = {}
        if not self._registry_fleet:
            self.use_tenants(settings.store_routes({}))
        self.derived = DerivedMetrics(settings.derived_window_s, settings.derived_max_gap_s)

    def use_machine_types(self, machine_types: Mapping[MachineKey, str]) -> None:
        """The registry's fleet (``ingest/fleet.py``, from its thread): the map is replaced whole,
        never changed in place, so each message sees one fleet or the next."""
        self._machine_types = machine_types

    def use_tenants(self, routes: Mapping[str, TenantStoreRoute]) -> None:
        """The tenant directory (the settings', or the registry's from the fleet thread), replaced
        whole like the fleet. A tenant whose quota is unchanged keeps its bucket: re-reading the
        registry must not hand anyone a fresh burst."""
        s, before = self.settings, self._tenants
        known = {}
        for tenant, route in routes.items():
            quota = None
            if route.messages_per_second is not None:
                old = before.get(tenant)
                if old is not None and old.route.messages_per_second == route.messages_per_second:
                    quota = old.quota
                else:
                    share = route.messages_per_second / s.quota_share_replicas
                    # Each replica admits its share: the broker spreads a shared subscription's
                    # messages evenly over the group's members (ingest/README.md, "Quota").
                    quota = TenantQuota(share, s.quota_burst_s, self._clock)
            known[tenant] = KnownTenant(route, quota)
        self._tenants = known

    def tenant_ids(self) -> list[str]:
        return sorted(self._tenants)

    def tenant_label(self, topic: str) -> str:
        """The tenant a topic names, as a metric label (bounded: only known tenants)."""
        key = parse_topic(topic)
        return key[0] if key is not None and key[0] in self._tenants else UNKNOWN_TENANT_LABEL

    def process_message(
        self, topic: str, payload: bytes, received_at: float
    ) -> list[tuple[bytes, Point | GapRecord | Deferred | DeadLetter]]:
        """Each document of one MQTT message (one, or a batch's) with its outcome. A batch that
        cannot be read is one dead letter of the whole payload; otherwise a document dead-lettered
        keeps its own bytes, so its replay is that document alone."""
        s = self.settings
        documents = unpack(
            topic,
            payload,
            max_bytes=s.max_payload_bytes,
            max_batch_bytes=s.max_batch_bytes,
            max_batch_documents=s.max_batch_documents,
        )
        if isinstance(documents, Rejected):
            return [(payload, self._dead_letter(documents, topic, payload, received_at))]
        return [(document, self.process(topic, document, received_at)) for document in documents]

    def process(
        self, topic: str, payload: bytes, received_at: float
    ) -> Point | GapRecord | Deferred | DeadLetter:
        """One document (not a batch: :meth:`process_message` unpacks those)."""
        try:
            outcome = self._process(topic, payload, received_at)
        except Exception as error:  # a bug must not become a poison message: see module docstring
            outcome = Rejected(Reason.INTERNAL_ERROR, f"{type(error).__name__}: {error}")
        if isinstance(outcome, Point | GapRecord | Deferred):
            return outcome
        return self._dead_letter(outcome, topic, payload, received_at)

    def _dead_letter(self, rejected: Rejected, topic: str, payload: bytes, received_at: float) -> DeadLetter:
        document = dead_letter_document(
            rejected, topic, payload, received_at, self.settings.dead_letter_payload_bytes
        )
        return DeadLetter(self.tenant_label(topic), rejected.reason, rejected.detail, document)

    def _process(
        self, topic: str, payload: bytes, received_at: float
    ) -> Point | GapRecord | Deferred | Rejected:
        machine_types = self._machine_types  # one reading: the fleet thread may swap it meanwhile
        result = decode(
            topic, payload, machine_types=machine_types, max_bytes=self.settings.max_payload_bytes
        )
        if isinstance(result, AcceptedGap):
            return self._gap(result, machine_types, received_at)
        if not isinstance(result, Accepted):
            return result
        sample = result.telemetry
        tenant = self._tenants.get(sample.tenant_id)  # one reading, like the fleet
        if tenant is None:  # before the machine: a removed tenant's machines went with it
            return Rejected(
                Reason.UNKNOWN_TENANT, f"tenant_id: {sample.tenant_id!r} is not a tenant of this platform"
            )
        machine = (sample.tenant_id, sample.site_id, sample.machine_id)
        if self._registry_fleet and machine not in machine_types:
            return Rejected(Reason.UNKNOWN_MACHINE, f"machine {'/'.join(machine)!r} is not registered")
        out_of_time = self._ts_problem(sample.ts, received_at, sample.tenant_id, tenant.route.max_age_s)
        if out_of_time is not None:
            return out_of_time
        quota = tenant.quota
        seq = (result.seq.gateway, result.seq.boot, result.seq.n) if result.seq else None
        if quota is not None and not quota.admit():
            detail = (
                f"tenant {sample.tenant_id!r} is over its quota of "
                f"{tenant.route.messages_per_second:g} messages/s: this replica "
                f"admits {quota.rate:g}/s (one of {self.settings.quota_share_replicas} sharing it) "
                f"with a burst of {quota.capacity:g} messages"
            )
            if seq is not None:  # its gateway holds it until a receipt covers it
                return Deferred(sample.tenant_id, DEFERRED_QUOTA, detail, seq)
            return Rejected(Reason.QUOTA_EXCEEDED, detail)
        line = to_line(sample, self.derived.update(sample), historical=result.historical)
        return Point(sample.tenant_id, line, sample.ts, seq)

    def _gap(
        self, result: AcceptedGap, machine_types: Mapping[MachineKey, str], received_at: float
    ) -> GapRecord | Rejected:
        """A gap record of a known tenant's registered machine. Its times are not checked against
        the arrival (a gap is old news by nature: the readings it counts were dropped for age)."""
        gap, seq = result.gap, result.gap.seq
        if gap.tenant_id not in self._tenants:
            return Rejected(
                Reason.UNKNOWN_TENANT, f"tenant_id: {gap.tenant_id!r} is not a tenant of this platform"
            )
        machine = (gap.tenant_id, gap.site_id, gap.machine_id)
        if self._registry_fleet and machine not in machine_types:
            return Rejected(Reason.UNKNOWN_MACHINE, f"machine {'/'.join(machine)!r} is not registered")
        row = GapRow(
            *machine,
            gateway=seq.gateway,
            boot=seq.boot,
            first_n=seq.first_n,
            last_n=seq.last_n,
            reason=gap.reason,
            count=gap.count,
            first_ts=epoch(gap.first_ts),
            last_ts=epoch(gap.last_ts),
            received_at=epoch(received_at),
        )
        return GapRecord(gap.tenant_id, row)

    def _ts_problem(
        self, ts: float, received_at: float, tenant_id: str, max_age_s: int | None
    ) -> Rejected | None:
        """Refused here rather than left to the store, which drops such a point: VictoriaMetrics
        after a 204 when it is > ~2 days ahead, InfluxDB with a 422 partial write when it is outside
        the bucket's retention."""
        ahead = ts - received_at
        if ahead > self.settings.max_clock_skew_s:
            return Rejected(
                Reason.TS_IN_FUTURE,
                f"ts: {ts!r} ({_iso(ts)}) is {_seconds(ahead)} s ahead of its arrival at "
                f"{_iso(received_at)}; at most {self.settings.max_clock_skew_s} s is allowed "
                "(ingest.max_clock_skew_s)",
            )
        if max_age_s is not None and -ahead > max_age_s:
            return Rejected(
                Reason.TS_TOO_OLD,
                f"ts: {ts!r} ({_iso(ts)}) is {_seconds(-ahead)} s older than its arrival at "
                f"{_iso(received_at)}; tenant {tenant_id!r} accepts at most {max_age_s} s "
                "(its retention tier's max_age)",
            )
        return None
