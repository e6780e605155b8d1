# ruff: noqa: E402  (the imports follow the sys.path fix below)
"""Ingest throughput and latency through a real Mosquitto into a real VictoriaMetrics (``make bench``).

Three consumers drain the same queued backlog (``--messages`` v2 messages), each from its own
Mosquitto, in alternating order for ``--rounds`` rounds, with the dev stack's Phase A settings:

1. **worker**: ``python -m ingest`` (run from ``--worker-root``: the code to measure), counted as
   points written and acknowledged (``ironlink_ingest_points_written``), every one checked in
   the store at the end;
2. **paho**: a bare paho subscriber doing the same MQTT work (MQTT 5, QoS 1, the worker's Receive
   Maximum, a persistent session, ``manual_ack`` and ``ack()`` of each message on receipt);
3. **mosquitto_sub** (C, libmosquitto): the same session settings, ``-C N``.

Each rate is taken from the first to the last message of a round (connection set-up and process
start excluded), so that rounds compare. The median of the rounds and their spread are printed,
then ``ratio`` (worker / paho: the median of the rounds' ratios), the ratio to ``mosquitto_sub``,
the p50/p99 of publish -> stored at ``--rate`` (the worker's ``ironlink_ingest_lag_seconds``, interpolated
within its buckets as ``histogram_quantile`` does) and the worker's peak RSS (``VmHWM``).
The tenants' quotas are lifted for the run (they would dead-letter a bench).

    python bench/ingest.py [--messages 40000] [--rounds 3] [--rate 1000] [--seconds 5]
                           [--worker-root PATH]   # e.g. a copy of the repo with a changed ingest/
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

# This file is bench/ingest.py: drop bench/ from the path so that ``ingest`` is the package.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from infra.config import (
    PlatformConfig,
    deep_merge,
    load_stack,
    parse_platform,
    read_stack_settings,
    stack_file,
)
from infra.tenancy import TELEMETRY_FILTER, store_routes, telemetry_topic
from ingest.catalog import MACHINE_TYPES
from ingest.settings import WorkerSettings, worker_settings_for
from localdev import servers
from localdev.state import demo_fleet
from localdev.victoria import VictoriaMetrics

ROOT = Path(__file__).resolve().parent.parent
BROKER_CONF = ROOT / "tests" / "fixtures" / "ingest" / "mosquitto.conf"
WORKER_ID = "bench-worker"
PAHO_ID = "bench-paho"
MOSQUITTO_SUB_ID = "bench-mosquitto-sub"
CONSUMERS = ["worker", "paho", "mosquitto_sub"]
DRAIN_TIMEOUT_S = 120
WORKER_PEAKS: list[float] = []  # MiB, one per worker process


def start_broker(folder: Path, name: str) -> tuple[servers.Server, int]:
    port, persistence = servers.free_port(), folder / f"{name}-mosquitto"
    persistence.mkdir()
    servers.hand_over(persistence, servers.service_user("mosquitto"))
    conf = folder / f"{name}-mosquitto.conf"
    conf.write_text(BROKER_CONF.read_text().format(port=port, persistence_dir=persistence))
    return servers.mosquitto(conf, port, folder / f"{name}-mosquitto.log").start(), port


def bench_config() -> PlatformConfig:
    """The platform stack with its tenant stacks' tenants (load_stack), quotas lifted."""
    tenants = [t.model_dump(mode="json", exclude_none=True) for t in load_stack("dev", ROOT).tenants]
    lifted = {"messages_per_second": 1e6, "messages_per_month": 10**12}
    raw = deep_merge(
        read_stack_settings(stack_file("dev", ROOT)),
        {"broker": {"tenant_quota": lifted}, "tenants": tenants},
    )
    return parse_platform(raw, "dev")


def settings_for(mqtt_port: int, store_url: str, http_port: int) -> WorkerSettings:
    config = bench_config()
    return worker_settings_for(
        config,
        machines=demo_fleet(config).route_machines(),
        mqtt_host="127.0.0.1",
        mqtt_port=mqtt_port,
        store_urls={route.instance: store_url for route in store_routes(config).values()},
        mqtt_tls=False,
        mqtt_client_id=WORKER_ID,
        http_host="127.0.0.1",
        http_port=http_port,
        log_level="warning",
    )


def workload(
    settings: WorkerSettings, count: int, start_ts: float, spacing_s: float
) -> Iterator[tuple[str, bytes]]:
    """``count`` v2 messages round-robin over the stack's machines, typical values, distinct ``ts``."""
    machines = [
        (tenant, *path.split("/"), kind)
        for tenant, route in settings.tenants.items()
        for path, kind in route.machines.items()
    ]
    for index in range(count):
        tenant, site, machine, kind = machines[index % len(machines)]
        body = {
            "schema_version": 2,
            "tenant_id": tenant,
            "site_id": site,
            "machine_id": machine,
            "machine_type": kind,
            "ts": round(start_ts + index * spacing_s, 3),
            "status": "running" if index % 7 else "stopped",
            "metrics": {metric.name: metric.typical for metric in MACHINE_TYPES[kind].metrics},
        }
        yield telemetry_topic(tenant, site, machine), json.dumps(body).encode()


def client(
    client_id: str, port: int, *, clean: bool, receive_maximum: int = 65535, manual_ack: bool = False
) -> mqtt.Client:
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=manual_ack
    )
    c.max_inflight_messages_set(1000)  # the publisher's window of unacknowledged QoS 1 messages
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    properties.ReceiveMaximum = receive_maximum
    c.connect("127.0.0.1", port, clean_start=clean, properties=properties)
    return c


def create_session(client_id: str, port: int) -> None:
    """Subscribe once and leave: the broker then queues the telemetry for this session."""
    c = client(client_id, port, clean=True)
    c.loop_start()
    c.subscribe(TELEMETRY_FILTER, qos=1)
    time.sleep(0.3)
    c.disconnect()
    c.loop_stop()


def publish(port: int, messages: list[tuple[str, bytes]], rate: float | None = None) -> None:
    """Publish at QoS 1 (paced at ``rate`` per second with ``ts`` rewritten to now), wait for PUBACKs."""
    c = client("bench-publisher", port, clean=True)
    c.loop_start()
    started = time.monotonic()
    infos = []
    for index, (topic, payload) in enumerate(messages):
        if rate is not None:
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            body = json.loads(payload)
            body["ts"] = round(time.time(), 3)
            payload = json.dumps(body).encode()
        infos.append(c.publish(topic, payload, qos=1))
    for info in infos:
        info.wait_for_publish(30)
    c.disconnect()
    c.loop_stop()


class Drain:
    """Arrival times of one consumer's round: the rate from its first to its last message."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last = 0.0

    def rate(self, count: int) -> float:
        assert self.first is not None
        return (count - 1) / (self.last - self.first)


def paho_drain(port: int, count: int, receive_maximum: int) -> float:
    """A bare paho subscriber: manual acknowledgement of each message as it arrives."""
    done, synced = threading.Event(), threading.Event()
    drain, received = Drain(), 0

    def on_message(c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        nonlocal received
        drain.last = time.perf_counter()
        if drain.first is None:
            drain.first = drain.last
        c.ack(message.mid, message.qos)
        received += 1
        if received == count:
            done.set()

    c = client(PAHO_ID, port, clean=False, receive_maximum=receive_maximum, manual_ack=True)
    c.on_message = on_message
    c.on_subscribe = lambda *_: synced.set()
    c.loop_start()
    if not done.wait(DRAIN_TIMEOUT_S):
        raise SystemExit(f"paho subscriber got {received} of {count} messages")
    # Mosquitto handles a connection's packets in order: once this SUBACK is in, so are the PUBACKs
    # (a session taken over before it read them would redeliver into the next round).
    c.subscribe(TELEMETRY_FILTER, qos=1)
    synced.wait(DRAIN_TIMEOUT_S)
    c.disconnect()
    c.loop_stop()
    return drain.rate(count)


def mosquitto_sub(port: int, receive_maximum: int, *extra: str) -> list[str]:
    return [
        "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-V", "5", "-i", MOSQUITTO_SUB_ID,
        "-c", "-x", "3600", "-q", "1", "-t", TELEMETRY_FILTER,
        "-D", "connect", "receive-maximum", str(receive_maximum), *extra,
    ]  # fmt: skip


def mosquitto_sub_drain(port: int, count: int, receive_maximum: int) -> float:
    """libmosquitto's own subscriber, stamping each message (``%U``: Unix time, nanoseconds)."""
    out = subprocess.run(
        mosquitto_sub(port, receive_maximum, "-C", str(count), "-F", "%U"),
        capture_output=True, text=True, timeout=DRAIN_TIMEOUT_S, check=True,
    ).stdout.split()  # fmt: skip
    return (count - 1) / (float(out[-1]) - float(out[0]))


def worker_drain(command: list[str], env: dict[str, str], root: Path, http_port: int, count: int) -> float:
    """Start the worker on its queued backlog; rate between its first and its last written point,
    polled often at both ends (``/metrics``) and rarely in between (a scrape costs it CPU)."""
    worker = subprocess.Popen(command, env=env, cwd=root)
    try:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        first: tuple[float, float] | None = None
        while time.monotonic() < deadline and worker.poll() is None:
            done = written_or_none(http_port)
            now = time.perf_counter()
            if done is not None and done > 0 and first is None:
                first = (now, done)
            if done is not None and done >= count and first is not None:
                return (done - first[1]) / (now - first[0])
            near_ends = first is None or (done or 0) >= 0.9 * count
            time.sleep(0.01 if near_ends else 0.1)
        raise SystemExit(f"worker did not write {count} points (exit code {worker.poll()})")
    finally:
        WORKER_PEAKS.append(stop(worker))


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def metric_sum(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def lag_buckets(text: str) -> list[tuple[float, float]]:
    pattern = r'^ironlink_ingest_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$'
    return [(float(le), float(count)) for le, count in re.findall(pattern, text, re.M)]


def quantile(q: float, before: list[tuple[float, float]], after: list[tuple[float, float]]) -> float:
    """``histogram_quantile`` over the difference of two scrapes of a cumulative histogram."""
    buckets = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]
    total = buckets[-1][1]
    rank, lower, below = q * total, 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = upper, count
    return lower


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=40_000, help="queued messages per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each consumer once per round")
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="live publishing rate of the latency phase"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of the latency phase")
    parser.add_argument(
        "--worker-root",
        type=Path,
        default=ROOT,
        help="folder whose ingest/ package runs as the worker (default: this checkout)",
    )
    args = parser.parse_args()
    problems = [
        f"--{name} must be {rule}, got {value}"
        for name, value, ok, rule in (
            ("messages", args.messages, 100 <= args.messages <= 200_000, "100..200000"),
            ("rounds", args.rounds, 1 <= args.rounds <= 20, "1..20"),
            ("rate", args.rate, 1 <= args.rate <= 20_000, "1..20000"),
            ("seconds", args.seconds, 0.5 <= args.seconds <= 120, "0.5..120"),
            (
                "worker-root",
                args.worker_root,
                (args.worker_root / "ingest" / "__main__.py").is_file(),
                "a folder holding ingest/__main__.py",
            ),
        )
        if not ok
    ]
    if problems:
        parser.error("; ".join(problems))
    worker_root = args.worker_root.resolve()

    folder = Path(tempfile.mkdtemp(prefix="ironlink-bench-"))
    folder.chmod(0o755)  # Mosquitto drops to its own account and persists under it
    # One broker per consumer, so that no session also queues another consumer's backlog.
    brokers = {name: start_broker(folder, name) for name in CONSUMERS}
    ports = {name: port for name, (_, port) in brokers.items()}
    vm_port, http_port = servers.free_port(), servers.free_port()
    store = servers.victoria_metrics(folder / "vm", vm_port, folder / "vm.log").start()
    store_url = f"http://127.0.0.1:{vm_port}"
    settings = settings_for(ports["worker"], store_url, http_port)
    window = settings.receive_maximum
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(worker_root)}
    command = [sys.executable, "-m", "ingest"]
    rates: dict[str, list[float]] = {name: [] for name in CONSUMERS}
    drains = {
        "worker": lambda: worker_drain(command, env, worker_root, http_port, args.messages),
        "paho": lambda: paho_drain(ports["paho"], args.messages, window),
        "mosquitto_sub": lambda: mosquitto_sub_drain(ports["mosquitto_sub"], args.messages, window),
    }
    try:
        create_session(WORKER_ID, ports["worker"])
        create_session(PAHO_ID, ports["paho"])
        subprocess.run(mosquitto_sub(ports["mosquitto_sub"], window, "-E"), check=True, timeout=30)
        for round_ in range(args.rounds):
            backlog = list(workload(settings, args.messages, time.time() - 7200 + 300 * round_, 0.01))
            order = CONSUMERS[round_ % 2 :] + CONSUMERS[: round_ % 2]  # who goes first alternates
            for name in order:
                publish(ports[name], backlog)
                rates[name].append(drains[name]())
        reader = VictoriaMetrics(store_url)
        reader.force_flush()
        stored = sum(len(s.timestamps) for s in reader.export('{__name__="telemetry_status_code"}', start=0))

        live_count = int(args.rate * args.seconds)
        worker = subprocess.Popen(command, env=env, cwd=worker_root)
        try:
            servers.wait_until(lambda: servers.http_ok(f"http://127.0.0.1:{http_port}/readyz"), 30, "worker")
            before = lag_buckets(scrape(http_port))
            publish(ports["worker"], list(workload(settings, live_count, time.time(), 0.0)), rate=args.rate)
            servers.wait_until(lambda: written(http_port) >= live_count, 60, "live")
            after = lag_buckets(scrape(http_port))
        finally:
            WORKER_PEAKS.append(stop(worker))
    finally:
        for server, _ in brokers.values():
            server.stop()
        store.stop()

    sent = args.rounds * args.messages
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"workload            {args.messages} queued messages x {args.rounds} rounds over "
        f"{len(settings.tenants)} tenants, batch {settings.batch_size}, flush "
        f"{settings.flush_interval_ms} ms, window {window}; worker from {worker_root}"
    )
    for name, what in (
        ("worker", "stored + acked"),
        ("paho", "bare paho, manual ack"),
        ("mosquitto_sub", "C client"),
    ):
        values = rates[name]
        spread = (max(values) - min(values)) / medians[name]
        print(
            f"{name:<19} {medians[name]:8.0f} msg/s  (median; spread {spread:4.0%}: {_rates(values)}; {what})"
        )
    # Each round's worker and paho run back to back: the median of their ratios shrugs off load
    # that other processes put on the machine for a round or two.
    ratio = statistics.median(w / p for w, p in zip(rates["worker"], rates["paho"], strict=True))
    print(f"ratio               {ratio:8.2f}  (worker / paho, median of the rounds' ratios, aim >= 0.85)")
    print(
        f"ratio mosquitto_sub {medians['worker'] / medians['mosquitto_sub']:8.2f}  (worker / mosquitto_sub)"
    )
    print(f"stored              {stored} of {sent} messages in VictoriaMetrics")
    live = f"{live_count} messages published at {args.rate:.0f}/s"
    print(f"latency p50         {quantile(0.5, before, after) * 1000:8.0f} ms  (publish -> stored, {live})")
    print(f"latency p99         {quantile(0.99, before, after) * 1000:8.0f} ms")
    print(f"worker peak RSS     {max(WORKER_PEAKS):8.1f} MiB")
    if stored != sent:
        raise SystemExit(f"lost messages: {sent - stored}")


def _rates(rates: list[float]) -> str:
    return ", ".join(f"{rate:.0f}" for rate in rates)


def written(http_port: int) -> float:
    return metric_sum(scrape(http_port), "ironlink_ingest_points_written_total")


def written_or_none(http_port: int) -> float | None:
    """Points written so far, or None while the worker does not answer yet."""
    try:
        return written(http_port)
    except OSError:
        return None


def stop(worker: subprocess.Popen[bytes]) -> float:
    """SIGTERM the worker (its session stays with the broker); its peak RSS in MiB (0: it had exited)."""
    if worker.poll() is not None:
        return 0.0
    peak = servers.peak_rss_mb(worker.pid)
    worker.send_signal(signal.SIGTERM)
    worker.wait(30)
    return peak


if __name__ == "__main__":
    main()
