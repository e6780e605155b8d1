"""The provisioning HTTP API (FastAPI). Operators authenticate with an admin token (``AdminKey``);
every tenant route takes ``TenantKey``, which refuses another tenant's token with
``tenant_mismatch`` before the route runs. Devices reach only ``/v1/claim`` and ``/v1/renew``.
Every refusal is ``{"code": ..., "detail": ...}``; a bad body is FastAPI's 422 naming the field.
"""

from __future__ import annotations

import io
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import psycopg
import segno
import structlog
from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import ConnectionPool

from infra.config import MachineId, SiteId, TenantId
from provisioning import broker_log, models
from provisioning.brokers import BrokerDirectory
from provisioning.ca import Authorities, CAConfig, IssuingCA
from provisioning.service import AdminScope, Provisioner, TenantAccess
from provisioning.settings import ProvisioningSettings
from registry.migrate import apply_migrations
from registry.provisioning import Refused

log = structlog.get_logger("provisioning")
CLIENT_CERT_SCOPE_KEY = "tls"
"""The ASGI TLS extension (``scope["extensions"]["tls"]["client_cert_chain"]``): set by the
server (``provisioning.tls``) from the certificate the TLS handshake verified, never from a header."""

STATUS = {
    "unauthorized": 401,
    "client_certificate_required": 401,
    "certificate_unknown": 401,
    "claim_token_unknown": 401,
    "tenant_mismatch": 403,
    "device_revoked": 403,
    "machine_disabled": 409,
    "tenant_unknown": 404,
    "site_unknown": 404,
    "machine_unknown": 404,
    "device_unknown": 404,
    "admin_token_unknown": 404,
    "claim_token_expired": 410,
    "claim_token_revoked": 410,
    "claim_token_used": 409,
    "machine_exists": 409,
    "site_exists": 409,
    "device_exists": 409,
    "renew_too_early": 409,
    "machine_type_mismatch": 409,
    "machine_type_required": 422,
    "csr_invalid": 400,
    "expiry_too_long": 422,
    "rate_limited": 429,
    "broker_unavailable": 503,
}
_REFUSALS: dict[int | str, dict[str, Any]] = {
    status: {"model": models.Problem} for status in sorted(set(STATUS.values()))
}


def provisioner(request: Request) -> Provisioner:
    service: Provisioner = request.app.state.provisioner
    return service


ProvisionerDep = Annotated[Provisioner, Depends(provisioner)]
_bearer = HTTPBearer(auto_error=False, description="An admin token: ilk-admin.<id>.<secret>")


def admin_key(
    service: ProvisionerDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> AdminScope:
    return service.authenticate(credentials.credentials if credentials else None)


AdminKey = Annotated[AdminScope, Depends(admin_key)]
"""The calling operator; every admin route takes it (directly or through :data:`TenantKey`)."""


def tenant_key(
    tenant_id: Annotated[TenantId, Path()], admin: AdminKey, service: ProvisionerDep
) -> TenantAccess:
    return service.tenant_access(admin, tenant_id)


TenantKey = Annotated[TenantAccess, Depends(tenant_key)]
"""An operator allowed on the path's tenant: a tenant-scoped token of another tenant never gets here."""


def refused(_request: Request, refusal: Exception) -> JSONResponse:
    assert isinstance(refusal, Refused)
    headers = {}
    if refusal.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(refusal.retry_after_s + 0.5)))
    if refusal.code == "unauthorized":
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(
        {"code": refusal.code, "detail": refusal.detail},
        status_code=STATUS.get(refusal.code, 400),
        headers=headers,
    )


def client_certificate(request: Request) -> str | None:
    chain = request.scope.get("extensions", {}).get(CLIENT_CERT_SCOPE_KEY, {}).get("client_cert_chain") or []
    return chain[0] if chain else None


def open_provisioner(
    settings: ProvisioningSettings,
    *,
    directory: BrokerDirectory | None = None,
    on_new_ca: Callable[[IssuingCA], None] | None = None,
) -> Provisioner:
    """Migrate the registry, load or create the CAs, connect the broker directory."""
    dsn = settings.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_migrations(conn)
    authorities = Authorities(
        CAConfig(
            folder=settings.ca_dir,
            region=settings.region,
            tenant_ca_isolation=settings.tenant_ca_isolation,
            validity_days=settings.ca_validity_days,
            key_file=settings.ca_key_file,
            cert_file=settings.ca_cert_file,
        ),
        on_new_ca=on_new_ca,
    )
    pool = ConnectionPool(
        dsn, min_size=1, max_size=settings.registry_pool_size, kwargs={"autocommit": True}, open=False
    )
    return Provisioner(settings, pool, authorities, directory or settings.broker_directory())


def _broker_threads(service: Provisioner) -> Callable[[], None]:
    """The brokers' failures into the registry: EMQX's counted events flushed each second, and
    where the broker's log is a local file (``ironlink dev``) a follower of it. Returns what stops
    both (after recording what they still count)."""
    settings, stop = service.settings, threading.Event()

    def flush_events() -> None:
        while True:
            last = stop.wait(1.0)
            try:
                service.flush_broker_events(everything=last)
            except (Refused, psycopg.Error) as error:
                log.warning("broker_events_not_recorded", error=str(error))
            if last:
                return

    def record(rows: list[broker_log.FailureRow]) -> None:
        service.record_broker_rows("mosquitto", [row.as_json() for row in rows])

    threads = [threading.Thread(target=flush_events, name="broker-events", daemon=True)]
    if settings.broker_log_file is not None:
        window = broker_log.FailureWindow(settings.broker_log_window_s)
        follow_args = (settings.broker_log_file, record, stop)
        follow_options = {"window": window, "poll_s": 0.5}
        threads.append(
            threading.Thread(
                target=broker_log.follow,
                args=follow_args,
                kwargs=follow_options,
                name="broker-log",
                daemon=True,
            )
        )
    for thread in threads:
        thread.start()

    def halt() -> None:
        stop.set()
        for thread in threads:
            thread.join(10)

    return halt


def create_app(service: Provisioner) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.pool.open()
        halt_broker_threads = _broker_threads(service)
        try:
            yield
        finally:
            halt_broker_threads()
            service.pool.close()
            close = getattr(service.directory, "close", None)
            if close is not None:
                close()

    app = FastAPI(
        title="Ironlink provisioning",
        version="1",
        description=__doc__,
        lifespan=lifespan,
        responses=_REFUSALS,
    )
    app.state.provisioner = service
    app.add_exception_handler(Refused, refused)
    _routes(app)
    return app


def _routes(app: FastAPI) -> None:
    # -------------------------------------------------------------------------------- operations
    @app.get("/healthz", tags=["operations"])
    def healthz() -> models.Health:
        return models.Health(status="ok")

    @app.get("/readyz", tags=["operations"], responses={503: {"model": models.Health}})
    def readyz(service: ProvisionerDep) -> Response:
        ok = service.ready()
        return JSONResponse(
            {"status": "ok" if ok else "registry_unreachable"}, status_code=200 if ok else 503
        )

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    def metrics(service: ProvisionerDep) -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/crl.pem", tags=["certificates"], response_class=PlainTextResponse)
    def crl(service: ProvisionerDep) -> Response:
        return Response(service.crl(), media_type="application/x-pem-file")

    @app.get("/v1/ca.pem", tags=["certificates"], response_class=PlainTextResponse)
    def ca_bundle(service: ProvisionerDep) -> Response:
        """Every issuing CA certificate (what brokers trust for device certificates)."""
        return Response(service.authorities.bundle_pem(), media_type="application/x-pem-file")

    # ---------------------------------------------------------------------------- admin tokens
    @app.post("/v1/admin-tokens", tags=["admin"], status_code=201)
    def create_admin_token(
        body: models.AdminTokenCreate, admin: AdminKey, service: ProvisionerDep
    ) -> models.AdminTokenCreated:
        return service.create_admin_token(admin, body)

    @app.post("/v1/admin-tokens/{token_id}/revoke", tags=["admin"], status_code=204)
    def revoke_admin_token(
        token_id: Annotated[str, Path(max_length=16)], admin: AdminKey, service: ProvisionerDep
    ) -> Response:
        service.revoke_admin_token(admin, token_id)
        return Response(status_code=204)

    # ------------------------------------------------------------------------ sites and machines
    @app.post("/v1/tenants/{tenant_id}/sites", tags=["fleet"], status_code=201)
    def add_site(body: models.SiteCreate, access: TenantKey, service: ProvisionerDep) -> models.SiteOut:
        return service.add_site(access, body)

    @app.get("/v1/tenants/{tenant_id}/sites", tags=["fleet"])
    def sites(access: TenantKey, service: ProvisionerDep) -> list[models.SiteOut]:
        return service.sites(access)

    @app.post("/v1/tenants/{tenant_id}/machines", tags=["fleet"], status_code=201)
    def add_machine(
        body: models.MachineCreate, access: TenantKey, service: ProvisionerDep
    ) -> models.MachineOut:
        return service.add_machine(access, body)

    @app.get("/v1/tenants/{tenant_id}/machines", tags=["fleet"])
    def machines(
        access: TenantKey, service: ProvisionerDep, site: Annotated[SiteId | None, Query()] = None
    ) -> list[models.MachineOut]:
        return service.machines(access, site)

    @app.patch("/v1/tenants/{tenant_id}/machines/{site_id}/{machine_id}", tags=["fleet"])
    def update_machine(
        site_id: Annotated[SiteId, Path()],
        machine_id: Annotated[MachineId, Path()],
        body: models.MachineUpdate,
        access: TenantKey,
        service: ProvisionerDep,
    ) -> models.MachineChanged:
        return service.update_machine(access, site_id, machine_id, body)

    @app.delete("/v1/tenants/{tenant_id}/machines/{site_id}/{machine_id}", tags=["fleet"])
    def remove_machine(
        site_id: Annotated[SiteId, Path()],
        machine_id: Annotated[MachineId, Path()],
        access: TenantKey,
        service: ProvisionerDep,
    ) -> models.MachineChanged:
        return service.remove_machine(access, site_id, machine_id)

    # ----------------------------------------------------------------------------------- devices
    @app.post("/v1/tenants/{tenant_id}/devices", tags=["devices"], status_code=201)
    def enroll(body: models.DeviceEnroll, access: TenantKey, service: ProvisionerDep) -> models.Credential:
        return service.enroll(access, body)

    @app.get("/v1/tenants/{tenant_id}/devices", tags=["devices"])
    def devices(access: TenantKey, service: ProvisionerDep) -> list[models.DeviceOut]:
        return service.devices(access)

    @app.post("/v1/tenants/{tenant_id}/devices/{username}/revoke", tags=["devices"], status_code=204)
    def revoke(
        username: Annotated[str, Path(max_length=130)], access: TenantKey, service: ProvisionerDep
    ) -> Response:
        service.revoke(access, username)
        return Response(status_code=204)

    # ------------------------------------------------------------------------------ claim tokens
    @app.post("/v1/tenants/{tenant_id}/claim-tokens", tags=["claims"], status_code=201)
    def create_claim_token(
        body: models.ClaimTokenCreate, access: TenantKey, service: ProvisionerDep
    ) -> models.ClaimTokenCreated:
        return service.create_claim_token(access, body)

    @app.get("/v1/tenants/{tenant_id}/claim-tokens", tags=["claims"])
    def claim_tokens(access: TenantKey, service: ProvisionerDep) -> list[models.ClaimTokenOut]:
        return service.claim_tokens(access)

    @app.get(
        "/v1/tenants/{tenant_id}/claim-tokens/{token_id}/qr.png",
        tags=["claims"],
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    def claim_token_qr(
        token_id: Annotated[str, Path(max_length=16)],
        access: TenantKey,
        service: ProvisionerDep,
        claim_token: Annotated[
            str | None,
            Header(
                alias="Ironlink-Claim-Token",
                max_length=128,
                description="The token (only its hash is stored).",
            ),
        ] = None,
    ) -> Response:
        payload = service.claim_token_qr(access, token_id, claim_token)
        image = io.BytesIO()
        segno.make(payload, error="m").save(image, kind="png", scale=6)
        return Response(image.getvalue(), media_type="image/png")

    @app.post("/v1/tenants/{tenant_id}/claim-tokens/{token_id}/revoke", tags=["claims"], status_code=204)
    def revoke_claim_token(
        token_id: Annotated[str, Path(max_length=16)], access: TenantKey, service: ProvisionerDep
    ) -> Response:
        service.revoke_claim_token(access, token_id)
        return Response(status_code=204)

    # ------------------------------------------------------------------------ device endpoints
    @app.post("/v1/claim", tags=["device"], response_model=models.Credential, status_code=201)
    def claim(body: models.ClaimRequest, request: Request, service: ProvisionerDep) -> JSONResponse:
        source = request.client.host if request.client else "unknown"
        credential, resumed = service.claim(source, body)
        return JSONResponse(credential.model_dump(mode="json"), status_code=200 if resumed else 201)

    @app.post("/v1/renew", tags=["device"])
    def renew(body: models.RenewRequest, request: Request, service: ProvisionerDep) -> models.Credential:
        """Over mutual TLS: the device's current certificate, verified by the TLS handshake."""
        return service.renew(client_certificate(request), body)

    # ------------------------------------------------------------------------- broker sidecars
    @app.post("/v1/broker/auth-failures", tags=["brokers"], status_code=201)
    def broker_auth_failures(
        body: models.BrokerAuthFailures,
        service: ProvisionerDep,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> models.Recorded:
        """A broker-pod sidecar (``python -m provisioning.broker_log``) reports the connections its
        broker refused, counted per reason, address and minute; bearer: the broker-log token."""
        token = credentials.credentials if credentials else None
        return models.Recorded(recorded=service.record_broker_failures(token, body))

    @app.post("/v1/broker/auth-events", tags=["brokers"], status_code=202)
    def broker_auth_event(
        body: models.BrokerAuthEvent,
        service: ProvisionerDep,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Response:
        """EMQX's rule on ``$events/client_connack`` (reason not ``success``) posts each refused
        CONNECT here; counted per reason, address and window like the log follower's rows."""
        service.count_broker_event(credentials.credentials if credentials else None, body)
        return Response(status_code=202)
