"""What the provisioning API does, route by route, without HTTP: registry writes (one transaction
each, audited), certificates, then the broker directory.

Order matters: the registry is the source of truth, so each change commits there first and the
broker is told afterwards. A broker that cannot be told answers ``broker_unavailable`` (503); every
call to the directory is idempotent, so the caller (or the device) simply tries again.
"""

from __future__ import annotations

import datetime
import hmac
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry, Counter
from psycopg_pool import ConnectionPool

from infra.tenancy import device_username
from ingest.buckets import KeyedBuckets
from provisioning import broker_log, models
from provisioning.brokers import BrokerDirectory, BrokerError
from provisioning.ca import Authorities, IssuingCA, common_name, parse_csr, public_key_digest
from provisioning.settings import ProvisioningSettings
from registry import provisioning as reg
from registry.credentials import generate_password, hash_password
from registry.provisioning import Refused

log = structlog.get_logger("provisioning")
_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class AdminScope:
    """Who is calling: an admin token, platform-wide (``tenant_id`` None) or of one tenant."""

    token_id: str
    tenant_id: str | None
    label: str

    @property
    def actor(self) -> str:
        return f"admin-token:{self.token_id}"


@dataclass(frozen=True)
class TenantAccess:
    """An admin allowed to act on ``tenant_id`` (the dependency every tenant route takes)."""

    tenant_id: str
    isolation: int
    admin: AdminScope


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.claims = Counter(
            "ironlink_provisioning_claims",
            "Claims by outcome: ok, resumed, or the refusal code.",
            ["outcome"],
            registry=self.registry,
        )
        self.provisioned = Counter(
            "ironlink_provisioning_devices_provisioned",
            "Device credentials issued, by method.",
            ["method"],
            registry=self.registry,
        )
        self.renewals = Counter(
            "ironlink_provisioning_renewals", "Renewals by outcome.", ["outcome"], registry=self.registry
        )
        self.broker_auth_failures = Counter(
            "ironlink_provisioning_broker_auth_failures",
            "Connections the brokers refused, by reason, as their logs report them.",
            ["reason"],
            registry=self.registry,
        )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class Provisioner:
    def __init__(
        self,
        settings: ProvisioningSettings,
        pool: ConnectionPool,
        authorities: Authorities,
        directory: BrokerDirectory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings, self.pool, self.authorities, self.directory = settings, pool, authorities, directory
        self.metrics = Metrics()
        self.per_source = KeyedBuckets(
            settings.claim_rate_per_source, settings.claim_burst_per_source, clock=clock
        )
        self.per_token = KeyedBuckets(
            settings.claim_rate_per_token, settings.claim_burst_per_token, clock=clock
        )
        budget = settings.broker_log_rows_per_minute
        self.broker_rows = KeyedBuckets(budget / 60, budget, clock=clock)
        self.broker_events = broker_log.FailureWindow(settings.broker_log_window_s)
        self._broker_events_lock = threading.Lock()

    # ------------------------------------------------------------------------------------- admin
    def authenticate(self, text: str | None) -> AdminScope:
        parsed = reg.parse_token(reg.ADMIN_TOKEN_PREFIX, text or "")
        if parsed is None:
            raise Refused("unauthorized", "an admin token is required (Authorization: Bearer ilk-admin....)")
        with self.pool.connection() as conn:
            token = reg.admin_token(conn, parsed[0])
        if token is None or not reg.secret_matches(parsed[1], token.secret_sha256):
            raise Refused("unauthorized", "the admin token is not known")
        if token.revoked_at is not None:
            raise Refused("unauthorized", f"admin token {token.id} was revoked")
        if token.expires_at <= _now():
            raise Refused("unauthorized", f"admin token {token.id} expired at {token.expires_at.isoformat()}")
        return AdminScope(token.id, token.tenant_id, token.label)

    def tenant_access(self, admin: AdminScope, tenant_id: str) -> TenantAccess:
        if admin.tenant_id is not None and admin.tenant_id != tenant_id:
            raise Refused("tenant_mismatch", f"this admin token belongs to tenant {admin.tenant_id!r}")
        with self.pool.connection() as conn:
            isolation = reg.require_tenant(conn, tenant_id)
        return TenantAccess(tenant_id, isolation, admin)

    def create_admin_token(
        self, admin: AdminScope, body: models.AdminTokenCreate
    ) -> models.AdminTokenCreated:
        if admin.tenant_id is not None and body.tenant_id != admin.tenant_id:
            raise Refused(
                "tenant_mismatch", f"this admin token may only mint tokens of tenant {admin.tenant_id!r}"
            )
        if body.expires_in_days > self.settings.admin_token_max_days:
            raise Refused(
                "expiry_too_long", f"expires_in_days: at most {self.settings.admin_token_max_days} days"
            )
        expires_at = _now() + body.expires_in_days * _DAY
        with self.pool.connection() as conn:
            token = reg.create_admin_token(
                conn, tenant_id=body.tenant_id, label=body.label, expires_at=expires_at, actor=admin.actor
            )
        return models.AdminTokenCreated(
            id=token.id, token=token.plaintext, tenant_id=body.tenant_id, expires_at=expires_at
        )

    def revoke_admin_token(self, admin: AdminScope, token_id: str) -> None:
        with self.pool.connection() as conn:
            if not reg.revoke_admin_token(conn, token_id, scope=admin.tenant_id, actor=admin.actor):
                raise Refused("admin_token_unknown", f"no valid admin token {token_id!r} in your scope")

    # -------------------------------------------------------------------------------------- fleet
    def add_site(self, access: TenantAccess, body: models.SiteCreate) -> models.SiteOut:
        with self.pool.connection() as conn:
            reg.add_site(conn, access.tenant_id, body.id, body.name, actor=access.admin.actor)
        return models.SiteOut(id=body.id, name=body.name)

    def sites(self, access: TenantAccess) -> list[models.SiteOut]:
        with self.pool.connection() as conn:
            return [models.SiteOut(id=s.id, name=s.name) for s in reg.list_sites(conn, access.tenant_id)]

    def add_machine(self, access: TenantAccess, body: models.MachineCreate) -> models.MachineOut:
        with self.pool.connection() as conn:
            reg.add_machine(
                conn, access.tenant_id, body.site_id, body.id, body.type, actor=access.admin.actor
            )
        return models.MachineOut(
            site_id=body.site_id, id=body.id, type=body.type, disabled=False, device=None
        )

    def machines(self, access: TenantAccess, site_id: str | None) -> list[models.MachineOut]:
        with self.pool.connection() as conn:
            return [_machine_out(m) for m in reg.list_machines(conn, access.tenant_id, site_id)]

    def update_machine(
        self, access: TenantAccess, site_id: str, machine_id: str, body: models.MachineUpdate
    ) -> models.MachineChanged:
        actor, tenant = access.admin.actor, access.tenant_id
        removed = None
        with self.pool.connection() as conn:
            if body.site_id is not None and body.site_id != site_id:
                removed = reg.move_machine(conn, tenant, site_id, machine_id, body.site_id, actor=actor)
                site_id = body.site_id
            if body.disabled is not None:
                reg.set_machine_disabled(conn, tenant, site_id, machine_id, body.disabled, actor=actor)
            machine = reg.get_machine(conn, tenant, site_id, machine_id)
        if removed is not None:
            self._broker(self.directory.remove, removed)
        if body.disabled is not None and machine.device is not None:
            self._broker(self.directory.disable if body.disabled else self.directory.enable, machine.device)
        return models.MachineChanged(machine=_machine_out(machine), device_removed=removed)

    def remove_machine(self, access: TenantAccess, site_id: str, machine_id: str) -> models.MachineChanged:
        with self.pool.connection() as conn:
            removed = reg.remove_machine(
                conn, access.tenant_id, site_id, machine_id, actor=access.admin.actor
            )
        if removed is not None:
            self._broker(self.directory.remove, removed)
        return models.MachineChanged(machine=None, device_removed=removed)

    # ------------------------------------------------------------------------------------ devices
    def enroll(self, access: TenantAccess, body: models.DeviceEnroll) -> models.Credential:
        tenant, site, machine_id = access.tenant_id, body.site_id, body.machine_id
        username = device_username(tenant, site, machine_id)
        csr = parse_csr(body.csr, username) if body.csr is not None else None
        password = None if csr is not None else generate_password()
        credential: models.Credential
        with self.pool.connection() as conn, conn.transaction():
            machine = reg.get_machine(conn, tenant, site, machine_id)
            if machine.disabled_at is not None:
                raise Refused("machine_disabled", f"machine {site}/{machine_id} is disabled; enable it first")
            previous = reg.get_device(conn, username)
            if body.rotate:
                reg.revoke_certificates(conn, username)
            reg.store_device(
                conn,
                tenant,
                site,
                machine_id,
                credential=None if password is None else hash_password(password),
                replace=body.rotate,
            )
            if csr is not None:
                ca = self.authorities.for_tenant(tenant, access.isolation)
                credential = self._issue(conn, ca, csr, username, tenant)
            else:
                credential = models.Credential(username=username, method="password", password=password)
            reg.audit(
                conn,
                access.admin.actor,
                "device.enrolled",
                username,
                tenant,
                method=credential.method,
                rotated=previous is not None,
            )
        self._broker(
            self.directory.add_device,
            username,
            password,
            tenant_id=tenant,
            site_id=site,
            machine_id=machine_id,
        )
        if previous is not None and previous[1].revoked_at is not None:
            self._broker(self.directory.enable, username)
        self.metrics.provisioned.labels(f"manual_{credential.method}").inc()
        return credential

    def devices(self, access: TenantAccess) -> list[models.DeviceOut]:
        with self.pool.connection() as conn:
            return [
                models.DeviceOut(
                    username=d.username,
                    site_id=d.site_id,
                    machine_id=d.machine_id,
                    method=d.auth,
                    issued_at=d.issued_at,
                    revoked=d.revoked_at is not None,
                )
                for d in reg.list_devices(conn, access.tenant_id)
            ]

    def revoke(self, access: TenantAccess, username: str) -> None:
        with self.pool.connection() as conn:
            reg.revoke_device(conn, access.tenant_id, username, actor=access.admin.actor)
        self._broker(self.directory.disable, username)

    def _issue(
        self,
        conn: reg.psycopg.Connection,
        ca: IssuingCA,
        csr: x509.CertificateSigningRequest,
        username: str,
        tenant: str,
    ) -> models.Credential:
        cert = ca.sign(csr, username, tenant, self.settings.cert_validity_days)
        return self._store_certificate(conn, ca, cert, username, tenant)

    def _store_certificate(
        self, conn: reg.psycopg.Connection, ca: IssuingCA, cert: x509.Certificate, username: str, tenant: str
    ) -> models.Credential:
        record, credential = self._certificate(ca, cert, username, tenant)
        reg.store_certificate(conn, record)
        return credential

    @staticmethod
    def _certificate(
        ca: IssuingCA, cert: x509.Certificate, username: str, tenant: str
    ) -> tuple[reg.CertificateRecord, models.Credential]:
        """A signed certificate as the registry stores it and as the device receives it."""
        pem = _pem(cert)
        record = reg.CertificateRecord(
            serial=format(cert.serial_number, "x"),
            username=username,
            tenant_id=tenant,
            issuer=ca.name,
            public_key_sha256=public_key_digest(cert),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            pem=pem,
        )
        credential = models.Credential(
            username=username,
            method="certificate",
            certificate=pem,
            ca_certificate=ca.cert_pem,
            not_after=cert.not_valid_after_utc,
        )
        return record, credential

    def _broker(self, call: Callable[..., None], *args: object, **kwargs: object) -> None:
        try:
            call(*args, **kwargs)
        except BrokerError as error:
            log.error("broker_unavailable", call=getattr(call, "__name__", "?"), error=str(error))
            raise Refused(
                "broker_unavailable", "the registry is updated but the broker could not be told; try again"
            ) from error

    # ------------------------------------------------------------------------------- claim tokens
    def create_claim_token(
        self, access: TenantAccess, body: models.ClaimTokenCreate
    ) -> models.ClaimTokenCreated:
        if body.expires_in_hours > self.settings.claim_token_max_days * 24:
            raise Refused(
                "expiry_too_long", f"expires_in_hours: at most {self.settings.claim_token_max_days * 24}"
            )
        expires_at = _now() + datetime.timedelta(hours=body.expires_in_hours)
        with self.pool.connection() as conn:
            token = reg.create_claim_token(
                conn,
                access.tenant_id,
                body.site_id,
                machine_type=body.machine_type,
                uses=body.count,
                expires_at=expires_at,
                actor=access.admin.actor,
            )
        return models.ClaimTokenCreated(
            id=token.id,
            site_id=body.site_id,
            machine_type=body.machine_type,
            count=body.count,
            remaining=body.count,
            expires_at=expires_at,
            revoked=False,
            token=token.plaintext,
            qr_payload=self.qr_payload(token.plaintext),
        )

    def qr_payload(self, token: str) -> str:
        """What a claim QR code carries: the token and where to post it."""
        endpoint = self.settings.public_url.rstrip("/") + "/v1/claim"
        return json.dumps({"v": 1, "endpoint": endpoint, "token": token}, separators=(",", ":"))

    def claim_tokens(self, access: TenantAccess) -> list[models.ClaimTokenOut]:
        with self.pool.connection() as conn:
            return [_claim_token_out(t) for t in reg.list_claim_tokens(conn, access.tenant_id)]

    def claim_token_qr(self, access: TenantAccess, token_id: str, token: str | None) -> str:
        """The QR payload of a token the caller holds (only its hash is stored, so it must be shown)."""
        parsed = reg.parse_token(reg.CLAIM_TOKEN_PREFIX, token or "")
        with self.pool.connection() as conn:
            stored = reg.claim_token(conn, token_id, tenant_id=access.tenant_id)
        if stored is None:
            raise Refused(
                "claim_token_unknown", f"no claim token {token_id!r} in tenant {access.tenant_id!r}"
            )
        if parsed is None or parsed[0] != token_id or not reg.secret_matches(parsed[1], stored.secret_sha256):
            raise Refused("claim_token_unknown", "the Ironlink-Claim-Token header is not this claim token")
        return self.qr_payload(token or "")

    def revoke_claim_token(self, access: TenantAccess, token_id: str) -> None:
        with self.pool.connection() as conn:
            if not reg.revoke_claim_token(conn, access.tenant_id, token_id, actor=access.admin.actor):
                raise Refused(
                    "claim_token_unknown", f"no valid claim token {token_id!r} in tenant {access.tenant_id!r}"
                )

    # ------------------------------------------------------------------------------------- claims
    def claim(self, source: str, body: models.ClaimRequest) -> tuple[models.Credential, bool]:
        """Register a device with a claim token; ``(credential, resumed)``. Every outcome is counted
        and audited (a flood of rate-limited requests: its first refusal)."""
        parsed = reg.parse_token(reg.CLAIM_TOKEN_PREFIX, body.token)
        token_id = parsed[0] if parsed else None
        try:
            self._rate_limit(source, token_id)
            if parsed is None:
                raise Refused("claim_token_unknown", "this is not a claim token")
            credential, resumed, args = self._claim(source, parsed[0], parsed[1], body)
        except Refused as refusal:
            self.metrics.claims.labels(refusal.code).inc()
            log.info(
                "claim_refused", code=refusal.code, source=source, token_id=token_id, machine=body.machine_id
            )
            if refusal.audited:
                with self.pool.connection() as conn:
                    reg.audit(
                        conn,
                        f"device@{source}",
                        "claim.refused",
                        token_id or "-",
                        refusal.tenant_id,
                        code=refusal.code,
                        detail=refusal.detail,
                        machine_id=body.machine_id,
                    )
            raise
        self._broker(self.directory.add_device, credential.username, credential.password, **args)
        outcome = "resumed" if resumed else "ok"
        self.metrics.claims.labels(outcome).inc()
        if not resumed:
            self.metrics.provisioned.labels(f"claim_{credential.method}").inc()
        log.info("claimed", outcome=outcome, source=source, token_id=token_id, username=credential.username)
        return credential, resumed

    def _rate_limit(self, source: str, token_id: str | None) -> None:
        for buckets, key, what in ((self.per_source, source, "address"), (self.per_token, token_id, "token")):
            if key is None:
                continue
            decision = buckets.take(key)
            if not decision.allowed:
                refusal = Refused(
                    "rate_limited",
                    f"too many claims from this {what}; retry in {decision.retry_after_s:.1f} s",
                    retry_after_s=decision.retry_after_s,
                )
                refusal.audited = decision.first_refusal
                raise refusal

    def _claim(
        self, source: str, token_id: str, secret: str, body: models.ClaimRequest
    ) -> tuple[models.Credential, bool, dict[str, str]]:
        with self.pool.connection() as conn:
            context = reg.claim_context(conn, token_id, body.machine_id)
            if context is None or not reg.secret_matches(secret, context.token.secret_sha256):
                raise Refused(
                    "claim_token_unknown", "this claim token is not known (altered, or never issued)"
                )
            try:
                return self._claim_with(conn, source, context, body)
            except Refused as refusal:
                refusal.tenant_id = context.token.tenant_id
                raise

    def _claim_with(
        self, conn: reg.psycopg.Connection, source: str, context: reg.ClaimContext, body: models.ClaimRequest
    ) -> tuple[models.Credential, bool, dict[str, str]]:
        """Check, hash or sign, then one statement that registers everything and takes the token's
        use (:func:`registry.provisioning.register_claim`): the token's row is locked only while
        that statement runs, not while a CSR is signed, so claims of one token run side by side."""
        token = context.token
        tenant, site, machine_id = token.tenant_id, token.site_id, body.machine_id
        if body.tenant_id is not None and body.tenant_id != tenant:
            raise Refused(
                "tenant_mismatch", f"this claim token belongs to another tenant than {body.tenant_id!r}"
            )
        username = device_username(tenant, site, machine_id)
        csr = parse_csr(body.csr, username) if body.csr is not None else None
        digest = public_key_digest(csr) if csr is not None else None
        args = {"tenant_id": tenant, "site_id": site, "machine_id": machine_id}
        actor = f"device@{source}"
        if context.existing is not None:
            with conn.transaction():
                return self._resume(conn, context.existing, digest, username, actor, tenant), True, args
        _refuse_unusable(token)
        machine_type = token.machine_type or body.machine_type
        if token.machine_type and body.machine_type and token.machine_type != body.machine_type:
            raise Refused(
                "machine_type_mismatch",
                f"this token registers {token.machine_type!r} machines, not {body.machine_type!r}",
            )
        if machine_type is None:
            raise Refused("machine_type_required", "machine_type: this token names none, so the device must")
        credential: models.Credential
        record = None
        if csr is not None:  # a certificate no transaction stores is never handed out
            ca = self.authorities.for_tenant(tenant, context.isolation)
            cert = ca.sign(csr, username, tenant, self.settings.cert_validity_days)
            record, credential = self._certificate(ca, cert, username, tenant)
            password_hash = None
        else:
            password = generate_password()
            password_hash = hash_password(password)
            credential = models.Credential(username=username, method="password", password=password)
        claim = reg.NewClaim(
            token_id=token.id,
            tenant_id=tenant,
            site_id=site,
            machine_id=machine_id,
            machine_type=machine_type,
            credential=password_hash,
            certificate=record,
            public_key_sha256=digest,
            actor=actor,
            method=credential.method,
        )
        if not reg.register_claim(conn, claim):
            _refuse_unusable(reg.claim_token(conn, token.id) or token, used_meanwhile=True)
        return credential, False, args

    def _resume(
        self,
        conn: reg.psycopg.Connection,
        claim: reg.Claim,
        digest: bytes | None,
        username: str,
        actor: str,
        tenant: str,
    ) -> models.Credential:
        """The same token and machine again: the same key gets the same certificate back; a password
        device gets a new password (only the hash of the first one was kept)."""
        if claim.public_key_sha256 != digest:
            raise Refused("machine_exists", f"machine {claim.machine_id} was claimed with another key")
        device = reg.get_device(conn, username)
        if device is None or device[1].revoked_at is not None:
            raise Refused("device_revoked", f"device {username!r} was revoked or removed; ask an operator")
        if claim.certificate_serial is not None:
            record = reg.certificate(conn, claim.certificate_serial)
            ca = self.authorities.by_name(record.issuer) if record else None
            if record is None or ca is None or record.revoked_at is not None:
                raise Refused("device_revoked", f"the certificate of {username!r} was revoked")
            credential = models.Credential(
                username=username,
                method="certificate",
                certificate=record.pem,
                ca_certificate=ca.cert_pem,
                not_after=record.not_after,
            )
        else:
            password = generate_password()
            reg.store_device(
                conn,
                tenant,
                device[1].site_id,
                claim.machine_id,
                credential=hash_password(password),
                replace=True,
            )
            credential = models.Credential(username=username, method="password", password=password)
        reg.audit(conn, actor, "device.claim_resumed", username, tenant, token_id=claim.token_id, code="ok")
        return credential

    # ------------------------------------------------------------------------------ certificates
    def renew(self, client_cert_pem: str | None, body: models.RenewRequest) -> models.Credential:
        try:
            credential = self._renew(client_cert_pem, body)
        except Refused as refusal:
            self.metrics.renewals.labels(refusal.code).inc()
            raise
        self.metrics.renewals.labels("ok").inc()
        return credential

    def _renew(self, client_cert_pem: str | None, body: models.RenewRequest) -> models.Credential:
        if client_cert_pem is None:
            raise Refused(
                "client_certificate_required", "renewal needs the device's current certificate (mutual TLS)"
            )
        cert = x509.load_pem_x509_certificate(client_cert_pem.encode())
        username = common_name(cert) or ""
        if not any(ca.issued(cert) for ca in self.authorities.all()):
            raise Refused("certificate_unknown", "this certificate was not issued by an Ironlink issuing CA")
        with self.pool.connection() as conn, conn.transaction():
            record = reg.certificate(conn, format(cert.serial_number, "x"))
            device = reg.get_device(conn, username)
            if record is None or record.username != username or device is None:
                raise Refused("certificate_unknown", f"no device {username!r} holds this certificate")
            tenant, found = device
            if record.revoked_at is not None or found.revoked_at is not None:
                raise Refused("device_revoked", f"device {username!r} is revoked")
            opens = record.not_after - self.settings.renew_before_days * _DAY
            if _now() < opens:
                raise Refused("renew_too_early", f"renewal opens at {opens.isoformat()}")
            csr = parse_csr(body.csr, username)
            ca = self.authorities.for_tenant(tenant, reg.require_tenant(conn, tenant))
            credential = self._issue(conn, ca, csr, username, tenant)
            reg.audit(
                conn, f"device:{username}", "certificate.renewed", username, tenant, previous=record.serial
            )
        return credential

    # ----------------------------------------------------------- brokers' authentication failures
    def _broker_token(self, token: str | None) -> None:
        expected = self.settings.broker_log_token
        if expected is None or not hmac.compare_digest(
            (token or "").encode(), expected.get_secret_value().encode()
        ):
            raise Refused("unauthorized", "the broker-log token is required (Authorization: Bearer ...)")

    def record_broker_failures(self, token: str | None, body: models.BrokerAuthFailures) -> int:
        """``POST /v1/broker/auth-failures``: a broker-pod sidecar's rows, with the broker-log token."""
        self._broker_token(token)
        return self.record_broker_rows(body.broker, [row.model_dump(mode="json") for row in body.rows])

    def count_broker_event(self, token: str | None, event: models.BrokerAuthEvent) -> None:
        """``POST /v1/broker/auth-events``: one refused CONNECT from EMQX's rule, counted in this
        replica's window (:meth:`flush_broker_events` writes the rows)."""
        self._broker_token(token)
        address, _, _ = (event.peername or "").rpartition(":")
        listener = (event.sockname or "").rpartition(":")[2]
        at = (
            _now()
            if event.timestamp is None
            else datetime.datetime.fromtimestamp(event.timestamp / 1000, datetime.UTC)
        )
        failure = broker_log.AuthFailure(
            at=at,
            reason=event.reason_code,
            address=address.strip("[]") or None,
            listener=int(listener) if listener.isdigit() else None,
            client_id=event.clientid,
            username=event.username,
        )
        with self._broker_events_lock:
            self.broker_events.add(failure)

    def flush_broker_events(self, *, everything: bool = False) -> int:
        with self._broker_events_lock:
            rows = self.broker_events.closed(None if everything else _now())
        return self.record_broker_rows("emqx", [row.as_json() for row in rows]) if rows else 0

    def record_broker_rows(self, broker: str, rows: list[dict[str, object]]) -> int:
        """Audit rows within the brokers' budget (``broker_log_rows_per_minute``, all brokers
        together): rows beyond it are folded into one ``*`` row per reason, so their counts stay
        whole; with no budget left at all, ``rate_limited`` (the sidecar keeps them and retries)."""
        allowed = 0
        while allowed < len(rows) and self.broker_rows.take("brokers").allowed:
            allowed += 1
        if rows and allowed == 0:
            raise Refused(
                "rate_limited", "the brokers' audit budget is spent; retry in a minute", retry_after_s=60
            )
        if allowed < len(rows):
            keep = max(0, allowed - len(broker_log.REASONS))
            rows = rows[:keep] + _folded(rows[keep:])
        with self.pool.connection() as conn:
            recorded = reg.record_auth_failures(conn, broker, rows)
        for row in rows:
            self.metrics.broker_auth_failures.labels(str(row["reason"])).inc(int(str(row["count"])))
        return recorded

    def crl(self) -> str:
        """One CRL per issuing CA, concatenated (Mosquitto's ``crlfile`` reads them all)."""
        with self.pool.connection() as conn:
            return "".join(
                ca.crl(
                    [(int(serial, 16), when) for serial, when in reg.revoked_certificates(conn, ca.name)],
                    self.settings.crl_validity_hours,
                )
                for ca in self.authorities.all()
            )

    def ready(self) -> bool:
        try:
            with self.pool.connection(timeout=2.0) as conn:
                conn.execute("SELECT 1 FROM claim_tokens LIMIT 0")
        except Exception:  # any failure means "not ready", never a traceback to the probe
            return False
        return True


def _refuse_unusable(token: reg.ClaimToken, *, used_meanwhile: bool = False) -> None:
    """Refuse a revoked, expired or used-up token; ``used_meanwhile``: its last use went to a
    parallel claim (a token that still looks usable then is refused as used)."""
    if token.revoked_at is not None:
        raise Refused("claim_token_revoked", f"claim token {token.id} was revoked")
    if token.expires_at <= _now():
        raise Refused(
            "claim_token_expired", f"claim token {token.id} expired at {token.expires_at.isoformat()}"
        )
    if token.uses_left <= 0 or used_meanwhile:
        raise Refused("claim_token_used", f"claim token {token.id} has registered its {token.uses} device(s)")


def _folded(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Rows over budget as one row per reason: address ``*``, counts summed, the widest span."""
    folded: dict[str, dict[str, object]] = {}
    for row in rows:
        into = folded.setdefault(str(row["reason"]), {**row, "address": "*", "count": 0, "client_ids": []})
        into["count"] = int(str(into["count"])) + int(str(row["count"]))
        for end, pick in (("first_at", min), ("last_at", max), ("window_start", min)):
            into[end] = pick(str(into[end]), str(row[end]))
    return list(folded.values())


def _machine_out(machine: reg.Machine) -> models.MachineOut:
    return models.MachineOut(
        site_id=machine.site_id,
        id=machine.id,
        type=machine.type,
        disabled=machine.disabled_at is not None,
        device=machine.device,
    )


def _claim_token_out(token: reg.ClaimToken) -> models.ClaimTokenOut:
    return models.ClaimTokenOut(
        id=token.id,
        site_id=token.site_id,
        machine_type=token.machine_type,
        count=token.uses,
        remaining=token.uses_left,
        expires_at=token.expires_at,
        revoked=token.revoked_at is not None,
    )
