"""The platform's monitoring where the cluster runs the Prometheus operator (``cluster.prometheus_operator``).

One ServiceMonitor or PodMonitor per workload that serves metrics (``components.render.monitoring``)
and one PrometheusRule of the platform's alerting rules (:func:`dashboards.platform.platform_rules`),
as ``CustomResource`` objects of the operator's ``monitoring.coreos.com/v1`` API. The NetworkPolicies
that let Prometheus in are the workloads' own (``cluster.prometheus``), operator or not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.kube import Kube, inherited_dependencies
from components.render.kubernetes import PART_OF
from components.render.monitoring import API_VERSION, MetricsEndpoint, monitor_spec, prometheus_rule_spec
from infra.config import Prometheus

RULE_NAME = "ironlink-platform"


class PlatformMonitoringArgs(TypedDict):
    provider: k8s.Provider
    """The region's Kubernetes provider."""
    namespace: str
    """The platform's namespace: the monitors live beside what they scrape."""
    prometheus: Prometheus
    """``cluster.prometheus``: its ``rule_labels`` go on every object, for the operator's selectors."""
    endpoints: Sequence[MetricsEndpoint]
    """The workloads' metrics endpoints."""
    rules: Mapping[str, Any]
    """The rule file as a mapping (``groups: [...]``)."""


class PlatformMonitoring(pulumi.ComponentResource):
    monitors: list[k8s.apiextensions.CustomResource]
    rule: k8s.apiextensions.CustomResource

    def __init__(
        self, name: str, args: PlatformMonitoringArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("ironlink:monitoring:PlatformMonitoring", name, None, opts)
        kube = Kube(self, args["provider"], args["namespace"], False, inherited_dependencies(opts))
        labels = {"app.kubernetes.io/part-of": PART_OF, **args["prometheus"].rule_labels}

        def custom(kind: str, object_name: str, spec: Any) -> k8s.apiextensions.CustomResource:
            return k8s.apiextensions.CustomResource(
                object_name,
                api_version=API_VERSION,
                kind=kind,
                metadata=kube.meta(object_name, labels),
                spec=spec,
                opts=kube.opts(),
            )

        self.monitors = [
            custom(endpoint.kind, endpoint.name, monitor_spec(endpoint)) for endpoint in args["endpoints"]
        ]
        self.rule = custom("PrometheusRule", RULE_NAME, prometheus_rule_spec(args["rules"]))
        self.register_outputs({"monitors": [endpoint.name for endpoint in args["endpoints"]]})
