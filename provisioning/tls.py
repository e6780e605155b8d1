"""Serving the API over TLS with optional client certificates, so ``POST /v1/renew`` sees the
certificate the handshake verified (never a header a proxy could forge).

uvicorn does not pass the peer certificate to the application, so :class:`ClientCertH11Protocol`
puts it into the request scope as the ASGI TLS extension (``extensions.tls.client_cert_chain``).
The server's context verifies client certificates against every issuing CA (``CERT_OPTIONAL``:
operators and claiming devices have none); a tenant CA made later is added to it at once.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from provisioning.app import CLIENT_CERT_SCOPE_KEY
from provisioning.ca import IssuingCA


class ClientCertH11Protocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return
        chain = [ssl.DER_cert_to_PEM_cert(der)]
        app = self.app

        async def with_client_certificate(scope: Any, receive: Any, send: Any) -> None:
            scope.setdefault("extensions", {})[CLIENT_CERT_SCOPE_KEY] = {"client_cert_chain": chain}
            await app(scope, receive, send)

        self.app = with_client_certificate


class TrustedCAs:
    """The TLS contexts that must trust each issuing CA, as :class:`provisioning.ca.Authorities`
    makes them (its ``on_new_ca``)."""

    def __init__(self) -> None:
        self.contexts: list[ssl.SSLContext] = []

    def __call__(self, ca: IssuingCA) -> None:
        for context in self.contexts:
            context.load_verify_locations(cadata=ca.cert_pem)


def server_config(
    app: Any,
    *,
    host: str,
    port: int,
    cert_file: str,
    key_file: str,
    ca_bundle_pem: str,
    trusted: TrustedCAs,
    log_level: str = "info",
) -> uvicorn.Config:
    """A loaded uvicorn config serving ``app`` over TLS, asking for (not requiring) a client
    certificate verified against ``ca_bundle_pem`` and whatever ``trusted`` adds later."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=ClientCertH11Protocol,
        ssl_certfile=cert_file,
        ssl_keyfile=key_file,
        ssl_cert_reqs=ssl.CERT_OPTIONAL,
        log_level=log_level,
        access_log=False,
    )
    config.load()
    assert config.ssl is not None
    config.ssl.load_verify_locations(cadata=ca_bundle_pem)
    trusted.contexts.append(config.ssl)
    return config
