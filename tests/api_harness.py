"""What the API's tests share: a migrated registry with a fleet, API keys, points written to the
real VictoriaMetrics the tests start (as the worker writes them: ``ingest.points.to_line``), the
app on a TestClient, and a real SMTP server (``aiosmtpd``) that keeps what it accepted. Not a
fixture module: tests call these from their own fixtures."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool
from pydantic import SecretStr

from api.app import create_app
from api.settings import ApiSettings
from components.render.postgres import EMQX_ROLE
from ingest.contract import TelemetryV2
from ingest.points import to_line
from localdev.servers import free_port
from registry.api_keys import create_api_key
from registry.migrate import apply_migrations

Fleet = dict[str, dict[str, dict[str, str]]]
"""tenant -> site -> machine -> machine type."""


T0 = (int(time.time()) // 3600 - 3) * 3600
"""Three hours ago, on the hour: where the tests' points are written from."""


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def unique_tenant(prefix: str) -> str:
    """A tenant id no other test uses: the store (VictoriaMetrics) is shared by the session."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@dataclass
class TwoTenants:
    """Tenants ``a`` and ``b`` in the registry at ``dsn``, their points in the store at ``vm``."""

    dsn: str
    vm: str
    a: str
    b: str


@dataclass
class ServedTenants(TwoTenants):
    """... and the app serving them on ``client``."""

    client: TestClient

    def get(self, path: str, key: str, **params: Any) -> Any:
        return self.client.get(path, params=params, headers=bearer(key))


def seed_registry(dsn: str, fleet: Fleet) -> None:
    """Migrate the registry and add the fleet's tenants, sites and machines."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_migrations(conn)
        for tenant, sites in fleet.items():
            conn.execute(
                "INSERT INTO tenants (id, name, tier, isolation) VALUES (%s, %s, 'standard', 1)",
                (tenant, tenant.title()),
            )
            for site, machines in sites.items():
                conn.execute(
                    "INSERT INTO sites (tenant_id, id, name) VALUES (%s, %s, %s)", (tenant, site, site)
                )
                for machine, machine_type in machines.items():
                    conn.execute(
                        "INSERT INTO machines (tenant_id, site_id, id, type) VALUES (%s, %s, %s, %s)",
                        (tenant, site, machine, machine_type),
                    )


@contextmanager
def broker_role_reading_every_table(dsn: str) -> Iterator[tuple[psycopg.Connection, str]]:
    """The broker's read-only role as components/render/postgres.py sets it up (SELECT on every
    table by default privileges), the registry migrated after: the owner's connection and a
    query ``(role, table)`` answering whether the role may read the table. The role is the
    cluster's (mark the test ``xdist_group("postgres-cluster-roles")``); dropped after."""
    with psycopg.connect(dsn, autocommit=True) as owner:
        owner.execute(f"CREATE ROLE {EMQX_ROLE}")
        try:
            owner.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {EMQX_ROLE}")
            apply_migrations(owner)
            yield owner, "SELECT has_table_privilege(%s, %s, 'SELECT')"
        finally:
            owner.execute(f"DROP OWNED BY {EMQX_ROLE}")
            owner.execute(f"DROP ROLE {EMQX_ROLE}")


def new_key(
    dsn: str, tenant: str, site: str | None = None, *, lifetime: timedelta = timedelta(days=30)
) -> str:
    """A fresh API key's plaintext."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        _key, plaintext = create_api_key(
            conn, tenant, site_id=site, label="test", lifetime=lifetime, actor="tests"
        )
    return plaintext


def sample(
    tenant: str, site: str, machine: str, ts: float, metrics: dict[str, float], status: str = "running"
) -> TelemetryV2:
    return TelemetryV2.model_construct(
        schema_version=2,
        tenant_id=tenant,
        site_id=site,
        machine_id=machine,
        machine_type="cnc_mill",
        ts=ts,
        status=status,
        metrics=metrics,
    )


def write_points(vm_url: str, samples: Iterable[TelemetryV2], *, historical: bool = False) -> None:
    """Write the samples' points to VictoriaMetrics and make them searchable now."""
    body = "\n".join(to_line(s, {}, historical=historical) for s in samples)
    with httpx.Client(base_url=vm_url, timeout=30) as client:
        client.post("/api/v2/write", content=body).raise_for_status()
        client.get("/internal/force_flush").raise_for_status()


@contextmanager
def api_client(dsn: str, vm_url: str, **settings: Any) -> Iterator[TestClient]:
    """The app on a TestClient (its lifespan run), against this registry and store."""
    config = ApiSettings(
        registry_dsn=SecretStr(dsn), store_kind="victoriametrics", store_url=vm_url, **settings
    )
    pool = ConnectionPool(dsn, min_size=1, max_size=4, kwargs={"autocommit": True}, open=False)
    with TestClient(create_app(config, pool=pool)) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class RecordingHandler:
    """aiosmtpd handler: keeps every message the real SMTP server accepted."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    async def handle_DATA(self, _server: SMTP, _session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"


@contextmanager
def smtp_server() -> Iterator[tuple[int, RecordingHandler]]:
    """A real SMTP server on loopback: its port, and what it accepted."""
    handler, port = RecordingHandler(), free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, handler
    finally:
        controller.stop()
