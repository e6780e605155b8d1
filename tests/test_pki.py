"""The local CA's certificates pass a real TLS handshake with hostname and client verification."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from localdev import pki


def _write(folder: Path, name: str, issued: pki.Issued) -> tuple[str, str]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    return str(cert), str(key)


def _handshake(
    tmp_path: Path, server: pki.Issued, ca: pki.Issued, host: str, client: pki.Issued | None
) -> str:
    """Run a TLS server requiring a client certificate; return the client's CN as the server saw it."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(*_write(tmp_path, "server", server))
    server_ctx.load_verify_locations(cadata=ca.cert_pem.decode())
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    if client is not None:
        client_ctx.load_cert_chain(*_write(tmp_path, "client", client))
    seen: list[str] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
                    seen.append(str(peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value))
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client_ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            assert tls.recv(2) == b"ok"
        thread.join(5)
    return seen[0]


def test_server_certificate_verifies_for_localhost_and_given_names(tmp_path: Path) -> None:
    ca = pki.make_ca()
    server = pki.issue_server_cert(ca, ["mqtt.ironlink.localhost", "10.0.0.7"])
    client = pki.issue_client_cert(ca, "acme.plant-1.press-01")
    for host in ("localhost", "127.0.0.1", "mqtt.ironlink.localhost"):
        assert _handshake(tmp_path, server, ca, host, client) == "acme.plant-1.press-01"
    sans = x509.load_pem_x509_certificate(server.cert_pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "10.0.0.7" in {str(ip) for ip in sans.value.get_values_for_type(x509.IPAddress)}


def test_wrong_hostname_and_foreign_ca_are_refused(tmp_path: Path) -> None:
    ca, other = pki.make_ca(), pki.make_ca("Someone else")
    server = pki.issue_server_cert(ca)
    client = pki.issue_client_cert(ca, "svc.acme")
    with pytest.raises(ssl.SSLCertVerificationError, match=r"Hostname mismatch|doesn't match"):
        _handshake(tmp_path, server, ca, "broker.example.com", client)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tmp_path, server, other, "localhost", client)


def test_client_certificate_carries_the_username_as_cn() -> None:
    ca = pki.make_ca()
    client = pki.issue_client_cert(ca, "globex.line-a.molder-01")
    assert pki.common_name(client.cert_pem) == "globex.line-a.molder-01"
    cert = x509.load_pem_x509_certificate(client.cert_pem)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_pem))
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(ValueError, match="'a/b'"):
        pki.issue_client_cert(ca, "a/b")
