"""Renewal over mutual TLS: a real uvicorn on a free port, the device's certificate verified by the
TLS handshake (never a header), against a real PostgreSQL."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from localdev import pki, servers
from provisioning.app import create_app, open_provisioner
from provisioning.brokers import RegistryOnly
from provisioning.settings import ProvisioningSettings
from provisioning.tls import TrustedCAs, server_config
from tests.test_provisioning import _tenants, key_and_csr

pytestmark = pytest.mark.integration


@pytest.fixture
def served(postgres_dsn: str, tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    settings = ProvisioningSettings.model_validate({"registry_dsn": postgres_dsn, "ca_dir": tmp_path / "ca"})
    trusted = TrustedCAs()
    service = open_provisioner(settings, directory=RegistryOnly(), on_new_ca=trusted)
    _tenants(postgres_dsn)
    server_ca = pki.make_ca("test server CA")
    server = pki.issue_server_cert(server_ca)
    (tmp_path / "server.pem").write_bytes(server.cert_pem)
    (tmp_path / "server.key").write_bytes(server.key_pem)
    (tmp_path / "server-ca.pem").write_bytes(server_ca.cert_pem)
    port = servers.free_port()
    config = server_config(
        create_app(service),
        host="127.0.0.1",
        port=port,
        cert_file=str(tmp_path / "server.pem"),
        key_file=str(tmp_path / "server.key"),
        ca_bundle_pem=service.authorities.bundle_pem(),
        trusted=trusted,
        log_level="warning",
    )
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    servers.wait_until(lambda: uvicorn_server.started, 15, "the provisioning service")
    yield f"https://127.0.0.1:{port}", tmp_path, postgres_dsn
    uvicorn_server.should_exit = True
    thread.join(15)


def _context(folder: Path, identity: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(folder / "server-ca.pem"))
    if identity is not None:
        context.load_cert_chain(str(folder / f"{identity}.pem"), str(folder / f"{identity}.key"))
    return context


def _admin(dsn: str) -> dict[str, str]:
    import datetime

    from registry import provisioning as reg

    with psycopg.connect(dsn, autocommit=True) as conn:
        token = reg.create_admin_token(
            conn,
            tenant_id=None,
            label="t",
            actor="t",
            expires_at=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1),
        )
    return {"Authorization": f"Bearer {token.plaintext}"}


@pytest.mark.parametrize("tenant", ["acme", "initech"])  # initech (level 3) has its own CA, made at runtime
def test_a_device_renews_over_mutual_tls_inside_the_window(
    served: tuple[str, Path, str], tenant: str
) -> None:
    url, folder, dsn = served
    verify = _context(folder)
    with httpx.Client(base_url=url, verify=verify) as operator:
        headers = _admin(dsn)
        operator.post(
            f"/v1/tenants/{tenant}/machines",
            json={"site_id": "plant-1", "id": "m-1", "type": "cnc_mill"},
            headers=headers,
        )
        key, csr = key_and_csr()
        issued = operator.post(
            f"/v1/tenants/{tenant}/devices",
            json={"site_id": "plant-1", "machine_id": "m-1", "csr": csr},
            headers=headers,
        )
        assert issued.status_code == 201, issued.text
        without = operator.post("/v1/renew", json={"csr": csr})
        assert without.status_code == 401 and without.json()["code"] == "client_certificate_required"
    (folder / "device.pem").write_text(issued.json()["certificate"])
    (folder / "device.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    device = httpx.Client(
        base_url=url, verify=verify, cert=(str(folder / "device.pem"), str(folder / "device.key"))
    )
    with device:
        early = device.post("/v1/renew", json={"csr": csr})
        assert early.status_code == 409 and early.json()["code"] == "renew_too_early", early.text
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE device_certificates SET not_after = now() + interval '5 days'")
        new_key, new_csr = key_and_csr()
        renewed = device.post("/v1/renew", json={"csr": new_csr})
        assert renewed.status_code == 200, renewed.text
    cert = x509.load_pem_x509_certificate(renewed.json()["certificate"].encode())
    assert cert.public_key() == new_key.public_key()
    assert pki.common_name(renewed.json()["certificate"].encode()) == f"{tenant}.plant-1.m-1"
    with psycopg.connect(dsn) as conn:
        actions = [
            row[0]
            for row in conn.execute(
                "SELECT action FROM audit_events WHERE subject = %s", (f"{tenant}.plant-1.m-1",)
            )
        ]
    assert "certificate.renewed" in actions


def test_a_certificate_from_another_ca_is_refused_by_the_tls_layer(served: tuple[str, Path, str]) -> None:
    url, folder, _ = served
    stranger = pki.issue_client_cert(pki.make_ca("someone else"), "acme.plant-1.m-1")
    (folder / "stranger.pem").write_bytes(stranger.cert_pem)
    (folder / "stranger.key").write_bytes(stranger.key_pem)
    client = httpx.Client(base_url=url, verify=_context(folder, "stranger"))
    with client, pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        client.post("/v1/renew", json={"csr": key_and_csr()[1]})
