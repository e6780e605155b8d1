"""Property: whatever arrives on a telemetry topic, ``decode`` answers Accepted or Rejected (with a
reason and a detail), and the pipeline turns it into a point or a JSON dead letter; nothing raises."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.catalog import MACHINE_TYPES
from ingest.contract import BATCH_MAGIC, Accepted, AcceptedGap, Reason, Rejected, decode, pack
from ingest.pipeline import DeadLetter, GapRecord, Pipeline, Point
from ingest.settings import worker_settings_for
from tests.fixtures.ingest import fleet_machines, platform

TOPIC = "ironlink/acme/plant-1/press-01/telemetry"
REGISTRY = {("acme", "plant-1", "press-01"): "hydraulic_press"}
PIPELINE = Pipeline(
    worker_settings_for(
        platform(),
        mqtt_host="broker",
        mqtt_port=1883,
        store_urls={"influxdb": "http://store"},
        machines=fleet_machines(),
    )
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
# Payloads near the contract: the right keys, each with a plausible or a wrong value.
near_valid = st.fixed_dictionaries(
    {},
    optional={
        "schema_version": st.sampled_from([1, 2, 3, 4, "2", None, True, 1.0, 2.0]),
        "kind": st.sampled_from(["gap", "batch", 1]),
        "historical": st.sampled_from([True, False, 1, "yes"]),
        "seq": st.sampled_from(
            [
                {"gateway": "gw-1", "boot": 0, "n": 3},
                {"gateway": "gw-1", "boot": 0, "first_n": 1, "last_n": 4},
            ]
        ),
        "reason": st.sampled_from(["max_bytes", "max_age", "lazy"]),
        "count": st.integers(-1, 6),
        "first_ts": st.sampled_from([1_749_999_000, 1_750_000_000.5, "x"]),
        "last_ts": st.sampled_from([1_749_999_000, 1_750_000_001]),
        "tenant_id": st.sampled_from(["acme", "globex", "Acme", ""]),
        "site_id": st.sampled_from(["plant-1", "x" * 40]),
        "machine_id": st.sampled_from(["press-01", "press 01"]),
        "machine_type": st.sampled_from([*MACHINE_TYPES, "toaster"]),
        "ts": st.one_of(
            st.integers(0, 5_000_000_000), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5)
        ),
        "status": st.sampled_from(["running", "stopped", "fault", "idle", 1]),
        "metrics": st.dictionaries(
            st.sampled_from(["oil_temp_c", "pressure_bar", "T_OIL", "stroke_count", "spindle_speed_rpm", ""]),
            st.one_of(
                st.floats(allow_nan=True, allow_infinity=True),
                st.integers(-(10**20), 10**20),
                st.booleans(),
                st.text(max_size=3),
            ),
            max_size=4,
        ),
        "signals": st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["T_OIL", "P_SYS", "oilTemp", "nope"]), "value": st.floats()}
            ),
            max_size=3,
        ),
    },
)


def check(payload: bytes) -> Accepted | AcceptedGap | Rejected:
    result = decode(TOPIC, payload, machine_types=REGISTRY)
    if isinstance(result, Rejected):
        assert isinstance(result.reason, Reason) and result.detail
    elif isinstance(result, AcceptedGap):
        assert result.gap.first_ts <= result.gap.last_ts and result.gap.count >= 1
    else:
        sample = result.telemetry
        catalog = MACHINE_TYPES[sample.machine_type]
        for name, value in sample.metrics.items():
            metric = catalog.metric(name)
            assert metric is not None and metric.minimum <= value <= metric.maximum and math.isfinite(value)
    for document, outcome in PIPELINE.process_message(TOPIC, payload, 1_750_000_000.0):
        if isinstance(outcome, DeadLetter):
            assert json.loads(outcome.document)["reason"] == outcome.reason.value
        elif isinstance(outcome, GapRecord):
            assert isinstance(decode(TOPIC, document), AcceptedGap)
        else:
            assert isinstance(outcome, Point) and outcome.line.startswith("telemetry,")
    return result


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes(payload: bytes) -> None:
    check(payload)


@settings(max_examples=300)
@given(json_values)
def test_arbitrary_json(value: Any) -> None:
    check(json.dumps(value).encode())


@settings(max_examples=500)
@given(near_valid)
def test_payloads_near_the_contract(body: dict[str, Any]) -> None:
    if isinstance(check(json.dumps(body).encode()), Accepted):
        assert type(body["schema_version"]) is int, "only a JSON integer is a version"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes_after_the_batch_marker(payload: bytes) -> None:
    check(BATCH_MAGIC + payload)


@settings(max_examples=200)
@given(st.lists(st.one_of(st.binary(max_size=40), near_valid.map(lambda body: json.dumps(body).encode()))))
def test_arbitrary_batches(documents: list[bytes]) -> None:
    check(pack(documents))
