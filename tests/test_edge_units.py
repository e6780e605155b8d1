"""The edge agent's config, normalization and store, without servers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest

from edge.agent import Agent
from edge.config import EdgeConfigError, Gateway, parse_config
from edge.normalize import Normalized, Normalizer, Reading
from edge.store import EdgeStore, StoreClosed
from edge.uplink import MachineLink
from infra.tenancy import telemetry_topic
from ingest.contract import Reason, Rejected, decode, unpack

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
    assert again.confirm("press-01", [(0, 0, 1)]).result(timeout=10) == 2
    assert again.backlog()["messages"] == 0


class _Link:
    """The transport side of a session, recorded (no broker): the bound lives in the agent."""

    def __init__(self) -> None:
        self.connected = True
        self.sent: list[bytes] = []

    def room(self, window: int) -> int:
        return window  # the broker acknowledges at once: only receipts may hold the history back

    def publish(self, payload: bytes, *, watch: bool = False) -> int:
        self.sent.append(payload)
        return len(self.sent)


def _history_seqs(link: _Link) -> list[int]:
    """The seq ``n`` of every history reading the link was handed, in order."""
    topic = telemetry_topic("acme", "plant-1", "press-01")
    found = []
    for payload in link.sent:
        documents = unpack(topic, payload)
        assert isinstance(documents, list)
        found += [json.loads(document)["seq"]["n"] for document in documents]
    return found


def test_history_in_flight_is_bounded_by_receipts_and_a_resend_pass_still_comes_without_them(
    tmp_path: Path,
) -> None:
    raw = _config()
    raw["store"] = {"path": str(tmp_path / "s.db")}
    raw["uplink"] = {"host": "127.0.0.1", "history_in_flight": 500, "resend_after_s": 1}
    agent = Agent(parse_config(raw))
    machine = agent.config.machines[0]
    normalizer = Normalizer(GATEWAY, machine)
    readings = [
        normalizer.normalize(Reading(1_800_000_000 + i, "running", {"T_OIL": 50.0})) for i in range(2000)
    ]
    agent.store.add([reading for reading in readings if isinstance(reading, Normalized)])
    link = _Link()
    session = cast(MachineLink, link)  # what the sender touches of a session: connected, room, publish

    async def sending() -> None:
        agent.links[machine.id] = session
        agent.connected(machine.id)  # all 2,000 are history now
        for _ in range(5):
            agent._send_machine(machine.id, session, 1000)  # budget for far more than the bound
        latest, *history = _history_seqs(link)
        assert latest == 1999, "the latest value goes first"
        assert history == list(range(500)), "unconfirmed history stops at the bound"
        link.sent.clear()
        assert agent.history_in_flight() == 500
        agent.receipt(machine.id, [(agent.store.boot, 0, 299)])
        assert agent.history_in_flight() == 200
        for _ in range(5):
            agent._send_machine(machine.id, session, 1000)
        assert _history_seqs(link) == list(range(500, 800)), "receipts make room for the next readings"
        link.sent.clear()
        await asyncio.sleep(1.2)  # resend_after_s without a receipt: the broker lost them
        for _ in range(5):
            agent._send_machine(machine.id, session, 1000)
        assert _history_seqs(link)[:3] == [300, 301, 302], "the pass starts again at the oldest unconfirmed"
        assert agent.history_in_flight() == 500

    asyncio.run(sending())
    agent.store.flush()
    assert agent.store.backlog()["messages"] == 1700, "the receipt's 300 were forgotten, nothing else"
    agent.store.close()


def test_a_history_in_flight_below_one_is_named_by_path_and_value() -> None:
    raw = _config()
    raw["uplink"] = {"host": "127.0.0.1", "history_in_flight": 0, "resend_after_s": 0}
    with pytest.raises(EdgeConfigError) as error:
        parse_config(raw)
    assert "uplink.history_in_flight: 0 is invalid" in str(error.value)
    assert "uplink.resend_after_s: 0 is invalid" in str(error.value)


def test_a_bounded_close_commits_what_ran_and_counts_what_it_never_reached(tmp_path: Path) -> None:
    machine = parse_config(_config()).machines[0]
    reading = Normalizer(GATEWAY, machine).normalize(Reading(1_800_000_000, "running", {"T_OIL": 51.5}))
    assert isinstance(reading, Normalized)
    store = EdgeStore(tmp_path / "s.db", gateway="gw-1")
    assert store.add([reading]) and store.close(timeout=0) == 0, "nothing queued: nothing refused"
    with pytest.raises(StoreClosed):
        store.submit([reading])
    again = EdgeStore(tmp_path / "s.db", gateway="gw-1")
    assert again.backlog()["messages"] == 1 and again.moved_aside is None, "what was committed stays"
    again.close()
