"""The Ironlink API (FastAPI): a tenant's sites, machines, their latest status and telemetry.

Callers authenticate with an API key (``Authorization: Bearer ilk-api.<id>.<secret>``), scoped to
one tenant or one site of it; nothing in a request can reach another tenant's data. Requests are
rate limited per key, weighted by the points they scan (429 with ``RateLimit-*`` headers). Every
refusal is ``{"code": ..., "detail": ...}``; malformed input is 422 naming each parameter.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg_pool import ConnectionPool
from pydantic import BaseModel

from api import alerts, fleet, live, maintenance, series, uptime, usage
from api.deps import PoolDep
from api.errors import RESPONSES, ApiError, api_error_handler, validation_handler
from api.limits import BodyLimit
from api.ratelimit import PointBuckets, RateLimitHeaders
from api.settings import ApiSettings
from api.stores import TelemetryStore, open_store


class Health(BaseModel):
    status: str


def open_pool(settings: ApiSettings) -> ConnectionPool:
    """The registry pool (not opened yet: the app's lifespan opens and closes it)."""
    return ConnectionPool(
        settings.dsn(),
        min_size=1,
        max_size=settings.registry_pool_size,
        kwargs={"autocommit": True},
        open=False,
    )


def create_app(
    settings: ApiSettings, *, pool: ConnectionPool | None = None, store: TelemetryStore | None = None
) -> FastAPI:
    """The application; ``pool`` and ``store`` default to what ``settings`` name."""
    registry = pool if pool is not None else open_pool(settings)
    telemetry = store if store is not None else open_store(settings, registry)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        registry.open()
        try:
            yield
        finally:
            telemetry.close()
            registry.close()

    app = FastAPI(
        title="Ironlink API", version="1", description=__doc__, lifespan=lifespan, responses=RESPONSES
    )
    app.state.settings = settings
    app.state.pool = registry
    app.state.store = telemetry
    app.state.rate_limits = PointBuckets(settings.rate_points_per_second, settings.rate_burst_points)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(
        BodyLimit,
        limit=settings.request_max_bytes,
        per_path={alerts.WEBHOOK_PATH: settings.alert_webhook_max_bytes},
    )
    _operations(app)
    _include_routers(app)
    return app


def _include_routers(app: FastAPI) -> None:
    """Every router of the API, one line each (each module owns its routes)."""
    app.include_router(fleet.router)
    app.include_router(alerts.router)  # also runs the notification dispatcher (its lifespan)
    app.include_router(series.router)
    app.include_router(uptime.router)
    app.include_router(maintenance.router)
    app.include_router(usage.router)
    app.include_router(live.router)


def _operations(app: FastAPI) -> None:
    @app.get("/healthz", tags=["operations"])
    def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", tags=["operations"], responses={503: {"model": Health}})
    def readyz(pool: PoolDep) -> JSONResponse:
        try:
            with pool.connection(timeout=2) as conn:
                conn.execute("SELECT 1")
        except (psycopg.Error, TimeoutError):
            return JSONResponse({"status": "registry_unreachable"}, status_code=503)
        return JSONResponse({"status": "ok"})
