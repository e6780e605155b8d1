"""What a route reads from ``app.state``: the settings, the registry pool, the telemetry store."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from psycopg_pool import ConnectionPool

from api.settings import ApiSettings
from api.stores import TelemetryStore


def settings(request: Request) -> ApiSettings:
    value: ApiSettings = request.app.state.settings
    return value


def registry_pool(request: Request) -> ConnectionPool:
    pool: ConnectionPool = request.app.state.pool
    return pool


def telemetry_store(request: Request) -> TelemetryStore:
    store: TelemetryStore = request.app.state.store
    return store


SettingsDep = Annotated[ApiSettings, Depends(settings)]
PoolDep = Annotated[ConnectionPool, Depends(registry_pool)]
"""The registry (psycopg_pool, autocommit connections): ``with pool.connection() as conn``."""
StoreDep = Annotated[TelemetryStore, Depends(telemetry_store)]
