"""Provisioning end to end on loopback, every part a real server: PostgreSQL (the registry), the
provisioning API (uvicorn over HTTP), Mosquitto with its dynamic-security plugin, ``python -m
ingest`` reading its fleet from the registry, and VictoriaMetrics as the store.

The broker's password listener trusts the platform CA (its server certificate, the services);
its certificate listener trusts only the provisioning service's issuing CAs and checks their CRLs
(a ``capath`` kept by ``provisioning.trust_sync`` polling the API, and its ``crlfile``), so a
certificate the service did not issue to a certificate device, or revoked, never gets past TLS.
Nothing here is restarted once started: devices appear, publish and
are revoked at runtime. Used by ``tests/test_provisioning_e2e.py`` and ``bench/fleet.py``.
"""

from __future__ import annotations

import datetime
import json
import os
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import paho.mqtt.client as mqtt
import psycopg
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.reasoncodes import ReasonCode

from components.render.mosquitto import (
    DYNSEC_ADMIN,
    BrokerAccount,
    DynamicSecurity,
    MosquittoPaths,
    render_dynamic_security_config,
    render_mosquitto_conf,
)
from infra.config import PlatformConfig, parse_platform
from infra.tenancy import telemetry_topic
from ingest.catalog import MACHINE_TYPES
from localdev import pki, servers
from localdev.victoria import VictoriaMetrics
from provisioning import trust_sync
from provisioning.app import create_app, open_provisioner
from provisioning.brokers import MosquittoDynamicSecurity
from provisioning.settings import ProvisioningSettings
from registry import provisioning as reg
from registry.access import service_usernames
from registry.credentials import generate_password, hash_password
from registry.tenant_routes import tenant_route_for, upsert_tenant_route
from tests.fixtures.ingest import WorkerProcess, start_store
from tests.test_broker_isolation import dynamic_security_plugin
from tests.test_provisioning import key_and_csr

TENANTS = ("acme", "globex")
SITE = "plant-1"
MQTT_WAIT = 5.0
TRUST_SYNC_INTERVAL_S = 0.5
Machine = tuple[str, str, str]


def platform_config() -> PlatformConfig:
    """Two Phase A tenants; their machines are the registry's alone."""
    tenants = [{"id": tenant, "name": tenant.title(), "tier": "basic"} for tenant in TENANTS]
    return parse_platform({"phase": "A", "region": "test", "tenants": tenants}, "provisioning-e2e")


def reading(machine: Machine, machine_type: str, ts: float) -> bytes:
    """One v2 telemetry message at the machine type's typical values."""
    tenant, site, machine_id = machine
    metrics = {metric.name: metric.typical for metric in MACHINE_TYPES[machine_type].metrics[:2]}
    body = {
        "schema_version": 2,
        "tenant_id": tenant,
        "site_id": site,
        "machine_id": machine_id,
        "machine_type": machine_type,
        "ts": ts,
        "status": "running",
        "metrics": metrics,
    }
    return json.dumps(body).encode()


class MqttDevice:
    """One MQTT 5 device session: CONNACK, PUBACK reason codes, and whether the broker dropped it."""

    def __init__(
        self,
        ca_file: Path,
        username: str,
        *,
        password: str | None = None,
        cert: tuple[Path, Path] | None = None,
    ) -> None:
        self.username = username
        self.connack: ReasonCode | None = None
        self.disconnected = threading.Event()
        self._connected = threading.Event()
        self._acks: dict[int, tuple[threading.Event, list[ReasonCode]]] = {}
        self._lock = threading.Lock()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv5)
        if password is not None:
            client.username_pw_set(username, password)
        certfile, keyfile = (str(cert[0]), str(cert[1])) if cert else (None, None)
        client.tls_set(
            ca_certs=str(ca_file), certfile=certfile, keyfile=keyfile, tls_version=ssl.PROTOCOL_TLS_CLIENT
        )
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *_: self.disconnected.set()
        # TLS 1.3 reports a refused client certificate after the handshake: paho notices it only on
        # its next attempt (on_connect_fail), after its reconnect delay (1 s by default).
        client.on_connect_fail = lambda *_: self.disconnected.set()
        client.reconnect_delay_set(min_delay=0.02, max_delay=1)  # type: ignore[arg-type]  # a float sleep
        client.on_publish = self._on_publish
        self.client = client

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, code: ReasonCode, _p: object) -> None:
        self.connack = code
        self._connected.set()

    def _slot(self, mid: int) -> tuple[threading.Event, list[ReasonCode]]:
        with self._lock:
            return self._acks.setdefault(mid, (threading.Event(), []))

    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, code: ReasonCode, _p: object) -> None:
        event, codes = self._slot(mid)
        codes.append(code)
        event.set()

    def connect(self, port: int) -> bool:
        """True when the broker accepted the session (TLS and CONNACK); a refused one stops at once."""
        try:
            self.client.connect("127.0.0.1", port, clean_start=True)
        except (OSError, ssl.SSLError):
            return False
        self.client.loop_start()
        deadline = time.monotonic() + MQTT_WAIT
        while time.monotonic() < deadline and not (self._connected.is_set() or self.disconnected.is_set()):
            self._connected.wait(0.01)
        accepted = self.connack is not None and not self.connack.is_failure and not self.disconnected.is_set()
        if not accepted:
            self.client.loop_stop()  # no reconnect attempts by a refused device
        return accepted

    def publish(self, topic: str, payload: bytes) -> str:
        """QoS 1; the PUBACK's reason name (``Success``, ``Not authorized``, ...)."""
        info = self.client.publish(topic, payload, qos=1)
        event, codes = self._slot(info.mid)
        if not event.wait(MQTT_WAIT):
            raise AssertionError(f"{self.username}: no PUBACK for {topic} within {MQTT_WAIT} s")
        return str(codes[0].getName())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class ProvisioningPlatform:
    """Everything started in ``folder`` against the empty database ``dsn``; :meth:`close` stops it."""

    def __init__(self, folder: Path, dsn: str) -> None:
        self.folder, self.dsn = folder, dsn
        self.config = platform_config()
        self._stack = ExitStack()
        self.devices: list[MqttDevice] = []
        broker_dir = folder / "broker"
        (broker_dir / "data").mkdir(parents=True)
        self.ca_file = broker_dir / "platform-ca.pem"
        self.trust_dir = broker_dir / "device-ca"
        self.platform_ca = pki.make_ca("Ironlink e2e platform CA")
        self.ca_file.write_bytes(self.platform_ca.cert_pem)
        self.tls_port, self.mtls_port, http_port = (
            servers.free_port(),
            servers.free_port(),
            servers.free_port(),
        )
        self.url = f"http://127.0.0.1:{http_port}"
        try:
            self._start(broker_dir, http_port)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------ start
    def _start(self, broker_dir: Path, http_port: int) -> None:
        passwords = {name: generate_password() for name in [DYNSEC_ADMIN, *service_usernames(self.config)]}
        directory = MosquittoDynamicSecurity(
            "127.0.0.1", self.tls_port, DYNSEC_ADMIN, passwords[DYNSEC_ADMIN], ca_file=str(self.ca_file)
        )
        settings = ProvisioningSettings.model_validate(
            {
                "registry_dsn": self.dsn,
                "ca_dir": self.folder / "ca",
                "public_url": self.url,
                # Rate limits have their own tests: here every device of a run comes from 127.0.0.1.
                "claim_rate_per_source": 1e6,
                "claim_burst_per_source": 100_000,
                "claim_rate_per_token": 1e6,
                "claim_burst_per_token": 100_000,
            }
        )
        self.service = open_provisioner(settings, directory=directory)  # migrates, makes the region CA
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for tenant in TENANTS:
                conn.execute(
                    "INSERT INTO tenants (id, name, tier, isolation) VALUES (%s, %s, 'basic', 1)",
                    (tenant, tenant.title()),
                )
                conn.execute("INSERT INTO sites (tenant_id, id) VALUES (%s, %s)", (tenant, SITE))
            admin = reg.create_admin_token(
                conn,
                tenant_id=None,
                label="e2e",
                actor="e2e",
                expires_at=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=2),
            )
        self.admin = {"Authorization": f"Bearer {admin.plaintext}"}
        self._start_broker(broker_dir, passwords)
        directory.connect()
        self._stack.callback(directory.close)
        store, self.store_url = start_store(self.folder)
        self._stack.callback(store.stop)
        self.store = VictoriaMetrics(self.store_url)
        with psycopg.connect(self.dsn, autocommit=True) as conn:  # the worker's tenants: the registry's
            for spec in self.config.tenants:
                route = tenant_route_for(self.config, spec, self.store_url, "")
                upsert_tenant_route(conn, spec.id, route, actor="e2e")
        self.worker = WorkerProcess.for_platform(
            self.config,
            self.tls_port,
            self.store_url,
            self.folder,
            machines=None,
            mqtt_tls=True,
            mqtt_ca_file=self.ca_file,
        )
        secrets = {"IRONLINK_REGISTRY_DSN": self.dsn, "IRONLINK_MQTT_PASSWORD": passwords["svc.ingest"]}
        with mock.patch.dict(os.environ, secrets):
            self.worker.start()
        self._stack.callback(self._stop_worker)
        self._serve(http_port)
        self.http = self._stack.enter_context(httpx.Client(base_url=self.url, timeout=30))
        self._sync_trust()

    def _sync_trust(self) -> None:
        """The broker pod's sidecar: ``trust_sync`` polling the API over HTTP into the capath."""
        options = trust_sync.parse_options(
            ["--url", self.url, "--dir", str(self.trust_dir), "--interval", str(TRUST_SYNC_INTERVAL_S)]
        )
        stop = threading.Event()
        thread = threading.Thread(target=trust_sync.run, args=(options, stop), daemon=True)
        thread.start()

        def halt() -> None:
            stop.set()
            thread.join(15)

        self._stack.callback(halt)

    def _start_broker(self, broker_dir: Path, passwords: dict[str, str]) -> None:
        server = pki.issue_server_cert(self.platform_ca)
        (broker_dir / "server.pem").write_bytes(server.cert_pem)
        (broker_dir / "server.key").write_bytes(server.key_pem)
        # The first sync before the broker starts (its crlfile must hold a CRL), as the broker pod's
        # initContainer does with ``trust_sync --once``; nothing is revoked yet, and the service's
        # pool opens only once it serves.
        authorities = self.service.authorities
        crls = "".join(ca.crl([], self.service.settings.crl_validity_hours) for ca in authorities.all())
        trust_sync.install(self.trust_dir, authorities.bundle_pem().encode(), crls.encode())
        accounts = {
            name: BrokerAccount(name, hash_password(password)) for name, password in passwords.items()
        }
        state = broker_dir / "dynamic-security.json"
        state.write_text(
            render_dynamic_security_config(self.config, accounts.pop(DYNSEC_ADMIN), list(accounts.values()))
        )
        paths = MosquittoPaths(
            cafile=str(self.ca_file),
            certfile=str(broker_dir / "server.pem"),
            keyfile=str(broker_dir / "server.key"),
            password_file="",  # dynamic-security mode: not used
            acl_file="",
            persistence_dir=str(broker_dir / "data"),
        )
        dynamic = DynamicSecurity(
            dynamic_security_plugin(),
            str(state),
            self.mtls_port,
            device_capath=str(self.trust_dir),
            device_crlfile=str(self.trust_dir / trust_sync.CRL_FILE),
        )
        conf = self.folder / "mosquitto.conf"
        conf.write_text(
            render_mosquitto_conf(
                self.config,
                paths,
                tls_port=self.tls_port,
                plaintext_port=servers.free_port(),
                bind_address="127.0.0.1",
                dynamic_security=dynamic,
            )
        )
        servers.hand_over(broker_dir, servers.service_user("mosquitto"))
        broker = servers.mosquitto(conf, self.tls_port, self.folder / "mosquitto.log").start()
        self._stack.callback(broker.stop)
        servers.wait_until(lambda: servers.port_open(self.mtls_port), 10, "the certificate listener")

    def _serve(self, port: int) -> None:
        server = uvicorn.Server(
            uvicorn.Config(create_app(self.service), host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()

        def stop() -> None:
            server.should_exit = True
            thread.join(15)

        self._stack.callback(stop)
        servers.wait_until(lambda: server.started, 15, "the provisioning service")

    def _stop_worker(self) -> None:
        if self.worker.process is not None and self.worker.process.poll() is None:
            self.worker.stop()

    def close(self) -> None:
        for device in self.devices:
            device.close()
        self._stack.close()

    # -------------------------------------------------------------------------------- operators
    def post(self, path: str, body: dict[str, Any] | None = None, *, admin: bool = True) -> httpx.Response:
        return self.http.post(path, json=body, headers=self.admin if admin else None)

    def claim_token(self, tenant: str = "acme", **body: Any) -> dict[str, Any]:
        defaults = {"site_id": SITE, "machine_type": "cnc_mill", "count": 1, "expires_in_hours": 1}
        answer = self.post(f"/v1/tenants/{tenant}/claim-tokens", {**defaults, **body})
        assert answer.status_code == 201, answer.text
        return dict(answer.json())

    def revoke(self, tenant: str, username: str) -> None:
        answer = self.post(f"/v1/tenants/{tenant}/devices/{username}/revoke")
        assert answer.status_code == 204, answer.text

    def broker_knows(self, username: str) -> bool:
        """Whether the broker's dynamic security holds a client of that name (``getClient``)."""
        directory = self.service.directory
        assert isinstance(directory, MosquittoDynamicSecurity)
        answer = directory._run({"command": "getClient", "username": username})[0]
        if answer.get("error") not in (None, "Client not found"):
            raise AssertionError(f"getClient {username}: {answer}")
        return "error" not in answer

    # ---------------------------------------------------------------------------------- devices
    def claim(self, token: str, machine_id: str, **body: Any) -> tuple[httpx.Response, tuple[Path, Path]]:
        """A device claims with its own key: the answer, and where it keeps its key and certificate."""
        key, csr = key_and_csr()
        answer = self.post(
            "/v1/claim", {"token": token, "machine_id": machine_id, "csr": csr, **body}, admin=False
        )
        files = self.keep(machine_id, key, answer.json().get("certificate"))
        return answer, files

    def keep(self, name: str, key: ec.EllipticCurvePrivateKey, certificate: str | None) -> tuple[Path, Path]:
        """Write a device's certificate (when it got one) and key, as the device stores them."""
        folder = self.folder / "devices"
        folder.mkdir(exist_ok=True)
        stem = folder / f"{name}-{uuid.uuid4().hex[:8]}"
        cert_path, key_path = stem.with_suffix(".pem"), stem.with_suffix(".key")
        cert_path.write_text(certificate or "")
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert_path, key_path

    def device(
        self, username: str, *, password: str | None = None, cert: tuple[Path, Path] | None = None
    ) -> MqttDevice:
        """A session of ``username``: on the certificate listener with ``cert``, else with ``password``."""
        device = MqttDevice(self.ca_file, username, password=password, cert=cert)
        self.devices.append(device)
        return device

    def connect(
        self, username: str, *, password: str | None = None, cert: tuple[Path, Path] | None = None
    ) -> MqttDevice | None:
        """A connected session, or None where the broker refused it."""
        device = self.device(username, password=password, cert=cert)
        return device if device.connect(self.mtls_port if cert else self.tls_port) else None

    # ------------------------------------------------------------------------------------ store
    def stored_machines(self, tenant: str) -> dict[str, int]:
        """Machine id → points stored, of one tenant (one status point per stored message)."""
        self.store.force_flush()
        found = self.store.export(f'{{__name__="telemetry_status_code",tenant_id="{tenant}"}}', start=0)
        counts: dict[str, int] = {}
        for series in found:
            machine = series.labels.get("machine_id", "")
            counts[machine] = counts.get(machine, 0) + len(series.timestamps)
        return counts

    def publish_until_stored(
        self, device: MqttDevice, machine: Machine, machine_type: str, deadline: float
    ) -> float | None:
        """A device's routine: a reading every 0.2 s until the store holds one (the first may come
        before the worker has heard of the machine: dead-lettered, ``unknown_machine``). The
        monotonic time it was first seen stored, or None by ``deadline``."""
        while time.monotonic() < deadline:
            code = device.publish(telemetry_topic(*machine), reading(machine, machine_type, time.time()))
            assert code == "Success", f"{device.username}: PUBACK {code}"
            if self.stored_machines(machine[0]).get(machine[2]):
                return time.monotonic()
            time.sleep(0.2)
        return None


@contextmanager
def running(folder: Path, dsn: str) -> Iterator[ProvisioningPlatform]:
    platform = ProvisioningPlatform(folder, dsn)
    try:
        yield platform
    finally:
        platform.close()
