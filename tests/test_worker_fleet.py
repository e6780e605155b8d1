"""The worker learns its machines (issue 9 item 4) and its tenants (issue 10) from the registry,
against real servers.

``python -m ingest`` starts with neither a tenant nor a machine in its settings and
``IRONLINK_REGISTRY_DSN`` set; machines are registered and removed through
``registry.provisioning``, tenants and their store routes through ``registry.store`` and
``registry.tenant_routes`` while it runs, and its PostgreSQL is stopped and started under it. The
changes it must follow within 5 s are waited for with that bound, then proven by what the store
holds, what is dead-lettered, and (for a store token, which VictoriaMetrics ignores) what a
recording proxy in front of the store saw on the wire.
"""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pydantic import SecretStr

from infra.config import PlatformConfig, parse_platform
from localdev import servers
from registry import provisioning, store, tenant_routes
from registry.migrate import apply_migrations
from registry.tenant_routes import tenant_route_for
from tests.conftest import MosquittoFactory
from tests.fixtures.ingest import (
    ACME_MILL,
    ACME_PRESS,
    ACME_PRESS_2,
    GLOBEX_MOLDER,
    WorkerProcess,
    WorkerStack,
    broker_config,
    topic,
    v1,
    v2,
    v3,
    wait_stored,
)

pytestmark = pytest.mark.integration
ACTOR = "test@fleet"
CHANGE_S = 5.0  # the bound on picking up a registry change


def two_tenants() -> PlatformConfig:
    """acme and globex; their machines are the registry's alone."""
    raw = {
        "phase": "A",
        "region": "test",
        "tenants": [
            {"id": "acme", "name": "Acme", "tier": "basic"},
            {"id": "globex", "name": "Globex", "tier": "basic"},
        ],
    }
    return parse_platform(raw, "fleet-test")


def seed(dsn: str, config: PlatformConfig, reader: str, store_url: str) -> None:
    """The tenants with their store routes, acme's site plant-1, and press-01 registered; a
    read-only role for the worker (roles are the cluster's, shared by the tests' databases: each
    test names its own)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_migrations(conn)
        store.sync_platform(conn, config, actor=ACTOR)
        for tenant in config.tenants:
            route = tenant_route_for(config, tenant, store_url, f"token-{tenant.id}-1")
            tenant_routes.upsert_tenant_route(conn, tenant.id, route, actor=ACTOR)
        provisioning.add_site(conn, "acme", "plant-1", None, actor=ACTOR)
        provisioning.add_machine(conn, *ACME_PRESS, "hydraulic_press", actor=ACTOR)
        conn.execute(f"CREATE ROLE {reader} LOGIN")
        conn.execute(f"GRANT SELECT ON machines, tenant_store_routes TO {reader}")


def fast_shutdown(postgres: servers.Server, data_dir: Path) -> None:
    """PostgreSQL's fast shutdown (SIGINT to the postmaster itself: ``runuser`` in between does
    not pass it on, and SIGTERM would wait for the worker's session to end)."""
    pid_file = data_dir / "postmaster.pid"
    if postgres.process is None or postgres.process.poll() is not None or not pid_file.exists():
        return
    os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)
    postgres.process.wait(30)


class FleetPlatform(WorkerStack):
    """Broker, store, registry and a worker that reads its fleet from the registry."""

    def __init__(
        self,
        folder: Path,
        start_mosquitto: MosquittoFactory,
        registry_dsn: str,
        env: pytest.MonkeyPatch,
        config: PlatformConfig | None = None,
    ) -> None:
        self.config = config or two_tenants()
        self.reader = f"fleet_{uuid.uuid4().hex[:12]}"
        self.registry_dsn = registry_dsn

        def start_worker(mqtt_port: int, store_url: str) -> WorkerProcess:
            seed(registry_dsn, self.config, self.reader, store_url)
            env.setenv(
                "IRONLINK_REGISTRY_DSN", registry_dsn.replace("user=postgres", f"user={self.reader}")
            )  # a secret: never in to_env()
            worker = WorkerProcess.for_platform(
                self.config, mqtt_port, store_url, folder, machines=None, from_registry=True
            )
            environment = worker.settings.to_env()
            assert not {"IRONLINK_TENANTS", "IRONLINK_STORE_URLS", "IRONLINK_REGISTRY_DSN"} & set(environment)
            return worker.start()

        super().__init__(folder, start_mosquitto, start_worker)

    def registry(self) -> psycopg.Connection:
        return psycopg.connect(self.registry_dsn, autocommit=True)

    def wait_tenants(self, tenants: list[str], timeout: float = CHANGE_S) -> None:
        servers.wait_until(
            lambda: self.worker.readiness()["fleet"]["tenants"] == tenants,
            timeout,
            f"the worker's tenants at {tenants}",
        )

    def wait_fleet(self, machines: int, timeout: float = CHANGE_S) -> None:
        servers.wait_until(
            lambda: self.worker.metric("ironlink_ingest_fleet_machines") == machines,
            timeout,
            f"the worker's fleet at {machines} machines",
        )

    def stores(self, machine: tuple[str, str, str], ts: int) -> bool:
        self.device.publish(topic(machine), v2(machine, ts))
        return ts * 1000 in wait_stored(self.store_url, machine, [ts * 1000])


@pytest.fixture
def folder(server_root: Path, request: pytest.FixtureRequest) -> Path:
    # Short: a PostgreSQL socket path must fit in 107 bytes.
    path = server_root / f"fleet-{request.node.name[5:25]}-{time.monotonic_ns()}"
    path.mkdir()
    return path


@pytest.fixture
def live(
    folder: Path, start_mosquitto: MosquittoFactory, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FleetPlatform]:
    platform = FleetPlatform(folder, start_mosquitto, postgres_dsn, monkeypatch)
    yield platform
    platform.close()


def test_the_worker_stores_registered_machines_and_follows_registrations_and_removals(
    live: FleetPlatform,
) -> None:
    ts = int(time.time()) - 60
    assert live.worker.metric("ironlink_ingest_fleet_machines") == 1
    assert live.stores(ACME_PRESS, ts), "a registered machine, though the settings hold none"

    with live.registry() as conn:
        provisioning.add_machine(conn, *ACME_PRESS_2, "hydraulic_press", actor=ACTOR)
    live.wait_fleet(2)
    assert live.stores(ACME_PRESS_2, ts), "registered while the worker runs, no restart"

    with live.registry() as conn:
        provisioning.remove_machine(conn, *ACME_PRESS, actor=ACTOR)
    live.wait_fleet(1)
    live.device.publish(topic(ACME_PRESS), v2(ACME_PRESS, ts + 1))
    ((dlq_topic, letter),) = live.dead_letters.collect(1)
    assert (dlq_topic, letter["reason"]) == (f"dlq/{topic(ACME_PRESS)}", "unknown_machine")
    assert "acme/plant-1/press-01" in letter["detail"]
    assert live.worker.metric("ironlink_ingest_fleet_reloads_total", scope="tenant") >= 2
    assert live.worker.alive()


def test_a_machine_the_registry_lacks_is_unknown_machine_in_every_schema_version(live: FleetPlatform) -> None:
    ts = int(time.time()) - 60
    live.device.publish(topic(ACME_MILL), v1(ACME_MILL, ts, S_RPM=12000.0))
    live.device.publish(topic(ACME_MILL), v2(ACME_MILL, ts + 1))
    live.device.publish(topic(ACME_MILL), v3(ACME_MILL, ts + 2, "gw-1", 1, 1))
    letters = live.dead_letters.collect(3)
    assert [letter["reason"] for _, letter in letters] == ["unknown_machine"] * 3
    assert (
        live.worker.metric("ironlink_ingest_messages_rejected_total", tenant="acme", reason="unknown_machine")
        == 3
    )
    assert live.stores(ACME_PRESS, ts), "the registered machine next to it flows on"


def test_the_worker_keeps_its_fleet_through_a_registry_outage_and_rereads_it_after(
    folder: Path, start_mosquitto: MosquittoFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PostgreSQL of its own (stopped here). After it returns, the worker's role is kept from
    logging in while a machine is registered: that notification is sent to no one, so the worker
    knows the machine only if it reads everything again once it gets back in."""
    user = servers.service_user("postgres")
    sockets = folder / "pg-sockets"
    servers.init_postgres(folder / "pg", user)
    port = servers.free_port()
    postgres = servers.postgres(folder / "pg", port, sockets, folder / "pg.log", user).start()
    dsn = f"host={sockets} port={port} user=postgres dbname=postgres"
    live = None
    try:
        live = FleetPlatform(folder, start_mosquitto, dsn, monkeypatch)
        ts = int(time.time()) - 60
        with live.registry() as conn:
            conn.execute(f"ALTER ROLE {live.reader} NOLOGIN")  # its open session stays

        fast_shutdown(postgres, folder / "pg")
        servers.wait_until(
            lambda: live.worker.metric("ironlink_ingest_registry_reachable") == 0, 20, "registry lost"
        )
        assert live.stores(ACME_PRESS, ts), "the last good copy serves while the registry is away"
        assert servers.http_ok(f"{live.worker.url}/readyz"), "the registry away is no reason to be unready"
        fleet = live.worker.readiness()["fleet"]
        assert fleet["reachable"] is False and fleet["machines"] == 1 and fleet["error"], fleet
        assert fleet["tenants"] == ["acme", "globex"], "the last good copy of the tenants too"
        assert "registry_unreachable" in live.worker.log_path.read_text()

        postgres.start()
        with live.registry() as conn:
            provisioning.add_machine(conn, *ACME_PRESS_2, "hydraulic_press", actor=ACTOR)
            conn.execute(f"ALTER ROLE {live.reader} LOGIN")
        live.wait_fleet(2, timeout=CHANGE_S + 5)  # plus the reconnect backoff (at most 5 s)
        assert live.worker.metric("ironlink_ingest_registry_reachable") == 1
        assert live.stores(ACME_PRESS_2, ts), "the machine registered while the worker was away"
        assert live.worker.metric("ironlink_ingest_registry_failures_total") >= 1
    finally:
        if live is not None:
            live.close()
        fast_shutdown(postgres, folder / "pg")


def test_the_worker_waits_for_its_first_copy_of_the_fleet_before_it_is_ready(
    folder: Path, start_mosquitto: MosquittoFactory
) -> None:
    """No registry at start: no copy, so not ready (every message would be unknown_machine)."""
    _, mqtt_port = start_mosquitto(broker_config(folder / "mosquitto"))
    worker = WorkerProcess.for_platform(two_tenants(), mqtt_port, "http://127.0.0.1:9", folder, machines=None)
    nothing_there = f"host=127.0.0.1 port={servers.free_port()} user=nobody dbname=postgres"
    env = {**os.environ, **worker.settings.to_env(), "IRONLINK_REGISTRY_DSN": nothing_there}
    with worker.log_path.open("ab") as log:
        worker.process = subprocess.Popen(
            [sys.executable, "-m", "ingest"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        servers.wait_until(lambda: "registry_unreachable" in worker.log_path.read_text(), 20, "a try")
        servers.wait_until(
            lambda: worker.alive() and servers.port_open(worker.settings.http_port), 20, "its probes"
        )
        readiness = worker.readiness()
        assert readiness["fleet"]["loaded"] is False, readiness
        assert not servers.http_ok(f"{worker.url}/readyz")
        assert servers.http_ok(f"{worker.url}/healthz"), "alive: it keeps trying"
    finally:
        worker.stop(signal.SIGTERM)


# ------------------------------------------------------------------------------------ tenants
def one_tenant() -> PlatformConfig:
    """acme alone: globex arrives at runtime, as a tenant stack would add it."""
    raw = {"phase": "A", "region": "test", "tenants": [{"id": "acme", "name": "Acme", "tier": "basic"}]}
    return parse_platform(raw, "fleet-test")


@pytest.fixture
def acme_only(
    folder: Path, start_mosquitto: MosquittoFactory, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FleetPlatform]:
    platform = FleetPlatform(folder, start_mosquitto, postgres_dsn, monkeypatch, one_tenant())
    yield platform
    platform.close()


def test_a_tenant_added_to_the_registry_is_stored_and_a_removed_one_dead_lettered_without_a_restart(
    acme_only: FleetPlatform,
) -> None:
    live, ts = acme_only, int(time.time()) - 60
    assert live.worker.readiness()["fleet"]["tenants"] == ["acme"]
    live.device.publish(topic(GLOBEX_MOLDER), v2(GLOBEX_MOLDER, ts))
    ((_, letter),) = live.dead_letters.collect(1)
    assert letter["reason"] == "unknown_tenant", "not a tenant yet"

    config = two_tenants()
    globex = config.tenant("globex")
    with live.registry() as conn:  # what globex's own stack does: its row, its route; then a machine
        store.sync_tenant(conn, globex, isolation=config.isolation_of(globex), actor=ACTOR)
        route = tenant_route_for(config, globex, live.store_url, "token-globex-1")
        assert tenant_routes.upsert_tenant_route(conn, "globex", route, actor=ACTOR)
        provisioning.add_site(conn, "globex", "line-a", None, actor=ACTOR)
        provisioning.add_machine(conn, *GLOBEX_MOLDER, "injection_molder", actor=ACTOR)
    live.wait_tenants(["acme", "globex"])
    live.wait_fleet(2)
    assert live.stores(GLOBEX_MOLDER, ts + 1), "a tenant added while the worker runs, no restart"
    assert live.worker.metric("ironlink_ingest_messages_received_total", tenant="globex") == 1
    assert live.worker.metric("ironlink_ingest_points_written_total", tenant="globex") == 1

    with live.registry() as conn:
        assert store.remove_tenant(conn, "globex", actor=ACTOR)  # its route and machines go with it
    live.wait_tenants(["acme"])
    for n in range(3):
        live.device.publish(topic(GLOBEX_MOLDER), v2(GLOBEX_MOLDER, ts + 2 + n))
    letters = live.dead_letters.collect(3)
    assert [(t, letter["reason"]) for t, letter in letters] == [
        (f"dlq/{topic(GLOBEX_MOLDER)}", "unknown_tenant")
    ] * 3
    rejected = live.worker.metric(
        "ironlink_ingest_messages_rejected_total", tenant="_unknown", reason="unknown_tenant"
    )
    assert rejected == 4, "the one before it was added and the three after it was removed"
    assert ts + 2 not in live_points(live, GLOBEX_MOLDER), "nothing of it stored after its removal"
    assert live.stores(ACME_PRESS, ts), "the other tenant flows on"
    assert live.worker.alive()


def live_points(live: FleetPlatform, machine: tuple[str, str, str]) -> set[int]:
    return {ms // 1000 for ms in wait_stored(live.store_url, machine, [], timeout=0)}


class RecordingProxy:
    """A pass-through HTTP proxy in front of the real VictoriaMetrics that records the
    ``Authorization`` header of every write: the store ignores tokens, the wire shows them."""

    def __init__(self, upstream: str) -> None:
        self.tokens: list[str] = []
        proxy = self

        class Forward(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                proxy.tokens.append(self.headers.get("Authorization", ""))
                request = urllib.request.Request(
                    upstream + self.path,
                    data=body,
                    method="POST",
                    headers={"Content-Type": self.headers.get("Content-Type", "text/plain")},
                )
                try:
                    with urllib.request.urlopen(request, timeout=10) as answer:
                        status, payload = answer.status, answer.read()
                except urllib.error.HTTPError as error:
                    status, payload = error.code, error.read()
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_token_rotated_in_the_registry_is_the_one_the_next_writes_carry(live: FleetPlatform) -> None:
    proxy = RecordingProxy(live.store_url)
    try:
        config, ts = live.config, int(time.time()) - 60
        acme = config.tenant("acme")
        with live.registry() as conn:
            route = tenant_route_for(config, acme, proxy.url, "token-acme-1")
            assert tenant_routes.upsert_tenant_route(conn, "acme", route, actor=ACTOR)
        servers.wait_until(
            lambda: live.stores(ACME_PRESS, ts) and "Token token-acme-1" in proxy.tokens,
            CHANGE_S,
            "acme written through the proxy with its first token",
        )
        with live.registry() as conn:
            rotated = route.model_copy(update={"token": SecretStr("token-acme-2")})
            assert tenant_routes.upsert_tenant_route(conn, "acme", rotated, actor=ACTOR)
            assert not tenant_routes.upsert_tenant_route(conn, "acme", rotated, actor=ACTOR), "idempotent"
            (event,) = [
                e for e in store.audit_events(conn, tenant_id="acme") if e.action == "store_route.updated"
            ][-1:]
        assert event.details["token_rotated"] is True and "token-acme" not in str(event.details)
        n = 0
        while "Token token-acme-2" not in proxy.tokens:
            n += 1
            assert n <= 20, f"the rotated token never reached the store: {sorted(set(proxy.tokens))}"
            assert live.stores(ACME_PRESS, ts + n), "stored all along the rotation"
        first_new = proxy.tokens.index("Token token-acme-2")
        assert "Token token-acme-1" not in proxy.tokens[first_new:], "once rotated, never the old one again"
        assert set(proxy.tokens) == {"Token token-acme-1", "Token token-acme-2"}
    finally:
        proxy.close()
