"""A tenant's Grafana alert rules, as the seed asks to start: thresholds and data absence.

Per machine type the tenant runs:

- **temperature high**: the 5-minute mean of the type's temperature metric above
  :func:`temperature_limit` (80 % of the way from the catalog's typical value to its physical
  maximum: the worker refuses values beyond the maximum, so a limit *at* it could never fire);
- **in fault**: the machine's last status is ``fault`` for 2 minutes (a state transition).

And per tenant, **no telemetry**: a machine seen in the last :data:`NO_DATA_LOOKBACK` has sent
nothing for :data:`NO_DATA_MINUTES`; a tenant with no data at all alerts through ``noDataState``.

Rules are built with grafana-foundation-sdk's alerting builders (Flux query, then a server-side
threshold expression) and rendered by :func:`tenant_rules` into the dicts
``pulumiverse_grafana.alerting.RuleGroup(rules=...)`` takes. Each alert instance carries the labels
``tenant``, ``site_id``, ``machine_id``, ``severity`` (and ``machine_type``), which notification
policies route on.
"""

from __future__ import annotations

import json
from typing import Literal

from grafana_foundation_sdk.builders import alerting, expr
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import alerting as alerting_models
from grafana_foundation_sdk.models.dashboard import DataSourceRef
from pulumiverse_grafana.alerting import RuleGroupRuleArgsDict

from dashboards import flux
from dashboards.view import TenantView
from infra.tenancy import grafana_uid
from ingest.catalog import MachineType, Metric
from ingest.points import STATUS_CODES

EVALUATION_INTERVAL_S = 60
THRESHOLD_FRACTION = 0.8
THRESHOLD_WINDOW_S = 300
FAULT_FOR = "2m"
NO_DATA_MINUTES = 10
NO_DATA_LOOKBACK = "7d"
EXPRESSION = DataSourceRef(type_val="__expr__", uid="__expr__")
Severity = Literal["warning", "critical"]


def temperature_limit(metric: Metric) -> float:
    return round(metric.typical + THRESHOLD_FRACTION * (metric.maximum - metric.typical), 1)


def alert_thresholds(machine_type: MachineType) -> dict[str, float]:
    """Metric → the value above which a machine of this type alerts (drawn on its dashboard)."""
    metric = machine_type.metric(machine_type.temperature_metric or "")
    return {metric.name: temperature_limit(metric)} if metric else {}


def _rule(
    view: TenantView,
    *,
    uid: str,
    title: str,
    query: str,
    window_s: int,
    above: float,
    for_: str,
    severity: Severity,
    no_data: Literal["OK", "Alerting"],
    summary: str,
    labels: dict[str, str] | None = None,
) -> alerting.Rule:
    """A rule that fires per machine where the Flux query ``A`` (one number per machine) is above
    ``above``: ``B = A > above`` evaluated by Grafana's threshold expression."""
    threshold = (
        expr.TypeThreshold()
        .ref_id("B")
        .datasource(EXPRESSION)
        .expression("A")
        .conditions(
            [
                expr.ExprTypeThresholdConditions().evaluator(
                    expr.ExprTypeThresholdConditionsEvaluator().type("gt").params([above])
                )
            ]
        )
    )
    return (
        alerting.Rule(title)
        .uid(uid)
        .condition("B")
        .for_val(for_)
        .no_data_state(no_data)
        .exec_err_state("Error")
        .labels({"tenant": view.tenant.id, "severity": severity, **(labels or {})})
        .annotations({"summary": summary})
        .with_query(
            alerting.Query("A")
            .datasource_uid(view.datasource_uid)
            .model(view.query(query))
            .relative_time_range(alerting_models.RelativeTimeRange(from_val=window_s, to=0))
        )
        .with_query(
            alerting.Query("B")
            .datasource_uid(EXPRESSION.uid or "")
            .model(threshold)
            .relative_time_range(alerting_models.RelativeTimeRange(from_val=window_s, to=0))
        )
    )


# Alert template text: where the instance is and the value of query A.
WHERE = "{{ $labels.site_id }}/{{ $labels.machine_id }}"
VALUE = "{{ $values.A }}"


def alert_rules(view: TenantView, *, no_data_minutes: int = NO_DATA_MINUTES) -> list[alerting.Rule]:
    """The tenant's rules (none for a tenant without machines)."""
    bucket, tenant_id = view.route.bucket, view.tenant.id
    rules: list[alerting.Rule] = []
    for kind in view.machine_types:
        for metric_name, limit in alert_thresholds(kind).items():
            metric = kind.metric(metric_name)
            assert metric is not None
            rules.append(
                _rule(
                    view,
                    uid=grafana_uid(tenant_id, "hot", kind.name),
                    title=f"{kind.description}: {metric.name} above {limit:g} {metric.unit}",
                    query=flux.window_mean(bucket, tenant_id, kind.name, metric.name),
                    window_s=THRESHOLD_WINDOW_S,
                    above=limit,
                    for_="5m",
                    severity="warning",
                    no_data="OK",  # silence is the no-telemetry rule's job
                    summary=f"{WHERE}: {metric.name} mean {VALUE} {metric.unit} (limit {limit:g})",
                    labels={"machine_type": kind.name},
                )
            )
        status = f"r.machine_type == {flux.literal(kind.name)}"
        rules.append(
            _rule(
                view,
                uid=grafana_uid(tenant_id, "fault", kind.name),
                title=f"{kind.description}: machine in fault",
                query=flux.field_latest(bucket, tenant_id, flux.STATUS_FIELD, status),
                window_s=THRESHOLD_WINDOW_S,
                above=STATUS_CODES["fault"] - 0.5,
                for_=FAULT_FOR,
                severity="critical",
                no_data="OK",
                summary=f"{WHERE} reports status fault",
                labels={"machine_type": kind.name},
            )
        )
    if rules:
        seconds = no_data_minutes * 60
        rules.append(
            _rule(
                view,
                uid=grafana_uid(tenant_id, "silent"),
                title=f"No telemetry for {no_data_minutes} minutes",
                query=flux.seconds_since_last_message(bucket, tenant_id, NO_DATA_LOOKBACK),
                window_s=seconds,
                above=seconds,
                for_="0s",
                severity="critical",
                no_data="Alerting",  # not one machine of the tenant in the lookback
                summary=f"{WHERE} has sent nothing for {VALUE} s",
            )
        )
    return rules


def rule_group_rule(rule: alerting.Rule) -> RuleGroupRuleArgsDict:
    """One SDK rule as ``alerting.RuleGroup``'s ``rules`` item (``RuleGroupRuleArgsDict``)."""
    model = json.loads(json.dumps(rule.build(), cls=JSONEncoder))
    return {
        "uid": model["uid"],
        "name": model["title"],
        "condition": model["condition"],
        "for_": model["for"],
        "no_data_state": model["noDataState"],
        "exec_err_state": model["execErrState"],
        "labels": model.get("labels", {}),
        "annotations": model.get("annotations", {}),
        "datas": [
            {
                "ref_id": stage["refId"],
                "datasource_uid": stage["datasourceUid"],
                "relative_time_range": {
                    "from_": stage["relativeTimeRange"]["from"],
                    "to": stage["relativeTimeRange"]["to"],
                },
                "model": json.dumps(stage["model"], sort_keys=True),
            }
            for stage in model["data"]
        ],
    }


def tenant_rules(view: TenantView, *, no_data_minutes: int = NO_DATA_MINUTES) -> list[RuleGroupRuleArgsDict]:
    return [rule_group_rule(rule) for rule in alert_rules(view, no_data_minutes=no_data_minutes)]
