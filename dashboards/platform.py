"""Prometheus alerting rules for the platform itself (the seed's section 8.1), on the ingest
worker's metrics (:class:`ingest.metrics.WorkerMetrics`, scraped from its ``/metrics``).

The series names are read from the worker's metric definitions rather than retyped, so a renamed
metric changes the rules with it; ``tests/test_alert_rules.py`` runs the rendered file through the
real ``promtool check rules`` and ``promtool test rules``. Write it with::

    python -m dashboards.platform > ironlink-platform.rules.yml
"""

from __future__ import annotations

from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from ingest.metrics import WorkerMetrics

GROUP = "ironlink-platform"
WRITE_ERRORS_FOR = "5m"
TENANT_HELD_FOR = "2m"
DEAD_LETTER_RATIO = 0.05
DEAD_LETTER_FOR = "10m"
BROKER_DOWN_FOR = "2m"
WORKER_ABSENT_FOR = "5m"
LAG_QUANTILE = 0.99
LAG_SECONDS = 30
LAG_FOR = "10m"


def series(metric: MetricWrapperBase, part: str = "") -> str:
    """The sample name Prometheus scrapes: ``_total`` for a counter, ``_bucket``... for a histogram."""
    family = next(iter(metric.describe()))
    if family.type == "counter":
        return f"{family.name}_total"
    return f"{family.name}_{part}" if part else family.name


def _alert(name: str, expression: str, for_: str, severity: str, summary: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expression,
        "for": for_,
        "labels": {"severity": severity, "team": "ironlink-platform"},
        "annotations": {"summary": summary},
    }


def platform_rules(metrics: WorkerMetrics | None = None) -> dict[str, Any]:
    """The rule file as a mapping (``groups: [...]``)."""
    m = metrics or WorkerMetrics()
    received, rejected = series(m.received), series(m.rejected)
    rules = [
        _alert(
            "IronlinkStoreWriteErrors",
            f"sum by (tenant) (rate({series(m.write_errors)}[5m])) > 0",
            WRITE_ERRORS_FOR,
            "critical",
            "InfluxDB keeps refusing writes of tenant {{ $labels.tenant }}; its telemetry waits.",
        ),
        _alert(
            "IronlinkTenantHeld",
            f"max by (tenant) ({series(m.held)}) == 1",
            TENANT_HELD_FOR,
            "critical",
            "Tenant {{ $labels.tenant }}'s store fails: its telemetry goes to the workers' spool"
            " (dead-lettered once the spool is full).",
        ),
        _alert(
            "IronlinkDeadLetterRateHigh",
            f"sum by (tenant) (rate({rejected}[10m]))"
            f" / sum by (tenant) (rate({received}[10m])) > {DEAD_LETTER_RATIO}",
            DEAD_LETTER_FOR,
            "warning",
            "{{ $value | humanizePercentage }} of tenant {{ $labels.tenant }}'s messages are dead-lettered.",
        ),
        _alert(
            "IronlinkBrokerDown",
            f"max({series(m.connected)}) == 0",
            BROKER_DOWN_FOR,
            "critical",
            "No ingest worker is connected to the MQTT broker.",
        ),
        _alert(
            "IronlinkIngestWorkerAbsent",
            f"absent({series(m.connected)})",
            WORKER_ABSENT_FOR,
            "critical",
            "No ingest worker reports metrics (not running, or not scraped).",
        ),
        _alert(
            "IronlinkIngestionLagHigh",
            f"histogram_quantile({LAG_QUANTILE}, sum by (le) (rate({series(m.lag_seconds, 'bucket')}[5m])))"
            f" > {LAG_SECONDS}",
            LAG_FOR,
            "warning",
            f"p{int(LAG_QUANTILE * 100)} lag from device to store is {{{{ $value | humanizeDuration }}}}"
            f" (limit {LAG_SECONDS}s).",
        ),
    ]
    return {"groups": [{"name": GROUP, "rules": rules}]}


def render_platform_rules(metrics: WorkerMetrics | None = None) -> str:
    """The Prometheus rule file (YAML)."""
    return yaml.safe_dump(platform_rules(metrics), sort_keys=False, width=1000)


if __name__ == "__main__":
    print(render_platform_rules(), end="")
