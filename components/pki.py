"""The region's certificate authority (pulumi-tls): it signs the broker's server certificate and, for
mutual TLS, the client certificates of the ingest worker (devices get theirs from the same CA).

Private keys leave this module only as Pulumi secrets. The CA is stateful in the sense that
matters: replacing it invalidates every device certificate in the field, so it is protected
wherever the stack protects stateful resources.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import pulumi
import pulumi_tls as tls

from infra.config import PlatformConfig

CA_VALIDITY_HOURS = 10 * 365 * 24
LEAF_VALIDITY_HOURS = 365 * 24
# `pulumi up` re-issues a leaf certificate within its last 30 days.
EARLY_RENEWAL_HOURS = 30 * 24
KEY_ALGORITHM = "ECDSA"
KEY_CURVE = "P256"
ORGANIZATION = "Ironlink"


class CertificateAuthorityArgs(TypedDict):
    config: PlatformConfig
    """The region's config: the region names the CA; ``protect_stateful`` decides its protection."""


@dataclass(frozen=True)
class IssuedCertificate:
    """A leaf certificate and its key (secret), both PEM."""

    cert_pem: pulumi.Output[str]
    private_key_pem: pulumi.Output[str]


class CertificateAuthority(pulumi.ComponentResource):
    cert_pem: pulumi.Output[str]
    """The CA certificate devices and services trust (public)."""
    private_key_pem: pulumi.Output[str]
    """The CA key (secret): needed to sign device certificates."""

    def __init__(
        self, name: str, args: CertificateAuthorityArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("ironlink:pki:CertificateAuthority", name, None, opts)
        config = args["config"]
        keep = pulumi.ResourceOptions(parent=self, protect=config.protect_stateful)
        key = tls.PrivateKey(f"{name}-key", algorithm=KEY_ALGORITHM, ecdsa_curve=KEY_CURVE, opts=keep)
        cert = tls.SelfSignedCert(
            name,
            private_key_pem=key.private_key_pem,
            is_ca_certificate=True,
            validity_period_hours=CA_VALIDITY_HOURS,
            allowed_uses=["cert_signing", "crl_signing", "digital_signature"],
            subject=tls.SelfSignedCertSubjectArgs(
                common_name=f"Ironlink {config.region} CA", organization=ORGANIZATION
            ),
            opts=keep,
        )
        self.cert_pem = cert.cert_pem
        self.private_key_pem = pulumi.Output.secret(key.private_key_pem)
        self.register_outputs({"cert_pem": self.cert_pem, "private_key_pem": self.private_key_pem})

    def issue(
        self,
        name: str,
        *,
        common_name: str,
        parent: pulumi.Resource,
        dns_names: Sequence[str] = (),
        client: bool = False,
    ) -> IssuedCertificate:
        """Issue a server (or, with ``client=True``, a client) certificate as children of ``parent``.

        A client certificate's CN is the broker identity it authenticates as (e.g. ``svc.ingest``).
        """
        opts = pulumi.ResourceOptions(parent=parent)
        key = tls.PrivateKey(f"{name}-key", algorithm=KEY_ALGORITHM, ecdsa_curve=KEY_CURVE, opts=opts)
        request = tls.CertRequest(
            f"{name}-csr",
            private_key_pem=key.private_key_pem,
            dns_names=list(dns_names),
            subject=tls.CertRequestSubjectArgs(common_name=common_name, organization=ORGANIZATION),
            opts=opts,
        )
        cert = tls.LocallySignedCert(
            name,
            cert_request_pem=request.cert_request_pem,
            ca_private_key_pem=self.private_key_pem,
            ca_cert_pem=self.cert_pem,
            validity_period_hours=LEAF_VALIDITY_HOURS,
            early_renewal_hours=EARLY_RENEWAL_HOURS,
            allowed_uses=[
                "digital_signature",
                "key_encipherment",
                "client_auth" if client else "server_auth",
            ],
            opts=opts,
        )
        return IssuedCertificate(cert.cert_pem, pulumi.Output.secret(key.private_key_pem))
