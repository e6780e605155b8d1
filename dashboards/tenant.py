"""A tenant's Grafana dashboards, built with grafana-foundation-sdk from the tenant model.

- **Fleet overview** (one per tenant): machines reporting, messages per second, each machine's last
  status and when it was seen, status history, uptime and duty cycle.
- **Machine drilldown** (one per machine type the tenant runs): ``site`` and ``machine`` variables
  limited to machines of that type, and one panel per catalog metric of the type, in its unit.

Every query reads the tenant's own bucket through the tenant's datasource (bound to its read-only
token); :func:`tenant_dashboards` gives ``{uid: JSON}`` ready for ``grafana.oss.Dashboard``.
"""

from __future__ import annotations

import json

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMapping,
    ValueMappingResult,
    VariableRefresh,
)

from dashboards import flux
from dashboards.alerts import alert_thresholds
from dashboards.view import TenantView
from infra.config import Tenant
from infra.tenancy import grafana_uid
from ingest.catalog import GATEWAY_MACHINE_TYPE, MachineType, Metric
from ingest.points import STATUS_CODES

# Catalog units → Grafana unit ids; anything else is shown as a suffix.
UNITS = {
    "rpm": "rotrpm",
    "degC": "celsius",
    "%": "percent",
    "kW": "kwatt",
    "bar": "pressurebar",
    "A": "amp",
    "s": "s",
    "m/s": "velocityms",
    "count": "short",
    "B": "bytes",
}
STATUS_COLORS = {"stopped": "blue", "running": "green", "fault": "red"}
REFRESH = "30s"
TAGS = ["ironlink"]


def unit_of(metric: Metric) -> str:
    return UNITS.get(metric.unit, f"suffix:{metric.unit}")


def status_mappings() -> list[ValueMapping]:
    """``status_code`` shown as the status words of the contract, in their colours."""
    options = {
        str(code): ValueMappingResult(text=status, color=STATUS_COLORS[status], index=code)
        for status, code in STATUS_CODES.items()
    }
    return [ValueMap(options=options)]


# Panels with their options set: the SDK leaves ``options`` null otherwise.
def _legend() -> common_builders.VizLegendOptions:
    return (
        common_builders.VizLegendOptions()
        .show_legend(True)
        .display_mode(common.LegendDisplayMode.LIST)
        .placement(common.LegendPlacement.BOTTOM)
    )


def _series() -> timeseries.Panel:
    return timeseries.Panel().legend(_legend())


def _table() -> table.Panel:
    return table.Panel().show_header(True)


def _timeline() -> statetimeline.Panel:
    return statetimeline.Panel().show_value(common.VisibilityMode.AUTO).legend(_legend())


def fleet_uid(tenant: Tenant) -> str:
    return grafana_uid(tenant.id, "fleet")


def drilldown_uid(tenant: Tenant, machine_type: MachineType) -> str:
    return grafana_uid(tenant.id, machine_type.name)


# ----------------------------------------------------------------------------- fleet overview
def fleet_overview(view: TenantView) -> dashboard.Dashboard:
    bucket, tenant_id = view.route.bucket, view.tenant.id
    source = flux.datasource_ref(view.datasource_uid)
    reporting = (
        stat.Panel()
        .title("Machines reporting")
        .description("Machines that sent at least one message in the time range.")
        .datasource(source)
        .with_target(view.query(flux.machines_reporting(bucket, tenant_id)))
        .unit("short")
        .graph_mode(common.BigValueGraphMode.NONE)
        .span(6)
        .height(4)
    )
    rate = (
        _series()
        .title("Messages per second")
        .datasource(source)
        .with_target(view.query(flux.message_rate(bucket, tenant_id)))
        .unit("reqps")
        .min(0)
        .span(18)
        .height(8)
    )
    machines = (
        _table()
        .title("Machines: last status")
        .description("Each machine's last status and when its last message arrived.")
        .datasource(source)
        .with_target(view.query(flux.latest_status(bucket, tenant_id)))
        .mappings(status_mappings())
        .span(12)
        .height(10)
    )
    history = (
        _timeline()
        .title("Status history")
        .datasource(source)
        .with_target(view.query(flux.status_history(bucket, tenant_id)))
        .mappings(status_mappings())
        .span(12)
        .height(10)
    )
    derived = [
        _table()
        .title(title)
        .datasource(source)
        .with_target(view.query(flux.field_latest(bucket, tenant_id, field)))
        .unit("percent")
        .min(0)
        .max(100)
        .span(12)
        .height(8)
        for title, field in (
            ("Uptime % (not in fault)", "uptime_pct"),
            ("Duty cycle % (running)", "duty_cycle_pct"),
        )
    ]
    built = (
        dashboard.Dashboard(f"{view.tenant.name}: fleet overview")
        .uid(fleet_uid(view.tenant))
        .tags([*TAGS, view.tenant.id])
        .refresh(REFRESH)
        .time("now-6h", "now")
        .with_panel(reporting)
        .with_panel(rate)
        .with_panel(machines)
        .with_panel(history)
    )
    for panel in derived:
        built = built.with_panel(panel)
    return built


# --------------------------------------------------------------------------------- drilldown
def machine_dashboard(
    view: TenantView, *, title: str, uid: str, machine_type: str, machine_label: str
) -> dashboard.Dashboard:
    """A dashboard about one machine of ``machine_type`` at a time: variables pick the site, then
    the machine (labelled ``machine_label``) among that type's machines there."""
    bucket, tenant_id = view.route.bucket, view.tenant.id
    source = flux.datasource_ref(view.datasource_uid)
    of_type = f"r.machine_type == {flux.literal(machine_type)}"
    site = (
        dashboard.QueryVariable(flux.SITE_VARIABLE)
        .label("Site")
        .datasource(source)
        .query(flux.tag_values(bucket, tenant_id, "site_id", of_type))
        .refresh(VariableRefresh.ON_DASHBOARD_LOAD)
    )
    in_site = f"{of_type} and r.site_id == {flux.literal('${' + flux.SITE_VARIABLE + '}')}"
    machine = (
        dashboard.QueryVariable(flux.MACHINE_VARIABLE)
        .label(machine_label)
        .datasource(source)
        .query(flux.tag_values(bucket, tenant_id, "machine_id", in_site))
        .refresh(VariableRefresh.ON_DASHBOARD_LOAD)
    )
    return (
        dashboard.Dashboard(f"{view.tenant.name}: {title}")
        .uid(uid)
        .tags([*TAGS, view.tenant.id, machine_type])
        .refresh(REFRESH)
        .time("now-6h", "now")
        .with_variable(site)
        .with_variable(machine)
    )


def status_timeline(view: TenantView, machine_type: str, title: str) -> statetimeline.Panel:
    """The picked machine's status over time, coloured by state."""
    history = flux.status_history(view.route.bucket, view.tenant.id, flux.selected_machine(machine_type))
    return (
        _timeline()
        .title(title)
        .datasource(flux.datasource_ref(view.datasource_uid))
        .with_target(view.query(history))
        .mappings(status_mappings())
    )


def machine_drilldown(
    view: TenantView, machine_type: MachineType, thresholds: dict[str, float]
) -> dashboard.Dashboard:
    """Drilldown for machines of ``machine_type``; ``thresholds`` (metric → alert limit) are drawn
    as lines on the metric's panel."""
    bucket, tenant_id = view.route.bucket, view.tenant.id
    source = flux.datasource_ref(view.datasource_uid)
    built = machine_dashboard(
        view,
        title=machine_type.description,
        uid=drilldown_uid(view.tenant, machine_type),
        machine_type=machine_type.name,
        machine_label="Machine",
    ).with_panel(status_timeline(view, machine_type.name, "Status").span(24).height(4))
    for metric in machine_type.metrics:
        panel = (
            _series()
            .title(f"{metric.name} ({metric.unit})")
            .datasource(source)
            .with_target(view.query(flux.metric_series(bucket, tenant_id, machine_type.name, metric.name)))
            .unit(unit_of(metric))
            .span(12)
            .height(8)
        )
        if metric.name in thresholds:
            panel = panel.thresholds(
                dashboard.ThresholdsConfig()
                .mode(ThresholdsMode.ABSOLUTE)
                .steps([Threshold(None, "green"), Threshold(thresholds[metric.name], "red")])
            ).thresholds_style(
                common_builders.GraphThresholdsStyleConfig().mode(common.GraphTresholdsStyleMode.LINE)
            )
        built = built.with_panel(panel)
    return built


def to_json(built: dashboard.Dashboard) -> str:
    """The dashboard model as Grafana stores it (what ``oss.Dashboard.config_json`` takes)."""
    return json.dumps(built.build(), cls=JSONEncoder, sort_keys=True)


def tenant_dashboards(view: TenantView) -> dict[str, str]:
    """``{uid: JSON}`` of all the tenant's dashboards (drilldowns show the alert limits; edge
    gateways get their health dashboard instead, ``dashboards/gateway.py``)."""
    from dashboards.gateway import gateway_health  # built from this module's panels

    boards = [
        fleet_overview(view),
        *(
            gateway_health(view)
            if kind.name == GATEWAY_MACHINE_TYPE
            else machine_drilldown(view, kind, alert_thresholds(kind))
            for kind in view.machine_types
        ),
    ]
    return {board.build().uid or "": to_json(board) for board in boards}
