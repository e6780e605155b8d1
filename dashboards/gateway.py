"""The gateway-health dashboard: the edge agents' own health, as they publish it (``edge/health.py``).

A gateway is a machine of type ``edge_gateway`` (``ingest/catalog.py``), so its health is ordinary
telemetry in the tenant's bucket: this dashboard replaces the generic drilldown for that type. It
shows every gateway's last status, and for the gateway picked in the variables its backlog
(messages, bytes, oldest unsent age), drops by reason, its sources and machine sessions by state,
and the identities it still lacks. Built from the catalog's metric names, so a metric renamed
there is renamed here.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard, timeseries

from dashboards import flux
from dashboards.tenant import _series, _table, machine_dashboard, status_mappings, status_timeline, unit_of
from dashboards.view import TenantView
from infra.tenancy import grafana_uid
from ingest.catalog import GATEWAY_MACHINE_TYPE as GATEWAY_TYPE
from ingest.catalog import MACHINE_TYPES

# Panel title → the catalog metrics it draws, one query each; the unit is the first metric's.
PANELS: dict[str, tuple[str, ...]] = {
    "Backlog (messages)": ("backlog_messages",),
    "Backlog (bytes)": ("backlog_bytes", "store_bytes"),
    "Oldest unsent reading (s)": ("oldest_unsent_age_s",),
    "Drops by reason (since the agent started)": (
        "dropped_max_bytes",
        "dropped_disk_headroom",
        "dropped_max_age",
        "rejected_readings",
    ),
    "Sources by state": ("sources_up", "sources_retrying", "sources_down"),
    "Machine sessions": ("uplinks_connected", "uplinks_disconnected"),
    "Identities missing": ("identities_missing",),
}


def gateway_uid(view: TenantView) -> str:
    return grafana_uid(view.tenant.id, GATEWAY_TYPE)


def gateway_health(view: TenantView) -> dashboard.Dashboard:
    kind = MACHINE_TYPES[GATEWAY_TYPE]
    bucket, tenant_id = view.route.bucket, view.tenant.id
    source = flux.datasource_ref(view.datasource_uid)
    of_type = f"r.machine_type == {flux.literal(GATEWAY_TYPE)}"
    built = (
        machine_dashboard(
            view,
            title="gateway health",
            uid=gateway_uid(view),
            machine_type=GATEWAY_TYPE,
            machine_label="Gateway",
        )
        .with_panel(
            _table()
            .title("Gateways: last health")
            .description(
                "fault: a source is down, a machine's session is not connected, or an identity is missing."
            )
            .datasource(source)
            .with_target(view.query(flux.field_latest(bucket, tenant_id, flux.STATUS_FIELD, of_type)))
            .mappings(status_mappings())
            .span(8)
            .height(8)
        )
        .with_panel(status_timeline(view, GATEWAY_TYPE, "Health").span(16).height(8))
    )
    for title, metrics in PANELS.items():
        first = kind.metric(metrics[0])
        assert first is not None, f"{metrics[0]} is not an {GATEWAY_TYPE} metric"
        panel: timeseries.Panel = _series().title(title).datasource(source).unit(unit_of(first)).min(0)
        for index, name in enumerate(metrics):
            query = flux.metric_series(bucket, tenant_id, GATEWAY_TYPE, name)
            panel = panel.with_target(view.query(query, ref_id=chr(ord("A") + index)))
        built = built.with_panel(panel.span(12).height(8))
    return built
