"""The canonical telemetry contract: what is accepted, how v1 maps forward, and why each rejection."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from infra.config import MachineId, SiteId, TenantId
from ingest.contract import (
    CURRENT_SCHEMA_VERSION,
    MODELS,
    Accepted,
    AcceptedGap,
    Reason,
    Rejected,
    TelemetryV2,
    decode,
)

TOPIC = "ironlink/acme/plant-1/press-01/telemetry"
REGISTRY = {("acme", "plant-1", "press-01"): "hydraulic_press"}
TS = 1_750_000_000


def v2(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema_version": 2,
        "tenant_id": "acme",
        "site_id": "plant-1",
        "machine_id": "press-01",
        "machine_type": "hydraulic_press",
        "ts": TS + 0.25,
        "status": "running",
        "metrics": {"oil_temp_c": 51.5, "pressure_bar": 210.0},
    }
    body.update(changes)
    return body


def v1(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema_version": 1,
        "tenant_id": "acme",
        "site_id": "plant-1",
        "machine_id": "press-01",
        "ts": TS,
        "status": "running",
        "signals": [{"name": "T_OIL", "value": 51.5}, {"name": "systemPressure", "value": 210.0}],
    }
    body.update(changes)
    return body


def run(
    body: dict[str, Any] | bytes, topic: str = TOPIC, registry: Any = REGISTRY
) -> Accepted | AcceptedGap | Rejected:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return decode(topic, payload, machine_types=registry)


def test_the_newest_version_is_the_canonical_model() -> None:
    assert max(MODELS) == CURRENT_SCHEMA_VERSION
    assert issubclass(MODELS[CURRENT_SCHEMA_VERSION], TelemetryV2), "v4 is read downstream as v2"


def test_v3_is_v2_with_the_gateways_sequence_id() -> None:
    seq = {"gateway": "gw-1", "boot": 3, "n": 41}
    from_v3, from_v2 = run(v2(schema_version=3, seq=seq)), run(v2())
    assert isinstance(from_v3, Accepted) and isinstance(from_v2, Accepted)
    assert from_v3.schema_version == 3 and from_v3.seq is not None
    assert (from_v3.seq.gateway, from_v3.seq.boot, from_v3.seq.n) == ("gw-1", 3, 41)
    assert from_v3.telemetry.model_dump(exclude={"schema_version", "seq"}) == from_v2.telemetry.model_dump(
        exclude={"schema_version"}
    ), "the measurement is v2's"
    assert from_v2.seq is None


def test_v1_maps_forward_to_the_same_canonical_sample_as_v2() -> None:
    from_v1, from_v2 = run(v1()), run(v2(ts=TS))
    assert isinstance(from_v1, Accepted) and isinstance(from_v2, Accepted)
    assert (from_v1.schema_version, from_v2.schema_version) == (1, 2)
    assert from_v1.telemetry == from_v2.telemetry
    assert from_v1.telemetry.metrics == {"oil_temp_c": 51.5, "pressure_bar": 210.0}


def test_v2_declares_its_type_so_an_unregistered_machine_is_still_understood() -> None:
    result = run(v2(), registry=None)
    assert isinstance(result, Accepted) and result.telemetry.machine_type == "hydraulic_press"


REJECTIONS = [
    (b"{not json", Reason.MALFORMED, "Invalid JSON"),
    (b"[1, 2]", Reason.MALFORMED, "object"),
    (b"\xff\xfe", Reason.MALFORMED, "payload"),
    (b"x" * 20_000, Reason.OVERSIZED, "20000 bytes"),
    (v2(schema_version=5), Reason.UNKNOWN_SCHEMA_VERSION, "schema_version: 5 is not supported"),
    (v2(schema_version=3), Reason.MISSING_FIELD, "seq: Field required"),
    (v2(schema_version=3, seq={"gateway": "gw-1", "boot": -1, "n": 0}), Reason.INVALID_VALUE, "seq.boot"),
    (v2(schema_version="2"), Reason.UNKNOWN_SCHEMA_VERSION, 'schema_version: "2" is not supported'),
    ({k: v for k, v in v2().items() if k != "schema_version"}, Reason.UNKNOWN_SCHEMA_VERSION, "required"),
    ({k: v for k, v in v2().items() if k != "status"}, Reason.MISSING_FIELD, "status"),
    (v2(ts="yesterday"), Reason.WRONG_TYPE, "ts: Input should be a valid number (got 'yesterday')"),
    (v2(metrics={"oil_temp_c": "51"}), Reason.WRONG_TYPE, "metrics.oil_temp_c"),
    (v2(metrics={"oil_temp_c": True}), Reason.WRONG_TYPE, "metrics.oil_temp_c"),
    (v2(ts=TS * 1000), Reason.INVALID_VALUE, "ts"),
    (v2(status="broken"), Reason.INVALID_VALUE, "'broken'"),
    (v2(tenant_id="Acme"), Reason.INVALID_VALUE, "tenant_id"),
    (v2(metrics={}), Reason.INVALID_VALUE, "metrics"),
    (v2(firmware="1.2"), Reason.UNKNOWN_FIELD, "firmware"),
    (v2(metrics={"oil_temp_c": 900.0}), Reason.OUT_OF_BOUNDS, "oil_temp_c=900.0 is outside -20..120 degC"),
    (v2(metrics={"T_OIL": 50.0}), Reason.UNKNOWN_METRIC, "canonical name 'oil_temp_c'"),
    (v2(metrics={"spindle_speed_rpm": 1.0}), Reason.UNKNOWN_METRIC, "'spindle_speed_rpm'"),
    (
        v1(signals=[{"name": "T_WHATEVER", "value": 1.0}]),
        Reason.UNKNOWN_METRIC,
        "signals[0].name: 'T_WHATEVER'",
    ),
    (
        v1(signals=[{"name": "T_OIL", "value": 1.0}, {"name": "oilTemp", "value": 2.0}]),
        Reason.INVALID_VALUE,
        "repeats",
    ),
    (v1(signals=[{"name": "T_OIL", "value": 500.0}]), Reason.OUT_OF_BOUNDS, "oil_temp_c=500.0"),
    (v1(ts=TS + 0.5), Reason.WRONG_TYPE, "ts"),
    (v2(tenant_id="globex"), Reason.TOPIC_MISMATCH, "tenant_id: 'globex' does not match the topic's 'acme'"),
    (v2(machine_id="press-02"), Reason.TOPIC_MISMATCH, "machine_id"),
    (v2(machine_type="cnc_mill", metrics={"spindle_temp_c": 40.0}), Reason.MACHINE_TYPE_MISMATCH, "registry"),
]


@pytest.mark.parametrize(
    ("body", "reason", "detail"), REJECTIONS, ids=[f"{r.value}-{i}" for i, (_, r, _) in enumerate(REJECTIONS)]
)
def test_each_rejection_has_its_reason_and_names_the_field_and_value(
    body: Any, reason: Reason, detail: str
) -> None:
    result = run(body)
    assert isinstance(result, Rejected), result
    assert result.reason is reason, result.detail
    assert detail in result.detail


@pytest.mark.parametrize(
    ("version", "shown", "kind"),
    [
        (True, "true", "a boolean"),
        (False, "false", "a boolean"),
        (1.0, "1.0", "a decimal number"),
        (2.0, "2.0", "a decimal number"),
        ("1", '"1"', "a string"),
        ("2", '"2"', "a string"),
        (None, "null", "null"),
        ([2], "[2]", "an array"),
    ],
)
@pytest.mark.parametrize("body", [v1, v2])
def test_only_a_json_integer_is_a_schema_version(body: Any, version: object, shown: str, kind: str) -> None:
    """``true == 1 == 1.0`` in Python; in the contract, a version is the JSON integer 1 or 2."""
    result = run(body(schema_version=version))
    assert isinstance(result, Rejected) and result.reason is Reason.UNKNOWN_SCHEMA_VERSION, result
    assert result.detail == (
        f"schema_version: {shown} is not supported "
        f"(supported: 1, 2, 3, 4; a version is a JSON integer, not {kind})"
    )


def test_the_integer_versions_are_accepted_as_themselves() -> None:
    from_v1, from_v2 = run(v1(schema_version=1)), run(v2(schema_version=2))
    assert isinstance(from_v1, Accepted) and from_v1.schema_version == 1
    assert isinstance(from_v2, Accepted) and from_v2.schema_version == 2
    crossed = run(v1(schema_version=2))
    assert isinstance(crossed, Rejected) and crossed.reason is Reason.MISSING_FIELD, "a v1 body is no v2"


def test_v1_needs_the_registry_for_its_machine_type() -> None:
    result = run(v1(), registry={})
    assert isinstance(result, Rejected) and result.reason is Reason.UNKNOWN_MACHINE
    assert "acme/plant-1/press-01" in result.detail


@pytest.mark.parametrize(
    "topic",
    [
        "ironlink/acme/plant-1/telemetry",
        "other/acme/plant-1/press-01/telemetry",
        "ironlink/acme//press-01/telemetry",
    ],
)
def test_a_topic_outside_the_contract_is_rejected(topic: str) -> None:
    result = run(v2(), topic=topic)
    assert isinstance(result, Rejected) and result.reason is Reason.BAD_TOPIC


@pytest.mark.parametrize("kind", ["tenant_id", "site_id", "machine_id"])
@pytest.mark.parametrize(
    "value", ["a", "a" * 32, "a" * 33, "a" * 48, "a" * 49, "plant-1", "-a", "a-", "A", "a_b", "a b"]
)
def test_payload_ids_follow_the_stack_configs_id_rules(kind: str, value: str) -> None:
    rule = {"tenant_id": TenantId, "site_id": SiteId, "machine_id": MachineId}[kind]
    try:
        TypeAdapter(rule).validate_python(value)
        config_accepts = True
    except ValidationError:
        config_accepts = False
    topic = TOPIC.replace(
        {"tenant_id": "acme", "site_id": "plant-1", "machine_id": "press-01"}[kind], value, 1
    )
    result = run(v2(**{kind: value}), topic=topic, registry=None)
    assert isinstance(result, Accepted) is config_accepts, result
