"""The committed JSON Schema files are the models' own, and they agree with the decoder."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from ingest.contract import Accepted, AcceptedGap, decode
from ingest.jsonschema import SCHEMA_DIR, render_schemas
from tests.test_contract import REGISTRY, TOPIC, v1, v2
from tests.test_contract_v4 import gap, v4


def test_committed_schema_files_match_the_models() -> None:
    rendered = render_schemas()
    committed = {path.name: path.read_text() for path in SCHEMA_DIR.glob("*.json")}
    assert committed == rendered, "the payload models changed: run `python -m ingest.jsonschema` and commit"


def validator(version: int | str) -> Draft202012Validator:
    name = f"v{version}" if isinstance(version, int) else version
    schema = json.loads((SCHEMA_DIR / f"telemetry-{name}.json").read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


SAMPLES = [
    v2(),
    v2(machine_type="cnc_mill", metrics={"spindle_speed_rpm": 12000.0}),
    v2(metrics={"oil_temp_c": 900.0}),
    v2(metrics={"oil_temp_c": -20.0}),
    v2(metrics={"T_OIL": 50.0}),
    v2(metrics={"spindle_speed_rpm": 1.0}),
    v2(ts="yesterday"),
    v2(status="broken"),
    v2(tenant_id="Acme"),
    v2(firmware="1.2"),
    v1(),
    v1(ts=1.5),
    v1(signals=[]),
    v4(),
    v4(historical=True),
    v4(historical="yes"),
    v4(seq={"gateway": "gw-1", "boot": 0}),
    v4(metrics={"oil_temp_c": 900.0}),
]


@pytest.mark.parametrize("body", SAMPLES, ids=range(len(SAMPLES)))
def test_schema_and_decoder_agree(body: dict[str, Any]) -> None:
    """What an integrator's validator accepts, the worker accepts (the topic set aside)."""
    registry = REGISTRY if body["schema_version"] == 1 else None  # v2 declares its type
    accepted = isinstance(decode(TOPIC, json.dumps(body).encode(), machine_types=registry), Accepted)
    assert validator(body["schema_version"]).is_valid(body) is accepted


GAPS = [
    gap(),
    gap(reason="max_age", count=1),
    gap(reason="lazy"),
    gap(count=0),
    gap(first_ts="yesterday"),
    gap(seq={"gateway": "gw-1", "boot": 0, "first_n": 1}),
    gap(status="running"),
]


@pytest.mark.parametrize("body", GAPS, ids=range(len(GAPS)))
def test_the_gap_schema_and_decoder_agree(body: dict[str, Any]) -> None:
    """Field by field; the cross-field rules (count within the seq range, first before last) are
    the decoder's alone, which JSON Schema cannot say."""
    accepted = isinstance(decode(TOPIC, json.dumps(body).encode()), AcceptedGap)
    assert validator("gap-v4").is_valid(body) is accepted
