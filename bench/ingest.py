# ruff: noqa: E402  (the imports follow the sys.path fix below)
"""Ingest throughput and latency through a real Mosquitto into a real VictoriaMetrics (``make bench``).

Measured in one run, on loopback, with the dev stack's Phase A worker settings:

1. **ceiling**: a bare paho subscriber (MQTT 5, QoS 1, the worker's Receive Maximum, automatic
   acknowledgements) that only counts, draining ``--messages`` queued for its session;
2. **worker**: ``python -m ingest`` draining the same workload queued for *its* session, counted
   as points written and acknowledged (``ironlink_ingest_points_written``), then checked in the
   store: every message must be there;
3. **latency**: messages published live at ``--rate`` for ``--seconds`` with ``ts`` = publish
   time; p50/p99 of publish→stored come from the worker's ``ironlink_ingest_lag_seconds`` histogram
   (interpolated within its buckets, as ``histogram_quantile`` does);
4. **peak RSS** of the worker process (``VmHWM``).

Draining a queued backlog measures what each consumer can take without the publisher competing
for the same two cores. Ceiling and worker alternate for ``--rounds`` rounds and the best of each
counts, which keeps a burst of unrelated load on the machine from deciding the ratio.
The tenants' quotas are lifted for the run (they would dead-letter a bench).

    python bench/ingest.py [--messages 20000] [--rate 1000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
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

from infra.config import deep_merge, parse_platform, read_stack_settings, stack_file
from infra.tenancy import TELEMETRY_FILTER, store_routes, telemetry_topic
from ingest.catalog import MACHINE_TYPES
from ingest.settings import WorkerSettings, worker_settings_for
from localdev import servers
from localdev.victoria import VictoriaMetrics

ROOT = Path(__file__).resolve().parent.parent
BROKER_CONF = ROOT / "tests" / "fixtures" / "ingest" / "mosquitto.conf"
WORKER_ID = "bench-worker"
CEILING_ID = "bench-ceiling"


def start_broker(folder: Path, name: str) -> tuple[servers.Server, int]:
    port, persistence = servers.free_port(), folder / f"{name}-mosquitto"
    persistence.mkdir()
    servers.hand_over(persistence, servers.service_user("mosquitto"))
    conf = folder / f"{name}-mosquitto.conf"
    conf.write_text(BROKER_CONF.read_text().format(port=port, persistence_dir=persistence))
    return servers.mosquitto(conf, port, folder / f"{name}-mosquitto.log").start(), port


def settings_for(mqtt_port: int, store_url: str, http_port: int) -> WorkerSettings:
    raw = deep_merge(
        read_stack_settings(stack_file("dev", ROOT)),
        {"broker": {"tenant_quota": {"messages_per_second": 1e6}}},
    )
    config = parse_platform(raw, "dev")
    return worker_settings_for(
        config,
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


def client(client_id: str, port: int, *, clean: bool, receive_maximum: int = 65535) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
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


def ceiling(port: int, count: int, receive_maximum: int) -> float:
    """Messages per second a bare subscriber drains (it only counts)."""
    done = threading.Event()
    received = 0

    def on_message(_c: mqtt.Client, _u: object, _m: mqtt.MQTTMessage) -> None:
        nonlocal received
        received += 1
        if received == count:
            done.set()

    c = client(CEILING_ID, port, clean=False, receive_maximum=receive_maximum)
    c.on_message = on_message
    started = time.monotonic()
    c.loop_start()
    if not done.wait(120):
        raise SystemExit(f"ceiling subscriber got {received} of {count} messages")
    elapsed = time.monotonic() - started
    c.disconnect()
    c.loop_stop()
    return count / elapsed


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


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20_000, help="queued messages per round")
    parser.add_argument("--rounds", type=int, default=2, help="ceiling and worker alternate; best of each")
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="live publishing rate of the latency phase"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of the latency phase")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="ironlink-bench-"))
    folder.chmod(0o755)  # Mosquitto drops to its own account and persists under it
    # Two identical brokers, so that neither consumer's session also queues the other's backlog.
    (ceiling_broker, ceiling_port), (broker, mqtt_port) = (
        start_broker(folder, "ceiling"),
        start_broker(folder, "worker"),
    )
    vm_port, http_port = servers.free_port(), servers.free_port()
    store = servers.victoria_metrics(folder / "vm", vm_port, folder / "vm.log").start()
    store_url = f"http://127.0.0.1:{vm_port}"
    settings = settings_for(mqtt_port, store_url, http_port)
    env = {**os.environ, **settings.to_env()}
    worker: subprocess.Popen[bytes] | None = None
    ceiling_rates, worker_rates, peaks = [], [], []
    try:
        for round_ in range(args.rounds):
            backlog = list(workload(settings, args.messages, time.time() - 7200 + 300 * round_, 0.01))
            create_session(CEILING_ID, ceiling_port)
            publish(ceiling_port, backlog)
            ceiling_rates.append(ceiling(ceiling_port, args.messages, settings.receive_maximum))

            if worker is None:
                create_session(WORKER_ID, mqtt_port)
            else:
                peaks.append(stop(worker))
            publish(mqtt_port, backlog)
            worker = subprocess.Popen([sys.executable, "-m", "ingest"], env=env, cwd=ROOT)
            servers.wait_until(lambda: servers.http_ok(f"http://127.0.0.1:{http_port}/readyz"), 30, "worker")
            started = time.monotonic()
            servers.wait_until(lambda: written(http_port) >= args.messages, 120, "drain")
            worker_rates.append(args.messages / (time.monotonic() - started))
        reader = VictoriaMetrics(store_url)
        reader.force_flush()
        stored = sum(len(s.timestamps) for s in reader.export('{__name__="telemetry_status_code"}', start=0))

        live_count = int(args.rate * args.seconds)
        before = lag_buckets(scrape(http_port))
        publish(mqtt_port, list(workload(settings, live_count, time.time(), 0.0)), rate=args.rate)
        target = args.messages + live_count
        servers.wait_until(lambda: written(http_port) >= target, 60, "live")
        after = lag_buckets(scrape(http_port))
    finally:
        if worker is not None:
            peaks.append(stop(worker))
        broker.stop()
        ceiling_broker.stop()
        store.stop()

    sent = args.rounds * args.messages
    ceiling_rate, worker_rate = max(ceiling_rates), max(worker_rates)
    print(
        f"workload            {args.messages} messages over {len(settings.tenants)} tenants, batch "
        f"{settings.batch_size}, flush {settings.flush_interval_ms} ms, window {settings.receive_maximum}"
    )
    rounds = f"best of {args.rounds}: " if args.rounds > 1 else ""
    print(
        f"ceiling             {ceiling_rate:8.0f} msg/s  ({rounds}{_rates(ceiling_rates)}; bare subscriber)"
    )
    print(f"worker              {worker_rate:8.0f} msg/s  ({rounds}{_rates(worker_rates)}; stored + acked)")
    print(f"ratio               {worker_rate / ceiling_rate:8.0%}")
    print(f"stored              {stored} of {sent} messages in VictoriaMetrics")
    live = f"{live_count} messages published at {args.rate:.0f}/s"
    print(f"latency p50         {quantile(0.5, before, after) * 1000:8.0f} ms  (publish -> stored, {live})")
    print(f"latency p99         {quantile(0.99, before, after) * 1000:8.0f} ms")
    print(f"worker peak RSS     {max(peaks):8.1f} MiB")
    if stored != sent:
        raise SystemExit(f"lost messages: {sent - stored}")


def _rates(rates: list[float]) -> str:
    return ", ".join(f"{rate:.0f}" for rate in rates)


def written(http_port: int) -> float:
    return metric_sum(scrape(http_port), "ironlink_ingest_points_written_total")


def stop(worker: subprocess.Popen[bytes]) -> float:
    """SIGTERM the worker (its session stays with the broker); its peak RSS in MiB."""
    peak = peak_rss_mb(worker.pid)
    worker.send_signal(signal.SIGTERM)
    worker.wait(30)
    return peak


if __name__ == "__main__":
    main()
