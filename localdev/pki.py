"""A small certificate authority for local and test brokers (library ``cryptography``).

Pure functions, PEM bytes in and out: a CA, a server certificate whose SANs cover ``localhost``,
``127.0.0.1`` and any hostnames given, and client certificates whose CN is the broker username
(a Mosquitto ``mtls`` listener with ``use_identity_as_username`` takes the CN as the identity).
Keys are ECDSA P-256: quick to make, accepted by OpenSSL, Mosquitto and paho. Production
certificates come from the cluster's issuer, not from here.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning.ca import key_usage

DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ironlink"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _sign(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    extensions: list[tuple[x509.ExtensionType, bool]],
    days: int,
) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False
        )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load(ca: Issued) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("ca.key_pem: is not an EC private key made by make_ca()")
    return cert, key


def make_ca(common_name: str = "Ironlink local CA", days: int = 365) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (key_usage(ca=True), True),
    ]
    return Issued(_sign(common_name, key, None, key, extensions, days), _key_pem(key))


def issue_server_cert(ca: Issued, hostnames: Iterable[str] = (), days: int = 365) -> Issued:
    """A broker certificate valid for ``localhost``, ``127.0.0.1`` and ``hostnames`` (names or IPs)."""
    names = list(dict.fromkeys([*hostnames, *DEFAULT_SERVER_NAMES]))
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    ca_cert, ca_key = _load(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (key_usage(ca=False), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.SubjectAlternativeName(sans), False),
    ]
    return Issued(_sign(names[0], key, ca_cert, ca_key, extensions, days), _key_pem(key))


def issue_client_cert(ca: Issued, username: str, days: int = 365) -> Issued:
    """A client certificate whose CN is the broker ``username`` (e.g. ``acme.plant-1.press-01``)."""
    if not username or "/" in username or "," in username:
        raise ValueError(f"username: {username!r} cannot be a certificate common name")
    ca_cert, ca_key = _load(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (key_usage(ca=False), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
    ]
    return Issued(_sign(username, key, ca_cert, ca_key, extensions, days), _key_pem(key))


def common_name(cert_pem: bytes) -> str:
    """The CN of a PEM certificate (what Mosquitto takes as the username under mTLS)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
