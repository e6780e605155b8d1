"""Worker settings: environment variables ``IRONLINK_<FIELD>`` on top of an optional settings file.

Every field of :class:`WorkerSettings` is read from ``IRONLINK_<FIELD NAME IN CAPITALS>``
(mappings as JSON), on top of ``IRONLINK_SETTINGS_FILE`` (JSON or YAML with the lower-case field
names). Secrets never travel with the rest: the broker password comes from
``IRONLINK_MQTT_PASSWORD`` only, the registry's DSN from ``IRONLINK_REGISTRY_DSN`` only, and the
store tokens from the JSON file named by ``IRONLINK_STORE_TOKENS_FILE`` (``{"<tenant>":
"<token>"}``); with ``IRONLINK_REGISTRY_DSN`` the tenants, their store URLs and tokens come from
the registry instead (``ingest/fleet.py``). :meth:`WorkerSettings.to_env` gives the non-secret
environment of a deployment (the ``IngestWorker`` component, ``ironlink dev``), and
:func:`worker_settings_for` derives it from the stack config, so tenants, buckets and
subscription come from ``infra/tenancy.py`` (through ``registry.tenant_routes.tenant_route_for``)
and nowhere else.

Bad settings raise :class:`SettingsError` naming each offending variable and value::

    IRONLINK_MQTT_PORT: 'eighty' is invalid: input should be a valid integer
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator

from infra.config import MachineTypeName, PlatformConfig, TenantId
from infra.tenancy import (
    INGEST_SERVICE,
    REPLAY_FILTER,
    TELEMETRY_FILTER,
    influxdb_instance,
    ingest_subscription,
    replay_subscription,
)
from ingest.contract import (
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_DOCUMENTS,
    DEFAULT_MAX_PAYLOAD_BYTES,
    MachineKey,
)
from registry.tenant_routes import (
    STORE_URL_PATTERN,
    TOKEN_MAX_CHARS,
    InstanceName,
    StoreName,
    TenantStoreRoute,
    TenantStoreRoutes,
    tenant_route_for,
)

ENV_PREFIX = "IRONLINK_"
SETTINGS_FILE_VAR = "IRONLINK_SETTINGS_FILE"
_SECRETS = {"mqtt_password", "registry_dsn"}
_JSON_FIELDS = {"store_urls", "tenants"}
_RUNNING = "running"
"""Validation context of settings read by the process itself (:func:`settings_from_env`)."""
_STORE_ROUTE_FIELDS = {"instance", "org", "bucket", "messages_per_second", "max_age_s"}
"""What a :class:`TenantRoute` and a :class:`~registry.tenant_routes.TenantStoreRoute` share."""
M = TypeVar("M", bound=BaseModel)


class SettingsError(ValueError):
    """Every problem of the worker's settings, each naming its variable (or file key) and value."""

    def __init__(self, problems: Iterable[str], what: str = "worker") -> None:
        self.problems = list(problems)
        count = len(self.problems)
        super().__init__(
            f"{what} settings have {count} problem{'s' if count != 1 else ''}:\n  "
            + "\n  ".join(self.problems)
        )


class TenantRoute(BaseModel):
    """Where one tenant's points go (``infra.tenancy.store_route``) and what the worker accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instance: InstanceName = Field(description="InfluxDB instance name; its URL is in store_urls.")
    org: StoreName
    bucket: StoreName
    messages_per_second: float | None = Field(
        default=None,
        gt=0,
        description="Quota across all replicas, counted on arrival (quota_share_replicas); None = no quota.",
    )
    max_age_s: int | None = Field(
        default=None,
        ge=1,
        description="Oldest ts accepted, in seconds before arrival (the tier's max_age); None = no bound.",
    )
    machines: dict[str, MachineTypeName] = Field(
        default_factory=dict, description="'<site>/<machine>' -> machine type, from the registry."
    )


class WorkerSettings(BaseModel):
    """Everything ``python -m ingest`` needs; defaults suit a Phase A stack."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Broker. MQTT 5: its Receive Maximum is the only way to widen Mosquitto's window of
    # unacknowledged deliveries beyond 20 (max_inflight_messages applies to 3.1.1 clients).
    mqtt_host: str = Field(min_length=1)
    mqtt_port: int = Field(default=8883, ge=1, le=65535)
    mqtt_tls: bool = True
    mqtt_ca_file: Path | None = Field(default=None, description="CA bundle of the broker's certificate.")
    mqtt_cert_file: Path | None = Field(default=None, description="Client certificate (mTLS, CN svc.ingest).")
    mqtt_key_file: Path | None = None
    mqtt_username: str = INGEST_SERVICE
    mqtt_password: SecretStr | None = Field(default=None, description="From IRONLINK_MQTT_PASSWORD only.")
    mqtt_client_id: str | None = Field(
        default=None,
        description="Stable per replica so the session survives restarts; default user-hostname.",
    )
    mqtt_subscription: str = TELEMETRY_FILTER
    mqtt_replay_subscription: str | None = Field(
        default=REPLAY_FILTER, description="Dead letters replayed from the registry (ingest.deadletters)."
    )
    mqtt_keepalive_s: int = Field(default=30, ge=5, le=3600)
    mqtt_session_expiry_s: int = Field(
        default=86_400, ge=60, description="How long the broker keeps queueing for a worker that is away."
    )
    mqtt_receive_maximum: int | None = Field(
        default=None,
        ge=1,
        le=65_535,
        description="Unacknowledged deliveries in flight; default 4 x batch_size (pipelining).",
    )

    # The registry (ingest/fleet.py): with it, tenants (routes, URLs, tokens, quotas) and machines
    # come from it and follow its changes; store_urls, tenants and the tokens file are then ignored.
    registry_dsn: SecretStr | None = Field(
        default=None,
        description="From IRONLINK_REGISTRY_DSN only; read access suffices, and writes to the usage_*"
        " tables with usage_metering, and INSERT/UPDATE on telemetry_gaps for gateways' gap records.",
    )
    fleet_poll_s: float = Field(
        default=60.0,
        ge=1,
        le=3600,
        description="Full re-read of the registry's tenants and machines, in case a notification was lost.",
    )

    # Store: InfluxDB 2.x API (VictoriaMetrics in local dev and tests).
    store_urls: dict[str, Annotated[str, Field(pattern=STORE_URL_PATTERN, max_length=2048)]] = Field(
        default_factory=dict, description="InfluxDB instance name -> URL (without a registry)."
    )
    store_tokens_file: Path | None = Field(default=None, description="JSON {tenant: write token}.")
    store_timeout_ms: int = Field(default=10_000, ge=100)
    tenants: dict[TenantId, TenantRoute] = Field(
        default=None, validate_default=True, description="Required without a registry."
    )

    # Batching and retries.
    batch_size: int = Field(default=500, ge=1, le=50_000)
    flush_interval_ms: int = Field(default=1000, ge=10, le=60_000)
    retry_initial_ms: int = Field(default=200, ge=10)
    retry_max_ms: int = Field(default=30_000, ge=10)

    # Bulkheads (ingest/spool.py): a tenant whose store fails is held and its points spooled on
    # disk, so the batch is acknowledged and no other tenant waits for it.
    spool_dir: Path = Field(
        default=Path("spool"), description="The durable spool's folder: the replica's own volume."
    )
    spool_max_bytes_per_tenant: int = Field(
        default=256 * 2**20,
        ge=2**16,
        description="Bytes spooled per held tenant (line, payload, topic); beyond: store_unavailable.",
    )
    spool_max_bytes: int = Field(
        default=768 * 2**20,
        ge=2**16,
        description="Bytes spooled in all: keep it well below the spool volume (1Gi by default).",
    )
    direct_write_timeout_ms: int = Field(
        default=1500,
        ge=50,
        description="How long a batch waits for one tenant's store before spooling that tenant's points.",
    )
    store_write_threads: int = Field(default=8, ge=1, le=64, description="Tenants written in parallel.")

    # Contract, quota and derived metrics.
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD_BYTES, ge=256)
    max_batch_bytes: int = Field(
        default=DEFAULT_MAX_BATCH_BYTES,
        ge=1024,
        le=64 * 2**20,
        description="What one compressed batch may decompress to (contract v4); beyond: batch_too_large.",
    )
    max_batch_documents: int = Field(
        default=DEFAULT_MAX_BATCH_DOCUMENTS,
        ge=1,
        le=100_000,
        description="Documents (readings, gap records) in one batch; beyond: batch_too_large.",
    )
    max_clock_skew_s: int = Field(
        default=300,
        ge=0,
        le=86_400,
        description="How far ahead of arrival a ts may be (ingest.max_clock_skew_s).",
    )
    quota_share_replicas: int = Field(
        default=1,
        ge=1,
        le=1000,
        description="Replicas sharing each tenant's quota (the minimum count): each admits quota / this.",
    )
    quota_burst_s: int = Field(
        default=60,
        ge=1,
        le=3600,
        description="Seconds of quota a tenant may send at once (token bucket size).",
    )
    dead_letter_payload_bytes: int = Field(
        default=DEFAULT_MAX_PAYLOAD_BYTES,
        ge=0,
        description="Payload bytes kept in a dead letter: at least max_payload_bytes, so that every"
        " message the contract admits is kept whole and can be replayed.",
    )
    derived_window_s: int = Field(default=900, ge=10, description="Window of duty cycle and uptime %.")
    derived_max_gap_s: int = Field(
        default=60, ge=1, description="Longest silence credited to the last status."
    )

    # Usage metering (ingest/usage.py), with a registry: idempotent events, hourly rollups, quota.
    usage_metering: bool = Field(
        default=True,
        description="Count usage per tenant in the registry (writes to its usage_* tables).",
    )
    usage_flush_s: float = Field(
        default=5.0, ge=0.1, le=300, description="How often counted usage is written to the registry."
    )
    usage_dedupe_hours: int = Field(
        default=24,
        ge=1,
        le=24 * 40,
        description="How long a point's identity is remembered: a copy arriving later counts again.",
    )
    usage_journal_max_bytes: int = Field(
        default=64 * 2**20,
        ge=2**16,
        description="Usage not yet in the registry, journalled in spool_dir/usage; beyond: counted as lost.",
    )

    # Operations.
    http_host: str = "0.0.0.0"
    http_port: int = Field(default=9108, ge=0, le=65535)
    shutdown_grace_s: float = Field(default=20.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("dead_letter_payload_bytes")
    @classmethod
    def _dead_letters_keep_whole_messages(cls, value: int, info: ValidationInfo) -> int:
        largest = info.data.get("max_payload_bytes", DEFAULT_MAX_PAYLOAD_BYTES)
        if value < largest:
            raise ValueError(
                f"{value} is smaller than max_payload_bytes ({largest}): a dead letter would keep only a"
                " sample of an admitted message, which could then never be replayed"
            )
        return value

    @field_validator("tenants", mode="before")
    @classmethod
    def _tenants_unless_registry(cls, tenants: Any, info: ValidationInfo) -> Any:
        if tenants is not None:
            return tenants
        # A deployment's settings (worker_settings_for) may leave them out; a worker may not.
        if (info.context or {}).get(_RUNNING) and info.data.get("registry_dsn") is None:
            raise ValueError("is required (unless IRONLINK_REGISTRY_DSN is set: tenants then come from it)")
        return {}

    @field_validator("tenants")
    @classmethod
    def _routes_have_urls(
        cls, tenants: dict[str, TenantRoute], info: ValidationInfo
    ) -> dict[str, TenantRoute]:
        urls = info.data.get("store_urls", {})
        for tenant, route in tenants.items():
            if route.instance not in urls:
                raise ValueError(
                    f"tenant {tenant!r} writes to instance {route.instance!r}, which has no URL in store_urls"
                )
        return tenants

    @property
    def client_id(self) -> str:
        return self.mqtt_client_id or f"{self.mqtt_username}-{socket.gethostname()}"

    @property
    def shared_subscription(self) -> bool:
        """Other replicas share the load: a worker that stops may hand its share over."""
        return self.mqtt_subscription.startswith("$share/")

    @property
    def receive_maximum(self) -> int:
        return self.mqtt_receive_maximum or min(65_535, 4 * self.batch_size)

    def machine_types(self) -> dict[MachineKey, str]:
        """The registry's machines as ``decode`` wants them."""
        types: dict[MachineKey, str] = {}
        for tenant_id, route in self.tenants.items():
            for path, machine_type in route.machines.items():
                site_id, _, machine_id = path.partition("/")
                types[(tenant_id, site_id, machine_id)] = machine_type
        return types

    def store_tokens(self) -> dict[str, str]:
        """Tenant → write token from ``store_tokens_file``; no file means no tokens (VictoriaMetrics).
        With a registry, none: its routes carry the tokens."""
        if self.store_tokens_file is None or self.registry_dsn is not None:
            return {}
        where = f"IRONLINK_STORE_TOKENS_FILE ({self.store_tokens_file})"
        try:
            tokens = json.loads(self.store_tokens_file.read_text())
        except OSError as error:
            raise SettingsError([f"{where}: cannot be read: {error.strerror}"]) from error
        except ValueError as error:
            raise SettingsError([f"{where}: is not valid JSON: {error}"]) from error
        if not isinstance(tokens, dict) or not all(
            isinstance(v, str) and 0 < len(v) <= TOKEN_MAX_CHARS for v in tokens.values()
        ):
            raise SettingsError(
                [f"{where}: must be a JSON object of tenant id -> token (1 to {TOKEN_MAX_CHARS} characters)"]
            )
        missing = [tenant for tenant in self.tenants if tenant not in tokens]
        if missing:
            raise SettingsError([f"{where}: no token for tenant {tenant!r}" for tenant in missing])
        return {tenant: tokens[tenant] for tenant in self.tenants}

    def store_routes(self, tokens: Mapping[str, str]) -> TenantStoreRoutes:
        """Without a registry, the tenant directory from these settings: what the registry's
        ``tenant_store_routes`` rows say in registry mode."""
        return {
            tenant: TenantStoreRoute(
                **route.model_dump(include=_STORE_ROUTE_FIELDS),
                url=self.store_urls[route.instance],
                token=SecretStr(tokens.get(tenant, "")),
            )
            for tenant, route in self.tenants.items()
        }

    def to_env(self) -> dict[str, str]:
        """The non-secret settings as ``IRONLINK_*`` variables (what a Deployment sets); no
        ``IRONLINK_TENANTS`` nor ``IRONLINK_STORE_URLS`` for a worker that reads the registry."""
        env = settings_env(self, prefix=ENV_PREFIX, json_fields=_JSON_FIELDS, secrets=_SECRETS)
        for name in _JSON_FIELDS:
            if not getattr(self, name):
                env.pop(ENV_PREFIX + name.upper())
        return env

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerSettings:
        """Read ``IRONLINK_*`` from ``environ`` (default: the process) on top of the settings file."""
        return settings_from_env(
            cls,
            os.environ if environ is None else environ,
            prefix=ENV_PREFIX,
            json_fields=_JSON_FIELDS,
            file_var=SETTINGS_FILE_VAR,
            what="worker",
        )


def settings_env(
    settings: BaseModel, *, prefix: str, json_fields: Iterable[str], secrets: Iterable[str]
) -> dict[str, str]:
    """The non-secret fields of ``settings`` as ``<prefix><FIELD>`` variables, what
    :func:`settings_from_env` reads back (mappings as compact JSON, booleans in lower case)."""
    json_fields = set(json_fields)
    env: dict[str, str] = {}
    for name, value in settings.model_dump(mode="json", exclude=set(secrets), exclude_none=True).items():
        if name in json_fields:
            text = json.dumps(value, separators=(",", ":"), sort_keys=True)
        elif isinstance(value, bool):
            text = str(value).lower()
        else:
            text = str(value)
        env[prefix + name.upper()] = text
    return env


def settings_from_env(
    model: type[M],
    environ: Mapping[str, str],
    *,
    prefix: str,
    json_fields: Iterable[str],
    file_var: str,
    what: str,
) -> M:
    """A settings model from ``<prefix><FIELD>`` variables on top of the file named by ``file_var``
    (the worker's, and the dead-letter consumer's with its own prefix); every problem at once."""
    json_fields = set(json_fields)
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    problems: list[str] = []
    file = environ.get(file_var)
    if file:
        values.update(_read_file(Path(file), problems, file_var))
        origin.update({key: f"{file_var} ({file}): {key}" for key in values})
    for name in model.model_fields:
        variable = prefix + name.upper()
        if variable not in environ:
            continue
        origin[name] = variable
        text = environ[variable]
        if name in json_fields:
            try:
                values[name] = json.loads(text)
            except ValueError as error:
                problems.append(f"{variable}: {_show(text)} is not valid JSON ({error})")
                values.pop(name, None)
        else:
            values[name] = text
    if not problems:
        try:
            return model.model_validate(values, context={_RUNNING: True})
        except ValidationError as error:
            problems.extend(_describe(error, origin, prefix))
    raise SettingsError(problems, what)


def _read_file(path: Path, problems: list[str], file_var: str = SETTINGS_FILE_VAR) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as error:
        problems.append(f"{file_var}: {str(path)!r} cannot be read: {error.strerror}")
        return {}
    except yaml.YAMLError as error:
        problems.append(f"{file_var}: {str(path)!r} is not valid JSON or YAML: {error}")
        return {}
    if not isinstance(document, dict):
        problems.append(f"{file_var}: {str(path)!r} must hold a mapping of setting -> value")
        return {}
    return document


def _describe(error: ValidationError, origin: Mapping[str, str], prefix: str = ENV_PREFIX) -> list[str]:
    problems = []
    for item in error.errors(include_url=False):
        location = [str(part) for part in item["loc"]] or ["settings"]
        field = location[0]
        where = origin.get(field, prefix + field.upper())
        where += "".join(f".{part}" for part in location[1:])
        if item["type"] == "missing":
            problems.append(f"{where}: is required")
        elif item["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown setting")
        elif item["type"] == "value_error":
            problems.append(f"{where}: {item['ctx']['error']}")
        else:
            message = item["msg"][0].lower() + item["msg"][1:]
            problems.append(f"{where}: {_show(item.get('input'))} is invalid: {message}")
    return problems


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def worker_settings_for(
    config: PlatformConfig,
    *,
    mqtt_host: str,
    mqtt_port: int,
    store_urls: Mapping[str, str] | None = None,
    machines: Mapping[str, Mapping[str, str]] | None = None,
    from_registry: bool = False,
    **overrides: Any,
) -> WorkerSettings:
    """The worker's settings for a stack: the subscription for the stack's broker engine, batching
    from ``ingest:``, and without a registry the routes and quotas per tenant (their instances'
    URLs from ``store_urls``). ``overrides`` are further :class:`WorkerSettings` fields (TLS file
    paths, ``http_port``, ...). ``from_registry``: the settings hold no tenant and no store URL,
    for a worker given ``IRONLINK_REGISTRY_DSN``, which reads its tenants (``tenant_store_routes``,
    written by :func:`registry.tenant_routes.upsert_tenant_route`) and machines from the
    registry. The stack holds no machines:
    ``machines`` (tenant id → ``'<site>/<machine>'`` → type, e.g.
    :meth:`infra.fleet.Fleet.route_machines`) passes them explicitly."""
    routing: dict[str, Any] = {}
    if not from_registry:
        urls = dict(store_urls or {})
        unrouted = sorted({influxdb_instance(config, t) for t in config.tenants} - set(urls))
        if unrouted:
            raise SettingsError([f"store_urls: instance {name!r} has no URL" for name in unrouted])
        routing["store_urls"] = urls
        routing["tenants"] = {
            tenant.id: TenantRoute(
                **tenant_route_for(config, tenant, urls[influxdb_instance(config, tenant)], "").model_dump(
                    include=_STORE_ROUTE_FIELDS
                ),
                machines=dict((machines or {}).get(tenant.id, {})),
            )
            for tenant in config.tenants
        }
    return WorkerSettings.model_validate(
        {
            "mqtt_host": mqtt_host,
            "mqtt_port": mqtt_port,
            "mqtt_subscription": ingest_subscription(config),
            "mqtt_replay_subscription": replay_subscription(config),
            **routing,
            "batch_size": config.ingest.batch_size,
            "flush_interval_ms": config.ingest.flush_interval_ms,
            "max_clock_skew_s": config.ingest.max_clock_skew_s,
            "quota_share_replicas": config.ingest.min_replicas,
            **overrides,
        }
    )
