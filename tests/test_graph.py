"""``infra.graph``: a stack's components and links, as DOT text from a real plan and as SVG from the
real graphviz ``dot``."""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from infra.config import load_stack
from infra.graph import DOCS_STACKS, GraphError, graph_command_hook, plan_stack, render_dot, render_svg
from infra.plan import build_plan, build_tenant_plan
from tests.pulumi_mocks import PLANS, region_plan

pytestmark = PLANS
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz is not installed (make deps)")
DOCS_GRAPHS = Path(__file__).resolve().parent.parent / "docs" / "graphs"
_NODE = re.compile(r'^\s*(n\d+) \[label="((?:[^"\\]|\\.)*)"', re.MULTILINE)
_EDGE = re.compile(r"^\s*(n\d+) -> (n\d+) \[(.*)\];$", re.MULTILINE)
_CLUSTER = re.compile(r'subgraph cluster_n\d+ \{\s*label="((?:[^"\\]|\\.)*)"')


class Drawing:
    """The DOT text read back: node labels (lines joined by ' / ') and labelled edges between them."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.labels = {node: label.replace("\\n", " / ") for node, label in _NODE.findall(text)}
        self.clusters = _CLUSTER.findall(text)
        self.edges = [
            (self.labels[tail], self.labels[head], attributes)
            for tail, head, attributes in _EDGE.findall(text)
        ]

    def edge(self, tail: str, head: str, kind: str) -> str:
        """The attributes of the one ``kind`` edge from node ``tail`` to node ``head`` (labels)."""
        found = [a for t, h, a in self.edges if t == tail and h == head and f'tooltip="{kind}"' in a]
        assert len(found) == 1, f"expected one {kind} edge {tail!r} -> {head!r}, have: {self.edges}"
        return found[0]


@pytest.fixture(scope="module")
def platform() -> Drawing:
    return Drawing(render_dot(region_plan("mvp-eu").platform.to_json()))


def test_every_component_of_the_platform_is_a_cluster_with_what_it_declares(platform: Drawing) -> None:
    plan = region_plan("mvp-eu").platform
    components = [f"{r.kind} {r.name}" for r in plan.resources if r.is_component]
    assert sorted(platform.clusters) == sorted(components)
    broker = next(label for label in platform.labels.values() if label.startswith("MqttBroker / "))
    assert "StatefulSet" in broker and "Service x2" in broker and "NetworkPolicy" in broker
    worker = next(label for label in platform.labels.values() if label.startswith("IngestWorker / "))
    assert "StatefulSet" in worker and "PodDisruptionBudget" in worker


def test_the_platform_contains_its_components(platform: Drawing) -> None:
    region = next(label for label in platform.labels.values() if label.startswith("RegionalPlatform / "))
    for child in ("MqttBroker", "InfluxDB", "IngestWorker", "Grafana", "Postgres", "ProvisioningService"):
        summary = next(label for label in platform.labels.values() if label.startswith(f"{child} / "))
        assert "lhead=cluster_" in platform.edge(region, summary, "parent")


def test_network_policies_become_the_links_they_allow(platform: Drawing) -> None:
    worker, store = "StatefulSet / ingest", "StatefulSet / influxdb"
    assert 'label="8086/TCP"' in platform.edge(worker, store, "allows")
    assert 'label="8086/TCP"' in platform.edge("Deployment / grafana", store, "allows")
    assert 'label="5432/TCP"' in platform.edge("StatefulSet / emqx", "StatefulSet / postgres", "allows")
    # An egress rule: the dead-letter consumer may reach the broker and the registry, nothing else.
    assert 'label="8883/TCP"' in platform.edge("Deployment / dead-letters", "StatefulSet / emqx", "allows")
    # The API: Grafana's webhook in, the registry and the store out.
    assert 'label="8090/TCP"' in platform.edge("Deployment / grafana", "Deployment / api", "allows")
    assert 'label="5432/TCP"' in platform.edge("Deployment / api", "StatefulSet / postgres", "allows")
    assert 'label="8086/TCP"' in platform.edge("Deployment / api", store, "allows")
    # A rule without a peer admits anyone: the devices' TLS port.
    assert 'label="8883/TCP"' in platform.edge("any client", "StatefulSet / emqx", "allows")
    assert not [e for e in platform.edges if e[0] == "any client" and e[1] == store], (
        "the store is not public"
    )


def test_services_select_their_workloads_and_workloads_dial_services(platform: Drawing) -> None:
    platform.edge("Service / emqx", "StatefulSet / emqx", "selects")
    platform.edge("Service / emqx-headless", "StatefulSet / emqx", "selects")
    # The worker and the dead-letter consumer reach the broker by its cluster DNS name.
    assert 'label="DNS"' in platform.edge("StatefulSet / ingest", "Service / emqx", "connects")
    platform.edge("Deployment / dead-letters", "Service / emqx", "connects")
    assert not [
        e for e in platform.edges if e[0] == "StatefulSet / emqx" and e[1] == "Service / emqx-headless"
    ]


def test_a_tenant_stack_references_its_platform() -> None:
    drawing = Drawing(render_dot(region_plan("mvp-eu").tenants["acme"].to_json()))
    # Its own org's alerts go to the API (components/alerting.py).
    assert sorted(drawing.clusters) == ["AlertWebhook acme-alerts", "Tenant acme"]
    tenant = next(label for label in drawing.labels.values() if label.startswith("Tenant / "))
    assert "Organization" in tenant and "Dashboard" in tenant
    assert "StackReference" in drawing.edge(tenant, "platform stack / mvp-eu", "reference")


def test_a_dedicated_store_admits_the_platforms_pods_drawn_as_another_stacks() -> None:
    """An in-cluster level-3 store (the scale stacks run Timestream; its security group admits the
    cluster: tests/test_aws_stores.py)."""
    config = load_stack("scale-eu-west-1")
    assert config.aws is not None
    in_cluster = config.model_copy(
        update={"aws": config.aws.model_copy(update={"telemetry_store": "in-cluster"})}
    )
    umbrella = build_tenant_plan(
        in_cluster, build_plan(in_cluster, "scale-eu-west-1"), in_cluster.tenant("umbrella")
    )
    drawing = Drawing(render_dot(umbrella.to_json()))
    assert sorted(drawing.clusters) == [
        "AlertWebhook umbrella-alerts",
        "InfluxDB influxdb-umbrella",
        "Tenant umbrella",
    ]
    store = "StatefulSet / influxdb-umbrella"
    assert "8086/TCP" in drawing.edge("pods of another stack / component=ingest", store, "allows")
    assert "8086/TCP" in drawing.edge("pods of another stack / component=grafana", store, "allows")
    assert "8086/TCP" in drawing.edge("pods of another stack / component=api", store, "allows")


def test_names_are_quoted_so_no_name_can_break_the_dot_text() -> None:
    name = 'evil" ] ; x -> y [label="\\'
    plan = {
        "stack": "s",
        "resources": [{"urn": "u1", "type": "ironlink:x:Thing", "name": name, "parent": None, "inputs": {}}],
    }
    text = render_dot(plan)
    assert '"Thing evil\\" ] ; x -> y [label=\\"\\\\"' in text
    assert " -> " not in text.split("label=", 1)[0]


def test_a_plan_too_large_to_draw_is_refused_by_its_count() -> None:
    with pytest.raises(GraphError, match=r"would draw \d+ nodes \(at most 5\)"):
        render_dot(region_plan("mvp-eu").platform.to_json(), max_nodes=5)
    with pytest.raises(GraphError, match="no 'resources' list"):
        render_dot({"stack": "s"})


@needs_dot
def test_the_real_dot_draws_an_svg_that_parses_as_xml(platform: Drawing) -> None:
    svg = render_svg(platform.text)
    root = ElementTree.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = {element.text for element in root.iter("{http://www.w3.org/2000/svg}text")}
    assert {"MqttBroker emqx", "InfluxDB influxdb", "8086/TCP"} <= texts


def test_a_missing_graphviz_is_named() -> None:
    with pytest.raises(GraphError, match=r"'/nonexistent/dot' command was not found: install graphviz"):
        render_svg("digraph {}", dot="/nonexistent/dot")


@needs_dot
def test_bad_dot_text_fails_with_graphvizs_message() -> None:
    with pytest.raises(GraphError, match=r"failed with exit code 1: .*syntax error"):
        render_svg("digraph { -> }")


@needs_dot
def test_the_hook_writes_the_stacks_svg(tmp_path: Path) -> None:
    plan = region_plan("mvp-eu").tenants["acme"]
    path = graph_command_hook(plan, tmp_path / "graphs")
    assert path == tmp_path / "graphs" / "mvp-eu.acme.svg"
    ElementTree.fromstring(path.read_bytes())
    with pytest.raises(GraphError, match="is not a stack name"):
        graph_command_hook({"stack": "../../etc/x", "resources": []}, tmp_path)


def _titles(svg: bytes) -> set[str]:
    """What a picture shows, whatever the layout: node and edge titles with their texts."""
    root = ElementTree.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    shown = set()
    for group in root.iter(f"{ns}g"):
        if group.get("class") in ("node", "edge", "cluster"):
            texts = " / ".join(t.text or "" for t in group.iter(f"{ns}text"))
            shown.add(f"{group.get('class')}: {group.findtext(f'{ns}title')}: {texts}")
    return shown


@needs_dot
@pytest.mark.parametrize("stack", DOCS_STACKS)
def test_the_committed_pictures_of_the_architecture_document_are_current(stack: str) -> None:
    committed = DOCS_GRAPHS / f"{stack}.svg"
    assert committed.is_file(), f"{committed} is missing: run `make docs-graphs`"
    fresh = render_svg(render_dot(plan_stack(stack).to_json()))
    assert _titles(committed.read_bytes()) == _titles(fresh), f"{committed} is stale: run `make docs-graphs`"


def test_ironlink_plan_graph_writes_the_stacks_picture_and_refuses_several_stacks(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from infra.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["plan", "poc.acme", "--no-tree", "--graph", "--output-dir", str(tmp_path)])
    assert done.exit_code == 0, done.output
    root = ElementTree.fromstring((tmp_path / "poc.acme.svg").read_bytes())
    assert root.tag.endswith("svg") and "acme" in (tmp_path / "poc.acme.svg").read_text()
    several = runner.invoke(app, ["plan", "poc", "dev", "--graph", "--output-dir", str(tmp_path)])
    assert several.exit_code == 2 and "exactly one STACK" in several.output
