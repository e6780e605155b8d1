# ruff: noqa: E402  (the imports follow the sys.path fix below)
"""The edge agent's store and uplink (``python bench/edge.py``), each figure on a line of its own:

1. ``store <policy>: <N> readings/s``: v3 readings normalized and taken by the store, per fsync
   policy, in this process, handed over one reading per call as the agent does, without waiting
   (the writer thread commits what queued meanwhile together); ``store always, one at a time``:
   the same with each call waiting for its own fsync (the rate before the writer thread);
2. ``backfill <N>x live``: the agent (``python -m edge run``) against a real Mosquitto and a real
   pymodbus press polled every ``--poll-ms``: the broker is stopped until ``--backlog`` readings
   wait, then started again. The live rate is what the agent took per second during the outage;
   the backfill rate is the backlog's readings per second as a subscriber of the machine's topic
   got them from the broker (batches unpacked, each seq counted once), from the broker's restart
   until the last of them arrived. No worker runs: this is the agent's own rate, not the platform's
   (tests/test_edge_agent.py prints that);
3. ``live p99 during the backfill``: readings taken after the restart, from their ``ts`` to the
   subscriber, while the backlog was still coming;
4. ``agent peak RSS <N> MB`` (``VmHWM``) over the run (adapters of other kinds are not imported);
5. the platform's figures, through the worker: ``--machines`` presses polled at ``--hz`` by one
   agent (a gateway's live rate), the real worker (``python -m ingest``, its fleet and store routes
   from a real PostgreSQL registry, as tests/test_edge_agent.py runs it, so receipts flow), a real
   VictoriaMetrics. The broker is stopped until ``--backlog`` readings wait, then started again.
   A reading counts as stored when the worker's receipt for its seq arrives (the worker publishes
   it once the store acknowledged the write; a subscriber on the receipts topics records the first
   time each seq is confirmed), and every backlog reading is checked in VictoriaMetrics at the end.
   ``backfill through the worker <N>x live``: the backlog's readings per second from the broker's
   restart to the receipt of the last of them, against what the agent took per second during the
   outage; ``live p99 through the worker``: readings sent live, taken between the restart and the
   last backlog receipt, from their ``ts`` to their receipt. A last line gives both from the first
   backlog receipt on (the worker's reconnect backoff left out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NamedTuple

sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # ``edge`` from this checkout

import paho.mqtt.client as mqtt
import psycopg
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.config import Gateway, Machine
from edge.normalize import Normalized, Normalizer, Reading
from edge.store import EdgeStore
from infra.tenancy import receipts_topic, telemetry_topic
from ingest.contract import unpack
from localdev import servers
from registry import provisioning
from tests.fixtures.ingest import (
    ACME_PRESS,
    WorkerProcess,
    broker_config,
    platform,
    seed_registry,
    start_store,
    stored,
)

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = Gateway(id="gw-bench", tenant="acme", site="plant-1")
PRESS = Machine.model_validate(
    {"id": "press-01", "type": "hydraulic_press", "adapter": {"kind": "modbus_tcp", "host": "127.0.0.1"}}
)
TOPIC = telemetry_topic(GATEWAY.tenant, GATEWAY.site, PRESS.id)


def store_rate(folder: Path, policy: str, count: int, *, one_at_a_time: bool = False) -> float:
    normalizer = Normalizer(GATEWAY, PRESS)
    readings = []
    for i in range(count):
        normalized = normalizer.normalize(Reading(time.time() + i / 1000, "running", {"pressure_bar": 210.0}))
        assert isinstance(normalized, Normalized)
        readings.append(normalized)
    batch = None if policy == "always" else int(policy.split(":")[1])
    name = f"{policy.replace(':', '-')}{'-each' if one_at_a_time else ''}.db"
    store = EdgeStore(folder / name, gateway=GATEWAY.id, batch_ms=batch)
    started = time.perf_counter()
    if one_at_a_time:
        for reading in readings:
            store.add([reading])
    else:
        taken: list[Future[Any]] = [store.submit([reading]) for reading in readings]
        taken[-1].result()
    store.flush()
    elapsed = time.perf_counter() - started
    store.close()
    return count / elapsed


def status(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait(check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise SystemExit(f"{what}: not within {timeout:.0f} s")


class Arrivals:
    """The seq ``n`` of every reading on ``filters``' telemetry topics, with when it first arrived,
    and (on receipts topics) when the worker first confirmed it stored, through a persistent
    session (the broker keeps it across its restart). It leaves before the broker stops and is
    back the moment the broker is (paho's own reconnect waits a second at least)."""

    def __init__(self, port: int, filters: list[str], client_id: str) -> None:
        self.port = port
        self.first: dict[int, float] = {}
        self.lag: dict[int, float] = {}  # seq n -> first arrival minus the reading's own ts
        self.readings: dict[int, tuple[str, float, bool]] = {}  # seq n -> (machine, ts, historical)
        self.confirmed: dict[int, float] = {}  # seq n -> first receipt covering it
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.on_message = self._message
        self.subscribed = threading.Event()
        self.client.on_connect = lambda client, *_: client.subscribe([(topic, 1) for topic in filters])
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.connect()

    def connect(self) -> None:
        expiry = Properties(PacketTypes.CONNECT)
        expiry.SessionExpiryInterval = 600
        self.subscribed.clear()
        self.client.connect("127.0.0.1", self.port, clean_start=False, properties=expiry)
        self.client.loop_start()
        if not self.subscribed.wait(30):
            raise SystemExit("the bench's subscriber: no SUBACK within 30 s")

    def leave(self) -> None:
        """Disconnect, keeping the session: the broker queues for it (and saves that at its stop)."""
        self.client.disconnect()
        self.client.loop_stop()

    def _message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        now = time.time()
        if message.topic.endswith("/receipts"):
            stored_runs = json.loads(message.payload).get("stored", [])
            with self._lock:
                for _boot, first_n, last_n in stored_runs:  # one boot: each run starts a fresh store
                    for n in range(int(first_n), int(last_n) + 1):
                        self.confirmed.setdefault(n, now)
            return
        documents = unpack(message.topic, bytes(message.payload))
        assert isinstance(documents, list), documents
        with self._lock:
            for document in documents:
                body = json.loads(document)
                seq_n = (body.get("seq") or {}).get("n")  # a gap record has a range, not an n
                if seq_n is None or int(seq_n) in self.first:
                    continue
                n, ts = int(seq_n), float(body["ts"])
                self.first[n], self.lag[n] = now, now - ts
                self.readings[n] = (body["machine_id"], ts, bool(body.get("historical")))

    def seen(self) -> dict[int, float]:
        with self._lock:
            return dict(self.first)

    def seen_readings(self) -> dict[int, tuple[str, float, bool]]:
        with self._lock:
            return dict(self.readings)

    def confirmations(self) -> dict[int, float]:
        with self._lock:
            return dict(self.confirmed)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else float("nan")


def start_broker(folder: Path) -> tuple[servers.Server, Path, int]:
    """Mosquitto with the ingest tests' config (persistence: its sessions survive a stop)."""
    port, config = servers.free_port(), folder / "mosquitto.conf"
    config.write_text(broker_config(folder / "mosquitto")(port))
    return servers.mosquitto(config, port, folder / "mosquitto.log").start(), config, port


def start_press(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The tests' pymodbus press (one PLC: every machine of the agent polls it)."""
    port = servers.free_port()
    with (folder / "modbus.log").open("ab") as log:
        press = subprocess.Popen(
            [sys.executable, "-m", "tests.fixtures.edge.machines", "modbus", str(port), "press-01"],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wait(lambda: servers.port_open(port), 30, "press")
    return press, port


def start_agent(
    folder: Path, broker_port: int, press_port: int, machines: list[str], poll_ms: int, **uplink: float
) -> subprocess.Popen[bytes]:
    """``python -m edge run`` for ``machines`` (hydraulic presses on the press's registers)."""
    config = {
        "gateway": GATEWAY.model_dump(),
        "uplink": {
            "host": "127.0.0.1",
            "port": broker_port,
            "reconnect_initial_s": 0.2,  # back soon after the broker, so the drain starts at once
            "reconnect_max_s": 0.5,
            **uplink,
        },
        "store": {"path": str(folder / "agent" / "store.db")},
        "machines": [
            {
                **PRESS.model_dump(mode="json", exclude={"map"}),
                "id": machine,
                "adapter": {
                    "kind": "modbus_tcp",
                    "host": "127.0.0.1",
                    "port": press_port,
                    "poll_ms": poll_ms,
                },
            }
            for machine in machines
        ],
        "status_interval_s": 0.1,
    }
    (folder / "agent.yaml").write_text(yaml.safe_dump(config))
    with (folder / "agent.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "edge", "run", str(folder / "agent.yaml")],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop_agent(agent: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL (said on stderr) should it not have stopped within 10 s."""
    agent.terminate()
    try:
        agent.wait(10)
    except subprocess.TimeoutExpired:
        print("the agent did not stop within 10 s of SIGTERM: killed", file=sys.stderr, flush=True)
        agent.kill()
        agent.wait(10)


def backfill(folder: Path, backlog: int, poll_ms: int) -> tuple[float, float, float, float]:
    """(live readings/s, backfilled readings/s, live p99 seconds during the backfill, agent peak RSS MB)."""
    broker, config, port = start_broker(folder)
    press, press_port = start_press(folder)
    agent = start_agent(
        folder,
        port,
        press_port,
        [PRESS.id],
        poll_ms,
        max_messages_per_s=100_000,  # the link allows: the agent's own pace is measured
        resend_after_s=3600,  # no receipts here (no worker): nothing is resent meanwhile
        history_in_flight=1_000_000,  # nor do receipts free the in-flight bound: the agent's own pace
    )
    status_file = folder / "agent" / "store.status.json"
    arrivals = Arrivals(port, [TOPIC], "bench-arrivals")
    try:
        wait(lambda: len(arrivals.seen()) >= 100, 60, "live readings through the broker")
        arrivals.leave()
        broker.stop()
        stopped, taken_at_stop = time.time(), int(status(status_file)["taken"])
        wait(lambda: int(status(status_file)["taken"]) - taken_at_stop >= backlog, 600, "backlog")
        broker = servers.mosquitto(config, port, folder / "mosquitto.log").start()
        restarted, taken_at_restart = time.time(), int(status(status_file)["taken"])
        arrivals.connect()
        live = (taken_at_restart - taken_at_stop) / (restarted - stopped)
        # The backlog: every reading taken before the restart that had not arrived before the stop.
        waiting = set(range(taken_at_restart)) - {n for n, at in arrivals.seen().items() if at < stopped}
        wait(lambda: waiting <= arrivals.seen().keys(), 600, "backfill")
        seen = arrivals.seen()
        done = max(seen[n] for n in waiting)
        rate = len(waiting) / (done - restarted)
        # Live meanwhile: taken after the restart and arrived before the backlog was through, from
        # the reading's own ts to its arrival (one clock: all of it runs on this machine).
        live_lag = [arrivals.lag[n] for n, at in seen.items() if n >= taken_at_restart and at <= done]
        return live, rate, p99(live_lag), peak_rss_mb(agent.pid)
    finally:
        arrivals.close()
        stop_agent(agent)
        press.kill()
        broker.stop()


class ThroughTheWorker(NamedTuple):
    """What :func:`through_the_worker` measured (readings/s, seconds, readings, MB)."""

    live: float
    rate: float
    p99: float
    backlog: int
    in_store: int
    rss: float
    worker_back_s: float  # from the broker's restart to the first backlog reading's receipt
    rate_after: float  # the backlog's rate from that first receipt on
    p99_after: float  # live p99 of the readings taken from that first receipt on


def through_the_worker(
    folder: Path, backlog: int, machines: int, hz: float, max_messages_per_s: int | None
) -> ThroughTheWorker:
    """The backfill and live lag as stored by the real worker (see the module's docstring, 5)."""
    folder.mkdir()
    folder.chmod(0o755)
    with contextlib.ExitStack() as running:  # each process stopped on the way out, however it ends
        user = servers.service_user("postgres")
        servers.init_postgres(folder / "pg", user)
        pg_port, sockets = servers.free_port(), folder / "pg-sockets"
        registry = servers.postgres(folder / "pg", pg_port, sockets, folder / "pg.log", user).start()
        running.callback(registry.stop)
        dsn = f"host={sockets} port={pg_port} user=postgres dbname=postgres"
        broker, config, port = start_broker(folder)
        running.callback(lambda: broker.stop())  # the one running then: it is restarted below
        store, store_url = start_store(folder)
        running.callback(store.stop)
        presses = [("acme", "plant-1", f"press-{index:02d}") for index in range(1, machines + 1)]
        # The backfill runs far above Phase A's default tenant quota of 100 messages/s (as in
        # tests/test_edge_agent.py); batching stays the platform's (batch 500, flush 1000 ms).
        quota = {"max_devices": machines + 10, "messages_per_second": 50_000}
        cloud = platform(broker={"tenant_quota": quota})
        seed_registry(dsn, cloud, store_url, [ACME_PRESS])  # the tenants, their store routes, the site
        with psycopg.connect(dsn, autocommit=True) as conn:
            for press_id in presses[1:]:
                provisioning.add_machine(conn, *press_id, PRESS.type, actor="bench@seed")
        worker = WorkerProcess.for_platform(
            cloud,
            port,
            store_url,
            folder,
            machines=None,
            from_registry=True,
            flush_interval_ms=cloud.ingest.flush_interval_ms,
        )
        # The worker takes its DSN from the environment only (WorkerProcess passes ours on).
        running.enter_context(_environment("IRONLINK_REGISTRY_DSN", dsn))
        worker.start()
        running.callback(worker.stop)
        press, press_port = start_press(folder)
        running.callback(press.kill)
        # The uplink's defaults (2,000 messages/s, 80 % for history, resend after 30 s): a gateway's.
        ids = [machine for _, _, machine in presses]
        budget = {} if max_messages_per_s is None else {"max_messages_per_s": max_messages_per_s}
        agent = start_agent(folder, port, press_port, ids, round(1000 / hz), **budget)
        running.callback(stop_agent, agent)
        status_file = folder / "agent" / "store.status.json"
        every_machine = [
            leaf(GATEWAY.tenant, GATEWAY.site, "+") for leaf in (telemetry_topic, receipts_topic)
        ]
        arrivals = Arrivals(port, every_machine, "bench-through-the-worker")
        running.callback(arrivals.close)

        wait(lambda: len(arrivals.confirmations()) >= 2 * machines * hz, 60, "live readings stored")
        arrivals.leave()
        broker.stop()
        # Counted once the status was rewritten after the stop (every 0.1 s): every seq from then on
        # was taken with no broker to send it to.
        time.sleep(0.3)
        at_stop = status(status_file)
        wait(lambda: int(status(status_file)["taken"]) - int(at_stop["taken"]) >= backlog, 600, "backlog")
        at_restart = status(status_file)
        restarted = time.time()
        broker = servers.mosquitto(config, port, folder / "mosquitto.log").start()
        arrivals.connect()
        outage = float(at_restart["written_at"]) - float(at_stop["written_at"])
        live = (int(at_restart["taken"]) - int(at_stop["taken"])) / outage
        waiting = set(range(int(at_stop["taken"]), int(at_restart["taken"])))
        wait(lambda: waiting <= arrivals.confirmations().keys(), 600, "the backlog stored")
        confirmations = arrivals.confirmations()
        first, done = min(confirmations[n] for n in waiting), max(confirmations[n] for n in waiting)
        # Live: sent live (not from the history lane), taken between the restart and the end of the
        # backfill; once each of them is stored too, from its own ts to its receipt (one clock).
        live_during = {
            n: ts
            for n, (_, ts, historical) in arrivals.seen_readings().items()
            if not historical and restarted <= ts <= done
        }
        wait(lambda: live_during.keys() <= arrivals.confirmations().keys(), 60, "the live readings stored")
        confirmed, readings = arrivals.confirmations(), arrivals.seen_readings()

        def live_lag(since: float) -> list[float]:
            return [confirmed[n] - ts for n, ts in live_during.items() if ts >= since]

        points = {machine: stored(store_url, (tenant, site, machine)) for tenant, site, machine in presses}
        in_store = sum(
            round(readings[n][1] * 1000) in points[readings[n][0]] for n in waiting if n in readings
        )
        return ThroughTheWorker(
            live=live,
            rate=len(waiting) / (done - restarted),
            p99=p99(live_lag(restarted)),
            backlog=len(waiting),
            in_store=in_store,
            rss=peak_rss_mb(agent.pid),
            worker_back_s=first - restarted,
            rate_after=len(waiting) / (done - first),
            p99_after=p99(live_lag(first)),
        )


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    os.environ[name] = value
    try:
        yield
    finally:
        del os.environ[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=3000, help="readings per store policy")
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--poll-ms", type=int, default=2, help="the agent-only backfill's polling")
    # A gateway's live rate: one edge box polls a line's PLCs, a few to a few dozen machines, each
    # at 1-10 Hz (faster is waveform capture, which stays on the PLC). 20 presses at 10 Hz is the
    # busy end of that: 200 readings/s, so a 10,000-reading backlog is a 50 s outage.
    parser.add_argument("--machines", type=int, default=20, help="machines of the through-the-worker run")
    parser.add_argument("--hz", type=float, default=10.0, help="polling rate per machine of that run")
    parser.add_argument(
        "--max-messages-per-s", type=int, help="that agent's uplink budget (default: the agent's, 2000)"
    )
    args = parser.parse_args()
    problems = [
        f"--{name} must be {rule}, got {value}"
        for name, value, ok, rule in (
            ("readings", args.readings, 30 <= args.readings <= 1_000_000, "30..1000000"),
            ("backlog", args.backlog, 100 <= args.backlog <= 1_000_000, "100..1000000"),
            ("poll-ms", args.poll_ms, 1 <= args.poll_ms <= 10_000, "1..10000"),
            ("machines", args.machines, 1 <= args.machines <= 100, "1..100"),
            ("hz", args.hz, 0.1 <= args.hz <= 100, "0.1..100"),
            (
                "max-messages-per-s",
                args.max_messages_per_s,
                args.max_messages_per_s is None or 1 <= args.max_messages_per_s <= 100_000,
                "1..100000",
            ),
        )
        if not ok
    ]
    if problems:
        parser.error("; ".join(problems))
    with tempfile.TemporaryDirectory(prefix="ironlink-bench-edge-") as tmp:
        folder = Path(tmp)
        folder.chmod(0o755)
        for policy in ("always", "batch:100", "batch:1000"):
            print(f"store {policy}: {store_rate(folder, policy, args.readings):,.0f} readings/s", flush=True)
        each = store_rate(folder, "always", args.readings // 3, one_at_a_time=True)
        print(f"store always, one at a time: {each:,.0f} readings/s", flush=True)
        live, rate, lag, rss = backfill(folder, args.backlog, args.poll_ms)
        print(f"live {live:,.0f} readings/s, backfill {rate:,.0f} readings/s", flush=True)
        print(f"backfill {rate / live:.1f}x live")
        print(f"live p99 during the backfill {lag:.2f} s (reading to subscriber)")
        print(f"agent peak RSS {rss:.0f} MB (one Modbus machine)", flush=True)
        worker = through_the_worker(
            folder / "through-the-worker", args.backlog, args.machines, args.hz, args.max_messages_per_s
        )
        print(
            f"through the worker: {args.machines} Modbus machines at {args.hz:g} Hz, live "
            f"{worker.live:,.0f} readings/s, backlog {worker.backlog:,} readings stored at "
            f"{worker.rate:,.0f} readings/s ({worker.in_store:,} of them found in VictoriaMetrics)"
        )
        print(f"backfill through the worker {worker.rate / worker.live:.1f}x live")
        print(f"live p99 through the worker {worker.p99:.2f} s (reading ts to the worker's receipt)")
        # The worker's MQTT client backs off 1-10 s between reconnects (ingest/session.py): after a
        # long outage it comes back up to 10 s after the broker, and both figures above include that.
        print(
            f"through the worker from its first receipt after the outage ({worker.worker_back_s:.1f} s after "
            f"the broker was back): backfill {worker.rate_after / worker.live:.1f}x live, "
            f"live p99 {worker.p99_after:.2f} s"
        )
        print(f"agent peak RSS {worker.rss:.0f} MB ({args.machines} Modbus machines)")


if __name__ == "__main__":
    main()
