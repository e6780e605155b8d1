"""Settings of the provisioning service: ``IRONLINK_PROV_<FIELD>`` on top of ``IRONLINK_PROV_SETTINGS_FILE``.

Read like the worker's (:func:`ingest.settings.settings_from_env`): every problem at once, each
naming its variable and value, and ``python -m provisioning`` exits 2 on any. Secrets never travel
with the rest: the registry DSN comes from ``IRONLINK_PROV_REGISTRY_DSN``, the broker's admin
password from ``IRONLINK_PROV_MOSQUITTO_PASSWORD`` and the broker-log token from
``IRONLINK_PROV_BROKER_LOG_TOKEN`` only. The CA signing keys live in ``ca_dir``
(the service's own volume), never in the settings, the stack or Pulumi state.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, model_validator

from infra.config import RegionName
from ingest.service_settings import ServiceSettings

if TYPE_CHECKING:
    from provisioning.brokers import BrokerDirectory

ENV_PREFIX = "IRONLINK_PROV_"
HTTP_PORT = 8443


class ProvisioningSettings(ServiceSettings):
    """Everything ``python -m provisioning`` needs; defaults suit a Phase A stack."""

    ENV_PREFIX = ENV_PREFIX
    SETTINGS_FILE_VAR = "IRONLINK_PROV_SETTINGS_FILE"
    SECRETS = frozenset({"registry_dsn", "mosquitto_password", "broker_log_token"})
    WHAT = "provisioning service"

    # Registry.
    registry_dsn: SecretStr | None = Field(default=None, description="From IRONLINK_PROV_REGISTRY_DSN only.")
    registry_pool_size: int = Field(default=8, ge=1, le=64)

    # Issuing CAs: one per region, and one per tenant at tenant_ca_isolation and above.
    region: RegionName = "local"
    ca_dir: Path = Field(
        default=Path("ca"), description="Persistent folder of the CA keys (0600), generated on first start."
    )
    ca_key_file: Path | None = Field(default=None, description="A configured region CA key (PEM) instead.")
    ca_cert_file: Path | None = Field(default=None, description="Its certificate (PEM); both or neither.")
    tenant_ca_isolation: int | None = Field(
        default=3,
        ge=1,
        le=3,
        description="Tenants at this isolation level or above get their own CA; None: never.",
    )
    ca_validity_days: int = Field(default=3650, ge=30, le=36_500)
    cert_validity_days: int = Field(default=90, ge=1, le=825)
    renew_before_days: int = Field(
        default=30, ge=1, description="Renewal is allowed from this many days before a certificate expires."
    )
    crl_validity_hours: int = Field(default=24, ge=1, le=24 * 30)

    # HTTP: TLS with optional client certificates (mutual TLS for POST /v1/renew).
    http_host: str = "0.0.0.0"
    http_port: int = Field(default=HTTP_PORT, ge=0, le=65535)
    tls_cert_file: Path | None = Field(default=None, description="The service's server certificate (PEM).")
    tls_key_file: Path | None = None
    public_url: str = Field(
        default="https://localhost:8443",
        max_length=256,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="The endpoint devices reach, as QR codes carry it.",
    )

    # Brokers: EMQX reads the registry itself; Mosquitto is driven over dynamic security.
    broker: Literal["emqx", "mosquitto"] = "emqx"
    mosquitto_host: str = "127.0.0.1"
    mosquitto_port: int = Field(default=8883, ge=1, le=65535)
    mosquitto_username: str = "svc.provisioning"
    mosquitto_password: SecretStr | None = Field(
        default=None, description="From IRONLINK_PROV_MOSQUITTO_PASSWORD."
    )
    mosquitto_ca_file: Path | None = None

    # Claims: token buckets in this process (per source address and per claim token).
    claim_rate_per_source: float = Field(default=1.0, gt=0, description="Claims per second per address.")
    claim_burst_per_source: int = Field(default=10, ge=1)
    claim_rate_per_token: float = Field(default=5.0, gt=0, description="Claims per second per token.")
    claim_burst_per_token: int = Field(default=50, ge=1)
    admin_token_max_days: int = Field(default=366, ge=1)
    claim_token_max_days: int = Field(default=90, ge=1)

    # The brokers' authentication failures (provisioning.broker_log) into the audit trail.
    broker_log_token: SecretStr | None = Field(
        default=None,
        description="From IRONLINK_PROV_BROKER_LOG_TOKEN: what a broker-pod sidecar presents to"
        " POST /v1/broker/auth-failures (refused while unset).",
    )
    broker_log_file: Path | None = Field(
        default=None, description="A Mosquitto log this service follows itself (one machine: ironlink dev)."
    )
    broker_log_window_s: int = Field(
        default=60, ge=1, le=3600, description="Failures are counted per window of this many seconds."
    )
    broker_log_rows_per_minute: int = Field(
        default=600, ge=1, le=100_000, description="Audit rows the brokers may add a minute, all together."
    )

    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _pairs(self) -> ProvisioningSettings:
        if (self.ca_key_file is None) != (self.ca_cert_file is None):
            raise ValueError(f"{ENV_PREFIX}CA_KEY_FILE and {ENV_PREFIX}CA_CERT_FILE: give both or neither")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(f"{ENV_PREFIX}TLS_CERT_FILE and {ENV_PREFIX}TLS_KEY_FILE: give both or neither")
        if self.renew_before_days >= self.cert_validity_days:
            raise ValueError(
                f"{ENV_PREFIX}RENEW_BEFORE_DAYS: {self.renew_before_days} must be less than"
                f" {ENV_PREFIX}CERT_VALIDITY_DAYS ({self.cert_validity_days})"
            )
        return self

    def broker_directory(self) -> BrokerDirectory:
        """Where registry changes are pushed: nothing for EMQX (it reads the registry), Mosquitto's
        dynamic-security plugin otherwise (connected; :class:`provisioning.brokers.BrokerError` if
        it cannot be reached)."""
        from provisioning.brokers import MosquittoDynamicSecurity, RegistryOnly

        if self.broker == "emqx":
            return RegistryOnly()
        password = self.mosquitto_password.get_secret_value() if self.mosquitto_password else None
        ca_file = str(self.mosquitto_ca_file) if self.mosquitto_ca_file else None
        return MosquittoDynamicSecurity(
            self.mosquitto_host, self.mosquitto_port, self.mosquitto_username, password, ca_file=ca_file
        ).connect()
