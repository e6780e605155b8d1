"""What each component keeps when it is killed with SIGKILL, measured on the real servers.

- **Mosquitto** persists by snapshot, every ``AUTOSAVE_CHANGES`` changes as rendered: with the
  worker away, a SIGKILL loses at most that many PUBACKed messages, always the newest.
- **VictoriaMetrics** 1.79 confirms a write (204) before it is on disk: a SIGKILL loses what it
  confirmed within ``VICTORIA_METRICS_LOSS_WINDOW_S``, nothing older; started with
  ``-dedup.minScrapeInterval`` it stores a redelivered point once.

Each test prints what it measured (``pytest -s``) and records it as a JUnit property.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import paho.mqtt.client as mqtt
import pytest
from influxdb_client import InfluxDBClient, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS, WriteApi
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from components.render.mosquitto import (
    AUTOSAVE_CHANGES,
)
from infra.tenancy import INGEST_SERVICE, TELEMETRY_FILTER, device_username, telemetry_topic
from ingest.contract import TelemetryV2
from localdev import servers
from localdev.victoria import VictoriaMetrics, wait_for_points
from tests.conftest import DevPlatformHandle, MosquittoFactory
from tests.fixtures.registry import Platform
from tests.test_broker_isolation import STATIC, start_broker
from tests.test_dev_platform import Device

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRESS = ("acme", "plant-1", "press-01")
# Enough messages to span many autosaves (without ``autosave_on_changes`` the 100 would be seconds,
# and all would be lost); 1,097 puts the kill 99 changes after the last save on Mosquitto 2.0.11,
# the worst case. The bound holds whatever the count.
QUEUED = 1097
Record = Callable[[str, object], None]
# Line protocol timestamps in milliseconds (the client types the constant as a plain str).
_MS = cast(WritePrecision, WritePrecision.MS)


# -------------------------------------------------------------------------------- Mosquitto
@dataclass
class Broker:
    """A real Mosquitto running the rendered files, and the credentials to use it."""

    server: servers.Server
    port: int
    ca_file: Path
    fixture: Platform

    def client(self, username: str, *, session: bool = False) -> mqtt.Client:
        """An MQTT 5 client over TLS; ``session``: the worker's kind, ``clean_start`` False with
        an hour's session expiry (Mosquitto 2.0 writes only such sessions to disk)."""
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv5)
        client.username_pw_set(username, self.fixture.passwords[username])
        client.tls_set(ca_certs=str(self.ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.max_inflight_messages_set(100)
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600 if session else 0
        client.connect("127.0.0.1", self.port, clean_start=not session, properties=properties)
        return client


@pytest.fixture
def broker(start_mosquitto: MosquittoFactory, server_root: Path, tmp_path: Path) -> Broker:
    """Mosquitto with the rendered config, password and ACL files (TLS on a free port): the
    isolation suite's static-file broker, whose persistence this file kills and restarts."""
    started = start_broker(start_mosquitto, server_root / f"durability-{tmp_path.name}", STATIC)
    return Broker(started.server, started.port, started.folder / "ca.pem", started.fixture)


def leave_worker_session(broker: Broker) -> None:
    """The worker subscribes once and goes away: from now on the broker queues for its session."""
    worker = broker.client(INGEST_SERVICE, session=True)
    subscribed = threading.Event()
    worker.on_subscribe = lambda *_: subscribed.set()
    worker.loop_start()
    worker.subscribe(TELEMETRY_FILTER, qos=1)
    assert subscribed.wait(10), "no SUBACK within 10 s"
    worker.disconnect()
    worker.loop_stop()


def publish_acknowledged(broker: Broker, count: int) -> list[bytes]:
    """``count`` QoS 1 messages from acme's press; returns them once every one is PUBACKed."""
    username = device_username(*PRESS)
    device = broker.client(username)
    device.loop_start()
    payloads = [f"reading-{index:05d}".encode() for index in range(count)]
    infos = [device.publish(telemetry_topic(*PRESS), payload, qos=1) for payload in payloads]
    for info in infos:
        info.wait_for_publish(30)
        assert info.is_published(), f"message {info.mid} was not acknowledged"
    device.disconnect()
    device.loop_stop()
    return payloads


def redelivered(broker: Broker, expected: int, quiet_s: float = 2.0) -> list[bytes]:
    """Reconnect the worker's session and collect what it is sent, until ``expected`` distinct
    messages arrived or nothing came for ``quiet_s`` seconds."""
    received: list[bytes] = []
    last = [time.monotonic()]

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        received.append(bytes(message.payload))
        last[0] = time.monotonic()

    worker = broker.client(INGEST_SERVICE, session=True)
    worker.on_message = on_message
    worker.loop_start()
    deadline = time.monotonic() + 60
    while len(set(received)) < expected and time.monotonic() - last[0] < quiet_s:
        assert time.monotonic() < deadline, "redelivery still going after 60 s"
        time.sleep(0.05)
    worker.disconnect()
    worker.loop_stop()
    return received


def test_a_sigkilled_mosquitto_loses_at_most_its_autosave_window_of_queued_messages(
    broker: Broker, record_property: Record
) -> None:
    leave_worker_session(broker)
    published = publish_acknowledged(broker, QUEUED)
    broker.server.kill()
    broker.server.start()  # same config, same persistence folder, same port

    survived = sorted(set(redelivered(broker, QUEUED)))
    lost = QUEUED - len(survived)
    record_property("mosquitto_lost", lost)
    print(f"\nmosquitto: {lost} of {QUEUED} PUBACKed messages lost to SIGKILL (bound {AUTOSAVE_CHANGES})")
    assert lost <= AUTOSAVE_CHANGES, f"{lost} lost: more than the {AUTOSAVE_CHANGES} changes between saves"
    # What survives is everything up to the last save: the loss is the newest messages only.
    assert survived == published[: len(survived)]


# -------------------------------------------------------------------------- VictoriaMetrics
@pytest.fixture
def store(server_root: Path, tmp_path: Path) -> Iterator[servers.Server]:
    """A VictoriaMetrics of this test's own, to kill (the launcher's flags, as ``ironlink dev`` runs it)."""
    folder = server_root / f"durability-vm-{tmp_path.name}"
    server = servers.victoria_metrics(folder / "data", servers.free_port(), folder / "vm.log").start()
    yield server
    server.stop()


def _url(server: servers.Server) -> str:
    return next(arg for arg in server.argv if arg.startswith("-httpListenAddr=")).replace(
        "-httpListenAddr=", "http://"
    )


def _writer(server: servers.Server) -> tuple[InfluxDBClient, WriteApi]:
    """Synchronous writes on ``/api/v2/write``, as ``ingest/store.py`` makes them (raises unless 204)."""
    client = InfluxDBClient(url=_url(server), token="unused", org="unused")
    return client, client.write_api(write_options=SYNCHRONOUS)


def _timestamps(server: servers.Server, metric: str) -> list[int]:
    reader = VictoriaMetrics(_url(server))
    reader.force_flush()
    return sorted(
        t for series in reader.export(f'{{__name__="{metric}"}}', start=0) for t in series.timestamps
    )


def test_a_sigkilled_victoria_metrics_loses_only_what_it_confirmed_in_its_last_seconds(
    store: servers.Server, record_property: Record
) -> None:
    """One point per write, every 10 ms, for longer than the stated window; then SIGKILL."""
    client, writes = _writer(store)
    base_ms = int(time.time() * 1000) - 3_600_000  # distinct past timestamps, one per point
    confirmed: dict[int, float] = {}  # timestamp -> when its 204 came back
    started = time.monotonic()
    while time.monotonic() - started < servers.VICTORIA_METRICS_LOSS_WINDOW_S + 2:
        ts = base_ms + len(confirmed)
        writes.write(bucket="b", record=f"durability,tenant_id=t value=1 {ts}", write_precision=_MS)
        confirmed[ts] = time.monotonic()
        time.sleep(0.01)
    client.close()
    store.kill()
    killed = time.monotonic()
    store.start()

    survived = set(_timestamps(store, "durability_value"))
    assert survived <= set(confirmed)
    lost = [ts for ts in confirmed if ts not in survived]
    window = killed - min((confirmed[ts] for ts in lost), default=killed)
    record_property("victoria_metrics_lost", len(lost))
    record_property("victoria_metrics_window_s", round(window, 2))
    print(
        f"\nvictoria-metrics: {len(lost)} of {len(confirmed)} confirmed points lost, the last {window:.1f} s"
    )
    older = [ts for ts in lost if killed - confirmed[ts] > servers.VICTORIA_METRICS_LOSS_WINDOW_S]
    assert older == [], f"{len(older)} points confirmed more than the stated window before the kill were lost"
    assert len(survived) > 0, "nothing survived: the window is longer than the run"


def test_victoria_metrics_stores_a_rewritten_point_once(store: servers.Server) -> None:
    """A message redelivered after a crash is written again with its own timestamp: one sample.
    Without ``-dedup.minScrapeInterval`` VictoriaMetrics would keep both."""
    client, writes = _writer(store)
    ts = int(time.time() * 1000) - 60_000
    for point in (ts, ts, ts + 1):  # the same point twice, then a later one as a barrier
        writes.write(bucket="b", record=f"redelivered,tenant_id=t value=1 {point}", write_precision=_MS)
    client.close()
    servers.wait_until(lambda: ts + 1 in _timestamps(store, "redelivered_value"), 10, "the barrier point")
    assert _timestamps(store, "redelivered_value") == [ts, ts + 1]


# ----------------------------------------------------------------- combined faults (dev platform)
LIVE = 200  # stored by the running worker, then the store is killed within its window
OLD = 50  # stored more than the store's window before it is killed: must all survive
DEAD = 3  # payloads naming another tenant on the press's own topic: dead-lettered by the worker


def _reading(ts_ms: int, tenant: str = "acme") -> bytes:
    """A v2 reading of acme's press with timestamp ``ts_ms`` (its identity in the store); with
    another ``tenant`` the worker must dead-letter it."""
    reading = TelemetryV2(
        schema_version=2,
        tenant_id=tenant,
        site_id=PRESS[1],
        machine_id=PRESS[2],
        machine_type="hydraulic_press",
        status="running",
        ts=ts_ms / 1000,
        metrics={"pressure_bar": 200.0},
    )
    return reading.model_dump_json().encode()


def _publish(press: Device, readings: list[tuple[int, bytes]], acked: dict[int, float]) -> None:
    """Publish at QoS 1, one PUBACK at a time, noting when each timestamp was acknowledged."""
    for ts_ms, payload in readings:
        code = press.publish(telemetry_topic(*PRESS), payload)
        assert not code.is_failure, code
        acked[ts_ms] = time.monotonic()


def _kill(dev: DevPlatformHandle, name: str) -> float:
    record = dev.platform.pids.read(name)
    assert record is not None and record.alive, f"{name} is not running"
    os.kill(record.pid, signal.SIGKILL)
    servers.wait_until(lambda: not record.alive, 10, f"{name} to die")
    return time.monotonic()


@pytest.mark.xdist_group("devplatform")
def test_combined_sigkills_lose_only_what_each_component_states(
    dev_platform: DevPlatformHandle, record_property: Record
) -> None:
    """Worker, then broker (worker down), then store killed with SIGKILL; one ``ironlink dev up``.

    Every acknowledged message (PUBACKed to the press) is stored, dead-lettered, or lost inside a
    stated window, and this test asserts exactly that:

    - *old* (PUBACKed more than ``VICTORIA_METRICS_LOSS_WINDOW_S`` before the store's kill): all stored;
    - *live* (stored by the worker before it died): only those PUBACKed within the store's window
      before its kill may be missing;
    - *queued* (PUBACKed while the worker was down): at most ``AUTOSAVE_CHANGES`` missing, the newest;
      the ``DEAD`` bad ones among the oldest are dead-lettered (rows in the registry), not stored.
    """
    dev = dev_platform
    dev.ensure_up()
    started = datetime.now(UTC)  # dead letters of this run: received since (earlier tests leave theirs)
    base_ms = int(time.time() * 1000) - 600_000  # past, unused timestamps: 10 ms apart, one per message
    stamps = iter(range(base_ms, base_ms + 10_000_000, 10))
    old = [(ts, _reading(ts)) for ts in itertools.islice(stamps, OLD)]
    live = [(ts, _reading(ts)) for ts in itertools.islice(stamps, LIVE)]
    bad = [(ts, _reading(ts, tenant="globex")) for ts in itertools.islice(stamps, DEAD)]
    queued = [*bad, *((ts, _reading(ts)) for ts in itertools.islice(stamps, 2 * AUTOSAVE_CHANGES))]
    acked: dict[int, float] = {}
    store = dev.platform.store

    press = Device(dev, *PRESS)
    try:
        _publish(press, old, acked)
        wait_for_points(store, {PRESS}, since=base_ms / 1000 - 1, settle=0.5)
        # Let the old batch age past the store's window; the live one is stored while it does not.
        servers.wait_until(
            lambda: time.monotonic() - max(acked.values()) > servers.VICTORIA_METRICS_LOSS_WINDOW_S, 30, "old"
        )
        _publish(press, live, acked)
        wait_for_points(store, {PRESS}, since=base_ms / 1000 - 1, settle=0.5)
    finally:
        press.close()
    _kill(dev, "ingest")
    press = Device(dev, *PRESS)
    try:
        _publish(press, queued, acked)
    finally:
        press.close()
    _kill(dev, "mosquitto")
    store_killed = _kill(dev, "victoria-metrics")
    healed = dev.cli("dev", "up")
    for name in ("victoria-metrics", "mosquitto", "ingest"):
        assert re.search(rf"{name}: +restarted", healed.stdout), healed.stdout

    everything = {ts for ts, _ in [*old, *live, *queued]}
    # The bad ones head the queue: their rows in the registry mean the healed worker has taken the
    # redelivered queue (the press's older points alone would satisfy the store's wait).
    dead_letters = dev.platform.dead_lettered
    servers.wait_until(lambda: sum((dead_letters(since=started) or {}).values()) >= DEAD, 30, "dead letters")
    wait_for_points(store, {PRESS}, since=base_ms / 1000 - 1, timeout=20, settle=2.0)
    stored = {
        ts
        for machine in store.points_by_machine("acme", since=base_ms / 1000 - 1)
        if (machine.site_id, machine.machine_id) == PRESS[1:]
        for ts in machine.timestamps
        if ts in everything
    }
    # The registry's rows, as operators see them (``ironlink deadletters list``): durable across
    # every restart, so a redelivered bad message would show here as a second row.
    dead_lettered = sum((dead_letters(since=started) or {}).values())
    missing = everything - stored - {ts for ts, _ in bad}
    in_store_window = {
        ts
        for ts, _ in live
        if ts in missing and store_killed - acked[ts] <= servers.VICTORIA_METRICS_LOSS_WINDOW_S
    }
    in_broker_window = {ts for ts, _ in queued if ts in missing}
    figures = {
        "acknowledged": len(acked),
        "stored": len(stored),
        "dead_lettered": dead_lettered,
        "lost_store_window": len(in_store_window),
        "lost_broker_window": len(in_broker_window),
    }
    for key, value in figures.items():
        record_property(f"combined_{key}", value)
    print(f"\ncombined faults: {figures}")

    assert len(acked) == len(everything)
    assert not {ts for ts, _ in old} & missing, "a point stored before the store's window was lost"
    assert missing == in_store_window | in_broker_window, "lost outside every stated window"
    assert len(in_broker_window) <= AUTOSAVE_CHANGES
    newest = sorted(ts for ts, _ in queued)[-len(in_broker_window) :] if in_broker_window else []
    assert sorted(in_broker_window) == newest, "the broker lost queued messages older than its last save"
    assert not {ts for ts, _ in bad} & stored and dead_lettered == DEAD
    assert len(acked) == len(stored) + dead_lettered + len(in_store_window) + len(in_broker_window)
