"""Broker credentials in Mosquitto's ``$7$`` PBKDF2-SHA512 form, the one form Ironlink stores.

``mosquitto_passwd`` (Mosquitto 2.0) writes ``$7$<iterations>$<base64 salt>$<base64 hash>``:
PBKDF2-HMAC-SHA512 over the password with 12 random salt bytes, 64-byte digest. Mosquitto reads the
value as it is from its password file; EMQX's PostgreSQL authenticator checks the same digest when
the registry hands it the lowercase hex digest and the raw salt bytes (see :data:`registry.queries.
EMQX_PASSWORD_HASH`). The stack file's ``password_hash``, the password file and the registry
therefore all hold one value, and a plaintext password exists only when it is generated.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass

# Mosquitto 2.0's defaults: 101 iterations, 12 salt bytes, SHA-512's 64-byte digest. EMQX is
# configured with the same iteration count, so the registry only accepts hashes made with it.
ITERATIONS = 101
SALT_BYTES = 12
DIGEST_BYTES = 64
_PREFIX = "7"


@dataclass(frozen=True)
class PasswordHash:
    """The parts of a ``$7$`` hash: what EMQX needs as ``salt`` and ``password_hash``."""

    iterations: int
    salt: bytes
    digest: bytes

    @property
    def hex_digest(self) -> str:
        """The digest as EMQX compares it: lowercase hex."""
        return self.digest.hex()

    def __str__(self) -> str:
        salt = base64.b64encode(self.salt).decode()
        digest = base64.b64encode(self.digest).decode()
        return f"${_PREFIX}${self.iterations}${salt}${digest}"


def generate_password() -> str:
    """A random device or service password (32 URL-safe characters, 192 bits)."""
    return secrets.token_urlsafe(24)


def _derive(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, DIGEST_BYTES)


def hash_password(password: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """``$7$<iterations>$<b64 salt>$<b64 hash>``, byte-for-byte what ``mosquitto_passwd`` writes."""
    if not password:
        raise ValueError("password: an empty password cannot be hashed")
    if iterations < 1:
        raise ValueError(f"iterations: {iterations} must be at least 1")
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    return str(PasswordHash(iterations, salt, _derive(password, salt, iterations)))


def parse_hash(hashed: str) -> PasswordHash:
    """Split a ``$7$`` hash; raises ``ValueError`` naming what is wrong with it."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != _PREFIX:
        raise ValueError(f"{hashed[:12]!r}... is not a '$7$<iterations>$<salt>$<hash>' PBKDF2-SHA512 hash")
    if not parts[2].isdigit() or int(parts[2]) < 1:
        raise ValueError(f"{parts[2]!r} is not a valid iteration count in a '$7$' hash")
    try:
        salt = base64.b64decode(parts[3], validate=True)
        digest = base64.b64decode(parts[4], validate=True)
    except binascii.Error as error:
        raise ValueError(f"the salt or hash of a '$7$' hash is not valid base64: {error}") from error
    if len(digest) != DIGEST_BYTES or not salt:
        raise ValueError(
            f"a '$7$' hash needs a salt and a {DIGEST_BYTES}-byte digest, got {len(digest)} bytes"
        )
    return PasswordHash(int(parts[2]), salt, digest)


def verify_password(password: str, hashed: str) -> bool:
    """True when ``password`` matches ``hashed`` (constant-time compare)."""
    parsed = parse_hash(hashed)
    return hmac.compare_digest(_derive(password, parsed.salt, parsed.iterations), parsed.digest)
