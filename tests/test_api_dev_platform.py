"""``ironlink dev`` runs the Ironlink API: the real process on its loopback port, shown by
``ironlink dev status``, answering its probes and refusing a request without a key.

Shares the session's dev platform (``tests/conftest.py``), hence the xdist group.
"""

from __future__ import annotations

import json

import httpx
import psycopg
import pytest

from localdev.demo import api_answers_each_tenant
from tests.conftest import DevPlatformHandle

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("devplatform")]


def test_ironlink_dev_runs_the_api_and_status_shows_it_listening(dev_platform: DevPlatformHandle) -> None:
    dev_platform.ensure_up()
    status = json.loads(dev_platform.cli("dev", "status", "--json").stdout)
    (api,) = [p for p in status["processes"] if p["name"] == "api"]
    port = dev_platform.platform.ports.api
    assert api["alive"] and api["listening"] and api["port"] == port, api
    worker = next(p for p in status["processes"] if p["name"] == "ingest")
    assert api["user"] == worker["user"], "the API runs as the project's other Python services"

    with httpx.Client(base_url=dev_platform.platform.api_url, timeout=10) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")  # the registry over the dev platform's socket
        assert (ready.status_code, ready.json()) == (200, {"status": "ok"})
        refused = client.get("/v1/sites")
        assert refused.status_code == 401, refused.text


def test_the_demos_api_step_sees_each_tenants_machines_with_its_own_key(
    dev_platform: DevPlatformHandle,
) -> None:
    """``make demo``'s last step: one key per tenant, exactly that tenant's machines, keys revoked."""
    dev_platform.ensure_up()
    platform = dev_platform.platform
    fleet = {(tenant_id, site.id, machine.id) for tenant_id, site, machine in platform.fleet.machines()}
    assert len({tenant for tenant, _, _ in fleet}) >= 2, "the dev fleet has two tenants to keep apart"
    assert api_answers_each_tenant(platform, fleet)
    with psycopg.connect(platform.registry_dsn()) as conn:
        (live,) = conn.execute(
            "SELECT count(*) FROM api_keys WHERE label = 'make demo' AND revoked_at IS NULL"
        ).fetchone() or (None,)
    assert live == 0, "the demo's keys are revoked once used"
