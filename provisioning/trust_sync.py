"""``python -m provisioning.trust_sync``: keeps a broker's certificate-listener trust folder in step
with the provisioning service's issuing CAs (``/v1/ca.pem``) and their CRLs (``/v1/crl.pem``).

Mosquitto 2.0 checks client certificates against CRLs only when its listener names a ``crlfile``
(``X509_V_FLAG_CRL_CHECK``, ``src/net.c``), which it reads once, at start, and which must hold at
least one CRL or the broker does not start. With that flag, OpenSSL's ``capath`` lookup also loads
``<issuer subject hash>.r<N>`` files at each handshake, but only suffixes it has not read yet (a
rewritten ``.r0`` is never read again), and among the CRLs of one issuer it keeps using the one
with the latest ``lastUpdate`` that has begun. So each change is a *new* file ``.r<N+1>`` whose
``lastUpdate`` is later than the last one's; a CRL of the same second waits for the next poll.
Every issuing CA must have a CRL there, or its devices are refused (checked by
``tests/test_trust_sync.py`` against a real Mosquitto).

The folder holds ``<hash>.0`` per CA, ``<hash>.r<N>`` per installed CRL (never removed: a
restarted broker reads them from ``.r0`` up and stops at the first gap) and :data:`CRL_FILE`, the
newest CRL of each CA, for the broker's ``crlfile``. Every file is written to a temporary name and
renamed. When the service is unreachable or answers something unusable the folder is left as it
was: the broker keeps its last good copy.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import re
import signal
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.name import _ASN1Type

from ingest.logs import configure_logging

CRL_FILE = "crls.pem"
"""The broker's ``crlfile``, inside the trust folder (OpenSSL's lookup reads only hash names)."""
DEFAULT_MAX_BYTES = 4 * 1024 * 1024
MAX_BYTES_LIMIT = 64 * 1024 * 1024
_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", re.S)
_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----\n?", re.S)
_CRL_NAME = re.compile(r"^([0-9a-f]{8})\.r(\d+)$")
log = structlog.get_logger("trust_sync")


class TrustError(RuntimeError):
    """The service's answer cannot be installed (the message says which part and why)."""


def subject_hash(name: x509.Name) -> str:
    """OpenSSL's ``X509_NAME_hash`` (``openssl x509 -hash``) in pure Python: the first four bytes,
    little-endian, of the SHA-1 of the name's canonical DER (string values as UTF8String, trimmed,
    inner whitespace collapsed, ASCII lower-cased; the outer SEQUENCE header left out)."""
    canonical = []
    for rdn in name.rdns:
        attributes = []
        for attribute in rdn:
            value = attribute.value
            if isinstance(value, str):
                value = re.sub(r"[ \t\n\r\f\v]+", " ", value.strip(" \t\n\r\f\v"))
                value = "".join(c.lower() if c.isascii() else c for c in value)
                attribute = x509.NameAttribute(attribute.oid, value, _ASN1Type.UTF8String)
            attributes.append(attribute)
        canonical.append(x509.RelativeDistinguishedName(attributes))
    der = x509.Name(canonical).public_bytes()
    length = der[1]
    body = der[2 + (length & 0x7F) if length & 0x80 else 2 :]
    return format(int.from_bytes(hashlib.sha1(body).digest()[:4], "little"), "08x")


@dataclass(frozen=True)
class Installed:
    """What one sync changed: CA files written or removed, CRL files added."""

    cas: int
    changed: list[str]

    def __str__(self) -> str:
        return f"{self.cas} CAs trusted" + (f", {len(self.changed)} files written" if self.changed else "")


def _newest_crl(folder: Path, name_hash: str) -> tuple[int, x509.CertificateRevocationList | None]:
    """The highest suffix installed for this issuer hash (-1: none) and its CRL."""
    suffixes = [
        int(match.group(2))
        for path in folder.glob(f"{name_hash}.r*")
        if (match := _CRL_NAME.match(path.name)) and match.group(1) == name_hash
    ]
    if not suffixes:
        return -1, None
    newest = max(suffixes)
    try:
        return newest, x509.load_pem_x509_crl((folder / f"{name_hash}.r{newest}").read_bytes())
    except (OSError, ValueError):
        return newest, None  # unreadable: the next CRL gets the next suffix anyway


def _needs_new(
    installed: x509.CertificateRevocationList | None, fetched: x509.CertificateRevocationList
) -> bool:
    """A new file when the revoked serials changed or the installed CRL is half way to its expiry,
    and only with a ``lastUpdate`` OpenSSL will prefer (later than the installed one, already begun)."""
    now = datetime.datetime.now(datetime.UTC)
    if fetched.last_update_utc > now:
        return False
    if installed is None:
        return True
    if fetched.last_update_utc <= installed.last_update_utc:
        return False
    serials = {entry.serial_number for entry in installed}
    if {entry.serial_number for entry in fetched} != serials:
        return True
    next_update = installed.next_update_utc
    if next_update is None:
        return False
    return now >= installed.last_update_utc + (next_update - installed.last_update_utc) / 2


def _write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    temporary.chmod(0o644)
    os.replace(temporary, path)


def _parse(
    ca_bundle: bytes, crl_bundle: bytes
) -> dict[str, tuple[bytes, bytes, x509.CertificateRevocationList]]:
    """``{subject hash: (CA PEM, CRL PEM, CRL)}``; refuses the whole answer if any CA has no CRL
    it signed (with CRL checking, that CA's devices would all be refused)."""
    cas: dict[str, tuple[bytes, x509.Certificate]] = {}
    for block in _CERT.findall(ca_bundle):
        try:
            cert = x509.load_pem_x509_certificate(block)
        except ValueError as error:
            raise TrustError(f"ca.pem: a certificate cannot be read: {error}") from error
        name_hash = subject_hash(cert.subject)
        if name_hash in cas and cas[name_hash][1] != cert:
            raise TrustError(f"ca.pem: two CAs share the subject hash {name_hash}")
        cas[name_hash] = (block if block.endswith(b"\n") else block + b"\n", cert)
    if not cas:
        raise TrustError("ca.pem: holds no certificate")
    crls: dict[str, tuple[bytes, x509.CertificateRevocationList]] = {}
    for block in _CRL.findall(crl_bundle):
        try:
            crl = x509.load_pem_x509_crl(block)
        except ValueError as error:
            raise TrustError(f"crl.pem: a CRL cannot be read: {error}") from error
        name_hash = subject_hash(crl.issuer)
        if name_hash in cas:
            key = cas[name_hash][1].public_key()
            if not isinstance(
                key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey
            ) or not crl.is_signature_valid(key):
                raise TrustError(f"crl.pem: the CRL of {crl.issuer.rfc4514_string()} is not signed by its CA")
            crls[name_hash] = (block if block.endswith(b"\n") else block + b"\n", crl)
    missing = sorted(cas[h][1].subject.rfc4514_string() for h in cas if h not in crls)
    if missing:
        raise TrustError(f"crl.pem: no CRL for {', '.join(missing)}")
    return {h: (cas[h][0], *crls[h]) for h in cas}


def install(folder: Path, ca_bundle: bytes, crl_bundle: bytes) -> Installed:
    """Bring ``folder`` in step with one answer of the service; nothing is written if it is unusable.

    CRLs go in before their CA, so a broker never trusts a CA it cannot check."""
    parsed = _parse(ca_bundle, crl_bundle)
    folder.mkdir(parents=True, exist_ok=True)
    changed: list[str] = []
    newest: list[bytes] = []
    for name_hash, (ca_pem, crl_pem, crl) in sorted(parsed.items()):
        suffix, installed = _newest_crl(folder, name_hash)
        if _needs_new(installed, crl):
            _write(folder / f"{name_hash}.r{suffix + 1}", crl_pem)
            changed.append(f"{name_hash}.r{suffix + 1}")
            newest.append(crl_pem)
        else:
            newest.append((folder / f"{name_hash}.r{suffix}").read_bytes())
        ca_path = folder / f"{name_hash}.0"
        if not ca_path.exists() or ca_path.read_bytes() != ca_pem:
            _write(ca_path, ca_pem)
            changed.append(ca_path.name)
    for stale in folder.glob("*.0"):
        if stale.name.removesuffix(".0") not in parsed:
            stale.unlink()
            changed.append(stale.name)
    crl_file = folder / CRL_FILE
    if changed or not crl_file.exists():
        _write(crl_file, b"".join(newest))
    return Installed(len(parsed), changed)


def fetch(url: str, *, context: ssl.SSLContext | None, timeout: float, max_bytes: int) -> bytes:
    """One GET, at most ``max_bytes`` of body."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            body: bytes = response.read(max_bytes + 1)
    except (urllib.error.URLError, OSError) as error:
        raise TrustError(f"{url}: {getattr(error, 'reason', error)}") from error
    if len(body) > max_bytes:
        raise TrustError(f"{url}: the answer is larger than --max-bytes {max_bytes}")
    return body


@dataclass(frozen=True)
class Options:
    url: str
    folder: Path
    interval: float
    once: bool
    ca_file: Path | None
    timeout: float
    max_bytes: int

    def context(self) -> ssl.SSLContext | None:
        if not self.url.startswith("https://"):
            return None
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)

    def sync(self) -> Installed:
        base, context = self.url.rstrip("/"), self.context()
        ca_bundle = fetch(
            f"{base}/v1/ca.pem", context=context, timeout=self.timeout, max_bytes=self.max_bytes
        )
        crl_bundle = fetch(
            f"{base}/v1/crl.pem", context=context, timeout=self.timeout, max_bytes=self.max_bytes
        )
        return install(self.folder, ca_bundle, crl_bundle)


def parse_options(argv: Sequence[str]) -> Options:
    """Every bad flag at once, each named with its value (:class:`SystemExit` 2)."""
    parser = argparse.ArgumentParser(
        prog="python -m provisioning.trust_sync", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--url", default=os.environ.get("IRONLINK_TRUST_URL", ""), help="the provisioning service"
    )
    parser.add_argument("--dir", default=os.environ.get("IRONLINK_TRUST_DIR", ""), help="the broker's capath")
    parser.add_argument("--interval", default="5", help="seconds between polls (0.2 to 3600)")
    parser.add_argument("--once", action="store_true", help="one sync; exit 1 if it fails (an initContainer)")
    parser.add_argument("--ca-file", default=None, help="the CA that signed the service's HTTPS certificate")
    parser.add_argument("--timeout", default="10", help="seconds per request (0.5 to 120)")
    parser.add_argument("--max-bytes", default=str(DEFAULT_MAX_BYTES), help="largest answer taken")
    args = parser.parse_args(argv)
    problems = []
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", args.url) or len(args.url) > 256:
        problems.append(f"--url: {args.url!r} is not an http(s) URL of at most 256 characters")
    if not args.dir:
        problems.append("--dir: is required (the broker's certificate-listener capath)")
    numbers = {}
    for flag, value, low, high in (
        ("--interval", args.interval, 0.2, 3600.0),
        ("--timeout", args.timeout, 0.5, 120.0),
        ("--max-bytes", args.max_bytes, 256, MAX_BYTES_LIMIT),
    ):
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not low <= number <= high:
            problems.append(f"{flag}: {value!r} is not a number from {low:g} to {high:g}")
        numbers[flag] = number
    if args.ca_file is not None and not Path(args.ca_file).is_file():
        problems.append(f"--ca-file: {args.ca_file!r} is not a readable file")
    if problems:
        parser.exit(2, "".join(f"error: {problem}\n" for problem in problems))
    return Options(
        url=args.url,
        folder=Path(args.dir),
        interval=numbers["--interval"],
        once=args.once,
        ca_file=Path(args.ca_file) if args.ca_file else None,
        timeout=numbers["--timeout"],
        max_bytes=int(numbers["--max-bytes"]),
    )


def run(options: Options, stop: threading.Event) -> None:
    """Poll until ``stop``; a failed sync is logged and the folder kept as it was."""
    while not stop.is_set():
        try:
            result = options.sync()
        except (TrustError, OSError) as error:
            log.warning("trust_sync_failed", error=str(error))
        else:
            if result.changed:
                log.info("trust_synced", cas=result.cas, files=result.changed)
        stop.wait(options.interval)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(sys.argv[1:] if argv is None else argv)
    configure_logging("info")
    if options.once:
        try:
            result = options.sync()
        except (TrustError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"{options.folder}: {result}")
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    started = time.monotonic()
    run(options, stop)
    log.info("trust_sync_stopped", ran_s=round(time.monotonic() - started, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
