"""The gateway's machines enroll through the provisioning service's claim flow.

The key is generated here and never leaves the gateway: ``POST /v1/claim`` carries a token, the
machine id and a CSR, and answers a certificate (CN = the broker username). ``renew`` asks
``POST /v1/renew`` over mutual TLS with the current certificate, ``renew_before_days`` before it
expires, for a new key's CSR. Files: ``<identity_dir>/<machine>.key`` (0600) and ``.pem``.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge.config import AgentConfig, Claim, Machine


class EnrollmentError(RuntimeError):
    """The provisioning service refused: ``<code>: <detail>`` as it answered."""


def new_key_and_csr() -> tuple[bytes, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, csr.public_bytes(serialization.Encoding.PEM).decode()


def _keep(folder: Path, machine: str, key_pem: bytes, certificate: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = folder / f"{machine}.key", folder / f"{machine}.pem"
    temporary = folder / f".{machine}.key.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_pem)
    (folder / f".{machine}.pem.tmp").write_text(certificate)
    os.replace(temporary, key_path)
    os.replace(folder / f".{machine}.pem.tmp", cert_path)
    return cert_path


def _answer(response: httpx.Response) -> dict[str, str]:
    if response.status_code >= 400:
        try:
            body = response.json()
            raise EnrollmentError(f"{body.get('code', response.status_code)}: {body.get('detail', '')}")
        except ValueError:
            raise EnrollmentError(f"{response.status_code}: {response.text[:200]}") from None
    return dict(response.json())


def claim(config: AgentConfig, machine: Machine) -> Path:
    """Claim one machine's identity with the configured token; the certificate's path."""
    settings, folder = config.uplink.claim, config.uplink.identity_dir
    assert settings is not None and folder is not None, "uplink.claim and uplink.identity_dir are required"
    key_pem, csr = new_key_and_csr()
    body = {
        "token": settings.token_file.read_text().strip(),
        "machine_id": machine.id,
        "machine_type": machine.type,
        "tenant_id": config.gateway.tenant,
        "csr": csr,
    }
    with httpx.Client(base_url=settings.api, verify=_verify(settings), timeout=10) as client:
        answer = _answer(client.post("/v1/claim", json=body))
    return _keep(folder, machine.id, key_pem, answer["certificate"])


def needs_renewal(cert_path: Path, renew_before_days: int, now: dt.datetime | None = None) -> bool:
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    now = now or dt.datetime.now(dt.UTC)
    return certificate.not_valid_after_utc - now <= dt.timedelta(days=renew_before_days)


def renew(config: AgentConfig, machine: Machine) -> Path:
    """A new key and certificate, asked for with the current one (mutual TLS)."""
    settings, folder = config.uplink.claim, config.uplink.identity_dir
    assert settings is not None and folder is not None
    context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    context.load_cert_chain(str(folder / f"{machine.id}.pem"), str(folder / f"{machine.id}.key"))
    key_pem, csr = new_key_and_csr()
    with httpx.Client(base_url=settings.api, verify=context, timeout=10) as client:
        answer = _answer(client.post("/v1/renew", json={"csr": csr}))
    return _keep(folder, machine.id, key_pem, answer["certificate"])


def _verify(settings: Claim) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=str(settings.ca_file)) if settings.ca_file else True
