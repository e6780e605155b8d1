"""Register maps and node ids per machine type: data files, so a new PLC needs a map, not code.

``edge/maps/<type>.modbus.yaml`` lists holding or input registers, ``<type>.opcua.yaml`` node ids
(``{machine}`` stands for the machine's id), each with scaling and the unit. Every name must be a
canonical metric of the machine type in ``ingest.catalog`` and every unit the catalog's: a map that
disagrees with the catalog is refused when the config is loaded, not dead-lettered in the cloud.
MQTT and HTTP sources need no map: they send the catalog's canonical or vendor names.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge.config import EdgeConfigError, Machine, Problem, problems_of
from infra.config import StackConfigError, read_stack_text
from ingest.catalog import MACHINE_TYPES
from ingest.contract import Status

MAPS_DIR = Path(__file__).parent / "maps"
PROTOCOL_OF_ADAPTER = {"modbus_tcp": "modbus", "opcua": "opcua"}
REGISTER_WIDTH = {"uint16": 1, "int16": 1, "uint32": 2, "int32": 2, "float32": 2}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Scaled(_Strict):
    scale: float = 1.0
    offset: float = 0.0
    unit: str = Field(max_length=16)

    def value(self, raw: float) -> float:
        return raw * self.scale + self.offset


class Register(Scaled):
    address: int = Field(ge=0, le=65535)
    type: Literal["uint16", "int16", "uint32", "int32", "float32"] = "uint16"


class StatusSource(_Strict):
    values: dict[int, Status] = Field(min_length=1, max_length=64)

    def state(self, raw: int) -> Status:
        """The state a raw value names; a value the map does not know is a fault."""
        return self.values.get(raw) or "fault"


class StatusRegister(StatusSource):
    address: int = Field(ge=0, le=65535)


class Node(Scaled):
    node: str = Field(min_length=1, max_length=512)


class StatusNode(StatusSource):
    node: str = Field(min_length=1, max_length=512)


class ModbusMap(_Strict):
    machine_type: str
    table: Literal["holding", "input"] = "holding"
    registers: dict[str, Register] = Field(min_length=1, max_length=256)
    status: StatusRegister | None = None

    def span(self) -> tuple[int, int]:
        """First address and register count of one read covering every register and the status."""
        ends = [(r.address, r.address + REGISTER_WIDTH[r.type]) for r in self.registers.values()]
        if self.status is not None:
            ends.append((self.status.address, self.status.address + 1))
        first = min(start for start, _ in ends)
        return first, max(end for _, end in ends) - first


class OpcUaMap(_Strict):
    machine_type: str
    nodes: dict[str, Node] = Field(min_length=1, max_length=256)
    status: StatusNode | None = None


MachineMap = ModbusMap | OpcUaMap


def map_path(machine: Machine) -> Path | None:
    protocol = PROTOCOL_OF_ADAPTER.get(machine.adapter.kind)
    if protocol is None:
        return machine.map
    return machine.map or MAPS_DIR / f"{machine.type}.{protocol}.yaml"


@cache
def _load(path: Path, protocol: str) -> MachineMap:
    try:
        raw = yaml.safe_load(read_stack_text(path))
    except StackConfigError as error:
        raise EdgeConfigError(error.problems) from None
    model = ModbusMap if protocol == "modbus" else OpcUaMap
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise EdgeConfigError([Problem(f"{path}:{p.path}", p.message) for p in problems_of(error)]) from None


def map_problems(index: int, machine: Machine) -> list[Problem]:
    """What is wrong with a machine's map: unreadable, another type's, or not the catalog's."""
    path = map_path(machine)
    if path is None:
        return []
    where = f"machines[{index}].map"
    if not path.is_file():
        return [
            Problem(where, f"{str(path)!r} does not exist (a {machine.adapter.kind} machine needs a map)")
        ]
    try:
        loaded = _load(path, PROTOCOL_OF_ADAPTER[machine.adapter.kind])
    except EdgeConfigError as error:
        return error.problems
    problems = []
    if loaded.machine_type != machine.type:
        problems.append(Problem(where, f"{str(path)!r} maps {loaded.machine_type!r}, not {machine.type!r}"))
    catalog = MACHINE_TYPES[machine.type]
    entries: dict[str, Scaled] = dict(loaded.registers if isinstance(loaded, ModbusMap) else loaded.nodes)
    for name, entry in entries.items():
        metric = catalog.metric(name)
        if metric is None:
            known = ", ".join(m.name for m in catalog.metrics)
            problems.append(Problem(f"{path}:{name}", f"is not a metric of {machine.type} (known: {known})"))
        elif entry.unit != metric.unit:
            problems.append(
                Problem(f"{path}:{name}.unit", f"{entry.unit!r} but the catalog's unit is {metric.unit!r}")
            )
    return problems


def machine_map(machine: Machine) -> MachineMap:
    """The map of a machine whose config was validated (:func:`edge.config.parse_config`)."""
    path = map_path(machine)
    assert path is not None, f"{machine.adapter.kind} has no map"
    return _load(path, PROTOCOL_OF_ADAPTER[machine.adapter.kind])
