"""The telemetry store behind the API: one query interface (:class:`TelemetryStore`) and its
VictoriaMetrics and InfluxDB 2.x implementations.

Every query is bound to the caller's tenant by the server, never by the request: VictoriaMetrics
(one shared store) gets a ``tenant_id`` label filter on every selector; InfluxDB is queried with
the tenant's own read token, org and bucket from its registry route (``tenant_store_routes``), and
a ``tenant_id`` filter as well. Ids reach the query text only after the API validated them as DNS
labels, metric names as ``[a-z][a-z0-9_]*``.

Downsampling happens in the store: a point at ``ts`` summarises ``(ts - step, ts]``: each metric
averaged, ``status_code`` its maximum (the worst status in the window), ``samples`` how many
telemetry points fell in it, ``historical`` whether any of them was backfilled from an edge
gateway's history. Windows with no sample have no point.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import httpx
from psycopg_pool import ConnectionPool

from api.settings import ApiSettings
from ingest.points import HISTORICAL_FIELD, MEASUREMENT
from registry.tenant_routes import TenantStoreRoute, tenant_routes

STATUS_FIELD = "status_code"

STATUS_TEXT_FIELD = "status"
"""The string field ``status``; VictoriaMetrics keeps a meaningless 0 series of it."""
_SAFE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


_NOT_METRICS = f"{STATUS_FIELD}|{HISTORICAL_FIELD}|{STATUS_TEXT_FIELD}"


class StoreError(RuntimeError):
    """The store did not answer as expected; the message says which and why (the API answers 502)."""


@dataclass(frozen=True)
class Latest:
    """A machine's newest status in the store."""

    site_id: str
    machine_id: str
    status_code: int
    last_seen: datetime


@dataclass(frozen=True)
class SeriesQuery:
    """One machine's points in ``(start, end]`` at ``step`` seconds."""

    tenant_id: str
    site_id: str
    machine_id: str
    metrics: tuple[str, ...]
    """Metric names; empty: every metric the machine has."""
    start: datetime
    end: datetime
    step_s: int


@dataclass
class Window:
    """One downsampled point: the window ``(ts - step, ts]``."""

    ts: datetime
    values: dict[str, float] = field(default_factory=dict)
    status_code: int | None = None
    samples: int = 0
    historical: bool = False


@dataclass(frozen=True)
class SeriesResult:
    windows: list[Window]
    scanned: int
    """Samples the store read (every field of every point in range): what the rate limit charges."""


@dataclass(frozen=True)
class StatusQuery:
    """The last ``status_code`` per machine and bucket of ``step_s`` seconds, for the buckets
    ending (epoch-aligned) from ``first_end`` to ``last_end``: what uptime is counted from."""

    tenant_id: str
    site_id: str | None
    machine_ids: tuple[str, ...]
    """Empty: every machine of the tenant (or site)."""
    first_end: int
    last_end: int
    step_s: int


@dataclass(frozen=True)
class StatusBuckets:
    reports: dict[tuple[str, str], dict[int, int]]
    """(site, machine) -> bucket end (epoch seconds) -> the last status_code reported in it."""
    scanned: int


class TelemetryStore(Protocol):
    def latest(
        self, tenant_id: str, site_id: str | None, lookback: timedelta, machine_id: str | None = None
    ) -> list[Latest]:
        """The newest status of every machine of the tenant (or of one site, or one machine) seen
        within ``lookback``."""
        ...

    def series(self, query: SeriesQuery) -> SeriesResult: ...

    def status_buckets(self, query: StatusQuery) -> StatusBuckets: ...

    def close(self) -> None: ...


def _checked(*names: str) -> None:
    """Refuse anything that is not an id or metric name before it reaches query text."""
    for name in names:
        if not _SAFE.match(name):
            raise ValueError(f"{name!r} is not an id or metric name")


def _collect(windows: dict[float, Window], at: float, kind: str, name: str, value: float) -> None:
    window = windows.setdefault(at, Window(ts=datetime.fromtimestamp(at, UTC)))
    if kind == "mean":
        window.values[name] = value
    elif kind == "status":
        window.status_code = int(value)
    elif kind == "samples":
        window.samples = int(value)
    elif kind == "historical":
        window.historical = value >= 1


def _result(windows: dict[float, Window], metrics_seen: int) -> SeriesResult:
    ordered = [windows[at] for at in sorted(windows) if windows[at].samples > 0]
    return SeriesResult(ordered, sum(w.samples for w in ordered) * max(1, metrics_seen + 1))


# ---------------------------------------------------------------------------------- VictoriaMetrics
class VictoriaMetricsStore:
    """VictoriaMetrics' Prometheus API (``/api/v1/query``, ``/api/v1/query_range``), where each field
    of the ``telemetry`` measurement is the series ``telemetry_<field>`` with the point's tags."""

    def __init__(self, base_url: str, *, timeout_s: float = 10.0, client: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = client or httpx.Client(timeout=timeout_s)

    def _get(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        url = f"{self.base_url}{path}"
        try:
            response = self._client.get(url, params=params)
        except httpx.HTTPError as error:
            raise StoreError(f"VictoriaMetrics {url}: {error}") from error
        if response.status_code != 200:
            raise StoreError(f"VictoriaMetrics {url}: HTTP {response.status_code}: {response.text[:300]}")
        result: list[dict[str, Any]] = response.json()["data"]["result"]
        return result

    @staticmethod
    def selector(tenant_id: str, site_id: str | None = None, machine_id: str | None = None) -> str:
        """The label filter every query carries: the tenant always, site and machine when given."""
        labels = {"tenant_id": tenant_id, "site_id": site_id, "machine_id": machine_id}
        _checked(*(value for value in labels.values() if value is not None))
        return ",".join(f'{name}="{value}"' for name, value in labels.items() if value is not None)

    def latest(
        self, tenant_id: str, site_id: str | None, lookback: timedelta, machine_id: str | None = None
    ) -> list[Latest]:
        where = self.selector(tenant_id, site_id, machine_id)
        status = f"{MEASUREMENT}_{STATUS_FIELD}{{{where}}}[{int(lookback.total_seconds())}s]"
        query = (
            f'union(label_set(last_over_time({status}), "ironlink_value", "status"),'
            f' label_set(tlast_over_time({status}), "ironlink_value", "seen"))'
        )
        found: dict[tuple[str, str], dict[str, float]] = {}
        for item in self._get("/api/v1/query", {"query": query, "nocache": "1"}):
            labels = item["metric"]
            key = (labels["site_id"], labels["machine_id"])
            found.setdefault(key, {})[labels["ironlink_value"]] = float(item["value"][1])
        return [
            Latest(site, machine, int(values["status"]), datetime.fromtimestamp(values["seen"], UTC))
            for (site, machine), values in sorted(found.items())
            if {"status", "seen"} <= values.keys()
        ]

    def series(self, query: SeriesQuery) -> SeriesResult:
        where = self.selector(query.tenant_id, query.site_id, query.machine_id)
        _checked(*query.metrics)
        names = "|".join(query.metrics) if query.metrics else ".+"
        window = f"[{query.step_s}s]"
        means = (
            f'{{__name__=~"{MEASUREMENT}_({names})",__name__!~"{MEASUREMENT}_({_NOT_METRICS})",'
            f"{where}}}{window}"
        )
        status = f"{MEASUREMENT}_{STATUS_FIELD}{{{where}}}{window}"
        historical = f"{MEASUREMENT}_{HISTORICAL_FIELD}{{{where}}}{window}"
        expression = (
            f'union(label_set(avg_over_time({means}) keep_metric_names, "ironlink_value", "mean"),'
            f' label_set(max_over_time({status}), "ironlink_value", "status"),'
            f' label_set(count_over_time({status}), "ironlink_value", "samples"),'
            f' label_set(max_over_time({historical}), "ironlink_value", "historical"))'
        )
        params = {
            "query": expression,
            "start": f"{query.start.timestamp() + query.step_s:.3f}",
            "end": f"{query.end.timestamp():.3f}",
            "step": f"{query.step_s}s",
            "nocache": "1",
        }
        windows: dict[float, Window] = {}
        metrics_seen: set[str] = set()
        prefix = f"{MEASUREMENT}_"
        for item in self._get("/api/v1/query_range", params):
            kind = item["metric"]["ironlink_value"]
            name = item["metric"].get("__name__", "").removeprefix(prefix)
            if kind == "mean":
                metrics_seen.add(name)
            for at, value in item["values"]:
                _collect(windows, float(at), kind, name, float(value))
        return _result(windows, len(metrics_seen))

    def status_buckets(self, query: StatusQuery) -> StatusBuckets:
        where = self.selector(query.tenant_id, query.site_id)
        _checked(*query.machine_ids)
        if query.machine_ids:
            where += f',machine_id=~"{"|".join(query.machine_ids)}"'
        status = f"{MEASUREMENT}_{STATUS_FIELD}{{{where}}}"
        params = {
            "query": f"max by (site_id, machine_id) (last_over_time({status}[{query.step_s}s]))",
            "start": str(query.first_end),
            "end": str(query.last_end),
            "step": f"{query.step_s}s",
            "nocache": "1",
        }
        reports: dict[tuple[str, str], dict[int, int]] = {}
        for item in self._get("/api/v1/query_range", params):
            labels = item["metric"]
            buckets = reports.setdefault((labels["site_id"], labels["machine_id"]), {})
            buckets.update((int(at), int(float(value))) for at, value in item["values"])
        # What was scanned, counted by the store in one number rather than per bucket (half the answer).
        window = query.last_end - query.first_end + query.step_s
        counted = self._get(
            "/api/v1/query",
            {
                "query": f"sum(count_over_time({status}[{window}s]))",
                "time": str(query.last_end),
                "nocache": "1",
            },
        )
        scanned = int(float(counted[0]["value"][1])) if counted else 0
        return StatusBuckets(reports, scanned)

    def close(self) -> None:
        self._client.close()


# -------------------------------------------------------------------------------------- InfluxDB 2.x
def flux_string(text: str) -> str:
    """A Flux string literal (JSON's escaping is Flux's for quotes, backslashes and controls)."""
    return json.dumps(text).replace("${", "\\${")


def _flux_time(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _filter(tenant_id: str, site_id: str | None, machine_id: str | None) -> str:
    clauses = [f"r._measurement == {flux_string(MEASUREMENT)}", f"r.tenant_id == {flux_string(tenant_id)}"]
    if site_id is not None:
        clauses.append(f"r.site_id == {flux_string(site_id)}")
    if machine_id is not None:
        clauses.append(f"r.machine_id == {flux_string(machine_id)}")
    return " and ".join(clauses)


def latest_flux(
    bucket: str, tenant_id: str, site_id: str | None, lookback: timedelta, machine_id: str | None = None
) -> str:
    """Each machine's newest ``status_code`` (its time is when it was last seen)."""
    return (
        f"from(bucket: {flux_string(bucket)})\n"
        f"  |> range(start: -{int(lookback.total_seconds())}s)\n"
        f"  |> filter(fn: (r) => {_filter(tenant_id, site_id, machine_id)}"
        f" and r._field == {flux_string(STATUS_FIELD)})\n"
        '  |> group(columns: ["site_id", "machine_id"])\n'
        "  |> last()\n"
    )


def series_flux(bucket: str, query: SeriesQuery) -> str:
    """Four results of one machine's windows over ``(start, end]`` (a microsecond past each bound:
    Flux ranges include their start), each window stamped with its end and aligned on ``start``
    (``offset``), as VictoriaMetrics' are: ``mean`` per metric, ``status`` (max), ``samples``
    (count of status_code), ``historical`` (max)."""
    where = _filter(query.tenant_id, query.site_id, query.machine_id)
    not_metrics = " and ".join(
        f"r._field != {flux_string(name)}" for name in (STATUS_FIELD, HISTORICAL_FIELD, STATUS_TEXT_FIELD)
    )
    if query.metrics:
        chosen = " or ".join(f"r._field == {flux_string(name)}" for name in query.metrics)
        not_metrics += f" and ({chosen})"
    tick = timedelta(microseconds=1)
    offset = int(query.start.timestamp()) % query.step_s
    base = (
        f"data = from(bucket: {flux_string(bucket)})\n"
        f"  |> range(start: {_flux_time(query.start + tick)}, stop: {_flux_time(query.end + tick)})\n"
        f"  |> filter(fn: (r) => {where})\n"
    )

    def one(name: str, field_filter: str, fn: str) -> str:
        return (
            f"data\n  |> filter(fn: (r) => {field_filter})\n"
            f"  |> aggregateWindow(every: {query.step_s}s, offset: {offset}s, fn: {fn}, createEmpty: false,"
            ' timeSrc: "_stop")\n'
            f'  |> yield(name: "{name}")\n'
        )

    status = f"r._field == {flux_string(STATUS_FIELD)}"
    historical = f"r._field == {flux_string(HISTORICAL_FIELD)}"
    return "\n".join(
        [
            base,
            one("mean", not_metrics, "mean"),
            one("status", status, "max"),
            one("samples", status, "count"),
            one("historical", historical, "max"),
        ]
    )


def status_flux(bucket: str, query: StatusQuery) -> str:
    """Two results per series: ``status`` (the last status_code of each window) and ``samples``
    (how many). Windows and range are a microsecond late (Flux's include their start), so a
    window is ``(e - step, e]`` like VictoriaMetrics' bucket, stamped ``e`` + 1 µs (read as ``e``).
    Not regrouped: each series' table is in time order, which ``last`` relies on."""
    where = _filter(query.tenant_id, query.site_id, None)
    if query.machine_ids:
        machines = ", ".join(map(flux_string, query.machine_ids))
        where += f" and contains(value: r.machine_id, set: [{machines}])"
    tick = timedelta(microseconds=1)
    start = datetime.fromtimestamp(query.first_end - query.step_s, UTC) + tick
    stop = datetime.fromtimestamp(query.last_end, UTC) + tick
    every = f"{query.step_s}s"
    data = (
        f"data = from(bucket: {flux_string(bucket)})\n"
        f"  |> range(start: {_flux_time(start)}, stop: {_flux_time(stop)})\n"
        f"  |> filter(fn: (r) => {where} and r._field == {flux_string(STATUS_FIELD)})\n"
    )
    results = [
        f"data\n  |> aggregateWindow(every: {every}, offset: 1us, fn: {fn}, createEmpty: false,"
        ' timeSrc: "_stop")\n'
        f'  |> yield(name: "{name}")\n'
        for name, fn in (("status", "last"), ("samples", "count"))
    ]
    return "\n".join([data, *results])


class FluxTables(Protocol):
    """What :class:`InfluxDBStore` needs of ``influxdb_client.QueryApi``: ``query(flux, org=...)``."""

    def query(self, query: str, org: str | None = ...) -> Any: ...


class InfluxDBStore:
    """InfluxDB 2.x over Flux: each tenant queried with its route's URL, org, bucket and read token
    (from the registry, cached ``route_ttl_s``). A tenant without a read token is refused."""

    def __init__(self, pool: ConnectionPool, *, timeout_s: float = 10.0, route_ttl_s: float = 30.0) -> None:
        self._pool, self._timeout_ms, self._ttl = pool, int(timeout_s * 1000), route_ttl_s
        self._routes: dict[str, tuple[float, TenantStoreRoute]] = {}
        self._clients: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def route(self, tenant_id: str) -> TenantStoreRoute:
        now = time.monotonic()
        with self._lock:
            cached = self._routes.get(tenant_id)
        if cached is not None and now - cached[0] < self._ttl:
            return cached[1]
        with self._pool.connection() as conn:
            route = tenant_routes(conn, tenant_id).get(tenant_id)
        if route is None:
            raise StoreError(f"tenant {tenant_id!r} has no store route in the registry")
        if not route.read_token.get_secret_value():
            raise StoreError(f"tenant {tenant_id!r} has no store read token in the registry (read_token)")
        with self._lock:
            self._routes[tenant_id] = (now, route)
        return route

    def query_api(self, route: TenantStoreRoute) -> FluxTables:
        """One client per URL and read token (a rotated token gets a new one)."""
        from influxdb_client import InfluxDBClient

        key = (route.url, route.read_token.get_secret_value())
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = InfluxDBClient(url=route.url, token=key[1], org=route.org, timeout=self._timeout_ms)
                self._clients[key] = client
        api: FluxTables = client.query_api()
        return api

    def _tables(self, tenant_id: str, flux_for: Any) -> Iterable[Any]:
        from influxdb_client.rest import ApiException

        route = self.route(tenant_id)
        try:
            tables: Iterable[Any] = self.query_api(route).query(flux_for(route.bucket), org=route.org)
        except (ApiException, OSError) as error:
            raise StoreError(f"InfluxDB {route.url} (tenant {tenant_id!r}): {error}") from error
        return tables

    def latest(
        self, tenant_id: str, site_id: str | None, lookback: timedelta, machine_id: str | None = None
    ) -> list[Latest]:
        def flux(bucket: str) -> str:
            return latest_flux(bucket, tenant_id, site_id, lookback, machine_id)

        tables = self._tables(tenant_id, flux)
        found = [
            Latest(r.values["site_id"], r.values["machine_id"], int(r.get_value()), r.get_time())
            for table in tables
            for r in table.records
        ]
        return sorted(found, key=lambda latest: (latest.site_id, latest.machine_id))

    def series(self, query: SeriesQuery) -> SeriesResult:
        _checked(*query.metrics)
        tables = self._tables(query.tenant_id, lambda bucket: series_flux(bucket, query))
        windows: dict[float, Window] = {}
        metrics_seen: set[str] = set()
        for table in tables:
            for record in table.records:
                kind, name = record.values["result"], record.get_field()
                if kind == "mean":
                    metrics_seen.add(name)
                _collect(windows, record.get_time().timestamp(), kind, name, float(record.get_value()))
        return _result(windows, len(metrics_seen))

    def status_buckets(self, query: StatusQuery) -> StatusBuckets:
        _checked(*query.machine_ids)
        tables = self._tables(query.tenant_id, lambda bucket: status_flux(bucket, query))
        reports: dict[tuple[str, str], dict[int, int]] = {}
        scanned = 0
        for table in tables:
            for record in table.records:
                if record.values["result"] == "samples":
                    scanned += int(record.get_value())
                    continue
                key = (record.values["site_id"], record.values["machine_id"])
                reports.setdefault(key, {})[int(record.get_time().timestamp())] = int(record.get_value())
        return StatusBuckets(reports, scanned)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


def open_store(settings: ApiSettings, pool: ConnectionPool) -> TelemetryStore:
    """The store ``settings`` name (``store_kind``)."""
    if settings.store_kind == "influxdb":
        return InfluxDBStore(pool, timeout_s=settings.store_timeout_s)
    settings.require_store()
    assert settings.store_url is not None
    return VictoriaMetricsStore(settings.store_url, timeout_s=settings.store_timeout_s)


def latest_by_machine(found: Iterable[Latest]) -> Mapping[tuple[str, str], Latest]:
    return {(latest.site_id, latest.machine_id): latest for latest in found}
