"""Registry SQL of the provisioning service: admin and claim tokens, the fleet at runtime, devices
and their certificates (migration ``0004_provisioning.sql``).

Every function takes a connection and runs inside the caller's transaction when there is one, so
the service can register a machine, its device, its certificate and the claim that made them in
one commit. Each change is recorded in ``audit_events`` (``registry.store.record_event``). A
refusal is a :class:`Refused` carrying a machine-readable code and a sentence; the service turns
it into an HTTP answer.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from infra.tenancy import device_username
from registry.access import machine_rules
from registry.store import record_event

ADMIN_TOKEN_PREFIX = "ilk-admin"
CLAIM_TOKEN_PREFIX = "ilk-claim"
TOKEN_MAX_LENGTH = 128
_ID_HEX = 16


class Refused(Exception):
    """A provisioning request refused: ``code`` for machines, ``detail`` for people."""

    def __init__(self, code: str, detail: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code, self.detail, self.retry_after_s = code, detail, retry_after_s
        self.tenant_id: str | None = None
        """The tenant concerned, once known (for the audit trail)."""
        self.audited = True
        """False for refusals not worth one audit row each (a flood already audited once)."""


# ----------------------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class NewToken:
    """A freshly minted token: ``plaintext`` is shown once, only ``digest`` is stored."""

    id: str
    plaintext: str
    digest: bytes


def mint_token(prefix: str) -> NewToken:
    """``<prefix>.<16 hex id>.<43 url-safe characters: 256 random bits>``."""
    token_id = secrets.token_hex(_ID_HEX // 2)
    secret = secrets.token_urlsafe(32)
    return NewToken(token_id, f"{prefix}.{token_id}.{secret}", secret_digest(secret))


def secret_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_token(prefix: str, text: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a token of this kind, or None when it is not one (never an error: an
    altered token is simply unknown)."""
    parts = text.split(".")
    if len(text) > TOKEN_MAX_LENGTH or len(parts) != 3 or parts[0] != prefix:
        return None
    token_id, secret = parts[1], parts[2]
    if len(token_id) != _ID_HEX or any(c not in "0123456789abcdef" for c in token_id) or not secret:
        return None
    return token_id, secret


def secret_matches(secret: str, digest: bytes) -> bool:
    return hmac.compare_digest(secret_digest(secret), digest)


# ----------------------------------------------------------------------------------- admin tokens
@dataclass(frozen=True)
class AdminToken:
    id: str
    tenant_id: str | None
    label: str
    secret_sha256: bytes
    created_by: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None


def create_admin_token(
    conn: psycopg.Connection, *, tenant_id: str | None, label: str, expires_at: datetime, actor: str
) -> NewToken:
    """A new admin token, platform-wide when ``tenant_id`` is None."""
    token = mint_token(ADMIN_TOKEN_PREFIX)
    with conn.transaction():
        if tenant_id is not None:
            require_tenant(conn, tenant_id)
        conn.execute(
            "INSERT INTO admin_tokens (id, tenant_id, label, secret_sha256, created_by, expires_at)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (token.id, tenant_id, label, token.digest, actor, expires_at),
        )
        record_event(
            conn,
            actor=actor,
            action="admin_token.created",
            subject=token.id,
            tenant_id=tenant_id,
            details={"label": label, "scope": tenant_id or "platform", "expires_at": expires_at.isoformat()},
        )
    return token


def admin_token(conn: psycopg.Connection, token_id: str) -> AdminToken | None:
    with conn.cursor(row_factory=class_row(AdminToken)) as cursor:
        return cursor.execute(
            "SELECT id, tenant_id, label, secret_sha256, created_by, created_at, expires_at, revoked_at"
            " FROM admin_tokens WHERE id = %s",
            (token_id,),
        ).fetchone()


def revoke_admin_token(conn: psycopg.Connection, token_id: str, *, scope: str | None, actor: str) -> bool:
    """Revoke a token; a tenant-scoped caller (``scope``) reaches only its tenant's tokens."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE admin_tokens SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL"
            " AND (%s::text IS NULL OR tenant_id = %s) RETURNING tenant_id",
            (token_id, scope, scope),
        ).fetchone()
        if row is None:
            return False
        record_event(conn, actor=actor, action="admin_token.revoked", subject=token_id, tenant_id=row[0])
    return True


# ------------------------------------------------------------------------------- tenants and sites
def tenant_isolation(conn: psycopg.Connection, tenant_id: str) -> int | None:
    row = conn.execute("SELECT isolation FROM tenants WHERE id = %s", (tenant_id,)).fetchone()
    return None if row is None else int(row[0])


def require_tenant(conn: psycopg.Connection, tenant_id: str) -> int:
    isolation = tenant_isolation(conn, tenant_id)
    if isolation is None:
        raise Refused("tenant_unknown", f"tenant {tenant_id!r} is not in the registry")
    return isolation


@dataclass(frozen=True)
class Site:
    id: str
    name: str | None


def add_site(conn: psycopg.Connection, tenant_id: str, site_id: str, name: str | None, *, actor: str) -> None:
    with conn.transaction():
        inserted = conn.execute(
            "INSERT INTO sites (tenant_id, id, name) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (tenant_id, site_id, name),
        ).rowcount
        if not inserted:
            raise Refused("site_exists", f"site {site_id!r} already exists in tenant {tenant_id!r}")
        record_event(
            conn,
            actor=actor,
            action="site.added",
            subject=site_id,
            tenant_id=tenant_id,
            details={"name": name},
        )


def list_sites(conn: psycopg.Connection, tenant_id: str) -> list[Site]:
    with conn.cursor(row_factory=class_row(Site)) as cursor:
        return cursor.execute(
            "SELECT id, name FROM sites WHERE tenant_id = %s ORDER BY id", (tenant_id,)
        ).fetchall()


def require_site(conn: psycopg.Connection, tenant_id: str, site_id: str) -> None:
    if (
        conn.execute("SELECT 1 FROM sites WHERE tenant_id = %s AND id = %s", (tenant_id, site_id)).fetchone()
        is None
    ):
        raise Refused("site_unknown", f"site {site_id!r} is not a site of tenant {tenant_id!r}")


# ---------------------------------------------------------------------------------------- machines
@dataclass(frozen=True)
class Machine:
    site_id: str
    id: str
    type: str
    disabled_at: datetime | None
    device: str | None
    """The machine's device username when it has a device."""


_MACHINES = (
    "SELECT m.site_id, m.id, m.type, m.disabled_at, d.username AS device FROM machines m"
    " LEFT JOIN devices d ON (d.tenant_id, d.site_id, d.machine_id) = (m.tenant_id, m.site_id, m.id)"
    " WHERE m.tenant_id = %s"
)


def list_machines(conn: psycopg.Connection, tenant_id: str, site_id: str | None = None) -> list[Machine]:
    query, params = _MACHINES, [tenant_id]
    if site_id is not None:
        query += " AND m.site_id = %s"
        params.append(site_id)
    with conn.cursor(row_factory=class_row(Machine)) as cursor:
        return cursor.execute(query + " ORDER BY m.site_id, m.id", params).fetchall()


def get_machine(conn: psycopg.Connection, tenant_id: str, site_id: str, machine_id: str) -> Machine:
    with conn.cursor(row_factory=class_row(Machine)) as cursor:
        row = cursor.execute(
            _MACHINES + " AND m.site_id = %s AND m.id = %s FOR UPDATE OF m", (tenant_id, site_id, machine_id)
        ).fetchone()
    if row is None:
        raise Refused(
            "machine_unknown", f"machine {site_id}/{machine_id} is not a machine of tenant {tenant_id!r}"
        )
    return row


def add_machine(
    conn: psycopg.Connection, tenant_id: str, site_id: str, machine_id: str, machine_type: str, *, actor: str
) -> None:
    with conn.transaction():
        require_site(conn, tenant_id, site_id)
        inserted = conn.execute(
            "INSERT INTO machines (tenant_id, site_id, id, type) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            (tenant_id, site_id, machine_id, machine_type),
        ).rowcount
        if not inserted:
            raise Refused(
                "machine_exists", f"machine {site_id}/{machine_id} already exists in tenant {tenant_id!r}"
            )
        record_event(
            conn,
            actor=actor,
            action="machine.added",
            subject=f"{site_id}/{machine_id}",
            tenant_id=tenant_id,
            details={"type": machine_type},
        )


def move_machine(
    conn: psycopg.Connection, tenant_id: str, site_id: str, machine_id: str, to_site: str, *, actor: str
) -> str | None:
    """Move a machine to another site of its tenant. Its device identity names the site, so the
    device is removed (certificates revoked) and must be enrolled again; returns its old username."""
    with conn.transaction():
        machine = get_machine(conn, tenant_id, site_id, machine_id)
        require_site(conn, tenant_id, to_site)
        if conn.execute(
            "SELECT 1 FROM machines WHERE tenant_id = %s AND site_id = %s AND id = %s",
            (tenant_id, to_site, machine_id),
        ).fetchone():
            raise Refused(
                "machine_exists", f"machine {to_site}/{machine_id} already exists in tenant {tenant_id!r}"
            )
        if machine.device is not None:
            _delete_device(conn, machine.device)
        conn.execute(
            "UPDATE machines SET site_id = %s WHERE tenant_id = %s AND site_id = %s AND id = %s",
            (to_site, tenant_id, site_id, machine_id),
        )
        record_event(
            conn,
            actor=actor,
            action="machine.moved",
            subject=f"{site_id}/{machine_id}",
            tenant_id=tenant_id,
            details={"to_site": to_site, "device_removed": machine.device},
        )
    return machine.device


def set_machine_disabled(
    conn: psycopg.Connection, tenant_id: str, site_id: str, machine_id: str, disabled: bool, *, actor: str
) -> Machine:
    """Disable (or enable) a machine; returns it as it was, so the caller knows whether it changed."""
    with conn.transaction():
        machine = get_machine(conn, tenant_id, site_id, machine_id)
        if (machine.disabled_at is not None) == disabled:
            return machine
        conn.execute(
            "UPDATE machines SET disabled_at = CASE WHEN %s THEN now() END"
            " WHERE tenant_id = %s AND site_id = %s AND id = %s",
            (disabled, tenant_id, site_id, machine_id),
        )
        record_event(
            conn,
            actor=actor,
            action="machine.disabled" if disabled else "machine.enabled",
            subject=f"{site_id}/{machine_id}",
            tenant_id=tenant_id,
        )
    return machine


def remove_machine(
    conn: psycopg.Connection, tenant_id: str, site_id: str, machine_id: str, *, actor: str
) -> str | None:
    """Delete a machine with its device (certificates stay listed, revoked); returns the username."""
    with conn.transaction():
        machine = get_machine(conn, tenant_id, site_id, machine_id)
        if machine.device is not None:
            _delete_device(conn, machine.device)
        conn.execute(
            "DELETE FROM machines WHERE tenant_id = %s AND site_id = %s AND id = %s",
            (tenant_id, site_id, machine_id),
        )
        record_event(
            conn,
            actor=actor,
            action="machine.removed",
            subject=f"{site_id}/{machine_id}",
            tenant_id=tenant_id,
            details={"device_removed": machine.device},
        )
    return machine.device


def _delete_device(conn: psycopg.Connection, username: str) -> None:
    revoke_certificates(conn, username)
    conn.execute("DELETE FROM acl_rules WHERE username = %s", (username,))
    conn.execute("DELETE FROM devices WHERE username = %s", (username,))


# ----------------------------------------------------------------------------------------- devices
@dataclass(frozen=True)
class Device:
    username: str
    site_id: str
    machine_id: str
    auth: str
    issued_at: datetime
    revoked_at: datetime | None


def list_devices(conn: psycopg.Connection, tenant_id: str) -> list[Device]:
    with conn.cursor(row_factory=class_row(Device)) as cursor:
        return cursor.execute(
            "SELECT username, site_id, machine_id, auth, issued_at, revoked_at FROM devices"
            " WHERE tenant_id = %s ORDER BY username",
            (tenant_id,),
        ).fetchall()


def get_device(conn: psycopg.Connection, username: str) -> tuple[str, Device] | None:
    """``(tenant_id, device)`` of a username, or None."""
    row = conn.execute(
        "SELECT tenant_id, username, site_id, machine_id, auth, issued_at, revoked_at FROM devices"
        " WHERE username = %s",
        (username,),
    ).fetchone()
    return None if row is None else (row[0], Device(*row[1:]))


def store_device(
    conn: psycopg.Connection,
    tenant_id: str,
    site_id: str,
    machine_id: str,
    *,
    credential: str | None,
    replace: bool,
) -> str:
    """Write the machine's device row (``credential`` None: a certificate device) and its broker
    rules; ``replace`` rotates an existing device, otherwise one is refused ``device_exists``."""
    username = device_username(tenant_id, site_id, machine_id)
    auth = "certificate" if credential is None else "password"
    row = conn.execute(
        "INSERT INTO devices AS d (username, tenant_id, site_id, machine_id, credential, auth)"
        " VALUES (%s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (username) DO UPDATE SET credential = EXCLUDED.credential, auth = EXCLUDED.auth,"
        " issued_at = now(), revoked_at = NULL WHERE %s"
        " RETURNING (xmax = 0) AS inserted",
        (username, tenant_id, site_id, machine_id, credential, auth, replace),
    ).fetchone()
    if row is None:
        raise Refused("device_exists", f"machine {site_id}/{machine_id} already has the device {username!r}")
    with conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO acl_rules (username, tenant_id, permission, action, topic)"
            " VALUES (%s, %s, 'allow', %s, %s) ON CONFLICT DO NOTHING",
            [
                (r.username, r.tenant_id, r.action, r.topic)
                for r in machine_rules(tenant_id, site_id, machine_id)
            ],
        )
    return username


def revoke_device(conn: psycopg.Connection, tenant_id: str, username: str, *, actor: str) -> bool:
    """Set the revocation flag and revoke the device's certificates; False when already revoked."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE devices SET revoked_at = now()"
            " WHERE username = %s AND tenant_id = %s AND revoked_at IS NULL RETURNING username",
            (username, tenant_id),
        ).fetchone()
        if row is None:
            found = get_device(conn, username)
            if found is None or found[0] != tenant_id:
                raise Refused("device_unknown", f"{username!r} is not a device of tenant {tenant_id!r}")
            return False
        serials = revoke_certificates(conn, username)
        record_event(
            conn,
            actor=actor,
            action="device.revoked",
            subject=username,
            tenant_id=tenant_id,
            details={"certificates_revoked": serials},
        )
    return True


# ------------------------------------------------------------------------------------ certificates
@dataclass(frozen=True)
class CertificateRecord:
    serial: str
    username: str
    tenant_id: str
    issuer: str
    public_key_sha256: bytes
    not_before: datetime
    not_after: datetime
    pem: str
    revoked_at: datetime | None = None


def store_certificate(conn: psycopg.Connection, cert: CertificateRecord) -> None:
    conn.execute(
        "INSERT INTO device_certificates"
        " (serial, username, tenant_id, issuer, public_key_sha256, not_before, not_after, pem)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (
            cert.serial,
            cert.username,
            cert.tenant_id,
            cert.issuer,
            cert.public_key_sha256,
            cert.not_before,
            cert.not_after,
            cert.pem,
        ),
    )


def certificate(conn: psycopg.Connection, serial: str) -> CertificateRecord | None:
    with conn.cursor(row_factory=class_row(CertificateRecord)) as cursor:
        return cursor.execute(
            "SELECT serial, username, tenant_id, issuer, public_key_sha256, not_before, not_after, pem,"
            " revoked_at FROM device_certificates WHERE serial = %s",
            (serial,),
        ).fetchone()


def revoke_certificates(conn: psycopg.Connection, username: str) -> list[str]:
    """Revoke every valid certificate of a device (they go on the CRL); returns their serials."""
    rows = conn.execute(
        "UPDATE device_certificates SET revoked_at = now() WHERE username = %s AND revoked_at IS NULL"
        " RETURNING serial",
        (username,),
    ).fetchall()
    return [row[0] for row in rows]


def revoked_certificates(conn: psycopg.Connection, issuer: str) -> list[tuple[str, datetime]]:
    """``(serial, revoked_at)`` of the issuer's revoked certificates not yet expired (the CRL)."""
    return [
        (row[0], row[1])
        for row in conn.execute(
            "SELECT serial, revoked_at FROM device_certificates"
            " WHERE issuer = %s AND revoked_at IS NOT NULL AND not_after > now() ORDER BY serial",
            (issuer,),
        )
    ]


# ------------------------------------------------------------------------------------ claim tokens
@dataclass(frozen=True)
class ClaimToken:
    id: str
    tenant_id: str
    site_id: str
    machine_type: str | None
    secret_sha256: bytes
    uses: int
    uses_left: int
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None


_CLAIM_TOKEN = (
    "SELECT id, tenant_id, site_id, machine_type, secret_sha256, uses, uses_left, created_at, expires_at,"
    " revoked_at FROM claim_tokens"
)


def create_claim_token(
    conn: psycopg.Connection,
    tenant_id: str,
    site_id: str,
    *,
    machine_type: str | None,
    uses: int,
    expires_at: datetime,
    actor: str,
) -> NewToken:
    token = mint_token(CLAIM_TOKEN_PREFIX)
    with conn.transaction():
        require_site(conn, tenant_id, site_id)
        conn.execute(
            "INSERT INTO claim_tokens (id, tenant_id, site_id, machine_type, secret_sha256, uses, uses_left,"
            " created_by, expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (token.id, tenant_id, site_id, machine_type, token.digest, uses, uses, actor, expires_at),
        )
        record_event(
            conn,
            actor=actor,
            action="claim_token.created",
            subject=token.id,
            tenant_id=tenant_id,
            details={
                "site": site_id,
                "machine_type": machine_type,
                "uses": uses,
                "expires_at": expires_at.isoformat(),
            },
        )
    return token


def claim_token(
    conn: psycopg.Connection, token_id: str, *, tenant_id: str | None = None
) -> ClaimToken | None:
    query, params = _CLAIM_TOKEN + " WHERE id = %s", [token_id]
    if tenant_id is not None:
        query += " AND tenant_id = %s"
        params.append(tenant_id)
    with conn.cursor(row_factory=class_row(ClaimToken)) as cursor:
        return cursor.execute(query, params).fetchone()


def list_claim_tokens(conn: psycopg.Connection, tenant_id: str) -> list[ClaimToken]:
    with conn.cursor(row_factory=class_row(ClaimToken)) as cursor:
        return cursor.execute(
            _CLAIM_TOKEN + " WHERE tenant_id = %s ORDER BY created_at, id", (tenant_id,)
        ).fetchall()


def revoke_claim_token(conn: psycopg.Connection, tenant_id: str, token_id: str, *, actor: str) -> bool:
    with conn.transaction():
        row = conn.execute(
            "UPDATE claim_tokens SET revoked_at = now()"
            " WHERE id = %s AND tenant_id = %s AND revoked_at IS NULL RETURNING id",
            (token_id, tenant_id),
        ).fetchone()
        if row is None:
            return False
        record_event(conn, actor=actor, action="claim_token.revoked", subject=token_id, tenant_id=tenant_id)
    return True


@dataclass(frozen=True)
class Claim:
    token_id: str
    machine_id: str
    username: str
    public_key_sha256: bytes | None
    certificate_serial: str | None


@dataclass(frozen=True)
class ClaimContext:
    """What a claim needs to know before it writes: the token, its tenant's isolation level and the
    earlier claim of this token and machine (a device resuming), read in one round trip."""

    token: ClaimToken
    isolation: int
    existing: Claim | None


def claim_context(conn: psycopg.Connection, token_id: str, machine_id: str) -> ClaimContext | None:
    """None when no such token exists."""
    row = conn.execute(
        "SELECT t.id, t.tenant_id, t.site_id, t.machine_type, t.secret_sha256, t.uses, t.uses_left,"
        " t.created_at, t.expires_at, t.revoked_at, n.isolation,"
        " c.username, c.public_key_sha256, c.certificate_serial"
        " FROM claim_tokens t JOIN tenants n ON n.id = t.tenant_id"
        " LEFT JOIN claims c ON c.token_id = t.id AND c.machine_id = %s WHERE t.id = %s",
        (machine_id, token_id),
    ).fetchone()
    if row is None:
        return None
    existing = None if row[11] is None else Claim(token_id, machine_id, row[11], row[12], row[13])
    return ClaimContext(ClaimToken(*row[:10]), int(row[10]), existing)


@dataclass(frozen=True)
class NewClaim:
    """A device registering itself with a claim token: its machine, device, rules, certificate
    (None: a password device, ``credential`` its hash) and audit details."""

    token_id: str
    tenant_id: str
    site_id: str
    machine_id: str
    machine_type: str
    credential: str | None
    certificate: CertificateRecord | None
    public_key_sha256: bytes | None
    actor: str
    method: str


# One statement, so one round trip and atomic by itself: every row hangs on the token's use
# (``used``), so a token with no use left (or revoked or expired meanwhile) writes nothing, and a
# conflict (the machine exists, the claim was taken by a parallel request) rolls the whole statement
# back, the use included. The UPDATE locks the token's row only until this statement commits, so
# parallel claims of one token queue there for microseconds and each sees the count left.
# Foreign keys are checked at the end of the statement, when the machine row is there.
_REGISTER_CLAIM = """
WITH used AS (
    UPDATE claim_tokens SET uses_left = uses_left - 1
    WHERE id = %(token_id)s AND uses_left > 0 AND revoked_at IS NULL AND expires_at > now()
    RETURNING id
), machine AS (
    INSERT INTO machines (tenant_id, site_id, id, type)
    SELECT %(tenant_id)s, %(site_id)s, %(machine_id)s, %(machine_type)s FROM used
), device AS (
    INSERT INTO devices (username, tenant_id, site_id, machine_id, credential, auth)
    SELECT %(username)s, %(tenant_id)s, %(site_id)s, %(machine_id)s, %(credential)s, %(auth)s FROM used
), rules AS (
    INSERT INTO acl_rules (username, tenant_id, permission, action, topic)
    SELECT %(username)s, %(tenant_id)s, 'allow', r.action, r.topic
    FROM used, unnest(%(actions)s::text[], %(topics)s::text[]) AS r (action, topic)
    ON CONFLICT DO NOTHING
), certificate AS (
    INSERT INTO device_certificates
        (serial, username, tenant_id, issuer, public_key_sha256, not_before, not_after, pem)
    SELECT %(serial)s, %(username)s, %(tenant_id)s, %(issuer)s, %(cert_key_sha256)s, %(not_before)s,
        %(not_after)s, %(pem)s
    FROM used WHERE %(serial)s::text IS NOT NULL
), claim AS (
    INSERT INTO claims (token_id, machine_id, username, public_key_sha256, certificate_serial)
    SELECT id, %(machine_id)s, %(username)s, %(public_key_sha256)s, %(serial)s FROM used
), audit AS (
    INSERT INTO audit_events (actor, action, tenant_id, subject, details)
    SELECT %(actor)s, e.action, %(tenant_id)s, e.subject, e.details
    FROM used, (VALUES (1, 'machine.added', %(machine_subject)s, %(machine_details)s::jsonb),
                       (2, 'device.claimed', %(username)s, %(claim_details)s::jsonb))
        AS e (n, action, subject, details)
    ORDER BY e.n
)
SELECT count(*) FROM used
"""
# What a claim can collide with: all mean its machine is registered already (a device names its
# machine, and a device row needs its machine row), whichever of them PostgreSQL meets first.
_CLAIM_CONFLICTS = frozenset({"machines_pkey", "claims_pkey", "devices_pkey", "devices_one_per_machine"})


def register_claim(conn: psycopg.Connection, claim: NewClaim) -> bool:
    """Register the machine, its device, rules, certificate, the claim and their audit events, and
    take one use of the token, atomically; False (nothing written) when the token has no use left."""
    username = device_username(claim.tenant_id, claim.site_id, claim.machine_id)
    rules = machine_rules(claim.tenant_id, claim.site_id, claim.machine_id)
    cert = claim.certificate
    params = {
        "token_id": claim.token_id,
        "tenant_id": claim.tenant_id,
        "site_id": claim.site_id,
        "machine_id": claim.machine_id,
        "machine_type": claim.machine_type,
        "username": username,
        "credential": claim.credential,
        "auth": "password" if cert is None else "certificate",
        "actions": [rule.action for rule in rules],
        "topics": [rule.topic for rule in rules],
        "serial": cert and cert.serial,
        "issuer": cert and cert.issuer,
        "not_before": cert and cert.not_before,
        "not_after": cert and cert.not_after,
        "pem": cert and cert.pem,
        "cert_key_sha256": cert and cert.public_key_sha256,
        "public_key_sha256": claim.public_key_sha256,
        "actor": claim.actor,
        "machine_subject": f"{claim.site_id}/{claim.machine_id}",
        "machine_details": Jsonb({"type": claim.machine_type}),
        "claim_details": Jsonb({"token_id": claim.token_id, "method": claim.method, "code": "ok"}),
    }
    try:
        row = conn.execute(_REGISTER_CLAIM, params).fetchone()
    except psycopg.errors.UniqueViolation as error:
        if error.diag.constraint_name not in _CLAIM_CONFLICTS:
            raise
        where, tenant = f"{claim.site_id}/{claim.machine_id}", claim.tenant_id
        raise Refused("machine_exists", f"machine {where} already exists in tenant {tenant!r}") from error
    return row is not None and row[0] == 1


def audit(
    conn: psycopg.Connection, actor: str, action: str, subject: str, tenant_id: str | None, **details: Any
) -> None:
    """One audit event (a shorthand for the service's many steps)."""
    record_event(conn, actor=actor, action=action, subject=subject, tenant_id=tenant_id, details=details)


# ----------------------------------------------------------------- brokers' authentication failures
def record_auth_failures(conn: psycopg.Connection, broker: str, rows: list[dict[str, Any]]) -> int:
    """One ``broker.auth_failed`` audit event per row (a count of refusals of one reason from one
    address in one window, ``provisioning.broker_log``), in one statement; returns how many."""
    if not rows:
        return 0
    inserted = conn.execute(
        "INSERT INTO audit_events (actor, action, tenant_id, subject, details)"
        " SELECT %s, 'broker.auth_failed', NULL, r ->> 'address', r - 'address'"
        " FROM jsonb_array_elements(%s) AS r",
        (f"broker:{broker}", Jsonb(rows)),
    ).rowcount
    return int(inserted)
