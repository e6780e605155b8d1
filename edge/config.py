"""One gateway's configuration: a YAML file, validated whole before anything starts.

Every problem is reported at once by path and value (``machines[1].adapter.port: 70000 is invalid``),
the way the stack config reports its own; the file is read through the same bounded reader
(``infra.config.read_stack_text``: size, UTF-8, depth, alias expansion, duplicate keys). The
register maps and node ids a machine type needs come from data files (``edge/maps.py``), so the
same checks cover them: a metric the catalog lacks, or a unit it does not use, is a config problem.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from infra.config import MachineId, MachineTypeName, SiteId, StackConfigError, TenantId, read_stack_text
from infra.config import Problem as Problem

GatewayId = Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length=63)]
_FSYNC = re.compile(r"^(always|batch:(\d{1,5}))$")
MAX_MACHINES = 1000
"""One gateway serves a line of machines, not a plant: each machine holds a broker session."""
MACHINE_ID_MAX = 48  # infra.config.MachineId


class EdgeConfigError(ValueError):
    """Every problem of a gateway config; nothing has started when it is raised."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(set(problems), key=lambda p: (p.path, p.message))
        count = len(self.problems)
        lines = "\n".join(f"  {problem}" for problem in self.problems)
        super().__init__(f"gateway config has {count} problem{'s' if count != 1 else ''}:\n{lines}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Gateway(_Strict):
    """Who this gateway is: its readings carry these ids, and its seq ids its ``id``."""

    id: GatewayId
    tenant: TenantId
    site: SiteId


class Tls(_Strict):
    ca_file: Path
    # A machine's own certificate and key, when it has no claimed identity under ``identity_dir``.
    cert_file: Path | None = None
    key_file: Path | None = None


class Claim(_Strict):
    """Enrollment through the provisioning service (``ironlink-agent enroll``)."""

    api: str = Field(pattern=r"^https?://", max_length=512)
    token_file: Path
    ca_file: Path | None = None
    renew_before_days: int = Field(default=30, ge=1, le=365)
    # The running agent checks its certificates this often (and retries a refused claim, re-reading
    # ``token_file``, so a replaced token needs no restart).
    check_interval_s: float = Field(default=3600, ge=1, le=86400)


class Uplink(_Strict):
    """The broker, and how fast the agent may talk to it."""

    host: str = Field(min_length=1, max_length=253)
    port: int = Field(default=8883, ge=1, le=65535)
    tls: Tls | None = None
    # Per machine ``<machine>.pem`` / ``<machine>.key``, written by ``enroll`` (certificate identity).
    identity_dir: Path | None = None
    claim: Claim | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    # The uplink's budget, messages per second for all machines; history gets ``backfill_share`` of it.
    max_messages_per_s: int = Field(default=2000, ge=1, le=100_000)
    backfill_share: float = Field(default=0.8, gt=0, le=1)
    # A reading sent but not confirmed by a receipt within this time is sent again.
    resend_after_s: float = Field(default=30, ge=1, le=3600)
    # History readings sent and not yet confirmed by a receipt, for all machines together: the
    # backlog waits on the gateway, not in the broker's and the worker's queues ahead of live
    # readings. About a second of what a worker stores.
    history_in_flight: int = Field(default=2000, ge=1, le=1_000_000)
    reconnect_initial_s: float = Field(default=0.5, ge=0.05, le=60)
    reconnect_max_s: float = Field(default=30, ge=0.1, le=3600)


class Store(_Strict):
    """The durable local store (SQLite, WAL) and its caps."""

    path: Path
    # ``always``: a reading is committed and fsynced before it counts (nothing lost on kill -9 or a
    # power cut). ``batch:<ms>``: committed at most every <ms>: a kill -9 loses at most that window.
    fsync: str = "always"
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=256 * 1024, le=1 << 40)
    min_free_bytes: int = Field(default=512 * 1024 * 1024, ge=0, le=1 << 40)
    max_age_s: int = Field(default=30 * 86400, ge=60, le=366 * 86400)

    @field_validator("fsync")
    @classmethod
    def _fsync_policy(cls, value: str) -> str:
        match = _FSYNC.fullmatch(value)
        if match is None or (match.group(2) is not None and not 1 <= int(match.group(2)) <= 10_000):
            raise ValueError(f"{value!r} is not a fsync policy (always, or batch:<1..10000 ms>)")
        return value

    @property
    def batch_ms(self) -> int | None:
        """The commit interval of ``batch:<ms>``, None for ``always``."""
        return None if self.fsync == "always" else int(self.fsync.split(":")[1])


class ModbusTcp(_Strict):
    kind: Literal["modbus_tcp"]
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(default=502, ge=1, le=65535)
    unit: int = Field(default=1, ge=0, le=247)
    # ``rtu``: RTU frames carried over TCP (a serial gateway); ``socket``: Modbus TCP (MBAP).
    framing: Literal["socket", "rtu"] = "socket"
    poll_ms: int = Field(default=1000, ge=1, le=3_600_000)
    timeout_s: float = Field(default=1.0, gt=0, le=60)


class OpcUa(_Strict):
    kind: Literal["opcua"]
    endpoint: str = Field(pattern=r"^opc\.tcp://", max_length=512)
    publishing_ms: int = Field(default=1000, ge=1, le=3_600_000)
    timeout_s: float = Field(default=2.0, gt=0, le=60)


class LocalMqtt(_Strict):
    kind: Literal["mqtt"]
    host: str = Field(default="127.0.0.1", max_length=253)
    port: int = Field(default=1883, ge=1, le=65535)
    # A JSON object on this topic: ``{"ts"?, "status"?, "metrics": {...}}`` in the map's names.
    topic: str = Field(min_length=1, max_length=256)


class HttpPush(_Strict):
    kind: Literal["http"]
    host: str = Field(default="127.0.0.1", max_length=253)
    port: int = Field(ge=1, le=65535)


Adapter = Annotated[ModbusTcp | OpcUa | LocalMqtt | HttpPush, Field(discriminator="kind")]


class Machine(_Strict):
    id: MachineId
    type: MachineTypeName
    adapter: Adapter
    # The data file with its registers or nodes: ``edge/maps/<type>.<protocol>.yaml`` by default.
    map: Path | None = None


class Health(_Strict):
    """The gateway's own health as telemetry (``edge/health.py``): the gateway is enrolled as a
    machine of type ``edge_gateway`` (id: the gateway's id) and publishes on its own topic."""

    interval_s: float = Field(default=15, ge=1, le=3600)


class AgentConfig(_Strict):
    gateway: Gateway
    uplink: Uplink
    store: Store
    machines: list[Machine] = Field(min_length=1, max_length=MAX_MACHINES)
    # A source that has not answered for this long is reported down (and retried with backoff).
    source_down_after_s: float = Field(default=30, gt=0, le=3600)
    source_retry_max_s: float = Field(default=30, ge=0.1, le=3600)
    # ``ironlink-agent status`` reads what the agent writes here, every ``status_interval_s``.
    status_file: Path | None = None
    status_interval_s: float = Field(default=1.0, ge=0.1, le=300)
    # Publish the agent's health to the platform (off when absent).
    health: Health | None = None

    @model_validator(mode="after")
    def _unique_machines(self) -> AgentConfig:
        seen: set[str] = set()
        for machine in self.machines:
            if machine.id in seen:
                raise ValueError(f"machine id {machine.id!r} is given twice")
            seen.add(machine.id)
        if self.health is not None and (self.gateway.id in seen or len(self.gateway.id) > MACHINE_ID_MAX):
            raise ValueError(
                f"gateway.id {self.gateway.id!r} publishes health as a machine: it must be no machine's"
                f" id and at most {MACHINE_ID_MAX} characters"
            )
        return self

    @property
    def status_path(self) -> Path:
        return self.status_file or self.store.path.with_suffix(".status.json")


def _path(location: tuple[int | str, ...]) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "config"


def problems_of(error: ValidationError) -> list[Problem]:
    """pydantic's errors as ``path: message`` problems, the value quoted (cut at 80 characters)."""
    problems = []
    for item in error.errors(include_url=False):
        location = tuple(part for part in item["loc"] if not (isinstance(part, str) and "[" in part))
        kind, value = item["type"], item.get("input")
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        if kind == "missing":
            message = "is required"
        elif kind == "extra_forbidden":
            message = f"unknown setting {location[-1]!r}"
        elif kind == "value_error":
            message = str(item["ctx"]["error"])
        elif kind == "union_tag_invalid":
            message = f"{shown} is not an adapter kind (known: {item['ctx']['expected_tags']})"
        else:
            message = f"{shown} is invalid: {item['msg']}"
        problems.append(Problem(_path(location), message))
    return problems


def parse_config(raw: Any) -> AgentConfig:
    """The validated config, maps included, or :class:`EdgeConfigError` with every problem."""
    from edge.maps import map_problems  # the maps read the catalog; config stays importable alone

    try:
        config = AgentConfig.model_validate(raw)
    except ValidationError as error:
        raise EdgeConfigError(problems_of(error)) from None
    problems = [
        problem for index, machine in enumerate(config.machines) for problem in map_problems(index, machine)
    ]
    if problems:
        raise EdgeConfigError(problems)
    return config


def load_config(path: Path) -> AgentConfig:
    """Read and validate a gateway config file (bounded like a stack file)."""
    try:
        text = read_stack_text(path)
    except StackConfigError as error:
        raise EdgeConfigError(error.problems) from None
    return parse_config(yaml.safe_load(text))
