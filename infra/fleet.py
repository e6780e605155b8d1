"""The fleet: each tenant's sites, machines and device credentials.

The fleet is runtime state and lives in the registry; no Pulumi stack file holds it. This model is
the shape a fleet has *outside* the registry: a fleet file (``localdev/demo-fleet.yaml``, the
output of ``ironlink fleet import --export``), or the ``sites:`` of an old-style stack file that
``ironlink fleet import`` moves into the registry (``registry/fleet_import.py``). Problems are
reported all at once, each named by its path, like a stack's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from infra.config import (
    DisplayName,
    MachineId,
    MachineTypeName,
    PasswordHash,
    Problem,
    Section,
    SiteId,
    StackConfigError,
    TenantId,
    _path,
    _problems_from,
    _show,
    read_stack_text,
)


class Machine(Section):
    """A machine and the device identity that publishes its telemetry."""

    id: MachineId
    type: MachineTypeName
    password_hash: PasswordHash | None = None


class Site(Section):
    id: SiteId
    name: DisplayName | None = None
    machines: list[Machine] = Field(default_factory=list)


class TenantFleet(Section):
    """One tenant's sites (the tenant itself is declared by the stack file)."""

    id: TenantId
    sites: list[Site] = Field(default_factory=list)

    @property
    def machines(self) -> Iterator[tuple[Site, Machine]]:
        return ((site, machine) for site in self.sites for machine in site.machines)


class Fleet(Section):
    tenants: list[TenantFleet] = Field(default_factory=list)

    def of(self, tenant_id: str) -> TenantFleet:
        """The tenant's fleet (empty when the fleet does not name it)."""
        return next((t for t in self.tenants if t.id == tenant_id), TenantFleet(id=tenant_id))

    def machines(self) -> Iterator[tuple[str, Site, Machine]]:
        """Every machine as ``(tenant id, site, machine)``."""
        return ((tenant.id, site, machine) for tenant in self.tenants for site, machine in tenant.machines)

    def route_machines(self) -> dict[str, dict[str, str]]:
        """``tenant id -> {'<site>/<machine>': type}``: what ``worker_settings_for`` takes."""
        return {
            tenant.id: {f"{site.id}/{machine.id}": machine.type for site, machine in tenant.machines}
            for tenant in self.tenants
        }


def machine_types(tenant: TenantFleet) -> list[str]:
    """The catalog types a tenant's machines have, sorted: its ``machine_types`` in the stack."""
    return sorted({machine.type for _, machine in tenant.machines})


def _unique(ids: Iterable[str], where: list[str | int]) -> Iterator[Problem]:
    seen: dict[str, int] = {}
    for index, item_id in enumerate(ids):
        if item_id in seen:
            message = f"{item_id!r} is already used by {where[-1]}[{seen[item_id]}]"
            yield Problem(_path([*where, index, "id"]), message)
        seen.setdefault(item_id, index)


def parse_fleet(tenants: Any, source: str | None = None) -> Fleet:
    """Validate a list of ``{id, sites: [...]}`` (a fleet file's ``tenants:``, or an old-style
    stack's tenants, whose other keys are ignored). Raises :class:`StackConfigError` with every problem."""
    if not isinstance(tenants, list):
        problem = Problem(_path(["tenants"]), f"{_show(tenants)} is not a list of tenants")
        raise StackConfigError([problem], source)
    problems: list[Problem] = []
    valid: list[TenantFleet] = []
    for index, item in enumerate(tenants):
        raw = {k: item[k] for k in ("id", "sites") if k in item} if isinstance(item, Mapping) else item
        try:
            fleet = TenantFleet.model_validate(raw)
        except ValidationError as error:
            problems.extend(_problems_from(error, ("tenants", index)))
            continue
        problems.extend(_unique((site.id for site in fleet.sites), ["tenants", index, "sites"]))
        for site_index, site in enumerate(fleet.sites):
            where: list[str | int] = ["tenants", index, "sites", site_index, "machines"]
            problems.extend(_unique((machine.id for machine in site.machines), where))
        valid.append(fleet)
    problems.extend(_unique((tenant.id for tenant in valid), ["tenants"]))
    if problems:
        raise StackConfigError(problems, source)
    return Fleet(tenants=valid)


def load_fleet_file(path: Path) -> Fleet:
    """Read a fleet file (``tenants: [{id, sites: [{id, name, machines: [...]}]}]``)."""
    text = read_stack_text(path, path.name)  # the same size and shape bounds as a stack file
    try:
        document = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise StackConfigError([Problem(str(path), f"is not valid YAML: {error}")], path.name) from error
    if not isinstance(document, dict) or set(document) - {"tenants"}:
        raise StackConfigError([Problem(str(path), "must be a mapping with one key, 'tenants:'")], path.name)
    return parse_fleet(document.get("tenants") or [], path.name)


def dump_fleet(fleet: Fleet, header: str = "") -> str:
    """A fleet file's text; ``header`` lines become comments at its top."""
    body = {"tenants": [tenant.model_dump(exclude_none=True) for tenant in fleet.tenants]}
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comments + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)
