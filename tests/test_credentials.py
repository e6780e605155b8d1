"""Credentials are byte-compatible with ``mosquitto_passwd`` and checkable the way EMQX checks them."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from infra.fleet import Machine
from localdev.servers import find_binary
from registry.credentials import generate_password, hash_password, parse_hash, verify_password
from registry.queries import EMQX_PASSWORD_HASH

# Written by Mosquitto 2.0.11's `mosquitto_passwd -b` with these passwords.
FIXTURE = Path(__file__).parent / "fixtures" / "registry" / "mosquitto_passwd.txt"
FIXTURE_PASSWORDS = {"acme.plant-1.press-01": "correct horse battery staple", "svc.ingest": "worker-secret-1"}


def _password_file(text: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in text.splitlines() if line)


def test_hashes_written_by_mosquitto_passwd_verify_and_rehash_identically() -> None:
    for username, stored in _password_file(FIXTURE.read_text()).items():
        password = FIXTURE_PASSWORDS[username]
        assert verify_password(password, stored), username
        assert not verify_password(password + "x", stored), username
        # Same salt and iterations give the same line mosquitto_passwd wrote.
        assert hash_password(password, salt=parse_hash(stored).salt) == stored


def test_hash_password_matches_the_installed_mosquitto_passwd(tmp_path: Path) -> None:
    password = generate_password()
    path = tmp_path / "passwd"
    subprocess.run([find_binary("mosquitto_passwd"), "-c", "-b", str(path), "dev", password], check=True)
    stored = _password_file(path.read_text())["dev"]
    assert stored.startswith("$7$101$")
    assert hash_password(password, salt=parse_hash(stored).salt) == stored


def test_our_hash_is_what_the_stack_config_accepts_and_emqx_would_compute() -> None:
    password = generate_password()
    hashed = hash_password(password)
    assert Machine(id="press-01", type="hydraulic_press", password_hash=hashed).password_hash == hashed
    parsed = parse_hash(hashed)
    assert (parsed.iterations, len(parsed.salt)) == (101, 12)
    # EMQX: pbkdf2(mac_fun, password, salt, iterations, dk_length), lowercase hex, compared as is.
    emqx = hashlib.pbkdf2_hmac(
        EMQX_PASSWORD_HASH["mac_fun"],
        password.encode(),
        parsed.salt,
        EMQX_PASSWORD_HASH["iterations"],
        EMQX_PASSWORD_HASH["dk_length"],
    ).hex()
    assert emqx == parsed.hex_digest
    assert emqx == emqx.lower()


def test_generated_passwords_are_long_and_distinct() -> None:
    passwords = {generate_password() for _ in range(50)}
    assert len(passwords) == 50
    assert all(len(p) >= 32 and ":" not in p for p in passwords)


def test_salts_are_random() -> None:
    assert hash_password("same") != hash_password("same")


@pytest.mark.parametrize(
    ("hashed", "complaint"),
    [
        ("plain-text", "is not a '$7$"),
        ("$6$101$abc$def", "is not a '$7$"),
        ("$7$x$c2FsdA==$" + "A" * 88, "'x' is not a valid iteration count"),
        ("$7$101$!!!$" + "A" * 88, "not valid base64"),
        ("$7$101$c2FsdA==$c2hvcnQ=", "64-byte digest"),
    ],
)
def test_malformed_hashes_are_refused_with_the_reason(hashed: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint.replace("$", r"\$")):
        verify_password("anything", hashed)


def test_empty_password_is_refused() -> None:
    with pytest.raises(ValueError, match="empty password"):
        hash_password("")
