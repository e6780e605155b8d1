"""The worker's copy of the fleet and of its tenants, kept equal to the registry's while it runs.

One thread: connect, ``LISTEN ironlink_fleet`` (``registry/fleet.py``) and
``ironlink_tenant_routes`` (``registry/tenant_routes.py``), read every machine and every tenant's
store route, hand both maps over (routes to the store and the pipeline, machines to the
pipeline); then on each notification re-read the tenants it names on its channel and hand over
a new map. The pipeline reads its map on every message, so a map is never changed once handed
over: each change builds a new dict and replaces the reference (one atomic store). Every
``poll_s`` everything is read again, for a notification lost on the way (a pooler that drops
LISTEN) and as a check that the connection still answers.

The registry going away costs nothing but freshness: the worker keeps its last good copy, logs
``registry_unreachable``, sets ``ironlink_ingest_registry_reachable`` to 0 and says so in
``/readyz`` (still ready), and reconnects with backoff. Notifications sent while it was away are
lost, so a reconnect reads everything again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from registry import fleet as registry_fleet
from registry import tenant_routes
from registry.fleet import MachineTypes
from registry.tenant_routes import TenantStoreRoutes

log = structlog.get_logger("ingest.fleet")
NOTIFY_WAIT_S = 0.5
"""Longest wait for notifications before looking at the clock and the stop flag."""
RECONNECT_INITIAL_S = 0.5
RECONNECT_MAX_S = 5.0
CONNECT_TIMEOUT_S = 5
WHOLE_RELOAD_TENANTS = 16
"""More tenants changed at once than this: one query for everything beats one per tenant."""


class FleetMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.machines = Gauge(
            "ironlink_ingest_fleet_machines",
            "Machines in the worker's copy of the registry",
            registry=registry,
        )
        self.reachable = Gauge(
            "ironlink_ingest_registry_reachable",
            "1 while the worker listens to the registry's fleet changes",
            registry=registry,
        )
        self.reloads = Counter(
            "ironlink_ingest_fleet_reloads",
            "Fleet copies replaced: scope all (start, reconnect, poll) or tenant (a notification)",
            ["scope"],
            registry=registry,
        )
        self.tenants = Gauge(
            "ironlink_ingest_tenants",
            "Tenants with a store route in the worker's copy of the registry",
            registry=registry,
        )
        self.tenant_reloads = Counter(
            "ironlink_ingest_tenant_routes_reloads",
            "Tenant directories replaced: scope all (start, reconnect, poll) or tenant (a notification)",
            ["scope"],
            registry=registry,
        )
        self.failures = Counter(
            "ironlink_ingest_registry_failures",
            "Registry connections lost or refused (each followed by a reconnect with backoff)",
            registry=registry,
        )


class Fleet:
    """Follows the registry's machines and tenants, and calls ``apply`` with each new machine map
    and ``apply_tenants`` with each new tenant directory (from its thread)."""

    def __init__(
        self,
        dsn: str,
        poll_s: float,
        apply: Callable[[MachineTypes], None],
        registry: CollectorRegistry,
        apply_tenants: Callable[[TenantStoreRoutes], None] | None = None,
    ) -> None:
        self._dsn = dsn
        self._poll_s = poll_s
        self._apply = apply
        self._apply_tenants = apply_tenants
        self._machines: MachineTypes = {}
        self._tenants: TenantStoreRoutes = {}
        self.metrics = FleetMetrics(registry)
        self.metrics.machines.set_function(lambda: len(self._machines))
        self.metrics.tenants.set_function(lambda: len(self._tenants))
        self.loaded = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet", daemon=True)
        self._loaded_at: float | None = None
        self._unreachable_since: float | None = None
        self._error: str | None = None

    def start(self) -> Fleet:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wait_loaded(self, timeout: float) -> bool:
        """True once the first copy is in the pipeline (the worker takes no delivery before)."""
        return self.loaded.wait(timeout)

    def detail(self) -> dict[str, Any]:
        """Readiness detail: how many machines, since when, and whether the registry answers."""
        return {
            "loaded": self.loaded.is_set(),
            "machines": len(self._machines),
            "tenants": sorted(self._tenants),
            "loaded_at": None if self._loaded_at is None else round(self._loaded_at, 3),
            "reachable": self._unreachable_since is None and self.loaded.is_set(),
            "unreachable_since": None
            if self._unreachable_since is None
            else round(self._unreachable_since, 3),
            "error": self._error,
        }

    # ------------------------------------------------------------------------------ the thread
    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                # TCP keepalives: a registry that vanishes without closing the connection is
                # noticed within ~25 s.
                with psycopg.connect(
                    self._dsn,
                    autocommit=True,
                    connect_timeout=CONNECT_TIMEOUT_S,
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                    keepalives_count=3,
                ) as conn:
                    registry_fleet.listen(conn)  # before reading: no change can fall in between
                    if self._apply_tenants is not None:
                        tenant_routes.listen(conn)
                        self._replace_tenants(tenant_routes.tenant_routes(conn), "all")
                    self._replace(registry_fleet.machine_types(conn), "all")
                    self._reached()
                    attempt = 0
                    self._follow(conn)
            except psycopg.Error as error:
                self._unreachable(error, attempt)
                self._stop.wait(min(RECONNECT_MAX_S, RECONNECT_INITIAL_S * 2**attempt))
                attempt += 1

    def _follow(self, conn: psycopg.Connection) -> None:
        """Re-read what each notification names until the connection fails or the worker stops."""
        whole_at = time.monotonic() + self._poll_s
        while not self._stop.is_set():
            notes = list(conn.notifies(timeout=NOTIFY_WAIT_S))
            tenants = {note.payload for note in notes if note.channel == registry_fleet.FLEET_CHANNEL}
            routed = {note.payload for note in notes if note.channel == tenant_routes.TENANT_ROUTES_CHANNEL}
            whole = time.monotonic() >= whole_at
            if self._apply_tenants is not None and (whole or routed):
                self._follow_tenants(conn, routed, whole)
            if whole or "" in tenants or len(tenants) > WHOLE_RELOAD_TENANTS:
                self._replace(registry_fleet.machine_types(conn), "all")
                whole_at = time.monotonic() + self._poll_s
            elif tenants:
                fresh = {key: kind for key, kind in self._machines.items() if key[0] not in tenants}
                for tenant in tenants:
                    fresh.update(registry_fleet.machine_types(conn, tenant))
                self._replace(fresh, "tenant", sorted(tenants))

    def _follow_tenants(self, conn: psycopg.Connection, changed: set[str], whole: bool) -> None:
        """Routes are a row per tenant: re-read the tenants named (or all of them)."""
        if whole or "" in changed or len(changed) > WHOLE_RELOAD_TENANTS:
            self._replace_tenants(tenant_routes.tenant_routes(conn), "all")
            return
        fresh = {tenant: route for tenant, route in self._tenants.items() if tenant not in changed}
        for tenant in changed:
            fresh.update(tenant_routes.tenant_routes(conn, tenant))
        self._replace_tenants(fresh, "tenant")

    def _replace_tenants(self, routes: TenantStoreRoutes, scope: str) -> None:
        assert self._apply_tenants is not None
        before = self._tenants
        self._tenants = routes
        self._apply_tenants(routes)
        self.metrics.tenant_reloads.labels(scope).inc()
        added, removed = sorted(routes.keys() - before.keys()), sorted(before.keys() - routes.keys())
        changed = sorted(t for t in routes.keys() & before.keys() if routes[t] != before[t])
        if added or removed or changed:
            # Tenant ids only: a route holds a token.
            log.info("tenants_changed", added=added, removed=removed, changed=changed, tenants=len(routes))
        if not routes and (before or scope == "all"):
            log.warning(
                "no_tenants", note="the registry holds no store route: every message is unknown_tenant"
            )

    def _replace(self, machines: MachineTypes, scope: str, tenants: list[str] | None = None) -> None:
        before = len(self._machines)
        self._machines = machines
        self._apply(machines)
        self._loaded_at = time.time()
        self.metrics.reloads.labels(scope).inc()
        if not self.loaded.is_set():
            self.loaded.set()
            log.info("fleet_loaded", machines=len(machines))
        elif scope == "tenant" or len(machines) != before:
            log.info("fleet_changed", machines=len(machines), was=before, scope=scope, tenants=tenants)

    def _reached(self) -> None:
        if self._unreachable_since is not None:
            log.info("registry_reachable", away_s=round(time.time() - self._unreachable_since, 1))
        self._unreachable_since, self._error = None, None
        self.metrics.reachable.set(1)

    def _unreachable(self, error: psycopg.Error, attempt: int) -> None:
        self._error = f"{type(error).__name__}: {str(error).strip()[:300]}"
        if self._unreachable_since is None:
            self._unreachable_since = time.time()
        self.metrics.reachable.set(0)
        self.metrics.failures.inc()
        log.warning(
            "registry_unreachable",
            error=self._error,
            attempt=attempt,
            machines_kept=len(self._machines),
            tenants_kept=len(self._tenants),
            note="working from the last good copy" if self.loaded.is_set() else "no copy yet: not ready",
        )
