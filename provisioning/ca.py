"""Issuing certificate authorities: one per region, one per tenant at the configured isolation level.

Each CA is an ECDSA P-256 key and a self-signed certificate in its own folder under ``ca_dir``
(``<ca_dir>/region-<region>/`` or ``<ca_dir>/tenant-<tenant>/``): generated on first use with the
key file created ``0600`` and exclusively (two replicas sharing the volume cannot both write one),
loaded afterwards. The key never leaves this module: :class:`IssuingCA` has no accessor for it, its
``repr`` shows only the name, and nothing in Pulumi state or the stack refers to it.

A device certificate carries ``CN=<tenant>.<site>.<machine>`` (the broker username under mutual
TLS), ``OU=<tenant>``, client-auth only, with the validity the settings give.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from registry.provisioning import Refused

CSR_MAX_BYTES = 8192
_KEY_FILE = "ca.key"
_CERT_FILE = "ca.pem"
_ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)
_RSA_MIN_BITS = 2048


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def key_usage(*, ca: bool) -> x509.KeyUsage:
    """ECDSA keys sign: certificates and CRLs for a CA, the TLS handshake for everyone else."""
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=ca,
        crl_sign=ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def public_key_digest(key: x509.Certificate | x509.CertificateSigningRequest) -> bytes:
    """SHA-256 of the DER SubjectPublicKeyInfo: how a claim recognises the same device key."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def parse_csr(pem: str, username: str) -> x509.CertificateSigningRequest:
    """A CSR the service will sign for ``username``; ``Refused`` (``csr_invalid`` or
    ``tenant_mismatch``) naming what is wrong."""
    if len(pem.encode()) > CSR_MAX_BYTES:
        raise Refused("csr_invalid", f"the CSR is longer than {CSR_MAX_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError as error:
        raise Refused("csr_invalid", f"the CSR is not a PEM certificate signing request ({error})") from error
    try:
        signed = csr.is_signature_valid
    except (ValueError, InvalidSignature, TypeError):
        signed = False
    if not signed:
        raise Refused("csr_invalid", "the CSR's signature does not verify with its own public key")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ACCEPTED_CURVES):
            raise Refused("csr_invalid", f"the CSR's key uses curve {key.curve.name}; P-256 or P-384 only")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _RSA_MIN_BITS:
            raise Refused(
                "csr_invalid", f"the CSR's RSA key has {key.key_size} bits; at least {_RSA_MIN_BITS}"
            )
    else:
        raise Refused("csr_invalid", "the CSR's key is neither ECDSA (P-256, P-384) nor RSA")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if names:
        common_name = str(names[0].value)
        if common_name != username:
            code = "tenant_mismatch" if common_name.split(".")[0] != username.split(".")[0] else "csr_invalid"
            raise Refused(code, f"the CSR names {common_name!r}; this device is {username!r}")
    return csr


def common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


class IssuingCA:
    """One CA: its certificate, and a signing key nobody outside this class can read."""

    def __init__(self, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.name = name
        self.cert = cert
        self.__key = key

    def __repr__(self) -> str:
        return f"IssuingCA({self.name!r})"

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @classmethod
    def load_or_create(cls, name: str, folder: Path, common_name: str, days: int) -> IssuingCA:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_path, cert_path = folder / _KEY_FILE, folder / _CERT_FILE
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls.load(name, key_path, cert_path, common_name, days)
        with os.fdopen(descriptor, "wb") as file:
            file.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            file.flush()
            os.fsync(file.fileno())
        cert = _self_signed(key, common_name, days)
        _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cls(name, cert, key)

    @classmethod
    def load(cls, name: str, key_path: Path, cert_path: Path, common_name: str, days: int) -> IssuingCA:
        """A CA from its key (and certificate: made again from the key when missing)."""
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError) as error:
            raise CAError(
                f"{key_path}: cannot be read as a PEM private key ({type(error).__name__})"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{key_path}: is not an ECDSA private key")
        if cert_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if cert.public_key() != key.public_key():
                raise CAError(f"{cert_path}: does not belong to the key {key_path}")
        else:
            cert = _self_signed(key, common_name, days)
            _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cls(name, cert, key)

    def sign(
        self, csr: x509.CertificateSigningRequest, username: str, tenant_id: str, days: int
    ) -> x509.Certificate:
        now = _now()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ironlink"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, tenant_id),
                x509.NameAttribute(NameOID.COMMON_NAME, username),
            ]
        )
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=days), self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
            )
            .sign(self.__key, hashes.SHA256())
        )

    def issued(self, cert: x509.Certificate) -> bool:
        """True when this CA signed ``cert``."""
        if cert.issuer != self.cert.subject:
            return False
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def crl(self, revoked: Iterable[tuple[int, datetime.datetime]], hours: int) -> str:
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now)
            .next_update(now + datetime.timedelta(hours=hours))
        )
        for serial, when in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        return builder.sign(self.__key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


class CAError(RuntimeError):
    """A configured or stored CA cannot be used (the message names the file, never its content)."""


def _self_signed(key: ec.EllipticCurvePrivateKey, common_name: str, days: int) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ironlink"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


@dataclass(frozen=True)
class CAConfig:
    folder: Path
    region: str
    tenant_ca_isolation: int | None
    validity_days: int
    key_file: Path | None = None
    cert_file: Path | None = None


class Authorities:
    """The region's CA (at start) and tenants' CAs (on first need); ``on_new_ca`` is told of each
    CA made or loaded after start, so the TLS layer can trust it for renewals at once."""

    def __init__(self, config: CAConfig, on_new_ca: Callable[[IssuingCA], None] | None = None) -> None:
        self.config = config
        self.on_new_ca = on_new_ca
        self._lock = threading.Lock()
        region_name = f"region-{config.region}"
        title = f"Ironlink {config.region} issuing CA"
        if config.key_file is not None and config.cert_file is not None:
            self.region = IssuingCA.load(
                region_name, config.key_file, config.cert_file, title, config.validity_days
            )
        else:
            self.region = IssuingCA.load_or_create(
                region_name, config.folder / region_name, title, config.validity_days
            )
        self._by_name: dict[str, IssuingCA] = {self.region.name: self.region}
        for folder in sorted(config.folder.glob("tenant-*")):
            if (folder / _KEY_FILE).exists():
                self._by_name[folder.name] = IssuingCA.load(
                    folder.name,
                    folder / _KEY_FILE,
                    folder / _CERT_FILE,
                    self._tenant_title(folder.name[7:]),
                    config.validity_days,
                )

    def _tenant_title(self, tenant_id: str) -> str:
        return f"Ironlink {self.config.region} {tenant_id} issuing CA"

    def for_tenant(self, tenant_id: str, isolation: int) -> IssuingCA:
        """The CA that signs this tenant's devices."""
        threshold = self.config.tenant_ca_isolation
        if threshold is None or isolation < threshold:
            return self.region
        name = f"tenant-{tenant_id}"
        with self._lock:
            found = self._by_name.get(name)
            if found is not None:
                return found
            made = IssuingCA.load_or_create(
                name, self.config.folder / name, self._tenant_title(tenant_id), self.config.validity_days
            )
            self._by_name[name] = made
        if self.on_new_ca is not None:
            self.on_new_ca(made)
        return made

    def by_name(self, name: str) -> IssuingCA | None:
        with self._lock:
            return self._by_name.get(name)

    def all(self) -> list[IssuingCA]:
        with self._lock:
            return list(self._by_name.values())

    def bundle_pem(self) -> str:
        """Every CA certificate: what a broker or the renewal listener trusts."""
        return "".join(ca.cert_pem for ca in self.all())
