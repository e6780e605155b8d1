"""The edge agent's config, normalization and store, without servers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge.config import EdgeConfigError, Gateway, parse_config
from edge.normalize import Normalized, Normalizer, Reading
from edge.store import EdgeStore
from infra.tenancy import telemetry_topic
from ingest.contract import Reason, Rejected, decode

GATEWAY = Gateway(id="gw-1", tenant="acme", site="plant-1")


def _config(**machine: object) -> dict[str, object]:
    return {
        "gateway": {"id": "gw-1", "tenant": "acme", "site": "plant-1"},
        "uplink": {"host": "127.0.0.1"},
        "store": {"path": "/tmp/x.db"},
        "machines": [
            {
                "id": "press-01",
                "type": "hydraulic_press",
                "adapter": {"kind": "modbus_tcp", "host": "plc"},
                **machine,
            }
        ],
    }


def test_every_problem_of_a_gateway_config_is_named_by_path_and_value_at_once() -> None:
    raw = _config(adapter={"kind": "modbus_tcp", "host": "plc", "port": 70000})
    raw["store"] = {"path": "/tmp/x.db", "fsync": "sometimes"}
    raw["gateway"] = {"id": "GW", "tenant": "acme", "site": "plant-1"}
    with pytest.raises(EdgeConfigError) as error:
        parse_config(raw)
    text = str(error.value)
    assert "3 problems" in text
    assert "machines[0].adapter.modbus_tcp.port: 70000" in text or "machines[0].adapter.port: 70000" in text
    assert "store.fsync: 'sometimes' is not a fsync policy" in text
    assert "gateway.id: 'GW'" in text


def test_a_map_that_disagrees_with_the_catalog_is_refused(tmp_path: Path) -> None:
    wrong = tmp_path / "press.modbus.yaml"
    wrong.write_text(
        "machine_type: hydraulic_press\nregisters:\n  oil_temp_c: {address: 0, unit: degF}\n"
        "  torque_nm: {address: 1, unit: Nm}\n"
    )
    with pytest.raises(EdgeConfigError) as error:
        parse_config(_config(map=str(wrong)))
    assert "oil_temp_c.unit: 'degF' but the catalog's unit is 'degC'" in str(error.value)
    assert "torque_nm: is not a metric of hydraulic_press" in str(error.value)


def test_the_cli_answers_a_bad_config_with_exit_2_and_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(_config(type="toaster")))
    result = subprocess.run(
        [sys.executable, "-m", "edge", "check", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "machines[0].type: 'toaster' is not a known machine type" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_reading_the_cloud_would_dead_letter_is_rejected_at_the_edge_with_the_same_reason() -> None:
    machine = parse_config(_config()).machines[0]
    verdict = Normalizer(GATEWAY, machine).normalize(Reading(1_800_000_000, "running", {"oil_temp_c": 900.0}))
    assert isinstance(verdict, Rejected) and verdict.reason is Reason.OUT_OF_BOUNDS
    cloud = decode(
        telemetry_topic("acme", "plant-1", "press-01"),
        json.dumps(
            {
                "schema_version": 2,
                "tenant_id": "acme",
                "site_id": "plant-1",
                "machine_id": "press-01",
                "machine_type": "hydraulic_press",
                "ts": 1_800_000_000,
                "status": "running",
                "metrics": {"oil_temp_c": 900.0},
            }
        ).encode(),
    )
    assert isinstance(cloud, Rejected) and cloud.reason is verdict.reason


def test_vendor_names_become_canonical_and_the_seq_counts_within_a_new_boot_per_open(tmp_path: Path) -> None:
    machine = parse_config(_config()).machines[0]
    normalized = Normalizer(GATEWAY, machine).normalize(Reading(1_800_000_000, "running", {"T_OIL": 51.5}))
    assert isinstance(normalized, Normalized) and normalized.document["metrics"] == {"oil_temp_c": 51.5}
    store = EdgeStore(tmp_path / "s.db", gateway="gw-1")
    rows = store.add([normalized, normalized])
    assert [row.key for row in rows] == [(0, 0), (0, 1)]
    assert json.loads(rows[1].payload)["seq"] == {"gateway": "gw-1", "boot": 0, "n": 1}
    store.close()
    again = EdgeStore(tmp_path / "s.db", gateway="gw-1")
    assert again.boot == 1 and again.backlog()["messages"] == 2, "a restart keeps what is unconfirmed"
    assert again.confirm("press-01", [(0, 0, 1)]) == 2
    assert again.backlog()["messages"] == 0
