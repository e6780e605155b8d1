"""Contract v4: the historical flag, gap records, and compressed batches read document by document."""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest

from ingest.contract import (
    BATCH_MAGIC,
    DEFAULT_MAX_BATCH_BYTES,
    Accepted,
    AcceptedGap,
    Reason,
    Rejected,
    decode,
    pack,
    unpack,
)
from ingest.pipeline import DeadLetter, GapRecord, Pipeline, Point
from ingest.settings import worker_settings_for
from tests.fixtures.ingest import fleet_machines, platform
from tests.test_contract import REGISTRY, TOPIC, TS, run, v2

SEQ = {"gateway": "gw-1", "boot": 2, "n": 40}


def v4(**changes: Any) -> dict[str, Any]:
    return v2(schema_version=4, seq=SEQ) | changes


def gap(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema_version": 4,
        "kind": "gap",
        "tenant_id": "acme",
        "site_id": "plant-1",
        "machine_id": "press-01",
        "reason": "max_bytes",
        "count": 3,
        "first_ts": TS - 100.5,
        "last_ts": TS - 10,
        "seq": {"gateway": "gw-1", "boot": 2, "first_n": 10, "last_n": 14},
    }
    body.update(changes)
    return body


def line(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def pipeline() -> Pipeline:
    settings = worker_settings_for(
        platform(), mqtt_host="broker", mqtt_port=1883, store_urls={"influxdb": "http://store"}
    )
    return Pipeline(settings.model_copy(update={"machines": fleet_machines()}))


# ------------------------------------------------------------------------------- readings
def test_v4_is_v3_and_a_historical_flag_that_defaults_to_live() -> None:
    live, historical, from_v3 = run(v4()), run(v4(historical=True)), run(v2(schema_version=3, seq=SEQ))
    assert isinstance(live, Accepted) and isinstance(historical, Accepted) and isinstance(from_v3, Accepted)
    assert (live.schema_version, live.historical, historical.historical) == (4, False, True)
    assert from_v3.historical is False
    assert historical.seq == from_v3.seq
    assert historical.telemetry.model_dump(
        exclude={"schema_version", "historical"}
    ) == from_v3.telemetry.model_dump(exclude={"schema_version"}), "the measurement is v3's"


@pytest.mark.parametrize(
    ("body", "reason", "detail"),
    [
        (v4(historical=1), Reason.WRONG_TYPE, "historical"),
        (v4(historical="true"), Reason.WRONG_TYPE, "historical"),
        ({k: v for k, v in v4().items() if k != "seq"}, Reason.MISSING_FIELD, "seq"),
        (v4(kind="reading"), Reason.UNKNOWN_FIELD, "kind"),
        (v2(historical=True), Reason.UNKNOWN_FIELD, "historical"),
    ],
)
def test_v4_reading_rejections(body: dict[str, Any], reason: Reason, detail: str) -> None:
    result = run(body)
    assert isinstance(result, Rejected) and result.reason is reason, result
    assert detail in result.detail


# ------------------------------------------------------------------------------------ gaps
def test_a_gap_record_is_its_own_kind() -> None:
    result = run(gap())
    assert isinstance(result, AcceptedGap), result
    record = result.gap
    assert (record.machine_id, record.reason, record.count) == ("press-01", "max_bytes", 3)
    assert (record.seq.gateway, record.seq.boot, record.seq.first_n, record.seq.last_n) == ("gw-1", 2, 10, 14)
    assert (record.first_ts, record.last_ts) == (TS - 100.5, TS - 10)


@pytest.mark.parametrize(
    ("body", "reason", "detail"),
    [
        (gap(reason="lazy"), Reason.INVALID_VALUE, "reason"),
        (gap(count=0), Reason.INVALID_VALUE, "count"),
        (gap(count=6), Reason.INVALID_VALUE, "count 6 is more than the 5 seqs"),
        (gap(first_ts=TS, last_ts=TS - 1), Reason.INVALID_VALUE, "first_ts"),
        (
            gap(seq={"gateway": "gw-1", "boot": 2, "first_n": 9, "last_n": 3}),
            Reason.INVALID_VALUE,
            "seq: first_n 9",
        ),
        (gap(seq={"gateway": "gw-1", "boot": 2, "n": 9}), Reason.MISSING_FIELD, "seq.first_n"),
        (gap(status="running"), Reason.UNKNOWN_FIELD, "status"),
        (gap(machine_id="press-02"), Reason.TOPIC_MISMATCH, "machine_id: 'press-02'"),
        (gap(schema_version=3), Reason.MISSING_FIELD, "status"),  # only v4 knows gap records
        ({k: v for k, v in gap().items() if k != "count"}, Reason.MISSING_FIELD, "count"),
    ],
)
def test_gap_record_rejections_name_the_field(body: dict[str, Any], reason: Reason, detail: str) -> None:
    result = run(body)
    assert isinstance(result, Rejected) and result.reason is reason, result
    assert detail in result.detail


# --------------------------------------------------------------------------------- batches
def test_a_batch_unpacks_into_its_documents_each_decoded_on_its_own() -> None:
    documents = [line(v4(seq={**SEQ, "n": n}, historical=True, ts=TS + n)) for n in range(3)]
    bad = line(v4(metrics={"oil_temp_c": 900.0}))
    packed = pack([*documents, bad, line(gap())])
    assert packed.startswith(BATCH_MAGIC)
    unpacked = unpack(TOPIC, packed)
    assert unpacked == [*documents, bad, line(gap())]
    verdicts = [decode(TOPIC, document, machine_types=REGISTRY) for document in unpacked]
    assert [type(v) for v in verdicts] == [Accepted, Accepted, Accepted, Rejected, AcceptedGap]
    assert all(v.historical for v in verdicts[:3] if isinstance(v, Accepted))
    assert [v.seq.n for v in verdicts[:3] if isinstance(v, Accepted) and v.seq] == [0, 1, 2]


def test_a_plain_payload_is_its_own_single_document() -> None:
    payload = line(v4())
    assert unpack(TOPIC, payload) == [payload]


@pytest.mark.parametrize(
    ("payload", "reason", "detail"),
    [
        (
            BATCH_MAGIC + zlib.compress(b"x" * (DEFAULT_MAX_BATCH_BYTES + 1)),
            Reason.BATCH_TOO_LARGE,
            "1048576",
        ),
        (BATCH_MAGIC + zlib.compress(b"{}\n" * 2001), Reason.BATCH_TOO_LARGE, "2001 documents"),
        (BATCH_MAGIC + b"not deflate", Reason.MALFORMED, "not a zlib"),
        (BATCH_MAGIC + zlib.compress(b"{}\n" * 50)[:-4], Reason.MALFORMED, "truncated"),
        (BATCH_MAGIC + zlib.compress(b"{}") + b"tail", Reason.MALFORMED, "4 bytes after"),
        (BATCH_MAGIC + zlib.compress(b""), Reason.MALFORMED, "no document"),
        (BATCH_MAGIC + b"\x00" * 20_000, Reason.OVERSIZED, f"{len(BATCH_MAGIC) + 20_000} bytes"),
    ],
    ids=["bomb", "too-many", "not-zlib", "truncated", "trailing", "empty", "oversized"],
)
def test_a_batch_that_cannot_be_read_is_refused_whole(payload: bytes, reason: Reason, detail: str) -> None:
    result = unpack(TOPIC, payload)
    assert isinstance(result, Rejected) and result.reason is reason, result
    assert detail in result.detail


def test_a_zip_bomb_stops_at_the_bound_not_at_its_size() -> None:
    """1 GiB of zeros compresses to ~1 MB: the bound is met after a MiB of output, never allocated whole."""
    bomb = BATCH_MAGIC + zlib.compress(b"\x00" * 2**30, 9)
    result = unpack(TOPIC, bomb, max_bytes=len(bomb))
    assert isinstance(result, Rejected) and result.reason is Reason.BATCH_TOO_LARGE


def test_a_batch_on_a_foreign_topic_is_one_rejection() -> None:
    result = unpack("ironlink/acme/telemetry", pack([line(v4())] * 100))
    assert isinstance(result, Rejected) and result.reason is Reason.BAD_TOPIC


def test_the_pipeline_stores_a_batch_but_its_bad_reading_which_keeps_its_own_bytes() -> None:
    """One bad reading of a batch is dead-lettered with that reading alone as its payload (so a
    replay is that reading); the others become points, historical ones marked as such."""
    now = TS + 60.0
    good = [line(v4(seq={**SEQ, "n": n}, ts=TS + n, historical=True)) for n in range(2)]
    bad = line(v4(seq={**SEQ, "n": 2}, metrics={"oil_temp_c": 900.0}))
    outcomes = pipeline().process_message(TOPIC, pack([good[0], bad, good[1], line(gap())]), now)
    assert [document for document, _ in outcomes] == [good[0], bad, good[1], line(gap())]
    kinds = [type(outcome) for _, outcome in outcomes]
    assert kinds == [Point, DeadLetter, Point, GapRecord]
    letter = outcomes[1][1]
    assert isinstance(letter, DeadLetter) and letter.reason is Reason.OUT_OF_BOUNDS
    assert json.loads(letter.document)["payload"] == bad.decode()
    points = [outcome for _, outcome in outcomes if isinstance(outcome, Point)]
    assert [p.seq for p in points] == [("gw-1", 2, 0), ("gw-1", 2, 1)]
    assert all(",historical=1i " in p.line for p in points)
    record = outcomes[3][1]
    assert isinstance(record, GapRecord)
    assert (record.row.gateway, record.row.boot, record.row.first_n, record.row.last_n) == ("gw-1", 2, 10, 14)
    assert record.row.first_ts.timestamp() == TS - 100.5


def test_a_live_reading_carries_no_historical_field() -> None:
    (_, outcome), *_ = pipeline().process_message(TOPIC, line(v4()), TS + 1.0)
    assert isinstance(outcome, Point) and "historical" not in outcome.line


def test_an_unreadable_batch_is_one_dead_letter_of_the_whole_payload() -> None:
    bomb = BATCH_MAGIC + zlib.compress(b"\x00" * (8 * 2**20), 9)
    (document, outcome), *rest = pipeline().process_message(TOPIC, bomb, TS)
    assert not rest and document == bomb
    assert isinstance(outcome, DeadLetter) and outcome.reason is Reason.BATCH_TOO_LARGE
    letter = json.loads(outcome.document)
    assert letter["payload_encoding"] == "base64" and letter["payload_bytes"] == len(bomb)
