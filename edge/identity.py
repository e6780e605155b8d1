"""The gateway's identities, enrolled through the provisioning service's claim flow.

One identity per machine (and one for the gateway itself when it publishes its health, as a
machine of type ``edge_gateway``). The key is generated here and never leaves the gateway:
``POST /v1/claim`` carries a token, the machine id and type and a CSR, and answers a certificate
(CN = the broker username ``<tenant>.<site>.<machine>``, the only identity the broker lets publish
to that machine's topic). ``POST /v1/renew``, over mutual TLS with the current certificate, gives a
new key's certificate ``renew_before_days`` before it expires. Files: ``<identity_dir>/<name>.key``
(0600) and ``<name>.pem``.

The key is written before the claim is sent: a claim whose answer was lost (a crash, a timeout) is
sent again with the same key, and the service answers the same certificate (a resumed claim).

:class:`Enrollment` is the running agent's side: it claims what is missing at start, renews while
running, and on a new certificate has that machine's session reconnect with it. A refusal is
reported (status and one line on stderr), never a traceback, and retried every
``check_interval_s`` with the token file read again, so a replaced token needs no restart.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge.config import AgentConfig, Claim
from edge.uplink import backoff_delays
from infra.tenancy import device_username
from ingest.catalog import GATEWAY_MACHINE_TYPE

GATEWAY_TYPE = GATEWAY_MACHINE_TYPE
# Refusals worth retrying soon; any other code needs an operator (a new token, an unrevoked device).
TRANSIENT = frozenset({"unreachable", "rate_limited", "broker_unavailable", "server_error"})
MAX_ANSWER_BYTES = 64 * 1024  # a certificate and its CA are a few KiB
MAX_TOKEN_BYTES = 1024  # a claim token is under 128 characters
TIMEOUT_S = 10


class EnrollmentError(RuntimeError):
    """The provisioning service refused (``code``: its refusal code) or could not be reached."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail

    @property
    def transient(self) -> bool:
        return self.code in TRANSIENT


@dataclass(frozen=True)
class Identity:
    """Who enrolls: a machine, or the gateway itself as an ``edge_gateway``."""

    name: str
    machine_type: str


def identities(config: AgentConfig) -> list[Identity]:
    found = [Identity(machine.id, machine.type) for machine in config.machines]
    if config.health is not None:
        found.append(Identity(config.gateway.id, GATEWAY_TYPE))
    return found


def files(folder: Path, name: str) -> tuple[Path, Path]:
    """``(certificate, key)`` of one identity."""
    return folder / f"{name}.pem", folder / f"{name}.key"


# ------------------------------------------------------------------------------- keys and files
def new_key() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def csr_of(key_pem: bytes) -> str:
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically, with ``mode`` from the start (a key is never readable by others, not even briefly)."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _claim_key(folder: Path, name: str) -> bytes:
    """The key a claim is made for: the one kept by an unanswered claim, or a new one kept now."""
    _, key_path = files(folder, name)
    if key_path.is_file():
        return key_path.read_bytes()
    key_pem = new_key()
    _write(key_path, key_pem, 0o600)
    return key_pem


def _checked(config: AgentConfig, identity: Identity, key_pem: bytes, certificate: str) -> bytes:
    """The certificate, if it names this identity and holds this key (a token of another site
    would make a certificate the broker never lets publish here)."""
    expected = device_username(config.gateway.tenant, config.gateway.site, identity.name)
    try:
        cert = x509.load_pem_x509_certificate(certificate.encode())
    except ValueError:
        raise EnrollmentError("certificate_invalid", "the service answered no PEM certificate") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else ""
    if common_name != expected:
        raise EnrollmentError(
            "identity_mismatch",
            f"the certificate is for {common_name!r}, this gateway's {identity.name} is {expected!r}"
            " (a claim token of another tenant or site?)",
        )
    key = serialization.load_pem_private_key(key_pem, password=None)
    if cert.public_key() != key.public_key():
        raise EnrollmentError("identity_mismatch", "the certificate does not hold this gateway's key")
    return certificate.encode()


# ---------------------------------------------------------------------------------- requests
def _settings(config: AgentConfig) -> tuple[Claim, Path]:
    settings, folder = config.uplink.claim, config.uplink.identity_dir
    if settings is None or folder is None:
        raise EnrollmentError("not_configured", "uplink.claim and uplink.identity_dir are required to enroll")
    return settings, folder


def _post(settings: Claim, path: str, body: dict[str, Any], verify: ssl.SSLContext | bool) -> dict[str, Any]:
    """The service's JSON answer (read up to :data:`MAX_ANSWER_BYTES`), or why there is none."""
    where = f"{settings.api}{path}"
    try:
        with (
            httpx.Client(base_url=settings.api, verify=verify, timeout=TIMEOUT_S) as client,
            client.stream("POST", path, json=body) as response,
        ):
            content = b""
            for chunk in response.iter_bytes():
                content += chunk
                if len(content) > MAX_ANSWER_BYTES:
                    raise EnrollmentError(
                        "server_error", f"{where} answered more than {MAX_ANSWER_BYTES} bytes"
                    )
    except httpx.HTTPError as error:
        raise EnrollmentError("unreachable", f"{where}: {error}") from None
    status = response.status_code
    fallback = "server_error" if status >= 500 else f"http_{status}"
    try:
        answer = json.loads(content)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise EnrollmentError(
            fallback, f"{where} answered {status}: {content[:200].decode(errors='replace')}"
        )
    if status >= 400:
        raise EnrollmentError(str(answer.get("code") or fallback)[:64], str(answer.get("detail", ""))[:500])
    if not isinstance(answer.get("certificate"), str):
        raise EnrollmentError("certificate_invalid", f"{where} answered no certificate")
    return answer


def _verify(settings: Claim) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)


def claim(config: AgentConfig, identity: Identity) -> Path:
    """Claim one identity with the configured token; the certificate's path."""
    settings, folder = _settings(config)
    try:
        with settings.token_file.open("rb") as handle:
            token = handle.read(MAX_TOKEN_BYTES + 1).decode().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise EnrollmentError("token_unreadable", f"uplink.claim.token_file: {error}") from None
    if len(token) > MAX_TOKEN_BYTES:
        raise EnrollmentError(
            "token_unreadable", f"uplink.claim.token_file: more than {MAX_TOKEN_BYTES} bytes"
        )
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_pem = _claim_key(folder, identity.name)
    body = {
        "token": token,
        "machine_id": identity.name,
        "machine_type": identity.machine_type,
        "tenant_id": config.gateway.tenant,
        "csr": csr_of(key_pem),
    }
    answer = _post(settings, "/v1/claim", body, _verify(settings))
    cert_path, _ = files(folder, identity.name)
    _write(cert_path, _checked(config, identity, key_pem, answer["certificate"]), 0o644)
    return cert_path


def not_after(cert_path: Path) -> dt.datetime:
    return x509.load_pem_x509_certificate(cert_path.read_bytes()).not_valid_after_utc


def needs_renewal(cert_path: Path, renew_before_days: int, now: dt.datetime | None = None) -> bool:
    now = now or dt.datetime.now(dt.UTC)
    return not_after(cert_path) - now <= dt.timedelta(days=renew_before_days)


def renew(config: AgentConfig, identity: Identity) -> Path:
    """A new key and certificate, asked for with the current one (mutual TLS)."""
    settings, folder = _settings(config)
    cert_path, key_path = files(folder, identity.name)
    context = _verify(settings)
    context.load_cert_chain(str(cert_path), str(key_path))
    key_pem = new_key()
    answer = _post(settings, "/v1/renew", {"csr": csr_of(key_pem)}, context)
    certificate = _checked(config, identity, key_pem, answer["certificate"])
    _write(_new(key_path), key_pem, 0o600)
    _write(_new(cert_path), certificate, 0o644)  # from here on the new pair is the identity
    finish_renewal(folder, identity.name)
    return cert_path


def _new(path: Path) -> Path:
    return path.with_name(f"{path.name}.new")


def finish_renewal(folder: Path, name: str) -> None:
    """Put a renewed pair in place, or drop half of one: ``<name>.pem.new`` is written last, so
    once it exists both new files are whole, and a crash between the two renames leaves the
    certificate to rename. A lone ``.key.new`` is a renewal whose answer was never kept."""
    cert_path, key_path = files(folder, name)
    if _new(cert_path).is_file():
        if _new(key_path).is_file():
            os.replace(_new(key_path), key_path)
        os.replace(_new(cert_path), cert_path)
    else:
        _new(key_path).unlink(missing_ok=True)


# ------------------------------------------------------------------------------ while running
@dataclass
class IdentityState:
    state: str = "checking"  # checking | valid | claiming | renewing | renew_pending | retrying | refused
    since: float = 0.0
    not_after: float | None = None
    last_error: str | None = None
    claimed: int = 0
    renewed: int = 0


class Enrollment:
    """Claims the identities without a certificate, renews them before expiry, and calls
    ``on_new_identity(name)`` after each new certificate (that session reconnects with it)."""

    def __init__(self, config: AgentConfig, on_new_identity: Callable[[str], None]) -> None:
        self.config, self.on_new_identity = config, on_new_identity
        self.identities = identities(config) if config.uplink.claim and config.uplink.identity_dir else []
        self.states = {identity.name: IdentityState(since=time.time()) for identity in self.identities}
        self._retry = backoff_delays(1.0, 60.0)
        self._attempts = dict.fromkeys(self.states, 0)

    def health(self) -> dict[str, Any]:
        return (
            {"identity": {name: asdict(state) for name, state in self.states.items()}} if self.states else {}
        )

    async def run(self) -> None:
        due = dict.fromkeys(self.states, 0.0)
        while self.identities:
            for identity in self.identities:
                if due[identity.name] <= time.monotonic():
                    due[identity.name] = time.monotonic() + await self.maintain(identity)
            await asyncio.sleep(max(0.05, min(due.values()) - time.monotonic()))

    async def maintain(self, identity: Identity) -> float:
        """Claim or renew where due; the seconds until this identity is looked at again."""
        settings, folder = _settings(self.config)
        cert_path, _ = files(folder, identity.name)
        check = settings.check_interval_s
        try:
            finish_renewal(folder, identity.name)  # one a crash interrupted
            if not cert_path.is_file():
                if self.states[identity.name].state not in ("refused", "retrying"):
                    self._mark(identity.name, "claiming")  # a retry keeps showing why the last one failed
                await asyncio.to_thread(claim, self.config, identity)
                self.states[identity.name].claimed += 1
            elif needs_renewal(cert_path, settings.renew_before_days):
                self._mark(identity.name, "renewing")
                await asyncio.to_thread(renew, self.config, identity)
                self.states[identity.name].renewed += 1
            else:
                self._valid(identity.name, cert_path)
                return check
        except EnrollmentError as error:
            return self._failed(identity.name, error, check)
        except (OSError, ValueError, ssl.SSLError) as error:  # an unreadable certificate or key file
            return self._failed(identity.name, EnrollmentError("identity_unreadable", str(error)), check)
        self._valid(identity.name, cert_path)
        self.on_new_identity(identity.name)
        return check

    def _valid(self, name: str, cert_path: Path) -> None:
        self._attempts[name] = 0
        self._mark(name, "valid")
        self.states[name].not_after = not_after(cert_path).timestamp()

    def _failed(self, name: str, error: EnrollmentError, check: float) -> float:
        state = self.states[name]
        if error.code == "renew_too_early":  # our renewal window opens before the service's
            self._mark(name, "renew_pending", str(error))
            return check
        if error.transient:
            self._mark(name, "retrying", str(error))
            self._attempts[name] += 1
            return self._retry(self._attempts[name])
        if state.state != "refused" or state.last_error != str(error):
            print(f"error: {name}: enrollment refused: {error} (retried every {check:g} s)", file=sys.stderr)
        self._mark(name, "refused", str(error))
        return check

    def _mark(self, name: str, state: str, error: str | None = None) -> None:
        current = self.states[name]
        if current.state != state:
            current.state, current.since = state, time.time()
        current.last_error = error
