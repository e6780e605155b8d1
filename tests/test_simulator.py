"""The device simulator's telemetry: valid under the contract, realistic, and varied."""

from __future__ import annotations

import random

import pytest

from infra.config import load_stack
from infra.tenancy import telemetry_topic
from ingest.catalog import MACHINE_TYPES
from ingest.contract import Accepted, TelemetryV1, TelemetryV2, decode
from localdev.simulator import MachineSimulator, machines_of
from localdev.state import demo_fleet

START = 1_750_000_000.0
TICKS = 400
Runs = dict[str, list[TelemetryV1 | TelemetryV2 | None]]


@pytest.fixture(scope="module")
def runs() -> Runs:
    """Each dev-stack machine run for TICKS one-second ticks (seeded: the same run every time)."""
    config = load_stack("dev")
    return {
        machine.username: [machine.tick(START + i) for i in range(TICKS)]
        for machine in machines_of(demo_fleet(config), seed=7)
    }


@pytest.fixture(scope="module")
def registry_types() -> dict[tuple[str, str, str], str]:
    fleet = demo_fleet(load_stack("dev"))
    return {(tenant_id, site.id, machine.id): machine.type for tenant_id, site, machine in fleet.machines()}


def test_every_payload_passes_the_contract_within_catalog_bounds(
    runs: Runs, registry_types: dict[tuple[str, str, str], str]
) -> None:
    for username, payloads in runs.items():
        topic = telemetry_topic(*username.split("."))
        for tick, payload in enumerate(payloads):
            if payload is not None:
                verdict = decode(topic, payload.model_dump_json().encode(), machine_types=registry_types)
                assert isinstance(verdict, Accepted), f"{username} at tick {tick}: {verdict}"


def test_each_tenant_mixes_v1_and_v2_and_v1_speaks_vendor_signals(
    runs: Runs,
) -> None:
    for tenant in ("acme", "globex"):
        versions = {
            type(payload)
            for name, payloads in runs.items()
            if name.startswith(f"{tenant}.")
            for payload in payloads
            if payload
        }
        assert versions == {TelemetryV1, TelemetryV2}, tenant
    v1 = next(p for payloads in runs.values() for p in payloads if isinstance(p, TelemetryV1))
    machine_type = next(
        MACHINE_TYPES[m.machine_type.name]
        for m in machines_of(demo_fleet(load_stack("dev")))
        if m.machine_id == v1.machine_id
    )
    vendor_names = {name for metric in machine_type.metrics for name in metric.vendor_signals}
    assert {signal.name for signal in v1.signals} <= vendor_names
    assert isinstance(v1.ts, int)


def test_machines_change_status_fault_and_fall_silent(
    runs: Runs,
) -> None:
    statuses = {payload.status for payloads in runs.values() for payload in payloads if payload}
    assert statuses == {"running", "stopped", "fault"}
    for username, payloads in runs.items():
        assert payloads[0] is not None and payloads[0].status == "running", (
            f"{username} must start running, seen"
        )
        assert any(p is None for p in payloads), f"{username} never had a gap in {TICKS} ticks"


def _metric(payload: TelemetryV1 | TelemetryV2, name: str, vendor: str) -> float:
    if isinstance(payload, TelemetryV2):
        return payload.metrics[name]
    return next(signal.value for signal in payload.signals if signal.name == vendor)


def test_a_stopped_press_stands_still_and_its_stroke_counter_only_grows() -> None:
    config = load_stack("dev")
    press = next(
        m for m in machines_of(demo_fleet(config), seed=3) if m.machine_type.name == "hydraulic_press"
    )
    payloads = [p for p in (press.tick(START + i) for i in range(TICKS)) if p is not None]
    strokes = [_metric(p, "stroke_count", "CNT_STROKE") for p in payloads]
    assert strokes == sorted(strokes) and strokes[-1] > strokes[0]
    # After several stopped ticks in a row, the motor current has decayed to (almost) nothing.
    long_stops = [
        payloads[i]
        for i in range(5, len(payloads))
        if all(p.status == "stopped" for p in payloads[i - 5 : i + 1])
    ]
    assert long_stops, "the seeded run has no long stop; pick another seed"
    assert all(_metric(p, "motor_current_a", "I_MOTOR") < 15 for p in long_stops)
    running = [_metric(p, "motor_current_a", "I_MOTOR") for p in payloads if p.status == "running"]
    assert sum(running) / len(running) > 30  # around the catalog's typical 60 A while running


def test_a_faulted_machine_runs_hot() -> None:
    machine_type = MACHINE_TYPES["air_compressor"]
    machine = MachineSimulator("acme", "plant-1", "c-1", machine_type, schema_version=2, rng=random.Random(1))
    machine.status = "fault"
    for _ in range(30):
        machine.evolve()
    hot = machine_type.metric("discharge_temp_c")
    assert hot is not None and hot.typical + 10 < machine.values["discharge_temp_c"] <= hot.maximum
