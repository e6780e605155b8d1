"""Offline plan: run the real Pulumi program under the SDK's mock engine and record what it declares.

No Pulumi CLI, no cloud, no credentials. Every registration is captured at the mock monitor —
type, name, parent, inputs, and the ``protect`` flag, which the Mocks API does not pass on, so it is
read from the ``RegisterResource`` request itself. Secret values are masked (``"[secret]"``) before
anything is kept. Each call runs in a fresh context (settings, config and root stack are context
variables in the SDK), so the planner can be called repeatedly in one process.

The engine returns inputs as outputs, plus plausible values for the few outputs the program reads
(random passwords, TLS keys and certificates, InfluxDB token values, Grafana org and team ids): see
:class:`PlanMocks`.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextvars
import hashlib
import json
import logging
import string
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pulumi import Output
from pulumi.runtime import mocks, rpc, settings
from pulumi.runtime import resource as pulumi_resource
from pulumi.runtime.config import set_all_config
from pulumi.runtime.proto import source_pb2
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _ensure_event_loop, _sync_await

from infra.config import (
    NAMESPACE,
    PlatformConfig,
    Tenant,
    TenantStackConfig,
    is_tenant_stack,
    tenant_stack_name,
)

PROJECT = "ironlink"
SECRET = "[secret]"
_SECRET_SIG = rpc._special_secret_sig
_SIG_KEY = rpc._special_sig_key
STACK_TYPE = "pulumi:pulumi:Stack"
STACK_REFERENCE_TYPE = "pulumi:pulumi:StackReference"
INFLUX_TOKEN_TYPE = "pulumi-python:dynamic/influxdb:Token"
GRAFANA_ORG_TYPE = "grafana:oss/organization:Organization"
GRAFANA_TEAM_TYPE = "grafana:oss/team:Team"


# ----------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class PlannedResource:
    """One declared resource. ``parent`` is the parent's URN (None for top-level resources)."""

    urn: str
    type: str
    name: str
    parent: str | None
    inputs: dict[str, Any]
    protect: bool
    custom: bool

    @property
    def is_kubernetes_object(self) -> bool:
        return self.custom and self.type.startswith("kubernetes:") and "apiVersion" in self.inputs

    @property
    def kind(self) -> str:
        """``StatefulSet``, ``RandomPassword``, ``Provider``…: the last part of the type token."""
        return "Provider" if self.type.startswith("pulumi:providers:") else self.type.rsplit(":", 1)[-1]

    @property
    def is_component(self) -> bool:
        return self.type.startswith("ironlink:")

    def get(self, path: str, default: Any = None) -> Any:
        """A nested input by dotted path (``spec.template.spec.containers``); list indexes are numbers."""
        value: Any = self.inputs
        for part in path.split("."):
            if isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            elif isinstance(value, dict) and part in value:
                value = value[part]
            else:
                return default
        return value

    def to_json(self) -> dict[str, Any]:
        return {
            "urn": self.urn,
            "type": self.type,
            "name": self.name,
            "parent": self.parent,
            "inputs": self.inputs,
            "protect": self.protect,
        }


@dataclass
class Plan:
    stack: str
    resources: list[PlannedResource]
    outputs: dict[str, Any] = field(default_factory=dict)
    """The stack's exports, secrets masked."""
    platform: Any = None
    """The program's return value (the ``RegionalPlatform`` or the ``Tenant``), for tests of its
    Output attributes."""
    reference_outputs: StackOutputs | None = None
    """The exports as a ``StackReference`` to this stack reads them (mock values, secrets unmasked
    and named): what the mock engine answers a tenant stack's reference to its platform with."""
    references: list[str] = field(default_factory=list)
    """Stacks this one reads through a ``StackReference``."""

    def __post_init__(self) -> None:
        self._by_urn = {resource.urn: resource for resource in self.resources}
        self._children: dict[str | None, list[PlannedResource]] = {}
        for resource in self.resources:
            self._children.setdefault(resource.parent, []).append(resource)

    def find(self, type: str | None = None, name: str | None = None) -> list[PlannedResource]:
        """Resources whose type token ends with ``type`` (``StatefulSet``, ``apps/v1:StatefulSet``…)
        and whose name is ``name``; either may be omitted."""
        return [
            r
            for r in self.resources
            if (type is None or r.type == type or r.type.endswith(":" + type) or r.type.endswith("/" + type))
            and (name is None or r.name == name)
        ]

    def one(self, type: str, name: str) -> PlannedResource:
        found = self.find(type, name)
        if len(found) != 1:
            names = sorted(r.name for r in self.find(type))
            raise LookupError(
                f"stack {self.stack!r}: expected one {type} {name!r}, found {len(found)} (have: {names})"
            )
        return found[0]

    def by_urn(self, urn: str) -> PlannedResource:
        return self._by_urn[urn]

    def children(self, parent: PlannedResource | None) -> list[PlannedResource]:
        return list(self._children.get(parent.urn if parent else None, []))

    def descendants(self, parent: PlannedResource) -> Iterator[PlannedResource]:
        for child in self.children(parent):
            yield child
            yield from self.descendants(child)

    def component_of(self, resource: PlannedResource) -> PlannedResource | None:
        """The nearest ancestor that is an Ironlink component."""
        parent = resource.parent
        while parent is not None:
            owner = self.by_urn(parent)
            if owner.is_component:
                return owner
            parent = owner.parent
        return None

    def manifests(self) -> list[dict[str, Any]]:
        """The Kubernetes objects as they would be applied (secrets masked), ``kubectl``'s key order."""
        head = ("apiVersion", "kind", "metadata")
        return [
            {**{key: r.inputs[key] for key in head if key in r.inputs}, **r.inputs}
            for r in self.resources
            if r.is_kubernetes_object
        ]

    @property
    def kind(self) -> str:
        return "tenant" if is_tenant_stack(self.stack) else "platform"

    def to_json(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "kind": self.kind,
            "platform": self.stack.split(".", 1)[0],
            "references": self.references,
            "resources": [resource.to_json() for resource in self.resources],
            "outputs": self.outputs,
        }


# ------------------------------------------------------------------------------------ values
def _is_secret(value: Any) -> bool:
    return isinstance(value, dict) and value.get(_SIG_KEY) == _SECRET_SIG


def _mask_all(value: Any) -> Any:
    """Every leaf masked, the shape kept (a Secret's ``stringData`` keeps its keys)."""
    if isinstance(value, dict):
        return {key: _mask_all(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_mask_all(item) for item in value]
    return SECRET


def clean(value: Any) -> Any:
    """Plain JSON from engine values: secrets masked, integral floats (the wire has only doubles) as ints."""
    if _is_secret(value):
        return _mask_all(clean(value.get("value")))
    if isinstance(value, dict):
        return {key: clean(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [clean(item) for item in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _digest(name: str, size: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{name}:{counter}".encode()).digest()
        counter += 1
    return out[:size]


def _mock_password(name: str, length: int) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(alphabet[byte % len(alphabet)] for byte in _digest(name, length))


def _pem(label: str, name: str) -> str:
    body = base64.b64encode(_digest(name, 48)).decode()
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


def mock_grafana_id(name: str) -> int:
    """The org or team id the mock Grafana gives resource ``name``: stable, and never 1 (the shared org)."""
    return 2 + int.from_bytes(_digest(name, 2)) % 1000


ENGINE_OUTPUTS: dict[str, Callable[[str, Mapping[str, Any]], dict[str, Any]]] = {}
"""Type token → what the engine would add to a resource's inputs as outputs (an endpoint, an ARN),
for the cloud resources the program reads outputs of. Register with :func:`engine_outputs`."""


def engine_outputs(
    typ: str,
) -> Callable[
    [Callable[[str, Mapping[str, Any]], dict[str, Any]]], Callable[[str, Mapping[str, Any]], dict[str, Any]]
]:
    """Decorator: ``@engine_outputs("aws:rds/instance:Instance") def rds(name, inputs) -> {...}``."""

    def register(
        make: Callable[[str, Mapping[str, Any]], dict[str, Any]],
    ) -> Callable[[str, Mapping[str, Any]], dict[str, Any]]:
        ENGINE_OUTPUTS[typ] = make
        return make

    return register


@dataclass(frozen=True)
class StackOutputs:
    """A stack's exports as the engine keeps them: plain values, and which of them are secret."""

    values: dict[str, Any]
    secret_names: frozenset[str]


class PlanMocks(mocks.Mocks):
    """Deterministic stand-ins for the outputs the program reads; everything else echoes inputs.

    A ``StackReference`` is answered from ``stacks`` (stack name → its planned exports); a
    reference to a stack not planned is an error, as it is for the engine.
    """

    def __init__(self, stacks: Mapping[str, StackOutputs] | None = None) -> None:
        self.stacks = dict(stacks or {})
        self.referenced: list[str] = []

    def new_resource(self, args: mocks.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        # Only what the engine adds: the SDK resolves every other output from its own input, so
        # echoing the inputs back would serialize them twice for the same plan.
        outputs: dict[str, Any] = {}
        name, typ = args.name, args.typ
        if typ == STACK_REFERENCE_TYPE:
            return self._reference(str(args.inputs.get("name", name)))
        if typ == "random:index/randomPassword:RandomPassword":
            outputs["result"] = _mock_password(name, int(args.inputs.get("length", 32)))
        elif typ == "random:index/randomBytes:RandomBytes":
            raw = _digest(name, int(args.inputs.get("length", 16)))
            outputs.update({"base64": base64.b64encode(raw).decode(), "hex": raw.hex()})
        elif typ == "tls:index/privateKey:PrivateKey":
            outputs.update(
                {"privateKeyPem": _pem("PRIVATE KEY", name), "publicKeyPem": _pem("PUBLIC KEY", name)}
            )
        elif typ == "tls:index/certRequest:CertRequest":
            outputs["certRequestPem"] = _pem("CERTIFICATE REQUEST", name)
        elif typ in (
            "tls:index/selfSignedCert:SelfSignedCert",
            "tls:index/locallySignedCert:LocallySignedCert",
        ):
            outputs["certPem"] = _pem("CERTIFICATE", name)
        elif typ == INFLUX_TOKEN_TYPE:
            # A secret, as InfluxDB's token is (the provider marks it so); masked in the plan.
            outputs["token"] = {_SIG_KEY: _SECRET_SIG, "value": f"token-of-{name}"}
        elif typ in (GRAFANA_ORG_TYPE, GRAFANA_TEAM_TYPE):
            outputs["orgId" if typ == GRAFANA_ORG_TYPE else "teamId"] = mock_grafana_id(name)
        elif typ in ENGINE_OUTPUTS:
            outputs.update(ENGINE_OUTPUTS[typ](name, args.inputs))
        return f"{name}-id", outputs

    def _reference(self, qualified: str) -> tuple[str, dict[str, Any]]:
        stack = qualified.rsplit("/", 1)[-1]
        if stack not in self.stacks:
            known = ", ".join(sorted(self.stacks)) or "none"
            raise LookupError(
                f"StackReference {qualified!r}: stack {stack!r} was not planned (planned: {known})"
            )
        self.referenced.append(stack)
        found = self.stacks[stack]
        state = {"name": qualified, "outputs": found.values, "secretOutputNames": sorted(found.secret_names)}
        return qualified, state

    def call(self, args: mocks.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
        return {}, None


class InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs each call at once in the calling thread. The SDK sends every engine call to a thread
    (a real engine is a gRPC server); the mock engine is a Python method, and the hop to a thread
    and back costs more than the call."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # handed to the awaiting task, as a thread would
            future.set_exception(error)
        return future


def _no_stack_trace() -> Any:
    return source_pb2.StackTrace()


# The SDK captures the Python stack of every resource for the engine's diagnostics (about a tenth
# of a plan's time); the mock engine never shows them, so the planner does not take them.
pulumi_resource._get_stack_trace = _no_stack_trace


class RecordingMonitor(mocks.MockMonitor):
    """The mock monitor, keeping each registration as the engine would receive it."""

    def __init__(self, mocks_: mocks.Mocks) -> None:
        super().__init__(mocks_)
        self.recorded: list[PlannedResource] = []
        self.stack_urn: str | None = None

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)
        if request.type == STACK_TYPE:
            self.stack_urn = response.urn
            return response
        parent = request.parent or None
        self.recorded.append(
            PlannedResource(
                urn=response.urn,
                type=request.type,
                name=request.name,
                parent=None if parent == self.stack_urn else parent,
                inputs=clean(rpc.deserialize_properties(request.object)),
                protect=bool(request.protect),
                custom=bool(request.custom),
            )
        )
        return response


# ---------------------------------------------------------------------------------- planning
def engine_config(config: PlatformConfig) -> dict[str, str]:
    """A platform stack's config as the engine hands it to the program (``ironlink:<key>`` → JSON
    text); its tenants are stacks of their own."""
    return {
        f"{NAMESPACE}:{key}": json.dumps(value)
        for key, value in config.model_dump(mode="json", exclude={"tenants"}).items()
    }


def tenant_engine_config(platform: str, tenant: Tenant) -> dict[str, str]:
    """A tenant stack's config as the engine hands it to the program."""
    body = TenantStackConfig(platform=platform, tenant=tenant).model_dump(mode="json")
    return {f"{NAMESPACE}:{key}": json.dumps(value) for key, value in body.items()}


def build_plan(config: PlatformConfig, stack: str) -> Plan:
    """Run ``infra.program`` for platform stack ``stack`` with ``config`` under the mock engine;
    returns what it declared, in order. ``config.tenants`` is not part of it (see
    :func:`build_tenant_plan`, :func:`build_region`)."""
    return run_program(engine_config(config), stack)


def build_tenant_plan(platform: PlatformConfig, platform_plan: Plan, tenant: Tenant) -> Plan:
    """Run ``infra.program`` for the tenant stack of ``tenant`` on the platform ``platform_plan``
    planned (its exports answer the tenant's ``StackReference``; ``platform`` is its config)."""
    if platform_plan.reference_outputs is None:
        raise ValueError(f"plan of {platform_plan.stack!r} carries no exports to reference")
    stack = tenant_stack_name(platform_plan.stack, tenant.id)
    monitor = RecordingMonitor(PlanMocks({platform_plan.stack: platform_plan.reference_outputs}))
    values = tenant_engine_config(platform_plan.stack, tenant)
    return run_program(values, stack, monitor, platforms={platform_plan.stack: platform})


@dataclass
class RegionPlan:
    """A platform stack's plan and the plans of its tenant stacks."""

    platform: Plan
    tenants: dict[str, Plan]
    """Tenant id → its stack's plan."""

    @property
    def plans(self) -> list[Plan]:
        return [self.platform, *self.tenants.values()]

    def merged(self) -> Plan:
        """The region's resources in one view (platform, then tenants; URNs name their stack, so
        none collide), with the platform's exports and program result."""
        resources = [resource for plan in self.plans for resource in plan.resources]
        return Plan(self.platform.stack, resources, self.platform.outputs, self.platform.platform)


def build_region(config: PlatformConfig, stack: str) -> RegionPlan:
    """Plan the platform stack ``stack`` and each tenant of ``config`` as a stack of its own."""
    platform = build_plan(config, stack)
    return RegionPlan(platform, {t.id: build_tenant_plan(config, platform, t) for t in config.tenants})


def run_program(
    values: dict[str, str],
    stack: str,
    monitor: RecordingMonitor | None = None,
    platforms: Mapping[str, PlatformConfig] | None = None,
) -> Plan:
    """Run ``infra.program`` with raw engine config ``values`` (what ``pulumi up`` would pass).

    ``platforms``: platform configs a tenant stack's program may use without reading their stack
    files. Raises what the program raises (e.g. ``StackConfigError``), after which
    ``monitor.recorded`` shows what had been declared; each call runs in its own context.
    """
    run_monitor = monitor or RecordingMonitor(PlanMocks())
    return contextvars.copy_context().run(_run, values, stack, run_monitor, platforms or {})


def _run(
    values: dict[str, str], stack: str, monitor: RecordingMonitor, platforms: Mapping[str, PlatformConfig]
) -> Plan:
    from infra import program

    plan_mocks = monitor.mocks
    settings.ROOT.set(None)
    program.PLATFORM_CONFIGS.set(platforms)
    mocks.set_mocks(
        plan_mocks,
        project=PROJECT,
        stack=stack,
        preview=False,
        monitor=monitor,
        logger=logging.getLogger("ironlink.plan"),
    )
    set_all_config(values)
    _ensure_event_loop().set_default_executor(InlineExecutor())
    result: dict[str, Any] = {}

    async def run() -> None:
        result["platform"] = program.main()
        result["outputs"], result["reference"] = await _stack_outputs()

    _sync_await(run_pulumi_func(run))
    referenced = sorted(set(plan_mocks.referenced)) if isinstance(plan_mocks, PlanMocks) else []
    return Plan(
        stack,
        tree_order(monitor.recorded),
        result.get("outputs", {}),
        result.get("platform"),
        result.get("reference"),
        referenced,
    )


async def _stack_outputs() -> tuple[dict[str, Any], StackOutputs]:
    """The program's exports, masked and as a reference reads them (the mock engine finishes the
    stack before the program runs, so they are read from the root stack, not a registration)."""
    root: Any = settings.get_root_resource()
    masked: dict[str, Any] = {}
    values: dict[str, Any] = {}
    secret: set[str] = set()
    for key, value in root.outputs.items():
        output = Output.from_input(value)
        values[key] = await output.future()
        if await output.is_secret():
            secret.add(key)
            masked[key] = SECRET
        else:
            masked[key] = clean(values[key])
    return masked, StackOutputs(values, frozenset(secret))


def tree_order(resources: list[PlannedResource]) -> list[PlannedResource]:
    """Parents before their children, siblings by type then name: registration order is async,
    this order is stable, so two plans of one stack diff cleanly."""
    children: dict[str | None, list[PlannedResource]] = {}
    for resource in resources:
        children.setdefault(resource.parent, []).append(resource)
    ordered: list[PlannedResource] = []

    def visit(parent: str | None) -> None:
        for child in sorted(children.get(parent, []), key=lambda r: (r.type, r.name)):
            ordered.append(child)
            visit(child.urn)

    visit(None)
    return ordered


# ----------------------------------------------------------------------------------- writing
def manifest_filename(manifest: dict[str, Any]) -> str:
    metadata = manifest.get("metadata", {})
    return f"{manifest['kind'].lower()}-{metadata.get('name', 'unnamed')}.yaml"


def write_plan(plan: Plan, output_dir: Path) -> Path:
    """Write ``<output_dir>/<stack>.json`` and one YAML manifest per Kubernetes object in
    ``<output_dir>/<stack>/`` (manifests of a previous plan of the stack are removed first)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{plan.stack}.json"
    path.write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    manifests_dir = output_dir / plan.stack
    manifests_dir.mkdir(exist_ok=True)
    for stale in manifests_dir.glob("*.yaml"):
        stale.unlink()
    for manifest in plan.manifests():
        (manifests_dir / manifest_filename(manifest)).write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


# The AWS resources' engine outputs register themselves on import (after engine_outputs exists).
from infra import plan_aws as _plan_aws  # noqa: E402,F401
