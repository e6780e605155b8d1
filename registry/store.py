"""Registry operations: the only place that writes the registry's SQL.

The tenant CLI, ``ironlink dev`` and the Pulumi registry provider all call these functions, so a
tenant reaches the database (and EMQX, which reads it) the same way whoever provisions it. Each
operation runs in one transaction (a savepoint when the caller already opened one) and records
what it changed in ``audit_events``. Constraint violations come back as :class:`RegistryError`
naming the offending field and value.
"""

from __future__ import annotations

import getpass
import hashlib
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from infra.config import PlatformConfig, Tenant
from infra.tenancy import device_username, tenant_service_username
from registry.access import AccessRule, platform_rules, tenant_rules
from registry.migrate import apply_migrations

_ID_RULE = "lowercase letters, digits, '-'; starting and ending with a letter or digit"
_HASH_RULE = "is not a '$7$101$<salt>$<hash>' PBKDF2-SHA512 hash with 101 iterations"
# Each named constraint of the migrations: the column it guards and what its violation means.
CONSTRAINTS: dict[str, tuple[str, str]] = {
    "tenants_pkey": ("id", "already exists in the registry"),
    "tenants_id_format": ("id", f"is not a valid tenant id ({_ID_RULE}; at most 32 characters)"),
    "tenants_id_reserved": ("id", "is reserved: svc.ingest is the ingest worker's broker identity"),
    "tenants_name_present": ("name", "must not be empty"),
    "tenants_tier_present": ("tier", "must not be empty"),
    "tenants_isolation_level": ("isolation", "is not an isolation level (1, 2 or 3)"),
    "sites_pkey": ("id", "is already used by another site of this tenant"),
    "sites_id_format": ("id", f"is not a valid site id ({_ID_RULE}; at most 32 characters)"),
    "machines_pkey": ("id", "is already used by another machine of this site"),
    "machines_id_format": ("id", f"is not a valid machine id ({_ID_RULE}; at most 48 characters)"),
    "machines_type_format": ("type", "is not a machine type name (lowercase letters, digits, '_')"),
    "devices_credential_format": ("password_hash", _HASH_RULE),
    "service_accounts_username_format": ("username", "is not a service username ('svc.<id>')"),
    "service_accounts_credential_format": ("password_hash", _HASH_RULE),
    "audit_events_action_format": ("action", "is not an audit action ('<noun>.<verb>', lowercase)"),
    "audit_events_actor_present": ("actor", "must name who acted"),
    "tenants_id_reserved_dead_letters": (
        "id",
        "is reserved: svc.deadletters is the dead-letter consumer's broker identity",
    ),
    "dead_letters_reason_format": ("reason", "is not a reason (lowercase letters and '_', at most 64)"),
    "dead_letters_detail_size": ("detail", "is longer than 2000 characters"),
    "dead_letters_topic_size": ("topic", "is empty or longer than 1024 characters"),
    "dead_letters_payload_size": ("payload_sample", "is longer than 65536 bytes"),
    "dead_letters_payload_bytes": ("payload_bytes", "must not be negative"),
}


class RegistryError(ValueError):
    """A registry write was refused; the message names the field and value."""


@contextmanager
def _refusals(where: str, row: Mapping[str, object]) -> Iterator[None]:
    """Turn a constraint violation while writing ``row`` into a :class:`RegistryError` such as
    ``tenants[acme].sites.id: 'Plant 1' is not a valid site id (...)``."""
    try:
        yield
    except psycopg.errors.IntegrityError as error:
        column, message = CONSTRAINTS.get(error.diag.constraint_name or "", ("", ""))
        if column in row:
            raise RegistryError(f"{where}.{column}: {row[column]!r} {message}") from error
        raise RegistryError(f"{where}: {error.diag.message_primary or error}") from error


def _shown(credential: str) -> str:
    """A credential as error messages show it: its head only."""
    return credential[:12] + "..."


def default_actor() -> str:
    """Who is acting, for the audit trail: ``user@host``."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


# ------------------------------------------------------------------------------------------ audit
@dataclass(frozen=True)
class AuditEvent:
    id: int
    occurred_at: datetime
    actor: str
    action: str
    tenant_id: str | None
    subject: str
    details: dict[str, Any]


def record_event(
    conn: psycopg.Connection,
    *,
    actor: str,
    action: str,
    subject: str,
    tenant_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> int:
    """Append one event (``action`` is ``<noun>.<verb>``, e.g. ``credential.issued``). One INSERT is
    atomic by itself: no transaction or savepoint of its own (two round trips less per event)."""
    with _refusals("audit_event", {"actor": actor, "action": action}):
        row = conn.execute(
            "INSERT INTO audit_events (actor, action, tenant_id, subject, details)"
            " VALUES (%s, %s, %s, %s, %s) RETURNING id",
            (actor, action, tenant_id, subject, Jsonb(details or {})),
        ).fetchone()
    assert row is not None
    return int(row[0])


def audit_events(conn: psycopg.Connection, *, tenant_id: str | None = None) -> list[AuditEvent]:
    """Events in the order they happened, optionally of one tenant."""
    query = "SELECT id, occurred_at, actor, action, tenant_id, subject, details FROM audit_events"
    params: tuple[Any, ...] = ()
    if tenant_id is not None:
        query += " WHERE tenant_id = %s"
        params = (tenant_id,)
    return [AuditEvent(*row) for row in conn.execute(query + " ORDER BY id", params)]


# ---------------------------------------------------------------------------------------- tenants
@dataclass
class SyncResult:
    """What one sync changed, as the audit actions it recorded (``site.added plant-2``...)."""

    tenant_id: str
    created: bool = False
    changes: list[str] = field(default_factory=list)


class _Recorder:
    def __init__(self, conn: psycopg.Connection, actor: str, tenant_id: str, result: SyncResult) -> None:
        self.conn, self.actor, self.tenant_id, self.result = conn, actor, tenant_id, result

    def __call__(self, action: str, subject: str, **details: Any) -> None:
        record_event(
            self.conn,
            actor=self.actor,
            action=action,
            subject=subject,
            tenant_id=self.tenant_id,
            details=details,
        )
        self.result.changes.append(f"{action} {subject}")


def tenant_ids(conn: psycopg.Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT id FROM tenants ORDER BY id")]


def sync_tenant(
    conn: psycopg.Connection, tenant: Tenant, *, isolation: int, actor: str, must_be_new: bool = False
) -> SyncResult:
    """Make the registry hold ``tenant`` as the stack declares it: its row and its service rules.

    Idempotent (a second call changes nothing and records nothing). Its sites, machines and
    devices are runtime state that the stack does not declare: they are never touched here
    (``registry/fleet_import.py`` and the provisioning service write them). ``must_be_new``
    refuses a tenant the registry already has.
    """
    result = SyncResult(tenant.id)
    with conn.transaction():
        record = _Recorder(conn, actor, tenant.id, result)
        _sync_tenant_row(conn, tenant, isolation, must_be_new, record)
        _replace_rules(conn, tenant.id, tenant_rules(tenant))
    return result


def _sync_tenant_row(
    conn: psycopg.Connection, tenant: Tenant, isolation: int, must_be_new: bool, record: _Recorder
) -> None:
    row = conn.execute("SELECT name, tier, isolation FROM tenants WHERE id = %s", (tenant.id,)).fetchone()
    wanted = (tenant.name, tenant.tier, isolation)
    if row is not None and must_be_new:
        raise RegistryError(f"tenant.id: {tenant.id!r} {CONSTRAINTS['tenants_pkey'][1]}")
    with _refusals(
        "tenant", {"id": tenant.id, "name": tenant.name, "tier": tenant.tier, "isolation": isolation}
    ):
        if row is None:
            conn.execute(
                "INSERT INTO tenants (id, name, tier, isolation) VALUES (%s, %s, %s, %s)",
                (tenant.id, *wanted),
            )
            record.result.created = True
            record("tenant.created", tenant.id, name=tenant.name, tier=tenant.tier, isolation=isolation)
        elif tuple(row) != wanted:
            conn.execute(
                "UPDATE tenants SET name = %s, tier = %s, isolation = %s, updated_at = now() WHERE id = %s",
                (*wanted, tenant.id),
            )
            before = dict(zip(("name", "tier", "isolation"), row, strict=True))
            record("tenant.updated", tenant.id, before=before, after=dict(zip(before, wanted, strict=True)))


_UPSERT_DEVICE = (
    "INSERT INTO devices (username, tenant_id, site_id, machine_id, credential) VALUES (%s, %s, %s, %s, %s)"
    " ON CONFLICT (username) DO UPDATE"
    " SET credential = EXCLUDED.credential, issued_at = now(), revoked_at = NULL"
)


def _store_device_credential(
    conn: psycopg.Connection, tenant_id: str, site_id: str, machine_id: str, credential: str
) -> str:
    username = device_username(tenant_id, site_id, machine_id)
    where = f"tenants[{tenant_id}].sites[{site_id}].machines[{machine_id}]"
    try:
        with _refusals(where, {"password_hash": _shown(credential)}):
            conn.execute(_UPSERT_DEVICE, (username, tenant_id, site_id, machine_id, credential))
    except RegistryError as error:
        if isinstance(error.__cause__, psycopg.errors.ForeignKeyViolation):
            raise RegistryError(f"{where}: machine is not in the registry (sync its tenant first)") from error
        raise
    return username


def _replace_rules(conn: psycopg.Connection, tenant_id: str | None, rules: Sequence[AccessRule]) -> None:
    """Replace the platform's rules, or a tenant's service rules: its devices' rules stay."""
    if tenant_id is None:
        conn.execute("DELETE FROM acl_rules WHERE tenant_id IS NULL")
    else:
        conn.execute(
            "DELETE FROM acl_rules WHERE tenant_id = %s AND username = %s",
            (tenant_id, tenant_service_username(tenant_id)),
        )
    with conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO acl_rules (username, tenant_id, permission, action, topic)"
            " VALUES (%s, %s, 'allow', %s, %s)",
            [(rule.username, rule.tenant_id, rule.action, rule.topic) for rule in rules],
        )


def remove_tenant(conn: psycopg.Connection, tenant_id: str, *, actor: str) -> bool:
    """Delete a tenant with its sites, machines, credentials and rules; False if it was not there."""
    with conn.transaction():
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM sites WHERE tenant_id = %(t)s),"
            " (SELECT count(*) FROM machines WHERE tenant_id = %(t)s),"
            " (SELECT count(*) FROM devices WHERE tenant_id = %(t)s),"
            " (SELECT count(*) FROM service_accounts WHERE tenant_id = %(t)s)",
            {"t": tenant_id},
        ).fetchone()
        deleted = conn.execute("DELETE FROM tenants WHERE id = %s", (tenant_id,)).rowcount
        if not deleted:
            return False
        assert counts is not None
        details = dict(
            zip(("sites", "machines", "device_credentials", "service_accounts"), counts, strict=True)
        )
        record_event(
            conn,
            actor=actor,
            action="tenant.removed",
            subject=tenant_id,
            tenant_id=tenant_id,
            details=details,
        )
    return True


def sync_platform_rules(conn: psycopg.Connection) -> None:
    """Write the access rules of the platform's own services (the worker), which span tenants."""
    with conn.transaction():
        _replace_rules(conn, None, platform_rules())


def sync_platform(conn: psycopg.Connection, config: PlatformConfig, *, actor: str) -> list[SyncResult]:
    """Make the registry match a whole stack: every tenant, the platform's rules, and no others."""
    apply_migrations(conn)
    with conn.transaction():
        results = [
            sync_tenant(conn, t, isolation=config.isolation_of(t), actor=actor) for t in config.tenants
        ]
        sync_platform_rules(conn)
        for stale in sorted(set(tenant_ids(conn)) - {t.id for t in config.tenants}):
            remove_tenant(conn, stale, actor=actor)
            results.append(SyncResult(stale, changes=[f"tenant.removed {stale}"]))
    return results


# ------------------------------------------------------------------------------------ credentials
def issue_service_credential(
    conn: psycopg.Connection, username: str, credential: str, *, actor: str, tenant_id: str | None = None
) -> bool:
    """Store (or rotate) a service account's ``$7$`` credential; False when it was already stored.

    Idempotent, so ``ironlink dev`` and the Pulumi provider can call it on every run; like a
    device's, a revoked credential is not revived by issuing the same hash again.
    """
    with conn.transaction():
        with _refusals("service_account", {"username": username, "password_hash": _shown(credential)}):
            row = conn.execute(
                "INSERT INTO service_accounts AS s (username, tenant_id, credential) VALUES (%s, %s, %s)"
                " ON CONFLICT (username) DO UPDATE"
                " SET credential = EXCLUDED.credential, tenant_id = EXCLUDED.tenant_id,"
                " issued_at = now(), revoked_at = NULL"
                " WHERE (s.credential, s.tenant_id)"
                " IS DISTINCT FROM (EXCLUDED.credential, EXCLUDED.tenant_id)"
                " RETURNING username",
                (username, tenant_id, credential),
            ).fetchone()
        if row is None:
            return False
        record_event(conn, actor=actor, action="credential.issued", subject=username, tenant_id=tenant_id)
    return True


def issue_device_credential(
    conn: psycopg.Connection, tenant_id: str, site_id: str, machine_id: str, credential: str, *, actor: str
) -> str:
    """Store (or rotate) a registered machine's ``$7$`` credential; returns the device username."""
    with conn.transaction():
        username = _store_device_credential(conn, tenant_id, site_id, machine_id, credential)
        record_event(conn, actor=actor, action="credential.issued", subject=username, tenant_id=tenant_id)
    return username


def revoke_credential(conn: psycopg.Connection, username: str, *, actor: str) -> bool:
    """Revoke a device's or service's credential: it can no longer log in through EMQX."""
    with conn.transaction():
        for table in ("devices", "service_accounts"):
            query = sql.SQL(
                "UPDATE {} SET revoked_at = now() WHERE username = %s AND revoked_at IS NULL"
                " RETURNING tenant_id"
            ).format(sql.Identifier(table))
            row = conn.execute(query, (username,)).fetchone()
            if row is not None:
                record_event(
                    conn, actor=actor, action="credential.revoked", subject=username, tenant_id=row[0]
                )
                return True
    return False


# ----------------------------------------------------------------------------------- dead letters
MALFORMED_DEAD_LETTER = "malformed_dead_letter"
"""The reason of a dead-letter document that could not be read: stored as it came, never replayed."""
DEAD_LETTER_SAMPLE_MAX = 65_536
"""The most payload bytes a stored dead letter keeps (the schema refuses more)."""
DEAD_LETTER_DETAIL_MAX = 2_000
LIST_LIMIT_MAX = 1_000
REPLAY_LIMIT_MAX = 10_000
_PURGE_BATCH = 5_000
ReplayState = Literal["none", "requested", "replayed"]


@dataclass(frozen=True)
class NewDeadLetter:
    """A dead letter as the consumer read it, before it has an id."""

    tenant_id: str | None
    """The tenant its topic names (stored as NULL when the registry has no such tenant)."""
    reason: str
    detail: str
    topic: str
    """The original topic (without ``dlq/``)."""
    received_at: datetime
    payload: bytes
    """The payload sample, at most :data:`DEAD_LETTER_SAMPLE_MAX` bytes."""
    payload_bytes: int
    truncated: bool
    fingerprint: bytes
    """What makes a redelivery the same row (:func:`dead_letter_fingerprint` of what identifies it)."""


def dead_letter_fingerprint(*parts: bytes) -> bytes:
    """sha256 of length-prefixed parts (so that no two part lists share a digest)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


@dataclass(frozen=True)
class DeadLetter:
    """A stored dead letter; ``payload`` is None where it was not asked for (listings)."""

    id: int
    tenant_id: str | None
    reason: str
    detail: str
    topic: str
    received_at: datetime
    stored_at: datetime
    payload_bytes: int
    truncated: bool
    replay_requested_at: datetime | None
    replayed_at: datetime | None
    payload: bytes | None = None

    @property
    def replay_state(self) -> ReplayState:
        if self.replayed_at is not None:
            return "replayed"
        return "requested" if self.replay_requested_at is not None else "none"

    @property
    def not_replayable(self) -> str | None:
        """Why this dead letter cannot be replayed; None when it can."""
        if self.reason == MALFORMED_DEAD_LETTER:
            return "its dead-letter document was malformed: the original payload is unknown"
        if self.truncated:
            return f"only a sample of its {self.payload_bytes} payload bytes was kept"
        if self.replay_state != "none":
            return f"replay already {self.replay_state}"
        return None


_DEAD_LETTER_COLUMNS = (
    "id, tenant_id, reason, detail, topic, received_at, stored_at, payload_bytes, truncated,"
    " replay_requested_at, replayed_at"
)


def _dead_letters(
    conn: psycopg.Connection,
    where: sql.Composable,
    params: Mapping[str, Any],
    *,
    with_payload: bool,
    order: str,
    limit: int,
    lock: bool = False,
) -> list[DeadLetter]:
    columns = _DEAD_LETTER_COLUMNS + (", payload" if with_payload else "")
    query = sql.SQL("SELECT {} FROM dead_letters WHERE {} ORDER BY {} LIMIT %(limit)s{}").format(
        sql.SQL(columns), where, sql.SQL(order), sql.SQL(" FOR UPDATE" if lock else "")
    )
    rows = conn.execute(query, {**params, "limit": limit}).fetchall()
    return [DeadLetter(*row) for row in rows]  # the payload, when selected, is the last column


def store_dead_letter(conn: psycopg.Connection, letter: NewDeadLetter) -> int | None:
    """Store one dead letter; its id, or None when it was stored before (a redelivery)."""
    row = {
        "tenant": letter.tenant_id,
        "reason": letter.reason,
        "detail": letter.detail,
        "topic": letter.topic,
        "received_at": letter.received_at,
        "payload": letter.payload,
        "payload_sample": f"{len(letter.payload)} bytes",
        "payload_bytes": letter.payload_bytes,
        "truncated": letter.truncated,
        "fingerprint": letter.fingerprint,
    }
    with conn.transaction(), _refusals("dead_letter", row):
        stored = conn.execute(
            "INSERT INTO dead_letters (tenant_id, reason, detail, topic, received_at, payload,"
            " payload_bytes, truncated, fingerprint)"
            " VALUES ((SELECT id FROM tenants WHERE id = %(tenant)s), %(reason)s, %(detail)s, %(topic)s,"
            " %(received_at)s, %(payload)s, %(payload_bytes)s, %(truncated)s, %(fingerprint)s)"
            " ON CONFLICT (fingerprint) DO NOTHING RETURNING id",
            row,
        ).fetchone()
    return None if stored is None else int(stored[0])


def _filters(
    tenant_id: str | None, reason: str | None, since: datetime | None
) -> tuple[sql.Composable, dict[str, Any]]:
    clauses: list[sql.Composable] = [sql.SQL("TRUE")]
    if tenant_id is not None:
        clauses.append(sql.SQL("tenant_id = %(tenant)s"))
    if reason is not None:
        clauses.append(sql.SQL("reason = %(reason)s"))
    if since is not None:
        clauses.append(sql.SQL("received_at >= %(since)s"))
    return sql.SQL(" AND ").join(clauses), {"tenant": tenant_id, "reason": reason, "since": since}


def list_dead_letters(
    conn: psycopg.Connection,
    *,
    tenant_id: str | None = None,
    reason: str | None = None,
    since: datetime | None = None,
    limit: int = 50,
) -> list[DeadLetter]:
    """Dead letters newest first (without their payload), optionally of one tenant, one reason,
    received since a time; at most ``limit`` (1 to :data:`LIST_LIMIT_MAX`)."""
    if not 1 <= limit <= LIST_LIMIT_MAX:
        raise RegistryError(f"limit: {limit!r} is not between 1 and {LIST_LIMIT_MAX}")
    where, params = _filters(tenant_id, reason, since)
    return _dead_letters(
        conn, where, params, with_payload=False, order="received_at DESC, id DESC", limit=limit
    )


def count_dead_letters(conn: psycopg.Connection, *, since: datetime | None = None) -> dict[str | None, int]:
    """How many dead letters the registry holds per tenant (None: those naming no known tenant),
    optionally only those received since a time; a tenant with none is absent."""
    where, params = _filters(None, None, since)
    query = sql.SQL("SELECT tenant_id, count(*) FROM dead_letters WHERE {} GROUP BY tenant_id").format(where)
    return {tenant: int(count) for tenant, count in conn.execute(query, params).fetchall()}


def get_dead_letter(conn: psycopg.Connection, dead_letter_id: int) -> DeadLetter | None:
    """One dead letter with its payload sample."""
    found = _dead_letters(
        conn, sql.SQL("id = %(id)s"), {"id": dead_letter_id}, with_payload=True, order="id", limit=1
    )
    return found[0] if found else None


@dataclass
class ReplayRequest:
    """What one replay request marked, and what it left out and why."""

    requested: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)


def request_replay(
    conn: psycopg.Connection,
    *,
    actor: str,
    ids: Sequence[int] = (),
    tenant_id: str | None = None,
    reason: str | None = None,
    since: datetime | None = None,
    limit: int = REPLAY_LIMIT_MAX,
) -> ReplayRequest:
    """Mark dead letters for replay: those of ``ids``, or else those matching the filters (oldest
    first, at most ``limit``). The consumer republishes them to ``replay/<topic>``. Each dead letter
    replays once: one already requested or replayed, a truncated sample or a malformed document is
    skipped with the reason. One audit event per tenant touched."""
    if not 1 <= limit <= REPLAY_LIMIT_MAX:
        raise RegistryError(f"limit: {limit!r} is not between 1 and {REPLAY_LIMIT_MAX}")
    if ids:
        where: sql.Composable = sql.SQL("id = ANY(%(ids)s)")
        params: dict[str, Any] = {"ids": list(ids)}
    else:
        where, params = _filters(tenant_id, reason, since)
        where = sql.SQL("{} AND replay_requested_at IS NULL").format(where)
    result = ReplayRequest()
    with conn.transaction():
        candidates = _dead_letters(
            conn,
            where,
            params,
            with_payload=False,
            order="received_at, id",
            limit=len(ids) if ids else limit,
            lock=True,
        )
        found = {letter.id for letter in candidates}
        result.skipped.update({missing: "no such dead letter" for missing in ids if missing not in found})
        by_tenant: dict[str | None, list[int]] = {}
        for letter in candidates:
            refusal = letter.not_replayable
            if refusal is not None:
                result.skipped[letter.id] = refusal
                continue
            result.requested.append(letter.id)
            by_tenant.setdefault(letter.tenant_id, []).append(letter.id)
        conn.execute(
            "UPDATE dead_letters SET replay_requested_at = now()"
            " WHERE id = ANY(%s) AND replay_requested_at IS NULL",
            (result.requested,),
        )
        for tenant, requested in by_tenant.items():
            record_event(
                conn,
                actor=actor,
                action="dead_letters.replay_requested",
                subject=f"{len(requested)} dead letters",
                tenant_id=tenant,
                details={"ids": requested},
            )
    return result


def pending_replays(conn: psycopg.Connection, limit: int = 100) -> list[DeadLetter]:
    """Dead letters requested for replay and not replayed yet, oldest request first, with payloads."""
    where = sql.SQL("replay_requested_at IS NOT NULL AND replayed_at IS NULL")
    return _dead_letters(conn, where, {}, with_payload=True, order="replay_requested_at, id", limit=limit)


def mark_replayed(conn: psycopg.Connection, dead_letter_id: int) -> bool:
    """Record that a dead letter was republished (the broker confirmed it); False if it is gone."""
    with conn.transaction():
        updated = conn.execute(
            "UPDATE dead_letters SET replayed_at = now()"
            " WHERE id = %s AND replay_requested_at IS NOT NULL AND replayed_at IS NULL",
            (dead_letter_id,),
        ).rowcount
    return bool(updated)


def purge_dead_letters(
    conn: psycopg.Connection, retention_seconds: Mapping[str, int], default_seconds: int
) -> dict[str | None, int]:
    """Delete dead letters older than their tenant's retention (``retention_seconds``; the
    registry's other tenants and unassigned dead letters get ``default_seconds``; 0 keeps
    forever), in bounded batches. Returns how many went, per tenant (None: unassigned)."""
    tenants: list[str | None] = [*tenant_ids(conn), None]
    purged: dict[str | None, int] = {}
    for tenant in tenants:
        seconds = retention_seconds.get(tenant, default_seconds) if tenant is not None else default_seconds
        if seconds <= 0:
            continue
        match = "tenant_id = %(tenant)s" if tenant is not None else "tenant_id IS NULL"
        query = sql.SQL(
            "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters WHERE {}"
            " AND received_at < now() - make_interval(secs => %(seconds)s) LIMIT %(batch)s)"
        ).format(sql.SQL(match))
        while True:
            with conn.transaction():
                deleted = conn.execute(
                    query, {"tenant": tenant, "seconds": seconds, "batch": _PURGE_BATCH}
                ).rowcount
            if deleted:
                purged[tenant] = purged.get(tenant, 0) + deleted
            if deleted < _PURGE_BATCH:
                break
    return purged
