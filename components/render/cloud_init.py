"""The cloud-init document of a Phase A stack on one EC2 instance (``aws.vm``).

It installs the Debian packages the dev platform's servers come from, this project's Python (the
worker, the dead-letter consumer, the provisioning API, the Ironlink API) into ``/opt/ironlink``,
and writes the same files ``ironlink dev`` runs, rendered by the same functions: Mosquitto's
config and its dynamic-security seed (:mod:`components.render.mosquitto`), the worker's and the
consumer's environment (``worker_settings_for``/``dead_letter_settings_for``), the provisioning
service's and the API's settings. Each process is a systemd unit; only Mosquitto's TLS listener
on 8883 listens beyond loopback (its certificate listener binds loopback too: certificate devices
are not served here; the API is reached over an SSH tunnel).

Everything here is a pure function of its arguments, so a test reads the document without AWS.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from api.settings import ApiSettings
from components.render.mosquitto import (
    DYNSEC_ADMIN,
    BrokerAccount,
    DynamicSecurity,
    MosquittoPaths,
    render_dynamic_security_config,
    render_mosquitto_conf,
    seed_if_absent_command,
)
from infra.config import PlatformConfig
from infra.tenancy import DEAD_LETTER_SERVICE, INGEST_SERVICE
from ingest.deadletters.settings import dead_letter_settings_for
from ingest.settings import worker_settings_for
from provisioning.settings import ProvisioningSettings

DEBIAN_PACKAGES = ("mosquitto", "postgresql", "victoria-metrics", "openssl", "python3-venv")
"""The servers' packages of the Makefile's ``DEBIAN_PACKAGES`` (not its test and CLI tools)."""
MQTT_PORT = 8883
LOOPBACK = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"
# Internal ports, on loopback only.
MQTT_CERTIFICATE_PORT = 8884
REGISTRY_PORT = 5432
STORE_PORT = 8428
WORKER_PORT = 9108
DEAD_LETTERS_PORT = 9109
PROVISIONING_PORT = 8443
API_PORT = 8090

ETC = "/etc/ironlink"
STATE = "/var/lib/ironlink"
VENV = "/opt/ironlink"
PYTHON = f"{VENV}/bin/python"
PG_BIN = "/usr/lib/postgresql/15/bin"
REGISTRY_SOCKETS = "/run/ironlink-registry"
DYNSEC_PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
"""Where Debian's mosquitto package puts the plugin on amd64 (the AMI's architecture)."""
CA_FILE = f"{ETC}/ca.pem"
DYNSEC_SEED = f"{ETC}/mosquitto/dynamic-security.seed.json"
DYNSEC_STATE = f"{STATE}/mosquitto/dynamic-security.json"
MOSQUITTO_CONF = f"{ETC}/mosquitto/mosquitto.conf"
MOSQUITTO_PATHS = MosquittoPaths(
    cafile=CA_FILE,
    certfile=f"{ETC}/mosquitto/server.pem",
    keyfile=f"{ETC}/mosquitto/server.key",
    password_file="",  # dynamic-security mode: the plugin holds identities and ACLs
    acl_file="",
    persistence_dir=f"{STATE}/mosquitto/data/",
)
PROVISIONING_CERT = f"{ETC}/provisioning/server.pem"
PROVISIONING_KEY = f"{ETC}/provisioning/server.key"
SERVICE_ACCOUNT = "ironlink"
"""The account the project's own Python runs as (as ``ironlink dev`` runs it when root)."""
UNITS = ("registry", "store", "broker", "provisioning", "ingest", "dead-letters", "api")
"""The systemd units (``ironlink-<name>.service``), in start order."""
_PACKAGED_SERVICES = ("mosquitto.service", "postgresql.service", "victoria-metrics.service")


@dataclass(frozen=True)
class VmSecrets:
    """What the Pulumi program generated for the VM, resolved (PEMs, passwords, ``$7$`` hashes)."""

    ca_cert_pem: str
    broker_cert_pem: str
    broker_key_pem: str
    provisioning_cert_pem: str
    provisioning_key_pem: str
    passwords: Mapping[str, str]
    """Broker identity → password: ``admin.dynsec``, ``svc.ingest``, ``svc.deadletters``."""
    password_hashes: Mapping[str, str]
    """The same identities → their ``$7$`` hashes (what the plugin's seed holds)."""


@dataclass(frozen=True)
class VmFile:
    path: str
    content: str
    owner: str = "root:root"
    mode: str = "0644"


def registry_dsn(config: PlatformConfig) -> str:
    """The registry over its Unix socket (trust for local connections, as ``ironlink dev`` has it)."""
    return f"host={REGISTRY_SOCKETS} port={REGISTRY_PORT} user=postgres dbname={config.postgres.database}"


def dynamic_security() -> DynamicSecurity:
    return DynamicSecurity(
        DYNSEC_PLUGIN,
        DYNSEC_STATE,
        mtls_port=MQTT_CERTIFICATE_PORT,
        device_capath=f"{STATE}/mosquitto/device-ca",
    )


def mosquitto_conf(config: PlatformConfig) -> str:
    """The broker's config: the TLS listener on every interface (the security group admits 8883)."""
    return render_mosquitto_conf(
        config,
        MOSQUITTO_PATHS,
        tls_port=MQTT_PORT,
        bind_address=ALL_INTERFACES,
        dynamic_security=dynamic_security(),
    )


def dynamic_security_seed(config: PlatformConfig, secrets: VmSecrets) -> str:
    hashes = secrets.password_hashes
    services = [BrokerAccount(user, hashes[user]) for user in (INGEST_SERVICE, DEAD_LETTER_SERVICE)]
    return render_dynamic_security_config(config, BrokerAccount(DYNSEC_ADMIN, hashes[DYNSEC_ADMIN]), services)


def environment_file(env: Mapping[str, str]) -> str:
    """A systemd ``EnvironmentFile``: one ``KEY="value"`` a line, quotes and backslashes escaped."""
    escaped = {key: value.replace("\\", "\\\\").replace('"', '\\"') for key, value in env.items()}
    return "".join(f'{key}="{value}"\n' for key, value in sorted(escaped.items()))


def worker_env(config: PlatformConfig, secrets: VmSecrets) -> dict[str, str]:
    """The worker in registry mode, as ``ironlink dev`` starts it."""
    settings = worker_settings_for(
        config,
        mqtt_host=LOOPBACK,
        mqtt_port=MQTT_PORT,
        from_registry=True,
        mqtt_ca_file=CA_FILE,
        http_host=LOOPBACK,
        http_port=WORKER_PORT,
    )
    return {
        **settings.to_env(),
        "IRONLINK_MQTT_PASSWORD": secrets.passwords[INGEST_SERVICE],
        "IRONLINK_REGISTRY_DSN": registry_dsn(config),
    }


def dead_letters_env(config: PlatformConfig, secrets: VmSecrets) -> dict[str, str]:
    settings = dead_letter_settings_for(
        config,
        mqtt_host=LOOPBACK,
        mqtt_port=MQTT_PORT,
        mqtt_ca_file=CA_FILE,
        http_host=LOOPBACK,
        http_port=DEAD_LETTERS_PORT,
    )
    return {
        **settings.to_env(),
        "IRONLINK_DLQ_MQTT_PASSWORD": secrets.passwords[DEAD_LETTER_SERVICE],
        "IRONLINK_DLQ_REGISTRY_DSN": registry_dsn(config),
    }


def provisioning_env(config: PlatformConfig, secrets: VmSecrets) -> dict[str, str]:
    """The provisioning API on loopback (no port but 8883 is public), the broker as ``admin.dynsec``."""
    settings = ProvisioningSettings.model_validate(
        {
            "region": config.region,
            "ca_dir": f"{STATE}/provisioning/ca",
            "http_host": LOOPBACK,
            "http_port": PROVISIONING_PORT,
            "tls_cert_file": PROVISIONING_CERT,
            "tls_key_file": PROVISIONING_KEY,
            "public_url": f"https://localhost:{PROVISIONING_PORT}",
            "broker": "mosquitto",
            "mosquitto_host": LOOPBACK,
            "mosquitto_port": MQTT_PORT,
            "mosquitto_username": DYNSEC_ADMIN,
            "mosquitto_ca_file": CA_FILE,
        }
    )
    return {
        **settings.to_env(),
        "IRONLINK_PROV_REGISTRY_DSN": registry_dsn(config),
        "IRONLINK_PROV_MOSQUITTO_PASSWORD": secrets.passwords[DYNSEC_ADMIN],
    }


def api_env(config: PlatformConfig) -> dict[str, str]:
    """The API on loopback (reached over an SSH tunnel: the security group admits 8883 and 22),
    VictoriaMetrics as the store, as ``ironlink dev`` runs it."""
    settings = ApiSettings.model_validate(
        {
            "store_kind": "victoriametrics",
            "store_url": f"http://{LOOPBACK}:{STORE_PORT}",
            "host": LOOPBACK,
            "port": API_PORT,
        }
    )
    return {**settings.to_env(), "IRONLINK_API_REGISTRY_DSN": registry_dsn(config)}


def vm_files(config: PlatformConfig, secrets: VmSecrets) -> list[VmFile]:
    """Every file the VM needs beside the packages: keys 0600 to the account that reads them."""
    if config.broker.engine != "mosquitto" or config.broker.tls == "mtls":
        raise ValueError(
            f"ironlink:broker: engine {config.broker.engine!r}, tls {config.broker.tls!r}: a VM runs "
            "Mosquitto with password devices over TLS (phase A, broker.tls 'tls')"
        )
    service = f"{SERVICE_ACCOUNT}:{SERVICE_ACCOUNT}"
    files = [
        VmFile(CA_FILE, secrets.ca_cert_pem),
        VmFile(MOSQUITTO_CONF, mosquitto_conf(config)),
        VmFile(MOSQUITTO_PATHS.certfile, secrets.broker_cert_pem),
        VmFile(MOSQUITTO_PATHS.keyfile, secrets.broker_key_pem, "mosquitto:mosquitto", "0600"),
        VmFile(DYNSEC_SEED, dynamic_security_seed(config, secrets), "mosquitto:mosquitto", "0600"),
        VmFile(PROVISIONING_CERT, secrets.provisioning_cert_pem),
        VmFile(PROVISIONING_KEY, secrets.provisioning_key_pem, service, "0600"),
        VmFile(f"{ETC}/ingest.env", environment_file(worker_env(config, secrets)), service, "0600"),
        VmFile(
            f"{ETC}/dead-letters.env", environment_file(dead_letters_env(config, secrets)), service, "0600"
        ),
        VmFile(
            f"{ETC}/provisioning.env", environment_file(provisioning_env(config, secrets)), service, "0600"
        ),
        VmFile(f"{ETC}/api.env", environment_file(api_env(config)), service, "0600"),
    ]
    files += [
        VmFile(f"/etc/systemd/system/ironlink-{name}.service", text) for name, text in units(config).items()
    ]
    return files


# ------------------------------------------------------------------------------ systemd units
def _command(argv: Sequence[str]) -> str:
    """A systemd command line: words quoted as the shell would, ``$`` and ``%`` escaped (systemd
    expands ``$VAR`` and ``%`` specifiers in Exec lines)."""
    return " ".join(shlex.quote(word) for word in argv).replace("$", "$$").replace("%", "%%")


def _unit(description: str, after: Sequence[str], service: Mapping[str, str | Sequence[str]]) -> str:
    requires = " ".join(f"ironlink-{name}.service" for name in after)
    unit = [
        "[Unit]",
        f"Description=Ironlink {description}",
        "After=network-online.target" + (f" {requires}" if requires else ""),
        "Wants=network-online.target",
        *([f"Requires={requires}"] if requires else []),
        "",
        "[Service]",
    ]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "full",
        "PrivateTmp": "yes",
        **service,
    }.items():
        unit += [f"{key}={item}" for item in ([value] if isinstance(value, str) else value)]
    return "\n".join([*unit, "Restart=on-failure", "", "[Install]", "WantedBy=multi-user.target", ""])


def _python_unit(description: str, module: str, state: str, after: Sequence[str]) -> str:
    return _unit(
        description,
        after,
        {
            "Type": "simple",
            "User": SERVICE_ACCOUNT,
            "Group": SERVICE_ACCOUNT,
            "EnvironmentFile": f"{ETC}/{state}.env",
            "StateDirectory": f"ironlink/{state}",
            "StateDirectoryMode": "0700",
            "WorkingDirectory": f"{STATE}/{state}",
            "ExecStart": _command([PYTHON, "-m", module]),
        },
    )


def units(config: PlatformConfig) -> dict[str, str]:
    """One unit per process of ``ironlink dev``, keyed by the names of :data:`UNITS`."""
    data = f"{STATE}/registry"
    initdb = [
        f"{PG_BIN}/initdb", "-D", data, "-U", "postgres", "--auth-local=trust",
        "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-instructions",
    ]  # fmt: skip
    first_start = f'test -e "$1/PG_VERSION" || exec {shlex.join(initdb)}'
    createdb = [
        "/usr/bin/createdb", "-h", REGISTRY_SOCKETS, "-p", str(REGISTRY_PORT), "-U", "postgres",
        config.postgres.database,
    ]  # fmt: skip
    return {
        "registry": _unit(
            "registry (PostgreSQL 15)",
            [],
            {
                "Type": "notify",
                "User": "postgres",
                "Group": "postgres",
                "StateDirectory": "ironlink/registry",
                "StateDirectoryMode": "0700",
                "RuntimeDirectory": "ironlink-registry",
                "ExecStartPre": _command(["/bin/sh", "-c", first_start, "initdb", data]),
                "ExecStart": _command(
                    [
                        f"{PG_BIN}/postgres",
                        "-D",
                        data,
                        "-p",
                        str(REGISTRY_PORT),
                        "-c",
                        f"listen_addresses={LOOPBACK}",
                        "-c",
                        f"unix_socket_directories={REGISTRY_SOCKETS}",
                    ]
                ),
                # The database on the first start; afterwards it exists and createdb's failure is ignored.
                "ExecStartPost": "-" + _command(createdb),
                "KillSignal": "SIGINT",  # PostgreSQL's fast shutdown
            },
        ),
        "store": _unit(
            "store (VictoriaMetrics)",
            [],
            {
                "Type": "simple",
                "User": "_victoria-metrics",
                "StateDirectory": "ironlink/store",
                "StateDirectoryMode": "0700",
                "ExecStart": _command(
                    [
                        "/usr/bin/victoria-metrics",
                        f"-httpListenAddr={LOOPBACK}:{STORE_PORT}",
                        f"-storageDataPath={STATE}/store",
                        "-retentionPeriod=100y",
                        "-dedup.minScrapeInterval=1ms",
                    ]
                ),
            },
        ),
        "broker": _unit(
            "MQTT broker (Mosquitto, TLS on 8883)",
            [],
            {
                "Type": "simple",
                "User": "mosquitto",
                "Group": "mosquitto",
                "StateDirectory": "ironlink/mosquitto ironlink/mosquitto/data ironlink/mosquitto/device-ca",
                "StateDirectoryMode": "0700",
                # The plugin's first state only while it has none: it rewrites the file after each change.
                "ExecStartPre": _command(seed_if_absent_command(DYNSEC_SEED, DYNSEC_STATE)),
                "ExecStart": _command(["/usr/sbin/mosquitto", "-c", MOSQUITTO_CONF]),
            },
        ),
        "provisioning": _python_unit(
            "provisioning API", "provisioning", "provisioning", ["registry", "broker"]
        ),
        "ingest": _python_unit("ingestion worker", "ingest", "ingest", ["registry", "broker", "store"]),
        "dead-letters": _python_unit(
            "dead-letter consumer", "ingest.deadletters", "dead-letters", ["registry", "broker"]
        ),
        "api": _python_unit("Ironlink API", "api", "api", ["registry", "store"]),
    }


# ------------------------------------------------------------------------------ the document
def render_cloud_init(config: PlatformConfig, package: str, secrets: VmSecrets) -> str:
    """The ``#cloud-config`` user data of the VM.

    The packaged services are kept from starting on install (``policy-rc.d``) and then disabled:
    Debian's VictoriaMetrics would listen on every interface, Mosquitto on 1883. Files owned by a
    package's account are written after the packages (``defer``), when that account exists.
    """
    no_start = VmFile(
        "/usr/sbin/policy-rc.d",
        "#!/bin/sh\n# cloud-init: no service starts on install\nexit 101\n",
        mode="0755",
    )
    written: list[dict[str, Any]] = [_write(no_start, defer=False)]
    written += [_write(item, defer=True) for item in vm_files(config, secrets)]
    commands: list[list[str]] = [
        ["rm", "-f", no_start.path],
        ["systemctl", "disable", "--now", *_PACKAGED_SERVICES],
        ["python3", "-m", "venv", VENV],
        [f"{VENV}/bin/pip", "install", "--no-cache-dir", package],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", *(f"ironlink-{name}.service" for name in UNITS)],
    ]
    document = {
        "users": [
            "default",
            {
                "name": SERVICE_ACCOUNT,
                "system": True,
                "shell": "/usr/sbin/nologin",
                "homedir": f"{STATE}/ingest",
                "no_create_home": True,
            },
        ],
        "package_update": True,
        "packages": list(DEBIAN_PACKAGES),
        "write_files": written,
        "runcmd": commands,
    }
    return "#cloud-config\n" + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=1000)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so the files read in the document as they will on disk."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def _write(item: VmFile, *, defer: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "path": item.path,
        "content": item.content,
        "owner": item.owner,
        "permissions": item.mode,
    }
    return {**entry, "defer": True} if defer else entry
