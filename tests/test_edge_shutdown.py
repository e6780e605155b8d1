"""SIGTERM during a backfill: a real agent (``python -m edge run``) with a backlog, a real Mosquitto
and a pymodbus press. The agent ends on its own with exit code 0, and its store keeps every reading
it counted as taken. The wait for the exit is a hang detector, not a speed claim."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge.store import SHUTDOWN, EdgeStore
from localdev import servers
from tests.fixtures.edge import wait_for
from tests.fixtures.ingest import broker_config

pytestmark = pytest.mark.integration
HANG = 60.0  # far above the agent's own bound on a stop (edge/agent.py, STOP_*_S: 8 s)


@pytest.fixture
def press(server_root: Path) -> Iterator[int]:
    port = servers.free_port()
    with (server_root / f"press-{port}.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.fixtures.edge.machines", "modbus", str(port), "press-01"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        servers.wait_until(lambda: servers.port_open(port), 30, "press")
        yield port
    finally:
        process.kill()
        process.wait(10)


def test_sigterm_mid_backfill_ends_the_agent_with_exit_0_and_its_store_intact(
    server_root: Path, press: int
) -> None:
    folder = server_root / f"shutdown-{press}"
    folder.mkdir()
    broker_port, broker_conf = servers.free_port(), folder / "mosquitto.conf"
    broker_conf.write_text(broker_config(folder / "mosquitto")(broker_port))
    store_path = folder / "agent" / "store.db"
    config = {
        "gateway": {"id": "gw-stop", "tenant": "acme", "site": "plant-1"},
        # No worker: nothing is confirmed, so the whole backlog is still in the store at the stop.
        "uplink": {
            "host": "127.0.0.1",
            "port": broker_port,
            "reconnect_initial_s": 0.2,
            "reconnect_max_s": 0.5,
        },
        "store": {"path": str(store_path)},
        "machines": [
            {
                "id": f"press-{index:02d}",
                "type": "hydraulic_press",
                "adapter": {"kind": "modbus_tcp", "host": "127.0.0.1", "port": press, "poll_ms": 2},
            }
            for index in (1, 2, 3)
        ],
        "status_interval_s": 0.1,
    }
    (folder / "agent.yaml").write_text(yaml.safe_dump(config))
    status_path = store_path.with_suffix(".status.json")

    def status() -> dict[str, Any]:
        try:
            return dict(json.loads(status_path.read_text()))
        except (OSError, ValueError):
            return {}

    log = folder / "agent.log"
    with log.open("ab") as output:
        agent = subprocess.Popen(
            [sys.executable, "-m", "edge", "run", str(folder / "agent.yaml")],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    broker = servers.mosquitto(broker_conf, broker_port, folder / "mosquitto.log")
    try:
        # The broker is not there yet: every reading waits as history.
        wait_for(lambda: status().get("taken", 0) >= 3000, 60, "a backlog of 3,000 readings")
        broker.start()
        wait_for(lambda: status().get("sent", {}).get("history", 0) > 0, 60, "the backfill under way")
        agent.send_signal(signal.SIGTERM)
        try:
            code = agent.wait(HANG)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the agent did not exit within {HANG:.0f} s of SIGTERM:\n{log.read_text()[-3000:]}")
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        broker.stop()
    assert code == 0, log.read_text()[-3000:]
    last = status()
    reopened = EdgeStore(store_path, gateway="gw-stop")
    try:
        assert reopened.moved_aside is None, "the store must open cleanly after a stop"
        # Nothing was confirmed: every reading that counted as taken is still there, and no more.
        assert reopened.backlog()["messages"] == last["taken"] > 3000
        assert SHUTDOWN not in last["drops"], last["drops"]
    finally:
        reopened.close()
