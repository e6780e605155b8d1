"""The agent's side of contract v4, on the real normalizer, store (SQLite) and the worker's own
decoder: readings marked historical once and for all, history in compressed batches the worker
reads back reading by reading, gap records per boot in the v4 form, forgotten on the worker's
receipt only while their count has not grown."""

from __future__ import annotations

import json
from pathlib import Path

from edge.agent import HISTORY_BATCH, Agent, gap_document, history_batches
from edge.config import Gateway, parse_config
from edge.normalize import Normalized, Normalizer, Reading
from edge.store import EdgeStore, Row
from infra.tenancy import telemetry_topic
from ingest.contract import (
    BATCH_MAGIC,
    DEFAULT_MAX_PAYLOAD_BYTES,
    Accepted,
    AcceptedGap,
    GapRecordV4,
    decode,
    unpack,
)
from tests.test_edge_units import _config

GATEWAY = Gateway(id="gw-1", tenant="acme", site="plant-1")
TOPIC = telemetry_topic("acme", "plant-1", "press-01")
REGISTRY = {("acme", "plant-1", "press-01"): "hydraulic_press"}
TS = 1_800_000_000.0


def readings(count: int, *, historical: bool = False, start: float = TS) -> list[Normalized]:
    normalizer = Normalizer(GATEWAY, parse_config(_config()).machines[0])
    found = []
    for i in range(count):
        reading = Reading(
            start + i / 100, "running", {"oil_temp_c": 40 + i % 50, "pressure_bar": 200.0 + i % 7}
        )
        normalized = normalizer.normalize(reading, historical=historical)
        assert isinstance(normalized, Normalized)
        found.append(normalized)
    return found


def test_a_reading_taken_while_its_session_is_down_is_historical_in_the_bytes_it_is_stored_with(
    tmp_path: Path,
) -> None:
    store = EdgeStore(tmp_path / "s.db", gateway="gw-1")
    live, backfilled = store.add([*readings(1), *readings(1, historical=True)])
    store.close()
    verdicts = [decode(TOPIC, row.payload, machine_types=REGISTRY) for row in (live, backfilled)]
    assert all(isinstance(v, Accepted) and v.schema_version == 4 for v in verdicts), verdicts
    assert [v.historical for v in verdicts if isinstance(v, Accepted)] == [False, True]
    assert b"historical" not in live.payload, "a live reading carries no flag"


def test_history_goes_in_compressed_batches_the_worker_reads_back_in_order(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path / "s.db", gateway="gw-1")
    rows = store.add(readings(2 * HISTORY_BATCH + 50, historical=True))
    store.close()
    batches = history_batches(rows)
    assert [len(chunk) for chunk, _ in batches] == [HISTORY_BATCH, HISTORY_BATCH, 50]
    unpacked: list[bytes] = []
    for chunk, payload in batches:
        assert payload.startswith(BATCH_MAGIC) and len(payload) <= DEFAULT_MAX_PAYLOAD_BYTES
        documents = unpack(TOPIC, payload)
        assert isinstance(documents, list) and documents == [row.payload for row in chunk]
        unpacked += documents
    assert unpacked == [row.payload for row in rows], "every reading once, oldest first"
    verdicts = [decode(TOPIC, document, machine_types=REGISTRY) for document in unpacked]
    assert all(isinstance(v, Accepted) and v.historical for v in verdicts)
    raw = sum(len(row.payload) for row in rows)
    sent = sum(len(payload) for _, payload in batches)
    print(f"history: {len(rows)} readings, {raw} bytes as readings, {sent} bytes batched ({raw / sent:.1f}x)")
    assert sent < raw, "a batch is smaller than its readings"


def test_a_batch_past_the_workers_limit_is_split_until_each_fits(tmp_path: Path) -> None:
    rows = [Row((0, n), "press-01", TS + n, payload) for n, payload in enumerate(_incompressible(60))]
    batches = history_batches(rows, limit=4096)
    assert all(len(payload) <= 4096 for _, payload in batches) and len(batches) > 1
    assert [row for chunk, _ in batches for row in chunk] == rows


def _incompressible(count: int) -> list[bytes]:
    """Readings whose bytes do not compress (random metric digits), for the split."""
    import random

    rng = random.Random(7)
    return [json.dumps({"n": n, "noise": rng.randbytes(120).hex()}).encode() for n in range(count)]


def _fill_until_dropped(store: EdgeStore, historical_start: float) -> None:
    """One reading per add, as the agent takes them, until the cap has dropped one of this boot."""
    for reading in readings(5000, historical=True, start=historical_start):
        store.add([reading])
        if any(gap.first_seq[0] == store.boot for gap in store.gaps()):
            return
    raise AssertionError("the cap never dropped a reading of this boot")


def test_gaps_are_kept_per_boot_and_each_is_a_v4_gap_record_the_worker_accepts(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    for boot in range(2):
        store = EdgeStore(path, gateway="gw-1", max_bytes=256 * 1024)
        assert store.boot == boot
        _fill_until_dropped(store, TS + boot * 10_000)
        store.close()
    store = EdgeStore(path, gateway="gw-1", max_bytes=256 * 1024)
    gaps = store.gaps()
    store.close()
    assert sorted(gap.first_seq[0] for gap in gaps) == [0, 1], "a gap per boot"
    assert all(gap.first_seq[0] == gap.last_seq[0] for gap in gaps)
    for gap in gaps:
        verdict = decode(TOPIC, gap_document("acme", "plant-1", "gw-1", gap))
        assert isinstance(verdict, AcceptedGap), verdict
        record: GapRecordV4 = verdict.gap
        assert (record.reason, record.count, record.seq.gateway) == ("max_bytes", gap.count, "gw-1")
        assert (record.seq.boot, record.seq.first_n, record.seq.last_n) == (
            gap.first_seq[0],
            gap.first_seq[1],
            gap.last_seq[1],
        )


def test_a_gap_is_forgotten_on_the_workers_receipt_unless_it_grew(tmp_path: Path) -> None:
    raw = _config()
    raw["store"] = {"path": str(tmp_path / "agent.db"), "max_bytes": 256 * 1024}
    agent = Agent(parse_config(raw))
    try:
        _fill_until_dropped(agent.store, TS)
        agent.store.confirm("press-01", [(0, 0, 10**6)]).result(timeout=10)  # room: no more drops
        (gap,) = agent.store.gaps()
        agent.gap_receipt("press-01", [(gap.reason, *gap.first_seq, gap.count - 1)])  # an older count
        agent.store.flush()
        assert agent.store.gaps() == [gap], "it grew since that receipt: it is sent again"
        agent.gap_receipt("press-01", [(gap.reason, *gap.first_seq, gap.count)])
        agent.store.flush()
        assert agent.store.gaps() == []
    finally:
        agent.store.close()
