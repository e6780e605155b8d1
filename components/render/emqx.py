"""EMQX 5 configuration: ``emqx.conf`` (HOCON) and the environment of each cluster node.

Pure functions; ``MqttBroker`` mounts the file and sets the environment. What the file enforces
(EMQX allows everything by default, so each item closes a door):

- devices connect over TLS on 8883 only; mutual TLS (``verify_peer`` + ``fail_if_no_peer_cert``,
  CN as username) where the stack says ``broker.tls: mtls``; the plaintext listener is disabled
  through ``EMQX_LISTENERS__TCP__DEFAULT__ENABLE=false`` unless ``broker.allow_plaintext``;
  WebSocket listeners are off;
- authentication against the device registry in PostgreSQL (``registry.queries``), with the
  registry's PBKDF2-SHA512 hashes; authorization from the registry's ACL rows only, and
  ``no_match = deny`` — no ``file`` source, whose default ends in ``{allow, all}``;
- per-client ``messages_rate``/``bytes_rate`` and per-listener ``max_conn_rate`` from
  ``broker.limits``; ``mqtt.max_packet_size``;
- behind the region's NLB (Phase C, ``components.aws.ingress``) the TLS listener reads proxy
  protocol v2, and MQTT 5 devices are told ``broker.keepalive_s`` (below the NLB's idle timeout).

Secrets (node cookie, dashboard and registry passwords) are not in the file: they are environment
variables from a Kubernetes Secret (:data:`SECRET_ENV`), EMQX's env overrides beating the file.
Nodes find each other through the Kubernetes API (``k8s`` discovery on the headless Service) and
are named by their stable pod FQDN, since EMQX bakes node names into its data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from components.render.kubernetes import CLUSTER_DOMAIN
from infra.config import PlatformConfig, regional_ingress
from registry.queries import EMQX_AUTHN_QUERY, EMQX_AUTHZ_QUERY, EMQX_PASSWORD_HASH

MQTT_PORT = 1883
MQTTS_PORT = 8883
DASHBOARD_PORT = 18083
EKKA_PORT = 4370
# gen_rpc between nodes: pinned (the Docker image's 5369), so the NetworkPolicy opens the right port
# whatever the image's default discovery (packages use 5370 and "stateless").
RPC_PORT = 5369
CERTS_DIR = "/opt/emqx/etc/certs"
NODE_NAME = "emqx"
APISERVER = "https://kubernetes.default.svc:443"
STATUS_PATH = "/status"
METRICS_PATH = "/api/v5/prometheus/stats"

# Secret key → environment variable. Indexes are 1-based: the first (only) authenticator/source.
SECRET_ENV = {
    "cookie": "EMQX_NODE__COOKIE",
    "dashboard-password": "EMQX_DASHBOARD__DEFAULT_PASSWORD",
    "registry-password": "EMQX_AUTHENTICATION__1__PASSWORD",
}
# The authorizer reads the same registry with the same role.
AUTHZ_PASSWORD_ENV = "EMQX_AUTHORIZATION__SOURCES__1__PASSWORD"
LICENSE_ENV = "EMQX_LICENSE__KEY"
"""The licence key (``broker.license``, EMQX 5.9+), from the Secret: never in the file."""


@dataclass(frozen=True)
class RegistryConnection:
    """Where EMQX reads device credentials and ACL rows (the password comes from the environment)."""

    host: str
    port: int
    database: str
    username: str
    tls: bool = False
    """Encrypt to the database (RDS); the server's certificate is not verified (no RDS CA bundle
    is mounted), as libpq's ``sslmode=require``."""

    @property
    def server(self) -> str:
        return f"{self.host}:{self.port}"


def _rate_limits(config: PlatformConfig) -> dict[str, str]:
    limits = config.broker.limits
    values = {
        "max_conn_rate": limits.max_conn_rate,
        "messages_rate": limits.messages_rate,
        "bytes_rate": limits.bytes_rate,
    }
    return {key: value for key, value in values.items() if value is not None}


# The brokers' authentication failures into the registry's audit trail: a rule on EMQX's CONNACK
# event posts each refused CONNECT to the provisioning service, which counts them per reason,
# address and minute (``provisioning.broker_log``), as the Mosquitto log follower does.
AUTH_FAILURES = "ironlink_auth_failures"
AUTH_FAILURES_CONNECTOR = "ironlink_provisioning"
AUTH_FAILURES_PATH = "/v1/broker/auth-events"
AUTH_FAILURES_SQL = (
    "SELECT clientid, username, peername, sockname, reason_code, timestamp, node"
    " FROM \"$events/client_connack\" WHERE reason_code != 'success'"
)
AUTH_FAILURES_TOKEN_ENV = f"EMQX_ACTIONS__HTTP__{AUTH_FAILURES.upper()}__PARAMETERS__HEADERS__AUTHORIZATION"
"""The broker-log token (``IRONLINK_PROV_BROKER_LOG_TOKEN``) as ``"Bearer <token>"``, from a Secret:
never in the file."""


def auth_failures_authorization(token: str) -> str:
    """The value of :data:`AUTH_FAILURES_TOKEN_ENV`: EMQX parses it as HOCON, so a quoted string."""
    return json.dumps(f"Bearer {token}")


@dataclass(frozen=True)
class AuthFailureReporting:
    """Where EMQX reports refused connections: the provisioning service's base URL, and the CA of
    its HTTPS certificate (None: plain HTTP inside the cluster)."""

    url: str
    cacertfile: str | None = None


def auth_failure_settings(reporting: AuthFailureReporting) -> dict[str, Any]:
    """The connector, HTTP action and rule (EMQX 5.8 ``connectors``/``actions``/``rule_engine``);
    with no ``body`` the action posts the rule's selected fields as one JSON object."""
    ssl: dict[str, Any] = {"enable": reporting.cacertfile is not None}
    if reporting.cacertfile is not None:
        ssl |= {"cacertfile": reporting.cacertfile, "verify": "verify_peer"}
    return {
        "connectors": {
            "http": {
                AUTH_FAILURES_CONNECTOR: {
                    "enable": True,
                    "url": reporting.url,
                    "connect_timeout": "5s",
                    "pool_size": 4,
                    "headers": {"content-type": "application/json"},
                    "ssl": ssl,
                }
            }
        },
        "actions": {
            "http": {
                AUTH_FAILURES: {
                    "enable": True,
                    "connector": AUTH_FAILURES_CONNECTOR,
                    "parameters": {
                        "method": "post",
                        "path": AUTH_FAILURES_PATH,
                        "headers": {"content-type": "application/json"},
                    },
                    # A flood queues at most this much in the node, then EMQX drops and counts it.
                    "resource_opts": {"max_buffer_bytes": "16MB", "request_ttl": "30s"},
                }
            }
        },
        "rule_engine": {
            "rules": {
                AUTH_FAILURES: {
                    "enable": True,
                    "sql": AUTH_FAILURES_SQL,
                    "actions": [f"http:{AUTH_FAILURES}"],
                    "description": "Refused CONNECTs to the Ironlink audit trail",
                }
            }
        },
    }


def emqx_settings(
    config: PlatformConfig,
    registry: RegistryConnection,
    certs_dir: str = CERTS_DIR,
    auth_failures: AuthFailureReporting | None = None,
) -> dict[str, Any]:
    """The configuration tree written to ``emqx.conf``; ``auth_failures``: report refused CONNECTs
    to the provisioning service (:func:`auth_failure_settings`)."""
    mtls = config.broker.tls == "mtls"
    limits = _rate_limits(config)
    listeners: dict[str, Any] = {
        "ssl": {
            "default": {
                "bind": f"0.0.0.0:{MQTTS_PORT}",
                # Behind the region's NLB every connection opens with a PROXY v2 header (the
                # device's address); a listener that does not expect it reads it as TLS and fails.
                "proxy_protocol": regional_ingress(config),
                **limits,
                "ssl_options": {
                    "cacertfile": f"{certs_dir}/ca.crt",
                    "certfile": f"{certs_dir}/tls.crt",
                    "keyfile": f"{certs_dir}/tls.key",
                    "versions": ["tlsv1.3", "tlsv1.2"],
                    "verify": "verify_peer" if mtls else "verify_none",
                    "fail_if_no_peer_cert": mtls,
                },
            }
        },
        "ws": {"default": {"enable": False}},
        "wss": {"default": {"enable": False}},
    }
    if config.broker.allow_plaintext:
        listeners["tcp"] = {"default": {"bind": f"0.0.0.0:{MQTT_PORT}", **limits}}
    mqtt: dict[str, Any] = {
        "max_packet_size": config.broker.limits.max_packet_size,
        # What MQTT 5 devices must use, below any load balancer's idle timeout (broker.keepalive_s).
        "server_keepalive": config.broker.keepalive_s,
        # The worker acknowledges a whole batch at once: let a window of batches be in flight, and
        # queue (not drop) what arrives while the store is down -- EMQX's defaults are 32 and 1000.
        "max_inflight": min(65_535, 4 * config.ingest.batch_size),
        "max_mqueue_len": config.broker.max_queued_messages,
        "mqueue_store_qos0": False,
        # One machine always reaches the same worker replica, so its derived metrics stay whole.
        "shared_subscription_strategy": "hash_topic",
    }
    if mtls:
        mqtt["peer_cert_as_username"] = "cn"
    database = {
        "server": registry.server,
        "database": registry.database,
        "username": registry.username,
        "pool_size": 8,
        "ssl": {"enable": registry.tls, "verify": "verify_none"} if registry.tls else {"enable": False},
    }
    reporting = auth_failure_settings(auth_failures) if auth_failures is not None else {}
    return {
        **reporting,
        "cluster": {"name": "ironlink"},
        "rpc": {"port_discovery": "manual", "tcp_server_port": RPC_PORT},
        "log": {"console": {"enable": True, "level": "warning"}, "file": {"enable": False}},
        "dashboard": {"listeners": {"http": {"bind": DASHBOARD_PORT}}},
        "mqtt": mqtt,
        "listeners": listeners,
        "authentication": [
            {
                "mechanism": "password_based",
                "backend": "postgresql",
                "enable": True,
                **database,
                "password_hash_algorithm": dict(EMQX_PASSWORD_HASH),
                "query": EMQX_AUTHN_QUERY,
            }
        ],
        "authorization": {
            "no_match": "deny",
            "deny_action": "ignore",
            "cache": {"enable": True, "max_size": 32, "ttl": "1m"},
            "sources": [{"type": "postgresql", "enable": True, **database, "query": EMQX_AUTHZ_QUERY}],
        },
    }


_BARE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _hocon(value: Any, indent: int) -> str:
    pad = "  " * indent
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a quoted HOCON string: no substitution of ${username} inside
    if isinstance(value, list):
        if all(not isinstance(item, dict | list) for item in value):
            return "[" + ", ".join(_hocon(item, indent) for item in value) + "]"
        items = "".join(f"{pad}  {_hocon(item, indent + 1)}\n" for item in value)
        return "[\n" + items + pad + "]"
    if isinstance(value, Mapping):
        return "{\n" + _hocon_fields(value, indent + 1) + pad + "}"
    raise TypeError(f"cannot write {value!r} as HOCON")


def _hocon_fields(tree: Mapping[str, Any], indent: int) -> str:
    pad = "  " * indent
    lines = []
    for key, value in tree.items():
        name = key if _BARE_KEY.match(key) else json.dumps(key)
        operator = " " if isinstance(value, Mapping) else " = "
        lines.append(f"{pad}{name}{operator}{_hocon(value, indent)}\n")
    return "".join(lines)


def render_hocon(tree: Mapping[str, Any]) -> str:
    return _hocon_fields(tree, 0)


def render_emqx_conf(
    config: PlatformConfig,
    registry: RegistryConnection,
    certs_dir: str = CERTS_DIR,
    auth_failures: AuthFailureReporting | None = None,
) -> str:
    header = (
        f"# Rendered by Ironlink for a phase {config.phase} stack in region {config.region}: do not edit.\n"
    )
    return header + render_hocon(emqx_settings(config, registry, certs_dir, auth_failures))


def node_host(namespace: str, headless_service: str, pod: str = "$(POD_NAME)") -> str:
    """A node's stable FQDN through the headless Service (``$(POD_NAME)`` is expanded by Kubernetes)."""
    return f"{pod}.{headless_service}.{namespace}.{CLUSTER_DOMAIN}"


def render_emqx_env(config: PlatformConfig, *, namespace: str, headless_service: str) -> dict[str, str]:
    """Node identity, Kubernetes discovery and the plaintext switch, as environment variables.

    Values are parsed as HOCON by EMQX, so a URL is quoted (``//`` would start a comment).
    The pod must define ``POD_NAME`` before these (downward API).
    """
    return {
        "EMQX_NAME": NODE_NAME,
        "EMQX_HOST": node_host(namespace, headless_service),
        "EMQX_CLUSTER__DISCOVERY_STRATEGY": "k8s",
        "EMQX_CLUSTER__K8S__APISERVER": json.dumps(APISERVER),
        "EMQX_CLUSTER__K8S__SERVICE_NAME": headless_service,
        "EMQX_CLUSTER__K8S__NAMESPACE": namespace,
        "EMQX_CLUSTER__K8S__ADDRESS_TYPE": "hostname",
        "EMQX_CLUSTER__K8S__SUFFIX": CLUSTER_DOMAIN,
        "EMQX_LISTENERS__TCP__DEFAULT__ENABLE": "true" if config.broker.allow_plaintext else "false",
    }
