"""Settings of the API: ``IRONLINK_API_<FIELD>`` on top of ``IRONLINK_API_SETTINGS_FILE``.

Read like the provisioning service's: every problem at once, each naming its variable and value,
and ``python -m api`` exits 2 on any. The registry DSN is a secret and comes from
``IRONLINK_API_REGISTRY_DSN`` only. Store read tokens are never settings: each tenant's comes from
its registry route (``tenant_store_routes.read_token``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from ingest.service_settings import ServiceSettings
from ingest.settings import SettingsError

ENV_PREFIX = "IRONLINK_API_"
HTTP_PORT = 8090


class ApiSettings(ServiceSettings):
    """Everything ``python -m api`` needs; defaults suit a Phase A stack."""

    ENV_PREFIX = ENV_PREFIX
    SETTINGS_FILE_VAR = "IRONLINK_API_SETTINGS_FILE"
    SECRETS = frozenset({"registry_dsn", "smtp_password"})
    WHAT = "API"

    # Registry: API keys, fleet, gaps, store routes.
    registry_dsn: SecretStr | None = Field(default=None, description="From IRONLINK_API_REGISTRY_DSN only.")
    registry_pool_size: int = Field(default=8, ge=1, le=64)

    # Telemetry store. VictoriaMetrics: one shared URL, the tenant bound by a label filter the
    # server adds. InfluxDB: each tenant's URL, org, bucket and read token from its registry route.
    store_kind: Literal["victoriametrics", "influxdb"] = "victoriametrics"
    store_url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://\S+$",
        description="VictoriaMetrics' base URL (required for victoriametrics; unused for influxdb).",
    )
    store_timeout_s: float = Field(default=10.0, gt=0, le=120)

    # HTTP.
    host: str = "0.0.0.0"
    port: int = Field(default=HTTP_PORT, ge=0, le=65535)

    request_max_bytes: int = Field(
        default=262_144,
        ge=4096,
        le=16_777_216,
        description="Largest request body (413 beyond; the Grafana webhook: alert_webhook_max_bytes).",
    )

    # Rate limits per API key, in points scanned (a request costs at least 1).
    rate_points_per_second: float = Field(default=2_000.0, gt=0, description="Refill rate per key.")
    rate_burst_points: int = Field(default=200_000, ge=1, description="Bucket size per key.")

    # Time series bounds.
    series_max_range_days: int = Field(
        default=3700, ge=1, le=36_600, description="Longest from..to (a little over 10 years)."
    )
    series_max_points: int = Field(
        default=10_000,
        ge=10,
        le=30_000,
        description="Most points one series page returns (VictoriaMetrics answers at most 30,000 a series).",
    )
    latest_lookback_s: int = Field(
        default=86_400, ge=60, le=31 * 86_400, description="How far back the latest status is looked for."
    )

    # Uptime (api/uptime.py): per machine, site and tenant, from status_code.
    uptime_max_range_days: int = Field(default=366, ge=1, le=3660, description="Longest from..to.")
    uptime_hold_s: int = Field(
        default=300, ge=1, le=86_400, description="A status holds this long; silent longer: unknown."
    )
    uptime_max_buckets: int = Field(
        default=20_000, ge=10, le=29_000, description="Most buckets per machine (VictoriaMetrics: 30,000)."
    )
    uptime_max_points: int = Field(
        default=2_000_000, ge=1000, le=20_000_000, description="Most machines x buckets per request."
    )
    uptime_max_intervals: int = Field(default=200, ge=1, le=10_000, description="Downtimes listed a machine.")

    # Maintenance log (api/maintenance.py).
    maintenance_max_entries_per_machine: int = Field(default=10_000, ge=1, le=1_000_000)

    # Usage (api/usage.py).
    usage_max_range_days: int = Field(default=3660, ge=1, le=36_600, description="Longest from..to.")
    usage_max_periods: int = Field(default=1000, ge=1, le=100_000, description="Most periods per answer.")

    # Live feed (api/live.py): a WebSocket per site, polling the store.
    live_poll_s: float = Field(default=5.0, ge=0.2, le=300, description="Between two looks at the store.")
    live_max_per_key: int = Field(default=4, ge=1, le=100, description="Open feeds per key per replica.")
    live_max_feeds: int = Field(default=1000, ge=1, le=100_000, description="Open feeds per replica.")
    live_auth_timeout_s: float = Field(default=10.0, gt=0, le=60, description="For the key as first message.")
    live_recheck_s: float = Field(
        default=60.0, ge=1, le=3600, description="A feed's key is checked again this often (revoked: closed)."
    )

    # Alerts (api/alerts.py, api/notify/): the Grafana webhook and the notification dispatcher.
    alert_webhook_max_bytes: int = Field(
        default=1_048_576, ge=4096, le=16_777_216, description="Largest webhook body accepted (413 beyond)."
    )
    notify_dispatcher: bool = Field(default=True, description="Run the dispatcher in this process.")
    notify_poll_s: float = Field(default=5.0, gt=0, le=300, description="Queue poll between rounds.")
    notify_batch: int = Field(default=20, ge=1, le=500, description="Attempts claimed per round.")
    notify_concurrency: int = Field(default=4, ge=1, le=32, description="Sends in flight per replica.")
    notify_max_attempts: int = Field(default=6, ge=1, le=100)
    notify_backoff_s: float = Field(default=30.0, gt=0, le=3600, description="Wait before attempt 2.")
    notify_backoff_max_s: float = Field(default=3600.0, gt=0, le=86_400)
    notify_timeout_s: float = Field(default=10.0, gt=0, le=120, description="Per HTTP or SMTP send.")
    notify_lease_s: float = Field(
        default=300.0, ge=30, le=86_400, description="A 'sending' attempt older than this was interrupted."
    )
    notify_allow_http: bool = Field(default=False, description="Allow http:// targets (tests, dev).")
    notify_allow_private: bool = Field(
        default=False, description="Allow targets on loopback/private addresses (tests, dev)."
    )
    smtp_host: str | None = Field(default=None, max_length=253, description="SMTP relay; None: no email.")
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_security: Literal["starttls", "tls", "none"] = "starttls"
    smtp_username: str | None = Field(default=None, max_length=256)
    smtp_password: SecretStr | None = Field(default=None, description="From IRONLINK_API_SMTP_PASSWORD only.")
    smtp_from: str = Field(default="Ironlink alerts <alerts@localhost>", min_length=3, max_length=256)

    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def require_store(self) -> None:
        """:class:`SettingsError` when the store settings do not fit the store kind."""
        if self.store_kind == "victoriametrics" and not self.store_url:
            raise SettingsError(
                [f"{ENV_PREFIX}STORE_URL: is required when STORE_KIND is victoriametrics"], self.WHAT
            )
