"""End to end on the dev platform, driven through the real CLI: ``ironlink dev up``, ``ironlink
simulate``, what lands in the store per tenant, isolation, self-healing and a clean ``down``.

Every test here shares one platform (the ``dev_platform`` session fixture) bound to MQTT's fixed
port 8883, hence the xdist group: one worker runs them all, one after the other.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from paho.mqtt.reasoncodes import ReasonCode

from infra.tenancy import device_username, telemetry_topic
from ingest.contract import EPOCH_MIN, TelemetryV2
from localdev import servers, supervisor
from localdev.platform import PROCESSES
from localdev.victoria import wait_for_points
from tests.conftest import DevPlatformHandle
from tests.provisioning_platform import MqttDevice
from tests.test_provisioning import key_and_csr

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("devplatform")]

ACME_PRESS = ("acme", "plant-1", "press-01")
GLOBEX_MOLDER = ("globex", "line-a", "molder-01")


def _status(dev: DevPlatformHandle) -> tuple[int, dict[str, Any]]:
    result = dev.cli("dev", "status", "--json", check=False)
    return result.returncode, json.loads(result.stdout)


def _machines(dev: DevPlatformHandle) -> set[tuple[str, str, str]]:
    """The demo fleet the platform imported into its registry and simulates."""
    return {(tenant_id, site.id, machine.id) for tenant_id, site, machine in dev.platform.fleet.machines()}


@pytest.fixture(scope="module")
def dev(dev_platform: DevPlatformHandle) -> DevPlatformHandle:
    return dev_platform


@pytest.fixture(scope="module")
def simulated(dev: DevPlatformHandle) -> float:
    """Four seconds of simulated telemetry from every machine; returns when it started."""
    dev.ensure_up()
    started = time.time()
    dev.cli("simulate", "--duration", "4", "--rate", "2", "--seed", "11")
    return started


class Device:
    """One device's own MQTT 5 connection over TLS, to try what it may and may not do."""

    def __init__(self, dev: DevPlatformHandle, tenant: str, site: str, machine: str) -> None:
        username = device_username(tenant, site, machine)
        password = dev.platform.credentials.password(username)
        assert password is not None
        self.acks: dict[int, ReasonCode] = {}
        self._acked = threading.Condition()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv5)
        client.username_pw_set(username, password)
        client.tls_set(ca_certs=str(dev.platform.ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.on_publish = self._on_publish
        client.connect("127.0.0.1", dev.platform.ports.mqtt)
        client.loop_start()
        self.client = client

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, code: ReasonCode, _p: Any) -> None:
        with self._acked:
            self.acks[mid] = code
            self._acked.notify_all()

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        """Publish at QoS 1 and return the broker's PUBACK reason code."""
        mid = self.client.publish(topic, payload, qos=1).mid
        with self._acked:
            assert self._acked.wait_for(lambda: mid in self.acks, 10), "no PUBACK within 10 s"
        return self.acks[mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _telemetry(tenant: str, site: str, machine: str, machine_type: str, ts: float) -> bytes:
    metrics = {"barrel_temp_c": 230.0} if machine_type == "injection_molder" else {"pressure_bar": 200.0}
    return (
        TelemetryV2(
            schema_version=2,
            tenant_id=tenant,
            site_id=site,
            machine_id=machine,
            machine_type=machine_type,
            status="running",
            ts=ts,
            metrics=metrics,
        )
        .model_dump_json()
        .encode()
    )


# --------------------------------------------------------------------------------- data path
def test_every_simulated_machine_lands_in_the_store_under_its_own_tenant(
    dev: DevPlatformHandle, simulated: float
) -> None:
    expected = _machines(dev)
    points = wait_for_points(dev.platform.store, expected, since=int(simulated))
    stored = {(p.tenant_id, p.site_id, p.machine_id): p.points for p in points}
    # Zero cross-tenant points: a series whose tenant_id is not its machine's own tenant would be a
    # key outside ``expected`` (e.g. ("acme", "line-a", "molder-01")).
    assert set(stored) == expected, stored
    # 4 s at 2 msg/s: up to 8 messages per machine (v1 ones merge within a whole second, gaps skip).
    assert all(1 <= count <= 8 for count in stored.values()), stored


def test_status_shows_each_tenants_machines_and_rate(dev: DevPlatformHandle, simulated: float) -> None:
    code, status = _status(dev)
    assert code == 0, status
    assert all(p["alive"] and p["listening"] for p in status["processes"]), status["processes"]
    tenants = {t["tenant_id"]: t for t in status["tenants"]}
    assert set(tenants) == {"acme", "globex"}
    for tenant in tenants.values():
        assert tenant["machines_seen"] == tenant["machines"] == 2, tenant
        assert tenant["messages_per_second"] > 0 and tenant["last_seen"] is not None, tenant
        assert tenant["dead_lettered"] == 0, tenant


def test_a_device_cannot_publish_into_another_tenant(dev: DevPlatformHandle, simulated: float) -> None:
    """acme's press, with its valid credential, tries globex's topic: refused at the broker."""
    marker = EPOCH_MIN + 12_345  # a timestamp nothing else uses
    press = Device(dev, *ACME_PRESS)
    try:
        code = press.publish(
            telemetry_topic(*GLOBEX_MOLDER), _telemetry(*GLOBEX_MOLDER, "injection_molder", float(marker))
        )
        assert code.is_failure and code.getName() == "Not authorized", code
        # Its own topic works on the same connection (so the refusal is the ACL, not the session).
        own = press.publish(
            telemetry_topic(*ACME_PRESS), _telemetry(*ACME_PRESS, "hydraulic_press", time.time())
        )
        assert not own.is_failure, own
    finally:
        press.close()
    store = dev.platform.store
    wait_for_points(store, {ACME_PRESS}, since=time.time() - 5)  # the worker has caught up
    intruding = [p for p in store.points_by_machine(since=marker - 1) if marker * 1000 in p.timestamps]
    assert intruding == []


def test_a_device_claiming_another_tenant_in_its_payload_is_dead_lettered(
    dev: DevPlatformHandle, simulated: float
) -> None:
    """On its own topic, a payload naming another tenant passes the ACL and is refused by the worker."""
    press = Device(dev, *ACME_PRESS)
    try:
        code = press.publish(
            telemetry_topic(*ACME_PRESS), _telemetry(*GLOBEX_MOLDER, "injection_molder", time.time())
        )
        assert not code.is_failure
    finally:
        press.close()
    platform = dev.platform
    servers.wait_until(lambda: (platform.dead_lettered() or {}).get("acme", 0) >= 1, 10, "the dead letter")
    _, status = _status(dev)
    assert {t["tenant_id"]: t["dead_lettered"] for t in status["tenants"]} == {"acme": 1, "globex": 0}


# ------------------------------------------------------------------------------ registry mode
def _admin_token(dev: DevPlatformHandle) -> str:
    """A platform admin token, minted the operator's way: ``ironlink provisioning token create``."""
    ironlink = str(Path(sys.executable).parent / "ironlink")
    command = [ironlink, "provisioning", "token", "create", "--registry", dev.platform.registry_dsn()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip().splitlines()[-1]


def _mill_reading(machine: tuple[str, str, str]) -> bytes:
    tenant, site, machine_id = machine
    body = TelemetryV2(
        schema_version=2,
        tenant_id=tenant,
        site_id=site,
        machine_id=machine_id,
        machine_type="cnc_mill",
        status="running",
        ts=time.time(),
        metrics={"spindle_speed_rpm": 12000.0},
    )
    return body.model_dump_json().encode()


def _environment(pid: int) -> dict[str, str]:
    """The environment a running process was started with (``/proc/<pid>/environ``)."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def _stored(dev: DevPlatformHandle, device: MqttDevice, machine: tuple[str, str, str], since: float) -> bool:
    """Publish one reading (accepted by the broker) and say whether the store has any since ``since``."""
    assert device.publish(telemetry_topic(*machine), _mill_reading(machine)) == "Success"
    time.sleep(0.5)
    store = dev.platform.store
    store.force_flush()
    return any(
        p.points
        for p in store.points_by_machine(since=since)
        if (p.tenant_id, p.site_id, p.machine_id) == machine
    )


def test_devices_enrolled_through_the_provisioning_api_connect_and_are_stored_with_no_restart(
    dev: DevPlatformHandle, simulated: float, tmp_path: Path
) -> None:
    """New machines and their devices, a password one and a certificate one (its own key and CSR),
    enrolled through the provisioning API while everything runs: the service creates them in the
    broker's dynamic security, the certificate listener trusts the service's issuing CA, and the
    worker learns the machines from the registry (none in its environment). Removing a machine
    takes its device off the broker. No process restarts."""
    dev.ensure_up()
    before = _pids(dev)
    platform = dev.platform
    environment = _environment(before["ingest"])
    assert "IRONLINK_REGISTRY_DSN" in environment
    # Tenants (routes, URLs, tokens) and machines are the registry's alone: none in its environment.
    assert not {"IRONLINK_TENANTS", "IRONLINK_STORE_URLS", "IRONLINK_STORE_TOKENS_FILE"} & set(environment)
    readiness = httpx.get(f"http://127.0.0.1:{platform.ports.worker}/readyz", timeout=5).json()
    assert readiness["fleet"]["tenants"] == ["acme", "globex"], readiness
    headers = {"Authorization": f"Bearer {_admin_token(dev)}"}
    verify = ssl.create_default_context(cafile=str(platform.ca_file))
    by_password, by_certificate = ("acme", "plant-1", "mill-07"), ("acme", "plant-1", "mill-08")
    devices: list[MqttDevice] = []
    with httpx.Client(base_url=platform.provisioning_url, verify=verify, headers=headers) as api:
        for _, site, machine in (by_password, by_certificate):
            added = api.post(
                "/v1/tenants/acme/machines", json={"site_id": site, "id": machine, "type": "cnc_mill"}
            )
            assert added.status_code == 201, added.text
        enrolled_at = time.time()
        password = api.post("/v1/tenants/acme/devices", json={"site_id": "plant-1", "machine_id": "mill-07"})
        assert password.status_code == 201, password.text
        username = device_username(*by_certificate)
        key, csr = key_and_csr(username)
        certificate = api.post(
            "/v1/tenants/acme/devices", json={"site_id": "plant-1", "machine_id": "mill-08", "csr": csr}
        )
        assert certificate.status_code == 201, certificate.text
        cert_file, key_file = tmp_path / "device.pem", tmp_path / "device.key"
        cert_file.write_text(certificate.json()["certificate"])
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        try:
            with_password = MqttDevice(
                platform.ca_file, device_username(*by_password), password=password.json()["password"]
            )
            devices.append(with_password)
            assert with_password.connect(platform.ports.mqtt), with_password.connack
            with_certificate = MqttDevice(platform.ca_file, username, cert=(cert_file, key_file))
            devices.append(with_certificate)
            assert with_certificate.connect(platform.ports.mqtt_certificates), with_certificate.connack
            for device, identity in ((with_password, by_password), (with_certificate, by_certificate)):
                stored = functools.partial(_stored, dev, device, identity, enrolled_at)
                servers.wait_until(stored, 15, f"{device.username}'s telemetry stored")
            removed = api.delete("/v1/tenants/acme/machines/plant-1/mill-07")
            assert removed.status_code == 200, removed.text
            assert with_password.disconnected.wait(10), "the removed device's session was not dropped"
        finally:
            for device in devices:
                device.close()
        gone = MqttDevice(
            platform.ca_file, device_username(*by_password), password=password.json()["password"]
        )
        assert not gone.connect(platform.ports.mqtt), "a removed device connected"
        assert api.delete("/v1/tenants/acme/machines/plant-1/mill-08").status_code == 200
    assert _pids(dev) == before, "nothing may restart for a fleet change"


# ------------------------------------------------------------------------------ supervision
@pytest.mark.parametrize("victim", PROCESSES)
def test_a_killed_process_is_shown_down_and_healed_by_up(dev: DevPlatformHandle, victim: str) -> None:
    dev.ensure_up()
    before = {name: dev.platform.pids.read(name) for name in PROCESSES}
    record = before[victim]
    assert record is not None
    os.kill(record.pid, signal.SIGKILL)
    servers.wait_until(lambda: not record.alive, 10, f"{victim} to die")

    code, status = _status(dev)
    health = {p["name"]: p["alive"] for p in status["processes"]}
    assert code == 1 and health[victim] is False, status["processes"]

    result = dev.cli("dev", "up")
    assert f"{victim} restarted" in result.stdout
    assert dev.platform.status().healthy, dev.platform.processes()
    healed = dev.platform.pids.read(victim)
    assert healed is not None and healed.pid != record.pid and healed.alive
    # Only the victim was restarted (a process that merely lost its peer for a moment is left alone).
    for name, old in before.items():
        if name != victim and old is not None:
            assert f"{name} restarted" not in result.stdout and old.alive, name


def test_up_twice_changes_nothing(dev: DevPlatformHandle) -> None:
    dev.ensure_up()
    before = _pids(dev)
    result = dev.cli("dev", "up")
    assert "all was running" in result.stdout
    assert _pids(dev) == before


def _pids(dev: DevPlatformHandle) -> dict[str, int]:
    return {name: record.pid for name in PROCESSES if (record := dev.platform.pids.read(name))}


def test_down_leaves_no_process_and_no_listener(dev: DevPlatformHandle) -> None:
    dev.ensure_up()
    records = [record for name in PROCESSES if (record := dev.platform.pids.read(name))]
    assert len(records) == len(PROCESSES)
    dev.cli("dev", "down")
    for record in records:
        assert not record.alive, record.name
        assert supervisor.leftovers(record) == [], f"{record.name} left processes behind"
        assert not servers.port_open(record.port), f"{record.name}'s port {record.port} still open"
    # Nothing at all still runs in the state folder or names it on its command line.
    assert _working_in(dev.state_dir.resolve()) == []
    code, _ = _status(dev)
    assert code == 1


def _working_in(folder: Path) -> list[tuple[int, str]]:
    found = []
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cwd.is_relative_to(folder) or str(folder).encode() in cmdline:
            found.append((pid, cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found
