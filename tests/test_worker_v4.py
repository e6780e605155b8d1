"""Contract v4 through the real worker (``python -m ingest``), Mosquitto, VictoriaMetrics and
PostgreSQL: single readings, compressed batches read reading by reading, the historical field in
the store, and gap records stored in the registry's ``telemetry_gaps``, idempotently, and
confirmed on the receipts topic."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from infra.tenancy import receipts_topic
from ingest.contract import pack
from registry.gaps import list_gaps
from tests.conftest import MosquittoFactory
from tests.fixtures.ingest import (
    ACME_MILL,
    ACME_PRESS,
    Mqtt,
    RegistryWorkerStack,
    platform,
    series,
    topic,
    v3,
    wait_stored,
)
from tests.test_worker_integration import Platform

pytestmark = pytest.mark.integration
GATEWAY = "gw-4"
WAIT = 20.0


def v4(
    machine: tuple[str, str, str], ts: float, n: int, *, historical: bool = False, **changes: Any
) -> bytes:
    body = json.loads(v3(machine, ts, GATEWAY, 1, n))
    body.update(schema_version=4, **changes)
    if historical:
        body["historical"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def gap(machine: tuple[str, str, str], first_n: int, last_n: int, count: int, last_ts: float) -> bytes:
    tenant, site, machine_id = machine
    body = {
        "schema_version": 4,
        "kind": "gap",
        "tenant_id": tenant,
        "site_id": site,
        "machine_id": machine_id,
        "reason": "max_bytes",
        "count": count,
        "first_ts": last_ts - 100,
        "last_ts": last_ts,
        "seq": {"gateway": GATEWAY, "boot": 1, "first_n": first_n, "last_n": last_n},
    }
    return json.dumps(body, separators=(",", ":")).encode()


class RegistryPlatform(RegistryWorkerStack):
    """Broker, store, a registry that knows acme's press-01 and a worker reading it; the worker
    uses the registry owner's DSN (it writes ``telemetry_gaps``)."""

    def __init__(
        self, folder: Path, start_mosquitto: MosquittoFactory, dsn: str, env: pytest.MonkeyPatch
    ) -> None:
        super().__init__(folder, start_mosquitto, dsn, env.setenv, platform(), [ACME_PRESS])
        self.gateway = Mqtt(self.mqtt_port, "gateway-receipts")
        self.gateway.subscribe(receipts_topic(*ACME_PRESS))

    def gaps(self) -> list[Any]:
        with psycopg.connect(self.dsn) as conn:
            return list_gaps(conn, "acme")

    def close(self) -> None:
        self.gateway.close()
        super().close()


@pytest.fixture
def registry_platform(
    server_root: Path,
    start_mosquitto: MosquittoFactory,
    postgres_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Iterator[RegistryPlatform]:
    folder = server_root / f"v4-{request.node.name[5:30]}-{time.monotonic_ns()}"
    folder.mkdir()
    stack = RegistryPlatform(folder, start_mosquitto, postgres_dsn, monkeypatch)
    yield stack
    stack.close()


def confirmed(gateway: Mqtt, wanted: set[int], gaps: int = 0) -> tuple[set[int], list[Any]]:
    """The ``n`` of boot 1 the receipts confirm and the gap receipts, until ``wanted`` and
    ``gaps`` gap receipts are in (or the wait ends)."""
    ns: set[int] = set()
    gap_receipts: list[Any] = []
    deadline = time.monotonic() + WAIT
    while (not wanted <= ns or len(gap_receipts) < gaps) and time.monotonic() < deadline:
        for _, receipt in gateway.collect(1, timeout=0.5):
            assert receipt["gateway"] == GATEWAY, receipt
            ns |= {n for boot, first, last in receipt["stored"] if boot == 1 for n in range(first, last + 1)}
            gap_receipts += receipt.get("gaps", [])
    return ns, gap_receipts


def test_a_batch_is_stored_reading_by_reading_historical_marked_its_bad_reading_dead_lettered(
    registry_platform: RegistryPlatform,
) -> None:
    live, start = registry_platform, int(time.time()) - 120
    live.device.publish(topic(ACME_PRESS), v4(ACME_PRESS, start, 0))
    readings = [v4(ACME_PRESS, start + n, n, historical=True) for n in range(1, 6)]
    bad = v4(ACME_PRESS, start + 3, 3, historical=True, metrics={"oil_temp_c": 900.0})
    readings[2] = bad
    live.device.publish(topic(ACME_PRESS), pack(readings))

    good = [start, start + 1, start + 2, start + 4, start + 5]
    stored_points = wait_stored(live.store_url, ACME_PRESS, [ts * 1000 for ts in good])
    assert set(stored_points) == {ts * 1000 for ts in good}, "all but the bad reading"
    fields = series(live.store_url, ACME_PRESS)
    assert fields["telemetry_historical"] == {ts * 1000: 1.0 for ts in good[1:]}, "the live one is not marked"

    ((dlq_topic, letter),) = live.dead_letters.collect(1)
    assert (dlq_topic, letter["reason"]) == (f"dlq/{topic(ACME_PRESS)}", "out_of_bounds")
    assert letter["payload"] == bad.decode(), "a batch's dead letter is its own reading, replayable alone"

    ns, _ = confirmed(live.gateway, {0, 1, 2, 4, 5})
    assert ns == {0, 1, 2, 4, 5}, "receipts per seq range, the dead-lettered reading not among them"
    assert live.worker.metric("ironlink_ingest_points_written_total", tenant="acme") == 5
    assert live.worker.metric("ironlink_ingest_messages_received_total", tenant="acme") == 6


def test_a_gap_record_is_stored_confirmed_and_a_resend_changes_nothing_but_growth(
    registry_platform: RegistryPlatform,
) -> None:
    live, now = registry_platform, time.time()
    live.device.publish(topic(ACME_PRESS), gap(ACME_PRESS, 10, 19, 8, now - 60))
    _, receipts = confirmed(live.gateway, set(), gaps=1)
    assert receipts == [{"reason": "max_bytes", "boot": 1, "first_n": 10, "count": 8}]
    (row,) = live.gaps()
    assert (row.machine_id, row.gateway, row.boot, row.first_n, row.last_n, row.count) == (
        "press-01",
        GATEWAY,
        1,
        10,
        19,
        8,
    )
    assert round(row.last_ts.timestamp(), 3) == round(now - 60, 3)

    live.device.publish(topic(ACME_PRESS), gap(ACME_PRESS, 10, 19, 8, now - 60))  # a resend
    _, receipts = confirmed(live.gateway, set(), gaps=1)
    assert [receipt["count"] for receipt in receipts] == [8], "a resend is confirmed again"
    assert live.gaps() == [row], "and changes nothing"

    # Grown while unconfirmed, and sent in a batch with a reading.
    grown = gap(ACME_PRESS, 10, 30, 15, now - 30)
    live.device.publish(topic(ACME_PRESS), pack([grown, v4(ACME_PRESS, int(now) - 20, 31)]))
    ns, receipts = confirmed(live.gateway, {31}, gaps=1)
    assert ns == {31} and [receipt["count"] for receipt in receipts] == [15]
    (updated,) = live.gaps()
    assert (updated.first_n, updated.last_n, updated.count) == (10, 30, 15)
    assert updated.first_ts == row.first_ts and updated.received_at > row.received_at

    assert live.worker.metric("ironlink_ingest_gap_records_stored_total", tenant="acme") == 3
    assert live.worker.metric("ironlink_ingest_gap_readings_total", tenant="acme", reason="max_bytes") == 15

    live.device.publish(topic(ACME_MILL), gap(ACME_MILL, 0, 0, 1, now))
    ((_, letter),) = live.dead_letters.collect(1)
    assert letter["reason"] == "unknown_machine", "a gap of a machine the registry lacks"


def test_without_a_registry_a_gap_record_is_dead_lettered_store_unavailable(
    server_root: Path, start_mosquitto: MosquittoFactory
) -> None:
    folder = server_root / f"v4-no-registry-{time.monotonic_ns()}"
    folder.mkdir()
    live = Platform(folder, start_mosquitto)
    try:
        gateway = Mqtt(live.mqtt_port, "gateway-receipts")
        gateway.subscribe(receipts_topic(*ACME_PRESS))
        live.device.publish(topic(ACME_PRESS), gap(ACME_PRESS, 0, 4, 5, time.time()))
        ((_, letter),) = live.dead_letters.collect(1)
        assert letter["reason"] == "store_unavailable" and "IRONLINK_REGISTRY_DSN" in letter["detail"]
        assert json.loads(letter["payload"])["kind"] == "gap", "the whole record, replayable"
        assert gateway.collect(1, timeout=1) == [], "not confirmed: the gateway sends it again"
        gateway.close()
    finally:
        live.close()
