"""A stack's components and their links as a picture: DOT text from a plan, SVG through graphviz.

Everything is read from the plan's JSON (:meth:`infra.plan.Plan.to_json`), so a picture shows what
the program declares, not what someone drew:

- one cluster per Ironlink component (``ironlink:*``), nested as the components are, with a node
  counting what the component declares itself and a node per workload and per Service;
- ``parent`` edges (dashed) from a component to the components it creates;
- ``selects`` edges from a Service to the workloads whose pod labels its selector matches;
- ``allows`` edges from a NetworkPolicy: an ingress rule's ``from`` pods (or "any client" when the
  rule names no peer) to the pods the policy selects, an egress rule's selected pods to its ``to``
  pods, labelled with the ports; pods a selector names that this stack does not declare (a tenant's
  own store admits the platform's worker) are drawn as "pods of another stack";
- ``connects`` edges from a workload to a Service its environment names by its cluster DNS name
  (``<service>.<namespace>.svc``): who dials whom, where no policy says it;
- a tenant stack's ``StackReference`` to its platform stack.

Selectors are matched by ``matchLabels`` only (the program writes no ``matchExpressions``).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.plan import PlannedResource

MAX_NODES = 2_000
"""A plan drawing more nodes than this is refused: ``dot`` would take minutes and the picture
would say nothing (a whole merged region; draw its stacks one by one)."""
DOT_TIMEOUT_S = 60.0
WORKLOAD_KINDS = ("StatefulSet", "Deployment", "DaemonSet", "CronJob")
_STACK_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
_SERVICE_DNS = re.compile(r"\b([a-z0-9](?:[a-z0-9-]*[a-z0-9])?)\.([a-z0-9](?:[a-z0-9-]*[a-z0-9])?)\.svc\b")


class GraphError(RuntimeError):
    """The picture cannot be drawn; the message says why and what to do."""


# ------------------------------------------------------------------------------- reading a plan
@dataclass(frozen=True)
class _Resource(PlannedResource):
    """A planned resource with what the drawing asks of it."""

    @property
    def is_kubernetes(self) -> bool:
        return self.type.startswith("kubernetes:")

    @property
    def namespace(self) -> str | None:
        return self.get("metadata.namespace")

    @property
    def pod_labels(self) -> dict[str, str]:
        spec = "spec.jobTemplate.spec" if self.kind == "CronJob" else "spec"
        labels = self.get(f"{spec}.template.metadata.labels")
        return labels if isinstance(labels, dict) else {}


@dataclass
class _Edge:
    tail: str
    head: str
    kind: str
    labels: set[str] = field(default_factory=set)
    head_cluster: str | None = None


def _resources(plan_json: Mapping[str, Any]) -> list[_Resource]:
    resources = plan_json.get("resources")
    if not isinstance(resources, list):
        raise GraphError("plan JSON has no 'resources' list (write it with `ironlink plan`)")
    return [
        _Resource(
            r["urn"],
            r["type"],
            r["name"],
            r.get("parent"),
            r.get("inputs") or {},
            bool(r.get("protect")),
            True,
        )
        for r in resources
        if isinstance(r, dict)
    ]


def _matches(selector: Any, labels: Mapping[str, str]) -> bool:
    """A ``matchLabels`` selector (or a Service's plain selector) against pod labels; an empty
    selector selects every pod, as Kubernetes reads it."""
    if not isinstance(selector, dict):
        return False
    wanted = selector.get("matchLabels", selector if "matchExpressions" not in selector else None)
    if not isinstance(wanted, dict):
        return False
    return all(labels.get(key) == value for key, value in wanted.items())


def _ports(rule: Mapping[str, Any]) -> str:
    ports = rule.get("ports") or []
    text = ", ".join(f"{p.get('port', '*')}/{p.get('protocol', 'TCP')}" for p in ports if isinstance(p, dict))
    return text or "all ports"


def _selector_text(selector: Any) -> str:
    """``component=ingest``: a selector's labels, without the prefix and the label every pod has."""
    labels = selector.get("matchLabels") if isinstance(selector, dict) else None
    if not isinstance(labels, dict) or not labels:
        return "every pod"
    shown = {k.removeprefix("app.kubernetes.io/"): v for k, v in sorted(labels.items())}
    return ", ".join(f"{k}={v}" for k, v in shown.items() if k != "part-of") or "every pod"


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


# ---------------------------------------------------------------------------------- the graph
def _quote(text: str) -> str:
    """A DOT string: quotes and backslashes escaped, line breaks as DOT's centred ``\\n``."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\r", "").replace("\n", "\\n") + '"'


def _counts_label(kinds: Mapping[str, int], per_line: int = 3) -> str:
    items = [f"{kind} x{count}" if count > 1 else kind for kind, count in sorted(kinds.items())]
    lines = [", ".join(items[i : i + per_line]) for i in range(0, len(items), per_line)]
    return "\n".join(lines) or "declares nothing itself"


class _Graph:
    def __init__(self, plan_json: Mapping[str, Any]) -> None:
        self.stack = str(plan_json.get("stack", "stack"))
        self.references = [str(r) for r in plan_json.get("references") or []]
        self.resources = _resources(plan_json)
        self.by_urn = {r.urn: r for r in self.resources}
        self.ids: dict[str, str] = {}
        self.edges: dict[tuple[str, str, str], _Edge] = {}

    def node_id(self, key: str) -> str:
        return self.ids.setdefault(key, f"n{len(self.ids)}")

    def component_of(self, resource: _Resource) -> _Resource | None:
        parent = resource.parent
        while parent is not None and parent in self.by_urn:
            owner = self.by_urn[parent]
            if owner.is_component:
                return owner
            parent = owner.parent
        return None

    def edge(self, tail: str, head: str, kind: str, label: str | None = None, **extra: Any) -> None:
        if tail == head:
            return
        found = self.edges.setdefault((tail, head, kind), _Edge(tail, head, kind, **extra))
        if label:
            found.labels.add(label)

    # -------------------------------------------------------------------------------- build
    def build(self, max_nodes: int) -> str:
        components = [r for r in self.resources if r.is_component]
        workloads = [r for r in self.resources if r.is_kubernetes and r.kind in WORKLOAD_KINDS]
        services = [r for r in self.resources if r.is_kubernetes and r.kind == "Service"]
        declared: dict[str | None, dict[str, int]] = {}
        for resource in self.resources:
            if not resource.is_component:
                owner = self.component_of(resource)
                counts = declared.setdefault(owner.urn if owner else None, {})
                counts[resource.kind] = counts.get(resource.kind, 0) + 1
        nodes = len(components) + len(workloads) + len(services) + len(self.references) + 2
        if nodes > max_nodes:
            raise GraphError(
                f"stack {self.stack!r} would draw {nodes} nodes (at most {max_nodes}): "
                "draw its platform and tenant stacks one by one"
            )
        members: dict[str | None, list[_Resource]] = {}
        for resource in [*workloads, *services]:
            owner = self.component_of(resource)
            members.setdefault(owner.urn if owner else None, []).append(resource)
        self._link_components(components)
        self._link_services(services, workloads)
        self._link_policies(workloads)
        self._link_dns(services, workloads)
        return self._write(components, declared, members)

    def _link_components(self, components: list[_Resource]) -> None:
        for component in components:
            owner = self.component_of(component)
            if owner is not None:
                self.edge(
                    self.node_id(owner.urn),
                    self.node_id(component.urn),
                    "parent",
                    head_cluster=self._cluster(component),
                )
        for stack in self.references:
            target = self.node_id(f"stack:{stack}")
            for component in components:
                if component.parent is None:
                    self.edge(self.node_id(component.urn), target, "reference", "StackReference")

    def _link_services(self, services: list[_Resource], workloads: list[_Resource]) -> None:
        for service in services:
            for workload in workloads:
                if self._same_namespace(service, workload) and _matches(
                    service.get("spec.selector"), workload.pod_labels
                ):
                    self.edge(self.node_id(service.urn), self.node_id(workload.urn), "selects")

    def _link_policies(self, workloads: list[_Resource]) -> None:
        for policy in (r for r in self.resources if r.is_kubernetes and r.kind == "NetworkPolicy"):
            spec = policy.get("spec") or {}
            selected = [
                w
                for w in workloads
                if self._same_namespace(policy, w) and _matches(spec.get("podSelector"), w.pod_labels)
            ]
            for rule in spec.get("ingress") or []:
                for source in self._peers(rule.get("from"), workloads, policy, ingress=True):
                    for target in selected:
                        self.edge(source, self.node_id(target.urn), "allows", _ports(rule))
            for rule in spec.get("egress") or []:
                for target_id in self._peers(rule.get("to"), workloads, policy, ingress=False):
                    for source_w in selected:
                        self.edge(self.node_id(source_w.urn), target_id, "allows", _ports(rule))

    def _peers(self, peers: Any, workloads: list[_Resource], policy: _Resource, ingress: bool) -> list[str]:
        """Node ids of a rule's peers. A rule with no peer admits anyone (drawn for ingress only;
        egress to anywhere, like DNS to every namespace, is not a link between components)."""
        if not peers:
            return [self.node_id("external:any")] if ingress else []
        found: list[str] = []
        for peer in peers:
            if not isinstance(peer, dict):
                continue
            if "ipBlock" in peer and ingress:
                found.append(self.node_id(f"external:{peer['ipBlock'].get('cidr', 'ipBlock')}"))
            elif "namespaceSelector" in peer and ingress:
                found.append(self.node_id("external:cluster"))
            elif "podSelector" in peer and "namespaceSelector" not in peer:
                matched = [
                    self.node_id(w.urn)
                    for w in workloads
                    if self._same_namespace(policy, w) and _matches(peer["podSelector"], w.pod_labels)
                ]
                found += matched or [self.node_id(f"pods:{_selector_text(peer['podSelector'])}")]
        return found

    def _link_dns(self, services: list[_Resource], workloads: list[_Resource]) -> None:
        by_name = {(s.get("metadata.name") or s.name, s.namespace): s for s in services}
        for workload in workloads:
            containers = workload.get("spec.template.spec.containers") or workload.get(
                "spec.jobTemplate.spec.template.spec.containers"
            )
            for text in _strings([c.get("env") for c in containers or [] if isinstance(c, dict)]):
                for name, namespace in _SERVICE_DNS.findall(text):
                    service = by_name.get((name, namespace))
                    if service is None or _matches(service.get("spec.selector"), workload.pod_labels):
                        continue  # not in this stack, or the workload's own Service
                    self.edge(self.node_id(workload.urn), self.node_id(service.urn), "connects", "DNS")

    @staticmethod
    def _same_namespace(a: _Resource, b: _Resource) -> bool:
        return a.namespace is None or b.namespace is None or a.namespace == b.namespace

    def _cluster(self, component: _Resource) -> str:
        return "cluster_" + self.node_id(component.urn)

    # -------------------------------------------------------------------------------- write
    def _write(
        self,
        components: list[_Resource],
        declared: Mapping[str | None, Mapping[str, int]],
        members: Mapping[str | None, list[_Resource]],
    ) -> str:
        lines = [
            f"digraph {_quote(self.stack)} {{",
            "  compound=true; rankdir=LR; newrank=true;",
            f"  label={_quote(f'stack {self.stack}')}; labelloc=t; fontname=Helvetica;",
            '  node [fontname=Helvetica, fontsize=10, shape=box, style="rounded,filled", fillcolor=white];',
            "  edge [fontname=Helvetica, fontsize=9];",
        ]
        children: dict[str | None, list[_Resource]] = {}
        for component in components:
            owner = self.component_of(component)
            children.setdefault(owner.urn if owner else None, []).append(component)

        def cluster(component: _Resource, depth: int) -> None:
            pad = "  " * depth
            lines.append(f"{pad}subgraph {self._cluster(component)} {{")
            title = f"{component.kind} {component.name}"
            lines.append(f'{pad}  label={_quote(title)}; style="rounded,filled"; fillcolor="#eef3fa";')
            summary = f"{component.kind}\n{_counts_label(declared.get(component.urn, {}))}"
            lines.append(
                f'{pad}  {self.node_id(component.urn)} [label={_quote(summary)}, fillcolor="#dbe7f6"];'
            )
            for member in members.get(component.urn, []):
                shape = "ellipse" if member.kind == "Service" else "box3d"
                text = f"{member.kind}\n{member.name}"
                lines.append(f"{pad}  {self.node_id(member.urn)} [label={_quote(text)}, shape={shape}];")
            for child in children.get(component.urn, []):
                cluster(child, depth + 1)
            lines.append(f"{pad}}}")

        for top in children.get(None, []):
            cluster(top, 1)
        if declared.get(None):
            text = f"outside components\n{_counts_label(declared[None])}"
            lines.append(f"  {self.node_id('stack:self')} [label={_quote(text)}, style=dashed];")
        for member in members.get(None, []):
            text = f"{member.kind}\n{member.name}"
            lines.append(f"  {self.node_id(member.urn)} [label={_quote(text)}];")
        for key, node in self.ids.items():
            if key.startswith("external:"):
                where = key.removeprefix("external:")
                text = {"any": "any client", "cluster": "any pod in the cluster"}.get(where, where)
                lines.append(f'  {node} [label={_quote(text)}, shape=plaintext, style=""];')
            elif key.startswith("pods:"):
                text = f"pods of another stack\n{key.removeprefix('pods:')}"
                lines.append(f"  {node} [label={_quote(text)}, shape=box3d, style=dashed];")
            elif key.startswith("stack:") and key != "stack:self":
                text = f"platform stack\n{key.removeprefix('stack:')}"
                lines.append(f'  {node} [label={_quote(text)}, shape=folder, fillcolor="#fdf1d6"];')
        styles = {
            "parent": 'style=dashed, color="#8a94a6", arrowhead=odot',
            "selects": 'color="#5b7db1", arrowhead=vee',
            "allows": 'color="#2f855a", penwidth=1.4',
            "connects": 'color="#b7791f", style=dotted',
            "reference": 'color="#b7791f", style=bold',
        }
        for edge in self.edges.values():
            attributes = [styles[edge.kind], f"tooltip={_quote(edge.kind)}"]
            if edge.labels:
                attributes.append(f"label={_quote('; '.join(sorted(edge.labels)))}")
            if edge.head_cluster:
                attributes.append(f"lhead={edge.head_cluster}")
            lines.append(f"  {edge.tail} -> {edge.head} [{', '.join(attributes)}];")
        lines.append("}")
        return "\n".join(lines) + "\n"


def render_dot(plan_json: Mapping[str, Any], *, max_nodes: int = MAX_NODES) -> str:
    """The DOT text of one stack's plan (``Plan.to_json()``): stable for a stable plan."""
    return _Graph(plan_json).build(max_nodes)


def render_svg(dot_text: str, *, dot: str = "dot", timeout_s: float = DOT_TIMEOUT_S) -> bytes:
    """``dot -Tsvg`` on ``dot_text``; raises :class:`GraphError` when graphviz is missing, fails or
    takes longer than ``timeout_s``."""
    try:
        done = subprocess.run(
            [dot, "-Tsvg"], input=dot_text.encode(), capture_output=True, timeout=timeout_s, check=False
        )
    except FileNotFoundError:
        raise GraphError(
            f"graphviz's {dot!r} command was not found: install graphviz (Debian: apt-get install graphviz; "
            "`make deps` does it)"
        ) from None
    except subprocess.TimeoutExpired:
        raise GraphError(f"{dot} -Tsvg took longer than {timeout_s:g} s and was stopped") from None
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()[:5]
        raise GraphError(f"{dot} -Tsvg failed with exit code {done.returncode}: {' / '.join(detail)}")
    return done.stdout


def graph_command_hook(plan: Any, output_dir: Path) -> Path:
    """What ``ironlink plan --graph`` calls per planned stack: writes ``<output_dir>/<stack>.svg``
    and returns its path. ``plan``: an :class:`infra.plan.Plan` or its ``to_json()``."""
    plan_json: Mapping[str, Any] = plan if isinstance(plan, Mapping) else plan.to_json()
    stack = str(plan_json.get("stack", ""))
    if not _STACK_NAME.fullmatch(stack) or stack in (".", ".."):
        raise GraphError(f"{stack[:80]!r} is not a stack name")
    svg = render_svg(render_dot(plan_json))
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{stack}.svg"
    path.write_bytes(svg)
    return path


def plan_stack(stack: str) -> Any:
    """The offline plan of one platform or tenant stack (a tenant's platform is planned to answer
    its ``StackReference``)."""
    from infra.config import load_stack
    from infra.plan import build_plan, build_tenant_plan

    platform_name, _, tenant_id = stack.partition(".")
    config = load_stack(platform_name)
    platform = build_plan(config, platform_name)
    return build_tenant_plan(config, platform, config.tenant(tenant_id)) if tenant_id else platform


DOCS_STACKS = ("mvp-eu", "scale-eu-west-1.umbrella")
"""The stacks pictured in docs/architecture.md: a Phase B platform, and a Phase C tenant with a
store of its own (isolation level 3)."""


def main(argv: list[str] | None = None) -> int:
    """``python -m infra.graph [STACK...] [--output-dir DIR]``: regenerate the pictures
    (``make docs-graphs``: the ones docs/architecture.md shows)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m infra.graph", description=main.__doc__)
    parser.add_argument("stacks", nargs="*", default=list(DOCS_STACKS))
    parser.add_argument("--output-dir", type=Path, default=Path("docs/graphs"))
    args = parser.parse_args(argv)
    try:
        for stack in args.stacks:
            print(graph_command_hook(plan_stack(stack), args.output_dir))
    except (GraphError, LookupError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
