"""The Prometheus operator's objects for the platform (``cluster.prometheus_operator``), as plain dicts.

Each workload that serves metrics describes where (:class:`MetricsEndpoint`); a Service that
carries the metrics port under its own name is scraped through a ``ServiceMonitor`` (the worker's
and EMQX's headless Services), pods without one through a ``PodMonitor`` (the dead-letter consumer
has no Service; the provisioning service's two Services share labels and port name, so a
ServiceMonitor would scrape each pod twice). The ``PrometheusRule`` holds exactly the groups of
:func:`dashboards.platform.platform_rules`, the file ``promtool`` checks in the tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from components.render.kubernetes import Manifest

API_VERSION = "monitoring.coreos.com/v1"
SCRAPE_INTERVAL = "30s"


@dataclass(frozen=True)
class MetricsEndpoint:
    """Where one workload serves Prometheus metrics."""

    name: str
    """The monitor's name (the workload's)."""
    pod_labels: Mapping[str, str]
    """Labels of the pods serving it (a PodMonitor selects them)."""
    port: int
    """The port number the NetworkPolicy opens to Prometheus."""
    port_name: str
    """The container's (and Service's) port name the monitor scrapes."""
    path: str = "/metrics"
    service_labels: Mapping[str, str] | None = None
    """Labels of a Service carrying ``port_name``: scraped through a ServiceMonitor; None: a PodMonitor."""
    tls: Manifest | None = None
    """``tlsConfig`` for a server that speaks only TLS (``scheme: https``)."""

    @property
    def kind(self) -> str:
        return "ServiceMonitor" if self.service_labels is not None else "PodMonitor"


def monitor_spec(endpoint: MetricsEndpoint) -> Manifest:
    """The ServiceMonitor's or PodMonitor's ``spec`` for one endpoint, in the monitor's own namespace."""
    scrape: Manifest = {"port": endpoint.port_name, "path": endpoint.path, "interval": SCRAPE_INTERVAL}
    if endpoint.tls is not None:
        scrape.update({"scheme": "https", "tlsConfig": dict(endpoint.tls)})
    if endpoint.service_labels is not None:
        return {"selector": {"matchLabels": dict(endpoint.service_labels)}, "endpoints": [scrape]}
    return {"selector": {"matchLabels": dict(endpoint.pod_labels)}, "podMetricsEndpoints": [scrape]}


def prometheus_rule_spec(rules: Mapping[str, Any]) -> Manifest:
    """A PrometheusRule's ``spec``: the rule file's groups, unchanged (``groups: [...]``)."""
    return {"groups": list(rules["groups"])}
