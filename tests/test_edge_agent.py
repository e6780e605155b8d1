"""The edge agent end to end, every piece a real process on loopback: a pymodbus server (two
presses poll it) and an asyncua server (a mill) standing in for machines, ``python -m edge run``,
Mosquitto, the worker (``python -m ingest``, its fleet from a real registry) and VictoriaMetrics.
The module shares one broker, worker, store and pair of machine servers (:class:`Cloud`); each test
runs an agent of its own (own gateway id, own store) and brings back what it stopped. Outages are
seconds long, with fast polling, so the backlogs are large while the file stays short; every wait
is bounded, and no rate is asserted (bench/edge.py measures them)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.contract import unpack
from localdev import servers
from registry.gaps import GapRow, list_gaps
from tests.conftest import PostgresCluster
from tests.fixtures.edge import wait_for
from tests.fixtures.ingest import (
    ACME_MILL,
    ACME_PRESS,
    ACME_PRESS_2,
    WorkerProcess,
    broker_config,
    platform,
    seed_registry,
    start_store,
    stored,
)

# One worker of `pytest -n` runs them all: they share one Cloud (module fixture) instead of two.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("edge-e2e")]
MACHINES = (ACME_PRESS, ACME_PRESS_2, ACME_MILL)
WAIT = 60.0


class MachineProcess:
    """A Modbus or OPC-UA server process (``tests/fixtures/edge/machines.py``)."""

    def __init__(self, kind: str, folder: Path, machine: str) -> None:
        self.kind, self.port, self.machine, self.log = (
            kind,
            servers.free_port(),
            machine,
            folder / f"{kind}.log",
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    def launch(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.fixtures.edge.machines",
                    self.kind,
                    str(self.port),
                    self.machine,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"{self.kind} server exited:\n{self.log.read_text()[-2000:]}")
            return servers.port_open(self.port)

        servers.wait_until(ready, 30, f"{self.kind} server")

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the machine answers nothing (its readings stop at once) until :meth:`resume`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.running() and self.paused:
            assert self.process is not None
            self.process.send_signal(signal.SIGCONT)
        self.paused = False


class Watcher:
    """Everything one gateway published on the machines' telemetry topics, in broker order, through a
    persistent session: it survives a broker restart (the broker queues for it)."""

    def __init__(self, port: int, gateway: str) -> None:
        self.gateway = gateway
        self.received: list[tuple[float, str, bytes]] = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"watcher-{gateway}", protocol=mqtt.MQTTv5
        )
        self.client.on_message = lambda _c, _u, m: self.received.append(
            (time.time(), m.topic, bytes(m.payload))
        )
        self.client.on_connect = lambda c, *_: c.subscribe(
            [("ironlink/acme/plant-1/+/telemetry", 1), ("dlq/ironlink/acme/plant-1/+/telemetry", 1)]
        )
        self.subscriptions = 0  # SUBACKs: one per (re)connect
        self.client.on_subscribe = lambda *_: setattr(self, "subscriptions", self.subscriptions + 1)
        self.client.reconnect_delay_set(1, 1)
        self.client.connect("127.0.0.1", port, clean_start=False, properties=_session(600))
        self.client.loop_start()
        wait_for(lambda: self.subscriptions, 20, "watcher subscribed")

    def readings(self) -> list[tuple[float, dict[str, Any], bytes]]:
        """(arrival, document, bytes) of every reading, a history batch's one by one, in arrival order."""
        found = []
        for arrived, topic, message in list(self.received):
            documents = [] if topic.startswith("dlq/") else unpack(topic, message)
            for payload in documents if isinstance(documents, list) else []:
                document = json.loads(payload)
                seq = document.get("seq") or {}
                if seq.get("gateway") == self.gateway and document.get("kind") != "gap":
                    found.append((arrived, document, payload))
        return found

    def close(self) -> None:
        ended = Properties(PacketTypes.DISCONNECT)
        ended.SessionExpiryInterval = 0  # the broker forgets the session and stops queueing for it
        self.client.disconnect(properties=ended)
        self.client.loop_stop()


def _with_autosave(render: Callable[[int], str], seconds: int) -> Callable[[int], str]:
    def rendered(port: int) -> str:
        text = render(port)
        assert "autosave_interval 5\n" in text, "tests/fixtures/ingest/mosquitto.conf changed"
        return text.replace("autosave_interval 5\n", f"autosave_interval {seconds}\n")

    return rendered


def _session(expiry: int) -> Properties:
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = expiry
    return properties


class Cloud:
    """What the tests of this module share: the broker, VictoriaMetrics, the worker reading its fleet
    from a real registry (it stores gap records there), the press and the mill. A test may stop or
    kill any of them; :meth:`ensure_running` brings back what is down before the next test.

    The broker snapshots its queues hourly (Mosquitto's ``autosave_interval``), so a SIGKILL loses
    all it queued since it started; a stop (SIGTERM) saves them, as Mosquitto does."""

    def __init__(self, folder: Path, registry_dsn: str) -> None:
        self.folder, self.registry_dsn = folder, registry_dsn
        self.render = _with_autosave(broker_config(folder / "mosquitto"), 3600)
        self.mqtt_port = servers.free_port()
        self.modbus = MachineProcess("modbus", folder, ACME_PRESS[2])
        self.opcua = MachineProcess("opcua", folder, ACME_MILL[2])
        self.modbus.launch()
        self.opcua.launch()
        self.start_broker()
        self.store, self.store_url = start_store(folder)
        # A gateway's backfill runs far above Phase A's default tenant quota of 100 messages/s.
        fast = platform(broker={"tenant_quota": {"max_devices": 50, "messages_per_second": 50_000}})
        seed_registry(registry_dsn, fast, self.store_url, MACHINES)
        self.worker = WorkerProcess.for_platform(
            fast, self.mqtt_port, self.store_url, folder, machines=None, from_registry=True
        )
        self.worker.start()
        self.modbus.wait_ready()
        self.opcua.wait_ready()

    def start_broker(self) -> None:
        """The broker on its port and persistence folder (with what its last snapshot held)."""
        config = self.folder / "mosquitto.conf"
        config.write_text(self.render(self.mqtt_port))
        self.broker = servers.mosquitto(config, self.mqtt_port, self.folder / "mosquitto.log").start()

    def ensure_running(self) -> None:
        if self.broker.process is None or self.broker.process.poll() is not None:
            self.start_broker()
        if self.worker.process is None or self.worker.process.poll() is not None:
            self.worker.start()
        for machine in (self.modbus, self.opcua):
            machine.resume()
        down = [machine for machine in (self.modbus, self.opcua) if not machine.running()]
        for machine in down:
            machine.launch()
        for machine in down:
            machine.wait_ready()

    def close(self) -> None:
        for machine in (self.modbus, self.opcua):
            if machine.running():
                machine.resume()
                machine.kill()
        if self.worker.process is not None and self.worker.process.poll() is None:
            self.worker.stop(signal.SIGKILL)
        self.store.stop()
        self.broker.stop()


class EdgePlatform:
    """One test's agent, with a gateway id and a store of its own, on the module's :class:`Cloud`."""

    def __init__(self, cloud: Cloud, folder: Path, gateway: str, **store: Any) -> None:
        self.cloud, self.folder, self.gateway = cloud, folder, gateway
        self.registry_dsn, self.store_url = cloud.registry_dsn, cloud.store_url
        self.config_path = folder / "agent.yaml"
        self.config: dict[str, Any] = {
            "gateway": {"id": gateway, "tenant": "acme", "site": "plant-1"},
            "uplink": {
                "host": "127.0.0.1",
                "port": cloud.mqtt_port,
                "max_messages_per_s": 5000,
                "backfill_share": 0.8,
                "resend_after_s": 5,
                "reconnect_initial_s": 0.2,
                "reconnect_max_s": 1,
            },
            "store": {"path": str(folder / "agent" / "store.db"), **store},
            "machines": [
                *(
                    {  # two presses on one Modbus server (one PLC, two units' worth of readings)
                        "id": press[2],
                        "type": "hydraulic_press",
                        "adapter": {
                            "kind": "modbus_tcp",
                            "host": "127.0.0.1",
                            "port": cloud.modbus.port,
                            "poll_ms": 2,
                        },
                    }
                    for press in (ACME_PRESS, ACME_PRESS_2)
                ),
                {
                    "id": ACME_MILL[2],
                    "type": "cnc_mill",
                    "adapter": {
                        "kind": "opcua",
                        "endpoint": f"opc.tcp://127.0.0.1:{cloud.opcua.port}/",
                        "publishing_ms": 20,
                    },
                },
            ],
            "source_down_after_s": 1,
            "source_retry_max_s": 1,
            "status_interval_s": 0.2,
        }
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.agent: subprocess.Popen[bytes] | None = None
        self.started_at = self.stopped_at = 0.0
        self.watcher = Watcher(cloud.mqtt_port, gateway)

    @property
    def broker(self) -> servers.Server:
        return self.cloud.broker

    @property
    def worker(self) -> WorkerProcess:
        return self.cloud.worker

    @property
    def modbus(self) -> MachineProcess:
        return self.cloud.modbus

    @property
    def opcua(self) -> MachineProcess:
        return self.cloud.opcua

    def configure(self, **sections: dict[str, Any]) -> None:
        for name, values in sections.items():
            self.config[name] = {**self.config[name], **values}
        self.config_path.write_text(yaml.safe_dump(self.config))

    # --------------------------------------------------------------------------------- agent
    def start_agent(self) -> None:
        (self.folder / "agent" / "store.status.json").unlink(missing_ok=True)  # a killed one's stays
        self.started_at = time.time()
        with (self.folder / "agent.log").open("ab") as log:
            self.agent = subprocess.Popen(
                [sys.executable, "-m", "edge", "run", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: self.health().get("boot") is not None, WAIT, "agent status")

    def kill_agent(self, sig: int = signal.SIGKILL) -> None:
        assert self.agent is not None
        self.agent.send_signal(sig)
        self.agent.wait(20)

    def health(self) -> dict[str, Any]:
        assert self.agent is not None
        if self.agent.poll() is not None:
            pytest.fail(
                f"agent exited {self.agent.returncode}:\n{(self.folder / 'agent.log').read_text()[-3000:]}"
            )
        try:
            return dict(json.loads((self.folder / "agent" / "store.status.json").read_text()))
        except (OSError, ValueError):
            return {}

    def status_cli(self) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "edge", "status", str(self.config_path)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    # --------------------------------------------------------------------------------- store
    def points(self) -> dict[tuple[str, str, str], dict[int, float]]:
        """Every stored point of the machines (this module's earlier tests' too)."""
        return {machine: stored(self.store_url, machine) for machine in MACHINES}

    def points_since_start(self) -> dict[tuple[str, str, str], int]:
        """How many points of each machine were taken since this test's agent started."""
        since = round(self.started_at * 1000)
        return {machine: sum(ts >= since for ts in points) for machine, points in self.points().items()}

    def restart_broker_after(self, until: Any, what: str) -> float:
        """Stop the broker, wait (bounded) until ``until()``, start it again: the wall time it was back.
        ``stopped_at``: when it had stopped (nothing taken later can have reached it before)."""
        self.broker.stop()
        self.stopped_at = time.time()
        wait_for(until, WAIT, what)
        starting_at = time.time()  # nothing taken before this could wait for a broker that was back
        self.cloud.start_broker()
        return starting_at

    def settle(self) -> dict[str, Any]:
        """Pause the machines and wait until the agent holds nothing unconfirmed; its last health."""
        self.modbus.pause()
        self.opcua.pause()
        return dict(
            wait_for(lambda: (h := self.health()) and h["backlog"]["messages"] == 0 and h, WAIT, "drained")
        )

    def assert_nothing_lost(self) -> None:
        """Every seq of every boot reached the broker (dense from 0), each machine's seqs are stored
        points, and a seq sent twice was sent with the same bytes (an identical rewrite)."""
        by_seq: dict[tuple[int, int], bytes] = {}
        per_machine: dict[str, set[float]] = {}
        for _, document, payload in self.watcher.readings():
            key = (document["seq"]["boot"], document["seq"]["n"])
            assert by_seq.setdefault(key, payload) == payload, f"seq {key} sent with different bytes"
            per_machine.setdefault(document["machine_id"], set()).add(document["ts"])
        assert by_seq, "the watcher saw nothing of this gateway"
        boots: dict[int, set[int]] = {}
        for boot, n in by_seq:
            boots.setdefault(boot, set()).add(n)
        for boot, ns in boots.items():
            missing = set(range(max(ns) + 1)) - ns
            assert not missing, f"boot {boot}: {len(missing)} seqs never sent, e.g. {sorted(missing)[:5]}"
        sent = {machine: {round(ts * 1000) for ts in per_machine[machine[2]]} for machine in MACHINES}

        def unstored() -> dict[str, int]:
            points = self.points()
            return {machine[2]: len(sent[machine] - points[machine].keys()) for machine in MACHINES}

        # The receipts said stored; VictoriaMetrics may take a moment to show the newest points.
        deadline = time.monotonic() + 15
        while any(unstored().values()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(unstored().values()), f"sent but not stored: {unstored()}"

    def close(self) -> None:
        self.watcher.close()
        if self.agent is not None and self.agent.poll() is None:
            self.kill_agent()


@pytest.fixture(scope="module")
def cloud(server_root: Path, postgres_cluster: PostgresCluster) -> Iterator[Cloud]:
    folder = server_root / f"edge-cloud-{time.monotonic_ns()}"
    folder.mkdir()
    registry_dsn = postgres_cluster.new_database()
    with pytest.MonkeyPatch.context() as env:  # the worker takes its DSN from the environment only
        env.setenv("IRONLINK_REGISTRY_DSN", registry_dsn)
        shared = Cloud(folder, registry_dsn)
        yield shared
        shared.close()


@pytest.fixture
def edge(cloud: Cloud, request: pytest.FixtureRequest) -> Iterator[EdgePlatform]:
    cloud.ensure_running()
    folder = cloud.folder / f"agent-{len(list(cloud.folder.glob('agent-*')))}"
    folder.mkdir()
    gateway = f"gw-{folder.name}"
    stack = EdgePlatform(cloud, folder, gateway, **getattr(request, "param", {}))
    yield stack
    stack.close()


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0


def test_a_broker_outage_of_10000_readings_loses_nothing_and_sends_the_latest_values_before_the_backlog(
    edge: EdgePlatform,
) -> None:
    # Live at ~300 readings/s (the press every 4 ms, the mill every 20 ms): 10,000 in ~35 s; the
    # uplink's budget well above what this machine's worker takes, so the backfill runs at its pace.
    edge.configure(uplink={"max_messages_per_s": 20_000})
    edge.start_agent()
    wait_for(lambda: edge.health().get("confirmed", 0) > 100, WAIT, "first receipts")
    outage_started = time.time()
    back_at = edge.restart_broker_after(
        lambda: edge.health()["backlog"]["messages"] >= 10_000, "a backlog of 10,000 readings"
    )
    backlog = edge.health()["backlog"]["messages"]
    live_rate = backlog / (back_at - outage_started)
    wait_for(lambda: edge.health()["backlog"]["messages"] < 200, WAIT, "the backlog drained")
    drained_at = time.time()
    health = edge.settle()
    edge.assert_nothing_lost()
    assert not health["drops"], health["drops"]

    # Taken during the outage, arrived after it (what the broker still held for the watcher from
    # before the outage is redelivered first, and says nothing about the agent's order).
    after = [
        (arrived, doc)
        for arrived, doc, _ in edge.watcher.readings()
        if arrived >= back_at and doc["ts"] >= edge.stopped_at
    ]
    for _, _, machine in MACHINES:
        mine = [doc for _, doc in after if doc["machine_id"] == machine]
        newest_before = max(doc["ts"] for doc in mine if doc["ts"] < back_at)
        # The first to arrive is the machine's latest value at the reconnect: newer than all the
        # outage's readings (the reconnect came a moment after the broker, so it may be newer still).
        assert mine[0]["ts"] >= newest_before, f"{machine}: the latest value must come first after the outage"
    first_arrival = min(arrived for arrived, _ in after)
    backfill_rate = backlog / max(1e-3, drained_at - first_arrival)
    live_lag = [
        arrived - doc["ts"] for arrived, doc in after if doc["ts"] > first_arrival and arrived < drained_at
    ]
    print(
        f"backlog {backlog} readings, live {live_rate:.0f}/s, backfill {backfill_rate:.0f}/s: "
        f"backfill {backfill_rate / live_rate:.1f}x live; "
        f"live p99 publish lag during backfill {_p99(live_lag):.2f} s"
    )
    # A rate is measured, not asserted (bench/edge.py reports it): here the worker, the store, the
    # broker, both machines and the agent share two cores, and the worker sets the pace.


def test_an_agent_killed_mid_backfill_loses_nothing_and_repeats_only_identical_rewrites(
    edge: EdgePlatform,
) -> None:
    # A slow uplink, so the kill lands mid-backfill: 8 history batches (1,600 readings) a second.
    edge.configure(uplink={"max_messages_per_s": 10})
    edge.start_agent()
    wait_for(lambda: edge.health().get("confirmed", 0) > 50, WAIT, "first receipts")
    edge.restart_broker_after(lambda: edge.health()["backlog"]["messages"] >= 2000, "a backlog of 2,000")
    wait_for(lambda: edge.health()["sent"].get("history", 0) > 300, WAIT, "backfill under way")
    edge.kill_agent(signal.SIGKILL)
    edge.start_agent()
    assert edge.health()["boot"] == 1, "a restart is a new boot epoch"
    edge.settle()
    edge.assert_nothing_lost()


@pytest.mark.parametrize("edge", [{"max_bytes": 1024 * 1024}], indirect=True)
def test_a_1_mb_store_through_a_long_outage_stays_under_its_cap_keeps_the_latest_and_reports_the_gap(
    edge: EdgePlatform,
) -> None:
    store = edge.folder / "agent" / "store.db"
    for press in edge.config["machines"][:2]:
        press["adapter"]["poll_ms"] = 1  # fill the cap fast
    edge.configure()
    edge.start_agent()
    wait_for(lambda: edge.health().get("confirmed", 0) > 50, WAIT, "first receipts")
    largest = 0

    def dropped_several_caps() -> bool:
        nonlocal largest
        on_disk = sum(p.stat().st_size for p in store.parent.glob("store.db*") if p.exists())
        largest = max(largest, on_disk)
        return sum(edge.health()["drops"].values()) >= 4000  # the cap holds about 2,500

    back_at = edge.restart_broker_after(dropped_several_caps, "several caps of readings dropped")
    health = edge.settle()
    assert largest <= 1024 * 1024, f"the store reached {largest} bytes"
    assert set(health["drops"]) == {"max_bytes"}, health["drops"]
    assert edge.registry_dsn is not None

    def gaps_stored() -> list[GapRow]:
        with psycopg.connect(edge.registry_dsn or "") as conn:
            rows = [row for row in list_gaps(conn, "acme") if row.gateway == edge.gateway]
        return rows if sum(row.count for row in rows) >= health["drops"]["max_bytes"] else []

    # Each gap (per machine and boot) is one row, however often it was resent while it grew.
    rows = wait_for(gaps_stored, WAIT, "the gap records stored in the registry's telemetry_gaps")
    assert sum(row.count for row in rows) == health["drops"]["max_bytes"], (rows, health["drops"])
    assert {row.reason for row in rows} == {"max_bytes"}
    assert {(row.gateway, row.boot) for row in rows} == {(edge.gateway, 0)}
    assert {row.machine_id for row in rows} <= {machine[2] for machine in MACHINES}
    assert all(row.first_ts <= row.last_ts and row.count <= row.last_n - row.first_n + 1 for row in rows)
    points = edge.points()
    readings = edge.watcher.readings()
    for machine in MACHINES:
        newest = max(
            doc["ts"]
            for arrived, doc, _ in readings
            if doc["machine_id"] == machine[2] and doc["ts"] < back_at
        )
        assert round(newest * 1000) in points[machine], f"{machine[2]}: its latest value was dropped"


def test_a_corrupt_store_is_moved_aside_and_both_machines_readings_are_stored_and_forgotten_on_receipts(
    edge: EdgePlatform,
) -> None:
    store = edge.folder / "agent" / "store.db"
    store.parent.mkdir(parents=True)
    store.write_bytes(b"SQLite format 3\x00" + b"\xff" * 8192)
    edge.start_agent()
    moved = edge.health()["store_moved_aside"]
    assert moved and Path(moved).exists() and Path(moved).read_bytes().startswith(b"SQLite format 3")
    wait_for(
        lambda: all(count >= 20 for count in edge.points_since_start().values()),
        WAIT,
        "20 points of each machine after the move",
    )
    health = edge.health()
    assert health["sources"][ACME_PRESS[2]]["state"] == "up"
    assert health["sources"][ACME_MILL[2]]["state"] == "up"
    assert health["confirmed"] > 0, "receipts must make the agent forget what is stored"
    assert not health["drops"], health["drops"]
    listed = edge.status_cli()
    assert listed.returncode == 0, listed.stderr
    assert "press-01" in listed.stdout and "connected" in listed.stdout


def test_a_modbus_source_that_disappears_is_reported_down_and_recovers_by_itself(edge: EdgePlatform) -> None:
    edge.start_agent()
    wait_for(lambda: edge.health()["sources"]["press-01"]["state"] == "up", WAIT, "press up")
    edge.modbus.kill()
    wait_for(lambda: edge.health()["sources"]["press-01"]["state"] == "down", WAIT, "press reported down")
    assert edge.health()["sources"]["mill-01"]["state"] == "up", "the other machine is not affected"
    listed = edge.status_cli()
    assert "down" in listed.stdout
    # Down for a while: the adapter keeps retrying at its longest backoff (source_retry_max_s 1).
    failures = edge.health()["sources"]["press-01"]["failures"]
    wait_for(
        lambda: (
            (press := edge.health()["sources"]["press-01"])["failures"] >= failures + 3
            and press["state"] == "down"
        ),
        WAIT,
        "three more failed retries, still reported down",
    )
    readings = edge.health()["sources"]["press-01"]["readings"]
    edge.modbus.start()
    wait_for(lambda: edge.health()["sources"]["press-01"]["state"] == "up", WAIT, "press up again")
    wait_for(
        lambda: edge.health()["sources"]["press-01"]["readings"] > readings + 10, WAIT, "press readings again"
    )


def test_a_broker_killed_while_the_worker_is_down_loses_nothing_the_agent_sent(edge: EdgePlatform) -> None:
    # The broker snapshots its sessions at a stop and hourly otherwise (Cloud): restarted now, its
    # snapshot holds the worker's and the watcher's sessions, and its SIGKILL below loses every
    # message it queued since, all of which it had acknowledged to the agent (PUBACK).
    subscriptions = edge.watcher.subscriptions
    edge.broker.stop()
    edge.cloud.start_broker()
    wait_for(lambda: edge.watcher.subscriptions > subscriptions, WAIT, "the watcher subscribed again")
    edge.start_agent()
    wait_for(lambda: edge.health().get("confirmed", 0) > 50, WAIT, "first receipts")
    edge.worker.stop()
    before = edge.health()
    wait_for(
        lambda: (
            (h := edge.health())["sent"].get("live", 0) - before["sent"].get("live", 0) >= 1000
            and h["backlog"]["messages"] >= 1000
        ),
        WAIT,
        "1,000 readings sent live and queued by the broker for the stopped worker",
    )
    held = edge.health()
    assert all(link["state"] == "connected" for link in held["uplink"].values()), held["uplink"]
    edge.broker.stop(signal.SIGKILL)
    edge.cloud.start_broker()
    edge.worker.start()
    health = edge.settle()
    assert health["confirmed"] - held["confirmed"] >= held["backlog"]["messages"]
    assert health["sent"].get("history", 0) > held["sent"].get("history", 0), "what was lost is sent again"
    edge.assert_nothing_lost()
