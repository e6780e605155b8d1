# ruff: noqa: E402  (the imports follow the sys.path fix below)
"""What Mosquitto's autosave costs and what it saves: a queued backlog, then a SIGKILL (``make bench``).

Mosquitto persists by snapshot: every ``autosave_interval`` changes (``autosave_on_changes
true``) it writes its whole database, every queued message, and fsyncs it. Saving often shrinks
what a SIGKILL loses and costs throughput, the more so the longer the backlog. Per setting (0 = no
autosave, the baseline; then every 100, 10 and 1 changes) on a real Mosquitto, in one run:

1. **throughput**: ``--messages`` QoS 1 telemetry-sized messages published for a persistent
   session that is offline (the worker away), timed from the first PUBLISH to the last PUBACK;
2. **lost**: the broker is killed with SIGKILL right after the last PUBACK, restarted on the same
   persistence folder, and the session's redelivered messages are counted.

Settings alternate for ``--rounds`` rounds and the best throughput of each counts.

    python bench/durability.py [--messages 5000] [--rounds 3] [--every 100 10 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

# bench/ holds ingest.py: drop bench/ from the path so that ``ingest`` is the package.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from components.render.mosquitto import AUTOSAVE_CHANGES, persistence_settings
from localdev import servers

SETTINGS = (0, 100, 10, 1)  # autosave every N changes; 0 = no autosave (the baseline)
SESSION = "bench-offline-worker"
TOPIC = "ironlink/acme/plant-1/press-01/telemetry"


def start_broker(folder: Path, port: int, autosave_changes: int) -> servers.Server:
    data = folder / "data"
    data.mkdir(exist_ok=True)
    servers.hand_over(data, servers.service_user("mosquitto"))
    conf = folder / "mosquitto.conf"
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "max_queued_messages 1000000",
        *persistence_settings(f"{data}/", autosave_changes),
        "log_dest stdout",
        "log_type error",
        "log_type warning",
    ]
    conf.write_text("\n".join(lines) + "\n")
    return servers.mosquitto(conf, port, folder / "mosquitto.log").start()


def connect(client_id: str, port: int, *, clean: bool) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    client.connect("127.0.0.1", port, clean_start=clean, properties=properties)
    client.loop_start()
    return client


def leave_session(port: int) -> None:
    """Subscribe once and go away: the broker queues the telemetry for the session from now on.

    ``clean_start`` False even for a new session, as the worker connects: Mosquitto 2.0 writes to
    disk only sessions whose last CONNECT had it False, whatever their session expiry.
    """
    client = connect(SESSION, port, clean=False)
    subscribed = threading.Event()
    client.on_subscribe = lambda *_: subscribed.set()
    client.subscribe(TOPIC, qos=1)
    if not subscribed.wait(10):
        raise SystemExit("no SUBACK within 10 s")
    client.disconnect()
    client.loop_stop()


def payload(index: int) -> bytes:
    """A telemetry-sized body (about 250 bytes) carrying its sequence number."""
    body = {
        "schema_version": 2,
        "tenant_id": "acme",
        "site_id": "plant-1",
        "machine_id": "press-01",
        "machine_type": "hydraulic_press",
        "ts": 1_700_000_000 + index / 1000,
        "status": "running",
        "metrics": {"pressure_bar": 201.5, "oil_temp_c": 48.2, "cycle_count": index, "seq": index},
    }
    return json.dumps(body).encode()


def publish(port: int, count: int) -> float:
    """Publish ``count`` messages at QoS 1; seconds from the first PUBLISH to the last PUBACK."""
    client = connect("bench-publisher", port, clean=True)
    started = time.monotonic()
    infos = [client.publish(TOPIC, payload(index), qos=1) for index in range(count)]
    for info in infos:
        info.wait_for_publish(120)
        if not info.is_published():
            raise SystemExit(f"message {info.mid} not acknowledged within 120 s")
    elapsed = time.monotonic() - started
    client.disconnect()
    client.loop_stop()
    return elapsed


def redelivered(port: int, expected: int) -> int:
    """Reconnect the session and count the distinct messages it gets (waits 1 s after the last)."""
    seen: set[bytes] = set()
    last = [time.monotonic()]

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        seen.add(bytes(message.payload))
        last[0] = time.monotonic()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=SESSION, protocol=mqtt.MQTTv5)
    client.on_message = on_message
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    client.connect("127.0.0.1", port, clean_start=False, properties=properties)
    client.loop_start()
    deadline = time.monotonic() + 60
    while len(seen) < expected and time.monotonic() - last[0] < 1.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    client.disconnect()
    client.loop_stop()
    return len(seen)


def run(root: Path, autosave_changes: int, count: int, round_: int) -> tuple[float, int]:
    """One setting once: (messages per second, messages lost to the SIGKILL)."""
    folder = root / f"every-{autosave_changes}-round-{round_}"
    folder.mkdir()
    folder.chmod(0o755)
    port = servers.free_port()
    broker = start_broker(folder, port, autosave_changes)
    try:
        leave_session(port)
        elapsed = publish(port, count)
        broker.kill()
        broker = start_broker(folder, port, autosave_changes)
        return count / elapsed, count - redelivered(port, count)
    finally:
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=5000, help="messages queued per setting and round")
    parser.add_argument("--rounds", type=int, default=3, help="settings alternate; best throughput counts")
    parser.add_argument(
        "--every",
        type=int,
        nargs="+",
        default=list(SETTINGS[1:]),
        help="autosave settings (changes) to compare with no autosave; every 1 is slow past 5,000",
    )
    args = parser.parse_args()
    settings = (0, *args.every)

    root = Path(tempfile.mkdtemp(prefix="ironlink-bench-durability-"))
    root.chmod(0o755)  # Mosquitto drops to its own account and persists under it
    rates: dict[int, list[float]] = {setting: [] for setting in settings}
    losses: dict[int, list[int]] = {setting: [] for setting in settings}
    for round_ in range(args.rounds):
        for setting in settings:
            rate, lost = run(root, setting, args.messages, round_)
            rates[setting].append(rate)
            losses[setting].append(lost)

    baseline = max(rates[0])
    print(f"workload   {args.messages} QoS 1 messages of ~250 B queued for an offline session, then SIGKILL")
    print(f"{'autosave':<22}{'msg/s (best)':>13}{'vs none':>9}   lost per round (of {args.messages})")
    for setting in settings:
        label = "none (baseline)" if setting == 0 else f"every {setting} changes"
        marker = "  <- rendered" if setting == AUTOSAVE_CHANGES else ""
        best = max(rates[setting])
        lost_per_round = ", ".join(map(str, losses[setting]))
        print(f"{label:<22}{best:>13.0f}{best / baseline:>9.0%}   {lost_per_round}{marker}")


if __name__ == "__main__":
    main()
