"""Readings into contract v4, checked by the worker's own decoder before they are stored.

The agent never re-implements a rule of the contract: it builds the v4 document and runs
``ingest.contract.decode`` on it with the machine's registered type, exactly as the worker will. A
reading the worker would dead-letter is dropped here with the same reason code (counted as
``rejected:<reason>``), and the ids in the payload are the gateway's own, so a ``topic_mismatch``
cannot leave the gateway.

A reading taken while its machine's session is down is marked ``historical`` here, once: it will
be backfilled from the history lane, and every send of it (latest lane, history, resends) carries
the same bytes, so a resend stays an identical rewrite in the store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from edge.config import Gateway, Machine
from infra.tenancy import telemetry_topic
from ingest.catalog import MACHINE_TYPES
from ingest.contract import Accepted, Rejected, Status, decode


@dataclass(frozen=True)
class Reading:
    """What an adapter saw: the sample time, the machine's state and metrics in canonical or vendor
    names (the catalog maps vendor names, as it does for v1 in the cloud)."""

    ts: float
    status: Status
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Normalized:
    """A reading as it will be published, without its seq (the store assigns it)."""

    machine_id: str
    ts: float
    metrics: tuple[str, ...]
    document: dict[str, object]


class Normalizer:
    """One per machine: its topic, its type, the ids every payload carries."""

    def __init__(self, gateway: Gateway, machine: Machine) -> None:
        self.gateway, self.machine = gateway, machine
        self.topic = telemetry_topic(gateway.tenant, gateway.site, machine.id)
        self._key = (gateway.tenant, gateway.site, machine.id)
        self._catalog = MACHINE_TYPES[machine.type]

    def normalize(self, reading: Reading, *, historical: bool = False) -> Normalized | Rejected:
        """The v4 document of a reading (seq ``n`` 0 as a placeholder), or the worker's rejection.
        ``historical``: taken while the machine's session was down (it will be backfilled)."""
        metrics = {
            self._catalog.canonical_name(name) or name: value for name, value in reading.metrics.items()
        }
        document: dict[str, object] = {
            "schema_version": 4,
            "tenant_id": self.gateway.tenant,
            "site_id": self.gateway.site,
            "machine_id": self.machine.id,
            "machine_type": self.machine.type,
            "ts": round(reading.ts, 3),
            "status": reading.status,
            "metrics": metrics,
            "seq": {"gateway": self.gateway.id, "boot": 0, "n": 0},
        }
        if historical:
            document["historical"] = True
        verdict = decode(
            self.topic, json.dumps(document).encode(), machine_types={self._key: self.machine.type}
        )
        if isinstance(verdict, Rejected):
            return verdict
        assert isinstance(verdict, Accepted)
        return Normalized(self.machine.id, reading.ts, tuple(sorted(metrics)), document)


def payload_with_seq(document: dict[str, object], gateway: str, boot: int, n: int) -> bytes:
    """The bytes published and stored: the same every time the reading is sent (identical rewrites)."""
    return json.dumps(
        {**document, "seq": {"gateway": gateway, "boot": boot, "n": n}}, separators=(",", ":")
    ).encode()
