"""Request and response bodies of the provisioning API. Every size a caller controls is bounded;
ids follow the stack model's rules (``infra.config``), so a bad one is a 422 naming the field."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from infra.config import DisplayName, MachineId, MachineTypeName, SiteId, TenantId
from provisioning.ca import CSR_MAX_BYTES
from registry.provisioning import TOKEN_MAX_LENGTH

Csr = Annotated[
    str,
    StringConstraints(min_length=1, max_length=CSR_MAX_BYTES),
    Field(description="PEM CSR, at most 8 KiB."),
]
Token = Annotated[str, StringConstraints(min_length=1, max_length=TOKEN_MAX_LENGTH)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(BaseModel):
    """Every refusal: a machine-readable code and a sentence."""

    code: str
    detail: str


class AdminTokenCreate(_Body):
    label: DisplayName
    tenant_id: TenantId | None = Field(
        default=None, description="None: platform scope (platform callers only)."
    )
    expires_in_days: int = Field(ge=1, le=3660)


class AdminTokenCreated(BaseModel):
    id: str
    token: str = Field(description="Shown once; only its hash is stored.")
    tenant_id: str | None
    expires_at: datetime


class SiteCreate(_Body):
    id: SiteId
    name: DisplayName | None = None


class SiteOut(BaseModel):
    id: str
    name: str | None


class MachineCreate(_Body):
    site_id: SiteId
    id: MachineId
    type: MachineTypeName


class MachineUpdate(_Body):
    site_id: SiteId | None = Field(
        default=None, description="Move to this site (the device must enroll again)."
    )
    disabled: bool | None = None


class MachineOut(BaseModel):
    site_id: str
    id: str
    type: str
    disabled: bool
    device: str | None


class MachineChanged(BaseModel):
    machine: MachineOut | None
    device_removed: str | None = None


class DeviceEnroll(_Body):
    site_id: SiteId
    machine_id: MachineId
    csr: Csr | None = Field(default=None, description="Sign this CSR; without one a password is generated.")
    rotate: bool = Field(default=False, description="Replace the machine's existing device credential.")


class Credential(BaseModel):
    """A device identity as issued: a password (shown once) or a certificate."""

    username: str
    method: Literal["password", "certificate"]
    password: str | None = Field(default=None, description="Shown once; only its $7$ hash is stored.")
    certificate: str | None = Field(default=None, description="PEM, CN = username.")
    ca_certificate: str | None = Field(default=None, description="The issuing CA (PEM).")
    not_after: datetime | None = None


class DeviceOut(BaseModel):
    username: str
    site_id: str
    machine_id: str
    method: str
    issued_at: datetime
    revoked: bool


class ClaimTokenCreate(_Body):
    site_id: SiteId
    machine_type: MachineTypeName | None = None
    count: int = Field(default=1, ge=1, le=100_000, description="How many devices may claim with it.")
    expires_in_hours: int = Field(ge=1, le=24 * 366)


class ClaimTokenOut(BaseModel):
    id: str
    site_id: str
    machine_type: str | None
    count: int
    remaining: int
    expires_at: datetime
    revoked: bool


class ClaimTokenCreated(ClaimTokenOut):
    token: str = Field(description="Shown once; only its hash is stored.")
    qr_payload: str = Field(description="What the QR code carries: JSON with the token and the endpoint.")


class ClaimRequest(_Body):
    token: Token
    machine_id: MachineId
    machine_type: MachineTypeName | None = Field(
        default=None, description="Required if the token names none."
    )
    tenant_id: TenantId | None = Field(default=None, description="The tenant the device expects (checked).")
    csr: Csr | None = Field(default=None, description="The device's own key; without it: a password.")


class RenewRequest(_Body):
    csr: Csr


class BrokerAuthFailure(_Body):
    """Refusals of one reason from one address in one window (``provisioning.broker_log``)."""

    window_start: datetime
    reason: str = Field(pattern=r"^[a-z_]{1,48}$", description="provisioning.broker_log.REASONS, or EMQX's")
    address: str = Field(max_length=64, pattern=r"^[0-9A-Za-z.:%*<>_-]+$")
    count: int = Field(ge=1, le=10_000_000)
    first_at: datetime
    last_at: datetime
    listeners: list[int] = Field(default_factory=list, max_length=16)
    client_ids: list[Annotated[str, Field(max_length=128)]] = Field(default_factory=list, max_length=5)
    usernames: list[Annotated[str, Field(max_length=128)]] = Field(default_factory=list, max_length=5)


class BrokerAuthFailures(_Body):
    broker: str = Field(min_length=1, max_length=64, pattern=r"^[0-9A-Za-z._-]+$")
    rows: list[BrokerAuthFailure] = Field(max_length=500)


class BrokerAuthEvent(BaseModel):
    """One refused CONNECT as EMQX's rule on ``$events/client_connack`` posts it
    (``components.render.emqx``); the service counts these per window, as the log follower does."""

    model_config = ConfigDict(extra="ignore")  # EMQX adds fields; none of them is stored

    reason_code: str = Field(pattern=r"^[a-z_]{1,48}$")
    clientid: str | None = Field(default=None, max_length=1024)
    username: str | None = Field(default=None, max_length=1024)
    peername: str | None = Field(default=None, max_length=64)
    sockname: str | None = Field(default=None, max_length=64)
    timestamp: int | None = Field(default=None, ge=0, description="Milliseconds since the epoch.")
    node: str | None = Field(default=None, max_length=255)


class Recorded(BaseModel):
    recorded: int


class Health(BaseModel):
    status: str
