"""``provisioning.trust_sync``, the broker pod's sidecar: against the real provisioning API (uvicorn
on a free port, real PostgreSQL) it writes a capath that a real Mosquitto, started once, uses to
accept a device certificate, then to refuse it at the TLS handshake once revoked; and how the Phase
A cluster runs it (the plan under the mock engine)."""

from __future__ import annotations

import datetime
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from components.mqtt_broker import DEVICE_CA_DIR, MOSQUITTO_MTLS_PORT
from components.render.kubernetes import ROLE_PROVISIONING, role_selector
from components.render.mosquitto import (
    DYNSEC_ADMIN,
    BrokerAccount,
    DynamicSecurity,
    MosquittoPaths,
    render_dynamic_security_config,
    render_mosquitto_conf,
)
from infra.tenancy import device_username
from localdev import pki, servers
from provisioning import trust_sync
from provisioning.settings import HTTP_PORT
from registry.access import service_usernames
from registry.credentials import hash_password
from tests.conftest import PostgresCluster
from tests.provisioning_platform import platform_config
from tests.pulumi_mocks import broker, pod_spec, stack_config, stack_plan
from tests.test_broker_isolation import dynamic_security_plugin
from tests.test_provisioning import key_and_csr, make_api

BOUND_S = 10.0
PHASE_A = ("dev", "poc")


# ------------------------------------------------------------------------- pure parts
@pytest.mark.parametrize(
    "common_name", ["Ironlink region CA local", "  Mixed   CASE\tname ", "Ünïcode Ça", "a,b+c=d"]
)
def test_the_subject_hash_is_openssls(common_name: str) -> None:
    """OpenSSL finds a CA in a capath by this name only (checked against the real ``openssl``)."""
    ca = pki.make_ca(common_name)
    subject = x509.load_pem_x509_certificate(ca.cert_pem).subject
    assert trust_sync.subject_hash(subject) == servers.subject_hash(ca.cert_pem)


def test_bad_flags_are_all_named_with_exit_code_2() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "provisioning.trust_sync", "--url", "ftp://x", "--interval", "0",
         "--timeout", "soon", "--max-bytes", "1e12", "--ca-file", "/nonexistent"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    for flag in ("--url: 'ftp://x'", "--dir:", "--interval: '0'", "--timeout: 'soon'", "--max-bytes: '1e12'"):
        assert flag in run.stderr, run.stderr
    assert "--ca-file: '/nonexistent'" in run.stderr and "Traceback" not in run.stderr


# -------------------------------------------------------------- against the real service
@dataclass
class Served:
    url: str
    api: Any
    folder: Path


@pytest.fixture
def served(server_root: Path, postgres_cluster: PostgresCluster) -> Iterator[Served]:
    folder = server_root / f"trust-{time.monotonic_ns()}"
    folder.mkdir()
    for api in make_api(postgres_cluster.new_database(), folder / "ca"):
        yield from _served_over_http(api, folder)


def _served_over_http(api: Any, folder: Path) -> Iterator[Served]:
    port = servers.free_port()
    server = uvicorn.Server(uvicorn.Config(api.client.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    servers.wait_until(lambda: server.started, 15, "the provisioning service")
    try:
        yield Served(f"http://127.0.0.1:{port}", api, folder)
    finally:
        server.should_exit = True
        thread.join(15)


def _sync_once(url: str, folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "provisioning.trust_sync", "--once", "--url", url, "--dir", str(folder)]
    return subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=60)


def _certificate_device(served: Served, tenant: str, machine: str) -> tuple[Path, Path]:
    api = served.api
    added = api.post(
        f"/v1/tenants/{tenant}/machines", {"site_id": "plant-1", "id": machine, "type": "cnc_mill"}
    )
    assert added.status_code == 201, added.text
    key, csr = key_and_csr()
    enrolled = api.post(
        f"/v1/tenants/{tenant}/devices", {"site_id": "plant-1", "machine_id": machine, "csr": csr}
    )
    assert enrolled.status_code == 201, enrolled.text
    cert, key_file = served.folder / f"{machine}.pem", served.folder / f"{machine}.key"
    cert.write_text(enrolled.json()["certificate"])
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key_file


def _broker(served: Served, capath: Path) -> tuple[int, Path]:
    """A real Mosquitto whose certificate listener is rendered as the cluster's: capath + crlfile."""
    folder = served.folder / "broker"
    (folder / "data").mkdir(parents=True)
    platform_ca = pki.make_ca("trust-sync test platform CA")
    server = pki.issue_server_cert(platform_ca)
    (folder / "ca.pem").write_bytes(platform_ca.cert_pem)
    (folder / "server.pem").write_bytes(server.cert_pem)
    (folder / "server.key").write_bytes(server.key_pem)
    config = platform_config()
    state = folder / "dynamic-security.json"
    services = [BrokerAccount(user, hash_password("unused")) for user in service_usernames(config)]
    admin = BrokerAccount(DYNSEC_ADMIN, hash_password("unused"))
    state.write_text(render_dynamic_security_config(config, admin, services))
    paths = MosquittoPaths(
        cafile=str(folder / "ca.pem"),
        certfile=str(folder / "server.pem"),
        keyfile=str(folder / "server.key"),
        password_file="",
        acl_file="",
        persistence_dir=str(folder / "data"),
    )
    mtls_port, tls_port = servers.free_port(), servers.free_port()
    dynamic = DynamicSecurity(
        dynamic_security_plugin(),
        str(state),
        mtls_port,
        device_capath=str(capath),
        device_crlfile=str(capath / trust_sync.CRL_FILE),
    )
    conf = folder / "mosquitto.conf"
    conf.write_text(
        render_mosquitto_conf(
            config, paths, tls_port=tls_port, bind_address="127.0.0.1", dynamic_security=dynamic
        )
    )
    servers.hand_over(folder, servers.service_user("mosquitto"))
    return mtls_port, conf


def _handshake(port: int, ca_file: Path, files: tuple[Path, Path]) -> str | None:
    """None, or why the TLS handshake failed (capped at 1.2: the client-certificate verdict is part
    of the handshake there)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(*files)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost"),
        ):
            return None
    except ssl.SSLError as error:
        return str(error)


def _until(check: Any, what: str) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() < started + BOUND_S, f"{what}: not within {BOUND_S} s"
        time.sleep(0.1)
    return time.monotonic() - started


@pytest.mark.integration
def test_a_synced_capath_lets_mosquitto_accept_a_device_then_refuse_it_at_tls_once_revoked(
    served: Served,
) -> None:
    capath = served.folder / "device-ca"
    first = _sync_once(served.url, capath)  # the initContainer: the broker starts only after it
    assert first.returncode == 0, first.stderr
    port, conf = _broker(served, capath)
    mosquitto = servers.mosquitto(conf, port, served.folder / "mosquitto.log").start()
    options = trust_sync.parse_options(["--url", served.url, "--dir", str(capath), "--interval", "0.3"])
    stop = threading.Event()
    sidecar = threading.Thread(target=trust_sync.run, args=(options, stop), daemon=True)
    sidecar.start()
    try:
        ca_file = served.folder / "broker" / "ca.pem"
        revoked, kept = (_certificate_device(served, "acme", m) for m in ("mill-gone", "mill-kept"))
        assert _handshake(port, ca_file, revoked) is None and _handshake(port, ca_file, kept) is None
        # A level-3 tenant's CA is made on its first device, after the broker started.
        own_ca = _certificate_device(served, "initech", "mill-own")
        took = _until(lambda: _handshake(port, ca_file, own_ca) is None, "a new tenant CA trusted")
        print(f"new issuing CA → trusted by the running broker: {took:.2f} s")

        revoked_at = time.monotonic()
        username = device_username("acme", "plant-1", "mill-gone")
        answer = served.api.post(f"/v1/tenants/acme/devices/{username}/revoke", {})
        assert answer.status_code == 204, answer.text
        refusals: list[str | None] = []

        def refused() -> bool:
            refusals.append(_handshake(port, ca_file, revoked))
            return refusals[-1] is not None

        _until(refused, "refused at TLS")
        assert "revoked" in str(refusals[-1]), refusals[-1]
        print(f"revoke → refused at the TLS handshake: {time.monotonic() - revoked_at:.2f} s")
        assert _handshake(port, ca_file, kept) is None, "a certificate of the same CA, not revoked"
        assert _handshake(port, ca_file, own_ca) is None, "the other CA's device"
        assert mosquitto.process is not None and mosquitto.process.poll() is None, "the broker restarted"
    finally:
        stop.set()
        sidecar.join(15)
        mosquitto.stop()


@pytest.mark.integration
def test_an_unreachable_or_oversized_answer_keeps_the_last_good_copy(served: Served) -> None:
    capath = served.folder / "device-ca"
    assert _sync_once(served.url, capath).returncode == 0
    before = {path.name: path.read_bytes() for path in capath.iterdir()}
    assert {name.rsplit(".", 1)[-1] for name in before} == {"0", "r0", "pem"}, sorted(before)
    port = servers.free_port()  # nobody listens there
    down = _sync_once(f"http://127.0.0.1:{port}", capath)
    assert down.returncode == 1 and f"127.0.0.1:{port}" in down.stderr and "Traceback" not in down.stderr
    oversized = _sync_once(served.url, capath, "--max-bytes", "300")
    assert oversized.returncode == 1 and "larger than --max-bytes 300" in oversized.stderr
    assert {path.name: path.read_bytes() for path in capath.iterdir()} == before


@pytest.mark.integration
def test_a_crl_not_signed_by_its_ca_is_refused_and_nothing_written(served: Served, tmp_path: Path) -> None:
    ca_pem = httpx.get(f"{served.url}/v1/ca.pem").content
    crl_pem = httpx.get(f"{served.url}/v1/crl.pem").content
    with pytest.raises(trust_sync.TrustError, match="no CRL for"):
        trust_sync.install(tmp_path, ca_pem, b"")
    forged = _forged_crl(ca_pem, pki.make_ca("impostor"))
    with pytest.raises(trust_sync.TrustError, match="not signed by its CA"):
        trust_sync.install(tmp_path, ca_pem, forged)
    assert list(tmp_path.iterdir()) == []
    assert trust_sync.install(tmp_path, ca_pem, crl_pem).cas == 1


def _forged_crl(ca_pem: bytes, impostor: pki.Issued) -> bytes:
    """A CRL naming the real CA as issuer, signed by another key."""
    real = x509.load_pem_x509_certificate(ca_pem)
    key = serialization.load_pem_private_key(impostor.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(real.subject)
        .last_update(now)
        .next_update(now + datetime.timedelta(hours=1))
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# ------------------------------------------------------------------------------- the cluster
@pytest.mark.parametrize("stack", PHASE_A)
def test_the_broker_pod_syncs_its_trust_before_starting_and_keeps_it_in_step(stack: str) -> None:
    plan, config = stack_plan(stack), stack_config(stack)
    spec = pod_spec(broker(plan))
    first = {c["name"]: c for c in spec["initContainers"]}["trust-sync-first"]
    sidecar = {c["name"]: c for c in spec["containers"]}["trust-sync"]
    url = f"https://provisioning.{config.cluster.namespace}.svc.cluster.local:{HTTP_PORT}"
    for container, mode in ((first, ["--once"]), (sidecar, ["--interval", "5"])):
        assert container["image"] == config.provisioning.image, stack
        command = container["command"]
        assert command[:3] == ["python", "-m", "provisioning.trust_sync"] and command[-len(mode) :] == mode
        flags = dict(zip(command[3::2], command[4::2], strict=False))
        assert flags["--url"] == url and flags["--dir"] == DEVICE_CA_DIR, command
        # The service's certificate comes from the region CA, which the broker's TLS secret holds.
        assert flags["--ca-file"].startswith("/mosquitto/certs/"), command
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert not mounts[DEVICE_CA_DIR].get("readOnly"), f"{container['name']} cannot write"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    service_ports = {p["name"]: p["port"] for p in plan.one("Service", broker(plan).name).get("spec.ports")}
    assert service_ports.get("mqtts-certs") == MOSQUITTO_MTLS_PORT, f"{stack}: {service_ports}"


@pytest.mark.parametrize("stack", PHASE_A)
def test_the_broker_pods_reach_the_provisioning_api_and_nothing_else(stack: str) -> None:
    plan = stack_plan(stack)
    policy = plan.one("NetworkPolicy", broker(plan).name)
    assert policy.get("spec.policyTypes") == ["Ingress", "Egress"]
    provisioning = {"podSelector": {"matchLabels": role_selector(ROLE_PROVISIONING)}}
    egress = policy.get("spec.egress")
    assert egress[0] == {"ports": [{"port": HTTP_PORT, "protocol": "TCP"}], "to": [provisioning]}, egress
    assert [sorted(p["port"] for p in rule["ports"]) for rule in egress[1:]] == [[53, 53]], "DNS only"
