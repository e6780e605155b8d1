# ruff: noqa: E402  (the imports follow the sys.path fix below)
"""The edge agent's store and uplink (``python bench/edge.py``), each figure on a line of its own:

1. ``store <policy>: <N> readings/s``: v3 readings normalized and committed into the SQLite store,
   per fsync policy (``always``: fsynced per reading; ``batch:<ms>``), in this process;
2. ``backfill <N>x live``: the agent (``python -m edge run``) against a real Mosquitto and a real
   pymodbus press polled every ``--poll-ms``: the broker is stopped until ``--backlog`` readings
   wait, started again, and the history's send rate (PUBACKed by the broker, from the agent's
   status) is set against the live rate the press produced during the outage. No worker runs:
   this is the agent's own backfill rate, not the platform's (tests/test_edge_agent.py prints that);
3. ``agent peak RSS <N> MB`` (``VmHWM``) over the run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # ``edge`` from this checkout

import yaml

from edge.config import Gateway, Machine
from edge.normalize import Normalized, Normalizer, Reading
from edge.store import EdgeStore
from localdev import servers

ROOT = Path(__file__).resolve().parent.parent
BROKER_CONF = ROOT / "tests" / "fixtures" / "ingest" / "mosquitto.conf"
GATEWAY = Gateway(id="gw-bench", tenant="acme", site="plant-1")
PRESS = Machine.model_validate(
    {"id": "press-01", "type": "hydraulic_press", "adapter": {"kind": "modbus_tcp", "host": "127.0.0.1"}}
)


def store_rate(folder: Path, policy: str, count: int) -> float:
    normalizer = Normalizer(GATEWAY, PRESS)
    readings = []
    for i in range(count):
        normalized = normalizer.normalize(Reading(time.time() + i / 1000, "running", {"pressure_bar": 210.0}))
        assert isinstance(normalized, Normalized)
        readings.append(normalized)
    batch = None if policy == "always" else int(policy.split(":")[1])
    store = EdgeStore(folder / f"{policy.replace(':', '-')}.db", gateway=GATEWAY.id, batch_ms=batch)
    started = time.perf_counter()
    for reading in readings:
        store.add([reading])
    store.commit()
    elapsed = time.perf_counter() - started
    store.close()
    return count / elapsed


def status(path: Path) -> dict[str, object]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise SystemExit(f"{what}: not within {timeout:.0f} s")


def backfill(folder: Path, backlog: int, poll_ms: int) -> tuple[float, float, float]:
    """(live readings/s, history messages/s, agent peak RSS MB)."""
    persistence = folder / "mosquitto"
    persistence.mkdir()
    servers.hand_over(persistence, servers.service_user("mosquitto"))
    port = servers.free_port()
    config = folder / "mosquitto.conf"
    config.write_text(BROKER_CONF.read_text().format(port=port, persistence_dir=persistence))
    broker = servers.mosquitto(config, port, folder / "mosquitto.log").start()
    press_port = servers.free_port()
    press = subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures.edge.machines", "modbus", str(press_port), "press-01"],
        cwd=ROOT,
    )
    wait(lambda: servers.port_open(press_port), 30, "press")
    agent_config = {
        "gateway": GATEWAY.model_dump(),
        "uplink": {"host": "127.0.0.1", "port": port, "max_messages_per_s": 20_000, "resend_after_s": 3600},
        "store": {"path": str(folder / "agent" / "store.db")},
        "machines": [
            {
                **PRESS.model_dump(mode="json", exclude={"map"}),
                "adapter": {
                    "kind": "modbus_tcp",
                    "host": "127.0.0.1",
                    "port": press_port,
                    "poll_ms": poll_ms,
                },
            }
        ],
        "status_interval_s": 0.1,
    }
    (folder / "agent.yaml").write_text(yaml.safe_dump(agent_config))
    status_file = folder / "agent" / "store.status.json"
    agent = subprocess.Popen([sys.executable, "-m", "edge", "run", str(folder / "agent.yaml")], cwd=ROOT)
    try:
        wait(
            lambda: status(status_file).get("uplink", {}).get("press-01", {}).get("state") == "connected",
            30,
            "agent",
        )  # type: ignore[union-attr]
        broker.stop()
        stopped, taken_before = time.time(), int(status(status_file)["taken"])  # type: ignore[call-overload]
        wait(lambda: int(status(status_file)["taken"]) - taken_before >= backlog, 300, "backlog")  # type: ignore[call-overload]
        live = (int(status(status_file)["taken"]) - taken_before) / (time.time() - stopped)  # type: ignore[call-overload]
        sent_before = int(status(status_file)["sent"].get("history", 0))  # type: ignore[attr-defined]
        broker = servers.mosquitto(config, port, folder / "mosquitto.log").start()
        started = time.time()
        wait(
            lambda: int(status(status_file)["sent"].get("history", 0)) - sent_before >= backlog,
            300,
            "backfill",
        )  # type: ignore[attr-defined]
        rate = backlog / (time.time() - started)
        return live, rate, peak_rss_mb(agent.pid)
    finally:
        agent.terminate()
        agent.wait(20)
        press.kill()
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=3000, help="readings per store policy")
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--poll-ms", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ironlink-bench-edge-") as tmp:
        folder = Path(tmp)
        folder.chmod(0o755)
        for policy in ("always", "batch:100", "batch:1000"):
            print(f"store {policy}: {store_rate(folder, policy, args.readings):,.0f} readings/s", flush=True)
        live, rate, rss = backfill(folder, args.backlog, args.poll_ms)
        print(f"live {live:,.0f} readings/s, backfill {rate:,.0f} messages/s", flush=True)
        print(f"backfill {rate / live:.1f}x live")
        print(f"agent peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
