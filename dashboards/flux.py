"""Flux queries on one tenant's bucket, and the Grafana query object that carries them.

The grafana-foundation-sdk has no InfluxDB query type, so :class:`FluxQuery` is the SDK's own
extension point (a ``Builder`` of a ``Dataquery``) that serializes the InfluxDB datasource's Flux
query model (``refId``, ``query``, ``datasource``). The query texts are pure functions of the
tenant's :class:`~infra.tenancy.StoreRoute` and the worker's point shape (:mod:`ingest.points`):
measurement ``telemetry``, tags ``tenant_id, site_id, machine_id, machine_type``, a field per
canonical metric, ``status_code`` (0 stopped, 1 running, 2 fault) and the derived metrics. Every
query reads only the bucket it is given and also filters on the tenant's tag.
"""

from __future__ import annotations

import json
from typing import Any, Self

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models.dashboard import DataSourceRef

from ingest.points import MEASUREMENT

DATASOURCE_TYPE = "influxdb"
STATUS_FIELD = "status_code"
MESSAGES_PER_POINT_FIELD = STATUS_FIELD  # every point carries exactly one status_code
SITE_VARIABLE, MACHINE_VARIABLE = "site", "machine"
# Grafana fills these from the dashboard's (or alert rule's) time range.
DASHBOARD_RANGE = "range(start: v.timeRangeStart, stop: v.timeRangeStop)"


def datasource_ref(uid: str) -> DataSourceRef:
    return DataSourceRef(type_val=DATASOURCE_TYPE, uid=uid)


class FluxDataquery(cogvariants.Dataquery):
    """The InfluxDB datasource's query model in Flux mode."""

    def __init__(self, ref_id: str, query: str, datasource: DataSourceRef) -> None:
        self.ref_id, self.query, self.datasource = ref_id, query, datasource

    def to_json(self) -> dict[str, Any]:
        return {"refId": self.ref_id, "query": self.query, "datasource": self.datasource.to_json()}


class FluxQuery(cogbuilder.Builder[cogvariants.Dataquery]):
    def __init__(self, query: str, datasource_uid: str) -> None:
        self._query, self._datasource, self._ref_id = query, datasource_ref(datasource_uid), "A"

    def ref_id(self, ref_id: str) -> Self:
        self._ref_id = ref_id
        return self

    def build(self) -> FluxDataquery:
        return FluxDataquery(self._ref_id, self._query, self._datasource)


def literal(value: str) -> str:
    """A Flux string literal (JSON's escapes are Flux's for these characters)."""
    return json.dumps(value)


def telemetry(bucket: str, tenant_id: str, *, time_range: str = DASHBOARD_RANGE, predicate: str = "") -> str:
    """The tenant's telemetry points in ``bucket``; ``predicate`` narrows them further (Flux)."""
    condition = tenant_points(tenant_id)
    if predicate:
        condition += f" and {predicate}"
    return f"from(bucket: {literal(bucket)})\n  |> {time_range}\n  |> filter(fn: (r) => {condition})"


def tenant_points(tenant_id: str) -> str:
    return f"r._measurement == {literal(MEASUREMENT)} and r.tenant_id == {literal(tenant_id)}"


def field_is(name: str) -> str:
    return f"r._field == {literal(name)}"


def selected_machine(machine_type: str) -> str:
    """The machine picked in a drilldown's variables."""
    return (
        f"r.machine_type == {literal(machine_type)} and r.site_id == {literal('${' + SITE_VARIABLE + '}')}"
        f" and r.machine_id == {literal('${' + MACHINE_VARIABLE + '}')}"
    )


# ----------------------------------------------------------------------------- fleet overview
def latest_status(bucket: str, tenant_id: str) -> str:
    """One row per machine: site, machine, type, last status code and when it was seen."""
    return (
        telemetry(bucket, tenant_id, predicate=field_is(STATUS_FIELD))
        + "\n  |> last()"
        + '\n  |> keep(columns: ["site_id", "machine_id", "machine_type", "_value", "_time"])'
        + "\n  |> group()"
        + '\n  |> sort(columns: ["site_id", "machine_id"])'
    )


def machines_reporting(bucket: str, tenant_id: str) -> str:
    """How many machines sent at least one message in the time range."""
    return (
        telemetry(bucket, tenant_id, predicate=field_is(STATUS_FIELD))
        + "\n  |> last()\n  |> group()\n  |> count()"
    )


def message_rate(bucket: str, tenant_id: str, every: str = "1m") -> str:
    """Messages per second of the whole tenant, per ``every`` window (one point per message)."""
    seconds = _seconds(every)
    return (
        telemetry(bucket, tenant_id, predicate=field_is(MESSAGES_PER_POINT_FIELD))
        + "\n  |> group()"
        + f"\n  |> aggregateWindow(every: {every}, fn: count, createEmpty: true)"
        + f"\n  |> map(fn: (r) => ({{r with _value: float(v: r._value) / {seconds}.0}}))"
    )


def status_history(bucket: str, tenant_id: str, predicate: str = "") -> str:
    """Status code per machine over time (a state timeline)."""
    where = field_is(STATUS_FIELD) + (f" and {predicate}" if predicate else "")
    return (
        telemetry(bucket, tenant_id, predicate=where)
        + "\n  |> aggregateWindow(every: v.windowPeriod, fn: last, createEmpty: false)"
        + '\n  |> keep(columns: ["_time", "_value", "site_id", "machine_id"])'
    )


def field_latest(bucket: str, tenant_id: str, field: str, predicate: str = "") -> str:
    """The last value of ``field`` per machine (``uptime_pct``, ``status_code``...)."""
    where = field_is(field) + (f" and {predicate}" if predicate else "")
    return (
        telemetry(bucket, tenant_id, predicate=where)
        + "\n  |> last()"
        + '\n  |> keep(columns: ["_value", "site_id", "machine_id"])'
    )


# -------------------------------------------------------------------------------- drilldown
def metric_series(bucket: str, tenant_id: str, machine_type: str, metric: str) -> str:
    """One metric of the selected machine, averaged per panel interval."""
    return (
        telemetry(bucket, tenant_id, predicate=f"{field_is(metric)} and {selected_machine(machine_type)}")
        + "\n  |> aggregateWindow(every: v.windowPeriod, fn: mean, createEmpty: false)"
        + '\n  |> keep(columns: ["_time", "_value", "_field"])'
    )


def tag_values(bucket: str, tenant_id: str, tag: str, predicate: str, lookback: str = "-30d") -> str:
    """Values of ``tag`` among the tenant's points (a dashboard variable's options)."""
    condition = f"{tenant_points(tenant_id)} and {predicate}"
    return (
        'import "influxdata/influxdb/schema"\n'
        f"schema.tagValues(bucket: {literal(bucket)}, tag: {literal(tag)},"
        f" predicate: (r) => {condition}, start: {lookback})"
    )


# ----------------------------------------------------------------------------------- alerting
def window_mean(bucket: str, tenant_id: str, machine_type: str, metric: str) -> str:
    """Mean of a metric per machine of a type over the alert's time range."""
    predicate = f"{field_is(metric)} and r.machine_type == {literal(machine_type)}"
    return (
        telemetry(bucket, tenant_id, predicate=predicate)
        + "\n  |> mean()"
        + '\n  |> keep(columns: ["_value", "site_id", "machine_id"])'
    )


def seconds_since_last_message(bucket: str, tenant_id: str, lookback: str) -> str:
    """Per machine seen in ``lookback``: seconds since its last message. A machine that fell silent
    keeps a row (and an alert instance) for as long as ``lookback`` still sees it."""
    return (
        telemetry(
            bucket, tenant_id, time_range=f"range(start: -{lookback})", predicate=field_is(STATUS_FIELD)
        )
        + "\n  |> last()"
        + "\n  |> map(fn: (r) => ({r with _value: float(v: int(v: now()) - int(v: r._time)) / 1000000000.0}))"
        + '\n  |> keep(columns: ["_value", "site_id", "machine_id"])'
    )


def _seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return int(duration[:-1]) * units[duration[-1]]
