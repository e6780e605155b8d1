"""The tenant as its dashboards and alert rules see it: its model, store route and datasource."""

from __future__ import annotations

from dataclasses import dataclass

from dashboards.flux import FluxQuery
from infra.config import PlatformConfig, Tenant
from infra.tenancy import StoreRoute, grafana_names, store_route
from ingest.catalog import MACHINE_TYPES, MachineType


@dataclass(frozen=True)
class TenantView:
    """What a tenant's dashboards and alert rules are built from."""

    tenant: Tenant
    route: StoreRoute
    datasource_uid: str

    @classmethod
    def of(cls, config: PlatformConfig, tenant: Tenant) -> TenantView:
        return cls(tenant, store_route(config, tenant), grafana_names(config, tenant).datasource_uid)

    @property
    def machine_types(self) -> list[MachineType]:
        """The catalog types the stack declares for the tenant (``machine_types``), by name."""
        return [MACHINE_TYPES[name] for name in sorted(set(self.tenant.machine_types))]

    def query(self, text: str, ref_id: str = "A") -> FluxQuery:
        return FluxQuery(text, self.datasource_uid).ref_id(ref_id)
