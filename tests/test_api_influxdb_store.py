"""The API's InfluxDB 2.x store, as unit tests on the real influxdb-client classes.

No InfluxDB 2.x server exists on this machine: the store's query API is an *autospecced*
``QueryApi`` (every call must match the real signature) answering ``FluxTable`` objects that the
real ``FluxCsvParser`` reads from annotated CSV in InfluxDB's response format. The tenant's route
and read token come from the real registry (PostgreSQL). The tests assert which token, org and
bucket each query goes to, that the tenant is filtered in the Flux text, and how the answer is read.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest.mock import create_autospec

import psycopg
import pytest
from influxdb_client import QueryApi
from influxdb_client.client.flux_csv_parser import FluxCsvParser, FluxSerializationMode
from influxdb_client.rest import ApiException
from psycopg_pool import ConnectionPool
from pydantic import SecretStr

from api.stores import InfluxDBStore, SeriesQuery, StoreError, flux_string, series_flux
from registry.store import audit_events
from registry.tenant_routes import TenantStoreRoute, upsert_tenant_route
from tests.api_harness import seed_registry

pytestmark = pytest.mark.integration
URL = "http://influxdb.ironlink.svc.cluster.local:8086"
T = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def tables(csv: str) -> Any:
    parser = FluxCsvParser(response=io.BytesIO(csv.encode()), serialization_mode=FluxSerializationMode.tables)
    with parser as reading:
        list(reading.generator())
    return parser.table_list()


def block(result: str, kind: str, rows: list[tuple[str, str, str, Any]]) -> str:
    """One result's table in annotated CSV: rows of (time, field, machine, value)."""
    head = (
        f"#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,dateTime:RFC3339,{kind},string,string,string,string,string\n"
        "#group,false,false,true,true,false,false,true,true,true,true,true\n"
        f"#default,{result},,,,,,,,,,\n"
        ",result,table,_start,_stop,_time,_value,_field,_measurement,machine_id,site_id,tenant_id\n"
    )
    body = "".join(
        f",,0,2026-12-01T00:00:00Z,2026-12-02T00:00:00Z,{at},{value},{field},telemetry,{machine},s1,acme\n"
        for at, field, machine, value in rows
    )
    return head + body + "\n"


@pytest.fixture
def store(postgres_dsn: str) -> Any:
    seed_registry(postgres_dsn, {"acme": {"s1": {"m1": "cnc_mill"}}, "globex": {"s1": {}}})
    route = TenantStoreRoute(
        instance="influxdb", url=URL, org="acme", bucket="acme-telemetry", token=SecretStr("write-acme"),
        read_token=SecretStr("read-acme"),
    )  # fmt: skip
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        upsert_tenant_route(conn, "acme", route, actor="tests")
        upsert_tenant_route(
            conn, "globex", route.model_copy(update={"read_token": SecretStr("")}), actor="tests"
        )
        rotated = route.model_copy(update={"read_token": SecretStr("read-acme-2")})
        upsert_tenant_route(conn, "acme", rotated, actor="tests")
        upsert_tenant_route(conn, "acme", route, actor="tests")
        events = audit_events(conn, tenant_id="acme")
    assert events[-1].details["read_token_rotated"] is True
    assert all("read-acme" not in str(event.details) for event in events)
    pool = ConnectionPool(postgres_dsn, min_size=1, max_size=2, kwargs={"autocommit": True}, open=True)
    influx = InfluxDBStore(pool)
    yield influx
    influx.close()
    pool.close()


def recording(store: InfluxDBStore, answer: Any) -> Any:
    """Route the store's queries to an autospecced QueryApi that answers ``answer``."""
    api: Any = create_autospec(QueryApi, instance=True)
    api.query.return_value = answer
    store.query_api = lambda route: api  # type: ignore[method-assign]
    return api


def test_each_tenant_is_queried_with_its_own_read_token_org_and_bucket(store: InfluxDBStore) -> None:
    api = store.query_api(store.route("acme"))
    assert isinstance(api, QueryApi)
    client = api._influxdb_client  # type: ignore[attr-defined]
    assert client.token == "read-acme" and client.url == URL and client.org == "acme"
    with pytest.raises(StoreError, match="read_token"):
        store.route("globex")
    with pytest.raises(StoreError, match="no store route"):
        store.route("initech")


def test_latest_filters_the_tenant_and_reads_each_machines_newest_status(store: InfluxDBStore) -> None:
    answer = tables(block("_result", "long", [("2026-12-01T10:00:00Z", "status_code", "m1", 2)]))
    api = recording(store, answer)
    (latest,) = store.latest("acme", "s1", timedelta(hours=1))
    assert (latest.site_id, latest.machine_id, latest.status_code, latest.last_seen) == ("s1", "m1", 2, T)
    flux = api.query.call_args.args[0]
    assert api.query.call_args.kwargs == {"org": "acme"}
    assert 'r.tenant_id == "acme"' in flux and 'r.site_id == "s1"' in flux and "range(start: -3600s)" in flux


def test_series_reads_the_four_results_into_windows(store: InfluxDBStore) -> None:
    at1, at2 = "2026-12-01T10:01:00Z", "2026-12-01T10:02:00Z"
    csv = (
        block("mean", "double", [(at1, "power_kw", "m1", 5.0), (at2, "power_kw", "m1", 6.5)])
        + block("status", "long", [(at1, "status_code", "m1", 2), (at2, "status_code", "m1", 1)])
        + block("samples", "long", [(at1, "status_code", "m1", 60), (at2, "status_code", "m1", 30)])
        + block("historical", "long", [(at2, "historical", "m1", 1)])
    )
    api = recording(store, tables(csv))
    query = SeriesQuery("acme", "s1", "m1", ("power_kw",), T, T + timedelta(minutes=2), 60)
    result = store.series(query)
    first, second = result.windows
    assert (first.values, first.status_code, first.samples, first.historical) == (
        {"power_kw": 5.0},
        2,
        60,
        False,
    )
    assert (second.values, second.status_code, second.samples, second.historical) == (
        {"power_kw": 6.5},
        1,
        30,
        True,
    )
    assert result.scanned == 90 * 2  # power_kw and the status, 90 points
    flux = api.query.call_args.args[0]
    assert "range(start: 2026-12-01T10:00:00.000001Z, stop: 2026-12-01T10:02:00.000001Z)" in flux
    assert 'from(bucket: "acme-telemetry")' in flux and 'r.tenant_id == "acme"' in flux
    assert 'r.machine_id == "m1"' in flux and 'r._field == "power_kw"' in flux
    assert (
        flux.count('yield(name: "') == 4 and 'timeSrc: "_stop"' in flux and "every: 60s, offset: 0s" in flux
    )
    everything = series_flux("acme-telemetry", SeriesQuery("acme", "s1", "m1", (), T, T, 60))
    assert 'r._field != "status"' in everything and 'r._field == "power_kw"' not in everything


def test_store_refusals_become_store_errors_and_ids_never_reach_flux_unchecked(store: InfluxDBStore) -> None:
    api = recording(store, None)
    api.query.side_effect = ApiException(status=401, reason="Unauthorized")
    with pytest.raises(StoreError, match="acme"):
        store.latest("acme", None, timedelta(hours=1))
    with pytest.raises(ValueError):
        store.series(SeriesQuery("acme", "s1", "m1", ('x") |> drop(',), T, T + timedelta(minutes=1), 60))
    assert flux_string('a"b\\c${x}') == '"a\\"b\\\\c\\${x}"'
