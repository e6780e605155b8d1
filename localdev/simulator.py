"""Device simulator: every machine of the stack publishes telemetry with its own credential.

Each machine is a small state machine driven by a seeded random generator:

- values follow a mean-reverting random walk around the catalog's ``typical`` value, always within
  the catalog's bounds (``ingest/catalog.py``); while a machine is stopped its drives, currents and
  pressures fall to zero and temperatures cool towards ambient; counters only grow while running;
- status changes: running → stopped (and back), now and then a fault: the machine keeps going but
  its temperature climbs until the fault is cleared by a stop;
- gaps: now and then a machine goes silent for a few seconds, as a flaky gateway does;
- payloads are the contract's models (``ingest/contract.py``): half the machines speak v1 (the PoC
  gateway: vendor signal names, whole seconds), the others v2 (canonical names).

Each device connects over TLS (MQTT 5, QoS 1) as ``<tenant>.<site>.<machine>`` with the password the
dev platform generated for it, so the broker's ACL applies exactly as in production; a refused
publish shows up as a PUBACK reason code, counted per device.
"""

from __future__ import annotations

import random
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from infra.fleet import Fleet
from infra.tenancy import device_username, telemetry_topic
from ingest.catalog import MACHINE_TYPES, MachineType, Metric
from ingest.contract import Signal, TelemetryV1, TelemetryV2
from localdev.platform import LOOPBACK, DevPlatform

Status = Literal["running", "stopped", "fault"]
AMBIENT_C = 20.0
# Per-tick transition probabilities (a tick is one message interval).
P_STOP, P_START, P_FAULT, P_CLEAR, P_GAP = 0.03, 0.25, 0.01, 0.3, 0.02
GAP_TICKS = (2, 5)
# Units of quantities that fall to zero while a machine stands still.
_IDLE_ZERO_UNITS = {"rpm", "%", "mm/s", "kW", "A", "bar", "m/s"}
CONNECT_TIMEOUT_S = 10.0


class SimulatorError(RuntimeError):
    """A device could not connect or publish; the message names the device and the broker's answer."""


@dataclass
class MachineSimulator:
    """One machine's simulated state; :meth:`tick` gives its next payload, or None during a gap."""

    tenant_id: str
    site_id: str
    machine_id: str
    machine_type: MachineType
    schema_version: int
    rng: random.Random
    status: Status = "running"
    values: dict[str, float] = field(init=False)
    silent_ticks: int = 0
    ticks: int = 0

    def __post_init__(self) -> None:
        self.values = {metric.name: metric.typical for metric in self.machine_type.metrics}

    @property
    def username(self) -> str:
        return device_username(self.tenant_id, self.site_id, self.machine_id)

    @property
    def topic(self) -> str:
        return telemetry_topic(self.tenant_id, self.site_id, self.machine_id)

    def _next_status(self) -> Status:
        roll = self.rng.random()
        if self.status == "running":
            return "fault" if roll < P_FAULT else "stopped" if roll < P_FAULT + P_STOP else "running"
        if self.status == "fault":
            return "stopped" if roll < P_CLEAR else "fault"
        return "running" if roll < P_START else "stopped"

    def _step(self, metric: Metric) -> float:
        value = self.values[metric.name]
        span = metric.maximum - metric.minimum
        if metric.unit == "count":
            grows = self.status == "running"
            return min(metric.maximum, value + (self.rng.randint(1, 5) if grows else 0))
        pull = 0.2  # temperatures and pressures drift towards their target
        if self.status == "fault" and metric.name == self.machine_type.temperature_metric:
            target = metric.typical + 0.3 * (metric.maximum - metric.typical)  # running hot
        elif self.status == "stopped" and metric.unit in _IDLE_ZERO_UNITS:
            target, pull = metric.minimum, 0.6  # drives spin down within a few seconds
        elif self.status == "stopped" and metric.unit == "degC":
            target = max(metric.minimum, AMBIENT_C)
        else:
            target = metric.typical
        noise = self.rng.gauss(0.0, 0.01 * min(span, 4 * abs(metric.typical) or span))
        value += pull * (target - value) + noise
        return round(min(metric.maximum, max(metric.minimum, value)), 3)

    def tick(self, now: float) -> TelemetryV1 | TelemetryV2 | None:
        """Advance one interval; the payload to publish, or None while the machine is silent."""
        self.ticks += 1
        if self.silent_ticks > 0:
            self.silent_ticks -= 1
            return None
        if self.ticks > 1 and self.rng.random() < P_GAP:
            self.silent_ticks = self.rng.randint(*GAP_TICKS) - 1
            return None
        self.status = self._next_status() if self.ticks > 1 else "running"
        self.evolve()
        return self.payload(now)

    def evolve(self) -> None:
        """Move every value one step under the current status."""
        self.values = {metric.name: self._step(metric) for metric in self.machine_type.metrics}

    def payload(self, now: float) -> TelemetryV1 | TelemetryV2:
        identity: dict[str, Any] = {
            "tenant_id": self.tenant_id,
            "site_id": self.site_id,
            "machine_id": self.machine_id,
            "status": self.status,
        }
        if self.schema_version == 1:
            signals = [
                Signal(name=(metric.vendor_signals or (metric.name,))[0], value=self.values[metric.name])
                for metric in self.machine_type.metrics
            ]
            return TelemetryV1(schema_version=1, ts=int(now), signals=signals, **identity)
        return TelemetryV2(
            schema_version=2,
            machine_type=self.machine_type.name,
            ts=round(now, 3),
            metrics=dict(self.values),
            **identity,
        )


def machines_of(fleet: Fleet, seed: int | None = None) -> list[MachineSimulator]:
    """A simulator per machine of the fleet (the demo fleet file's); every other machine speaks v1."""
    rng = random.Random(seed)
    found = list(fleet.machines())
    return [
        MachineSimulator(
            tenant_id,
            site.id,
            machine.id,
            MACHINE_TYPES[machine.type],
            schema_version=1 if index % 2 else 2,
            rng=random.Random(rng.random()),
        )
        for index, (tenant_id, site, machine) in enumerate(found)
    ]


# ------------------------------------------------------------------------------------ publishing
@dataclass
class DeviceResult:
    """What one device did during a run."""

    username: str
    schema_version: int
    published: int = 0
    acknowledged: int = 0
    refused: int = 0
    skipped: int = 0
    faults: int = 0
    refusals: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    devices: list[DeviceResult]
    without_password: list[str]


class Device:
    """An MQTT 5 client over TLS for one device identity, counting PUBACKs and refusals."""

    def __init__(self, username: str, password: str, port: int, ca_file: str, result: DeviceResult) -> None:
        self.result = result
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._pending = 0
        self._connack: ReasonCode | None = None
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv5)
        client.username_pw_set(username, password)
        client.tls_set(ca_certs=ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        self.client = client
        self.port = port

    def _on_connect(
        self, _client: mqtt.Client, _data: Any, _flags: Any, code: ReasonCode, _props: Any
    ) -> None:
        self._connack = code
        self._connected.set()

    def _on_publish(self, _client: mqtt.Client, _data: Any, _mid: int, code: ReasonCode, _props: Any) -> None:
        with self._lock:
            self._pending -= 1
            if code.is_failure:
                self.result.refused += 1
                self.result.refusals.append(str(code))
            else:
                self.result.acknowledged += 1

    def connect(self) -> None:
        try:
            self.client.connect(LOOPBACK, self.port)
        except OSError as error:
            raise SimulatorError(
                f"{self.result.username}: cannot reach the broker on port {self.port}: {error}"
            ) from error
        self.client.loop_start()
        if not self._connected.wait(CONNECT_TIMEOUT_S):
            self.close()
            raise SimulatorError(f"{self.result.username}: no CONNACK within {CONNECT_TIMEOUT_S:.0f}s")
        if self._connack is not None and self._connack.is_failure:
            self.close()
            raise SimulatorError(
                f"{self.result.username}: the broker refused the connection ({self._connack})"
            )

    def publish(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self._pending += 1
            self.result.published += 1
        self.client.publish(topic, payload, qos=1)

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._pending > 0 and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run(
    platform: DevPlatform,
    *,
    duration: float,
    rate: float,
    seed: int | None = None,
) -> RunResult:
    """Publish for ``duration`` seconds at ``rate`` messages per second per machine."""
    if duration <= 0:
        raise ValueError(f"duration: {duration} must be positive")
    if rate <= 0:
        raise ValueError(f"rate: {rate} must be positive")
    credentials = platform.credentials
    simulators, devices, without_password = [], [], []
    try:
        for machine in machines_of(platform.fleet, seed):
            password = credentials.password(machine.username)
            if password is None:
                without_password.append(machine.username)
                continue
            device = Device(
                machine.username,
                password,
                platform.ports.mqtt,
                str(platform.ca_file),
                DeviceResult(machine.username, machine.schema_version),
            )
            device.connect()
            devices.append(device)
            simulators.append(machine)
        interval = 1.0 / rate
        start = time.monotonic()
        tick = 0
        while time.monotonic() - start < duration:
            for machine, device in zip(simulators, devices, strict=True):
                message = machine.tick(time.time())
                if message is None:
                    device.result.skipped += 1
                    continue
                device.result.faults += message.status == "fault"
                device.publish(machine.topic, message.model_dump_json().encode())
            tick += 1
            time.sleep(max(0.0, start + tick * interval - time.monotonic()))
        for device in devices:
            device.drain(5.0)
    finally:
        for device in devices:
            device.close()
    return RunResult([device.result for device in devices], without_password)
