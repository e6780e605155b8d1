"""Grafana server settings as ``GF_*`` environment variables (secrets come from a Secret, not here).

One replica keeps its SQLite database on a volume. Several replicas must share state: they use
the region's PostgreSQL (``grafana`` database and role) and gossip alert state on 9094 through a
headless Service, so that an alert fires once, not once per replica.
"""

from __future__ import annotations

from dataclasses import dataclass

HTTP_PORT = 3000
GOSSIP_PORT = 9094
HEALTH_PATH = "/api/health"
ADMIN_USER = "admin"
DATA_DIR = "/var/lib/grafana"


@dataclass(frozen=True)
class GrafanaDatabase:
    """The shared PostgreSQL database of an HA Grafana (the password comes from the environment)."""

    host: str
    port: int
    name: str
    user: str
    ssl_mode: str = "disable"
    """libpq's sslmode: ``require`` for RDS, which refuses unencrypted clients."""


def render_grafana_env(
    *, public_url: str, database: GrafanaDatabase | None = None, gossip_host: str | None = None
) -> dict[str, str]:
    """``POD_IP`` must be defined before these when ``gossip_host`` is set (downward API)."""
    env = {
        "GF_SERVER_ROOT_URL": public_url,
        "GF_SERVER_HTTP_PORT": str(HTTP_PORT),
        "GF_PATHS_DATA": DATA_DIR,
        "GF_LOG_MODE": "console",
        "GF_SECURITY_ADMIN_USER": ADMIN_USER,
        "GF_SECURITY_COOKIE_SECURE": "true",
        "GF_USERS_ALLOW_SIGN_UP": "false",
        "GF_AUTH_ANONYMOUS_ENABLED": "false",
        "GF_ANALYTICS_REPORTING_ENABLED": "false",
        "GF_ANALYTICS_CHECK_FOR_UPDATES": "false",
    }
    if database is not None:
        env.update(
            {
                "GF_DATABASE_TYPE": "postgres",
                "GF_DATABASE_HOST": f"{database.host}:{database.port}",
                "GF_DATABASE_NAME": database.name,
                "GF_DATABASE_USER": database.user,
                "GF_DATABASE_SSL_MODE": database.ssl_mode,
            }
        )
    if gossip_host is not None:
        env.update(
            {
                "GF_UNIFIED_ALERTING_HA_PEERS": f"{gossip_host}:{GOSSIP_PORT}",
                "GF_UNIFIED_ALERTING_HA_LISTEN_ADDRESS": f"0.0.0.0:{GOSSIP_PORT}",
                "GF_UNIFIED_ALERTING_HA_ADVERTISE_ADDRESS": f"$(POD_IP):{GOSSIP_PORT}",
            }
        )
    return env
