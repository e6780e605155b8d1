"""API keys of the Ironlink API (migration ``0008_api_keys.sql``): minted, listed, revoked, checked.

A key is ``ilk-api.<16 hex id>.<256-bit secret>``, shown once; the registry keeps only the
secret's SHA-256 (``registry.provisioning.mint_token``, the admin tokens' scheme). A key is scoped
to a tenant, or to one site of it, and always expires. Creating and revoking are audit events;
checking a key is not (it happens on every request).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
from psycopg.rows import class_row

from registry.provisioning import (
    Refused,
    mint_token,
    parse_token,
    require_site,
    require_tenant,
    secret_matches,
)
from registry.store import record_event

API_KEY_PREFIX = "ilk-api"
MAX_LIFETIME = timedelta(days=366)
LABEL_MAX_CHARS = 128
_COLUMNS = "id, tenant_id, site_id, label, created_by, created_at, expires_at, revoked_at"


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant_id: str
    site_id: str | None
    label: str
    created_by: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class Refusal:
    """Why a presented key is not accepted: ``unauthorized`` (malformed or unknown: nothing more is
    said), ``api_key_expired`` or ``api_key_revoked``."""

    code: str
    detail: str


_UNKNOWN = Refusal("unauthorized", "the API key is not valid")


def create_api_key(
    conn: psycopg.Connection,
    tenant_id: str,
    *,
    site_id: str | None,
    label: str,
    lifetime: timedelta,
    actor: str,
) -> tuple[ApiKey, str]:
    """A new key and its plaintext (shown once). :class:`Refused` for an unknown tenant or site,
    a lifetime outside (0, ``MAX_LIFETIME``] or a label too long."""
    if not timedelta(0) < lifetime <= MAX_LIFETIME:
        raise Refused(
            "expiry_too_long", f"lifetime {lifetime} must be above 0 and at most {MAX_LIFETIME.days} days"
        )
    if len(label) > LABEL_MAX_CHARS:
        raise Refused("label_too_long", f"label has {len(label)} characters, at most {LABEL_MAX_CHARS}")
    token = mint_token(API_KEY_PREFIX)
    with conn.transaction():
        require_tenant(conn, tenant_id)
        if site_id is not None:
            require_site(conn, tenant_id, site_id)
        with conn.cursor(row_factory=class_row(ApiKey)) as cursor:
            key = cursor.execute(
                "INSERT INTO api_keys (id, tenant_id, site_id, label, secret_sha256, created_by, expires_at)"
                f" VALUES (%s, %s, %s, %s, %s, %s, now() + %s) RETURNING {_COLUMNS}",
                (token.id, tenant_id, site_id, label, token.digest, actor, lifetime),
            ).fetchone()
        assert key is not None
        record_event(
            conn,
            actor=actor,
            action="api_key.created",
            subject=key.id,
            tenant_id=tenant_id,
            details={"site_id": site_id, "label": label, "expires_at": key.expires_at.isoformat()},
        )
    return key, token.plaintext


def list_api_keys(conn: psycopg.Connection, tenant_id: str) -> list[ApiKey]:
    """The tenant's keys, oldest first, revoked and expired ones included (never their secrets)."""
    with conn.cursor(row_factory=class_row(ApiKey)) as cursor:
        return cursor.execute(
            f"SELECT {_COLUMNS} FROM api_keys WHERE tenant_id = %s ORDER BY created_at, id", (tenant_id,)
        ).fetchall()


def revoke_api_key(conn: psycopg.Connection, tenant_id: str, key_id: str, *, actor: str) -> bool:
    """Revoke the tenant's key; False when it was revoked already. :class:`Refused`
    (``api_key_unknown``) when the tenant has no such key."""
    with conn.transaction():
        row = conn.execute(
            "SELECT revoked_at IS NOT NULL FROM api_keys WHERE id = %s AND tenant_id = %s FOR UPDATE",
            (key_id, tenant_id),
        ).fetchone()
        if row is None:
            raise Refused("api_key_unknown", f"tenant {tenant_id!r} has no API key {key_id!r}")
        if row[0]:
            return False
        conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (key_id,))
        record_event(conn, actor=actor, action="api_key.revoked", subject=key_id, tenant_id=tenant_id)
    return True


def authenticate(conn: psycopg.Connection, presented: str) -> ApiKey | Refusal:
    """The key ``presented`` stands for, or why it is refused (constant-time secret comparison)."""
    parsed = parse_token(API_KEY_PREFIX, presented)
    if parsed is None:
        return _UNKNOWN
    key_id, secret = parsed
    row = conn.execute(
        f"SELECT {_COLUMNS}, secret_sha256, expires_at <= now() FROM api_keys WHERE id = %s", (key_id,)
    ).fetchone()
    if row is None or not secret_matches(secret, bytes(row[8])):
        return _UNKNOWN
    key = ApiKey(*row[:8])
    if key.revoked_at is not None:
        return Refusal("api_key_revoked", f"API key {key.id} was revoked at {key.revoked_at.isoformat()}")
    if row[9]:
        return Refusal("api_key_expired", f"API key {key.id} expired at {key.expires_at.isoformat()}")
    return key
