"""Settings of the dead-letter consumer: ``IRONLINK_DLQ_<FIELD>`` on top of ``IRONLINK_DLQ_SETTINGS_FILE``.

Read like the worker's (:func:`ingest.settings.settings_from_env`): every problem at once, each
naming its variable and value. Secrets never travel with the rest: the broker password comes from
``IRONLINK_DLQ_MQTT_PASSWORD`` and the registry DSN (it holds a password) from
``IRONLINK_DLQ_REGISTRY_DSN``. :func:`dead_letter_settings_for` derives the rest from a stack.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from infra.config import PlatformConfig, TenantId
from infra.tenancy import DEAD_LETTER_ROOT, DEAD_LETTER_SERVICE, dead_letter_subscription
from ingest.settings import SettingsError, settings_env, settings_from_env
from registry.store import DEAD_LETTER_SAMPLE_MAX

ENV_PREFIX = "IRONLINK_DLQ_"
SETTINGS_FILE_VAR = "IRONLINK_DLQ_SETTINGS_FILE"
_SECRETS = {"mqtt_password", "registry_dsn"}
_JSON_FIELDS = {"retention_s"}
HTTP_PORT = 9109
WEEK_S = 7 * 86_400


class DeadLetterSettings(BaseModel):
    """Everything ``python -m ingest.deadletters`` needs; defaults suit a Phase A stack."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Broker: MQTT 5, QoS 1, a persistent session, manual acknowledgements.
    mqtt_host: str = Field(min_length=1)
    mqtt_port: int = Field(default=8883, ge=1, le=65535)
    mqtt_tls: bool = True
    mqtt_ca_file: Path | None = None
    mqtt_cert_file: Path | None = Field(default=None, description="mTLS: CN svc.deadletters.")
    mqtt_key_file: Path | None = None
    mqtt_username: str = DEAD_LETTER_SERVICE
    mqtt_password: SecretStr | None = Field(default=None, description="From IRONLINK_DLQ_MQTT_PASSWORD only.")
    mqtt_client_id: str | None = Field(default=None, description="Default <username>-<hostname>.")
    mqtt_subscription: str = f"{DEAD_LETTER_ROOT}/#"
    mqtt_keepalive_s: int = Field(default=30, ge=5, le=3600)
    mqtt_session_expiry_s: int = Field(default=86_400, ge=60)
    mqtt_receive_maximum: int = Field(
        default=100, ge=1, le=1000, description="Unacknowledged dead letters in flight (the memory bound)."
    )

    # Registry.
    registry_dsn: SecretStr | None = Field(
        default=None, description="From IRONLINK_DLQ_REGISTRY_DSN only; required to run."
    )
    retention_s: dict[TenantId, int] = Field(
        default_factory=dict,
        description="Tenant -> seconds its dead letters are kept (0: forever), where the registry's"
        " route of the tenant (tenant_store_routes.dead_letter_retention_s) says nothing.",
    )
    default_retention_s: int = Field(
        default=WEEK_S, ge=0, description="For tenants not in retention_s, and dead letters of no tenant."
    )
    purge_interval_s: int = Field(default=3600, ge=10, le=86_400)
    replay_poll_s: float = Field(default=5.0, ge=0.1, le=300)
    replay_batch: int = Field(default=100, ge=1, le=1000)
    replay_timeout_s: float = Field(default=10.0, ge=0.5, le=300, description="Wait for one PUBACK.")
    retry_initial_ms: int = Field(default=200, ge=10)
    retry_max_ms: int = Field(default=30_000, ge=10)

    # Sizes.
    max_document_bytes: int = Field(
        default=1 << 20, ge=1024, le=16 << 20, description="Larger dead-letter documents are malformed."
    )
    max_sample_bytes: int = Field(
        default=16_384, ge=0, le=DEAD_LETTER_SAMPLE_MAX, description="Payload bytes stored per dead letter."
    )

    # Operations.
    http_host: str = "0.0.0.0"
    http_port: int = Field(default=HTTP_PORT, ge=0, le=65535)
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @property
    def client_id(self) -> str:
        return self.mqtt_client_id or f"{self.mqtt_username}-{socket.gethostname()}"

    def dsn(self) -> str:
        """The registry DSN; :class:`SettingsError` naming the variable when it is missing."""
        if self.registry_dsn is None or not self.registry_dsn.get_secret_value():
            raise SettingsError([f"{ENV_PREFIX}REGISTRY_DSN: is required"], "dead-letter consumer")
        return self.registry_dsn.get_secret_value()

    def to_env(self) -> dict[str, str]:
        """The non-secret settings as ``IRONLINK_DLQ_*`` variables (what a Deployment sets)."""
        return settings_env(self, prefix=ENV_PREFIX, json_fields=_JSON_FIELDS, secrets=_SECRETS)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DeadLetterSettings:
        return settings_from_env(
            cls,
            os.environ if environ is None else environ,
            prefix=ENV_PREFIX,
            json_fields=_JSON_FIELDS,
            file_var=SETTINGS_FILE_VAR,
            what="dead-letter consumer",
        )


def dead_letter_settings_for(
    config: PlatformConfig, *, mqtt_host: str, mqtt_port: int, **overrides: Any
) -> DeadLetterSettings:
    """The consumer's settings for a stack: the subscription for its broker engine and each
    tenant's dead-letter retention from its tier. ``overrides`` are further fields."""
    return DeadLetterSettings.model_validate(
        {
            "mqtt_host": mqtt_host,
            "mqtt_port": mqtt_port,
            "mqtt_subscription": dead_letter_subscription(config),
            "retention_s": {t.id: config.retention_of(t).dead_letter_seconds for t in config.tenants},
            **overrides,
        }
    )
