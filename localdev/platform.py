"""Phase A on one machine: the stack's broker, registry, store and worker as local processes.

:class:`DevPlatform` turns a validated stack (``stacks/Pulumi.dev.yaml``) into four supervised
processes of real Debian binaries, started in dependency order and kept under one state folder
(:mod:`localdev.state`):

============  ==========================================================  ===================
process       what it runs                                                account (as root)
============  ==========================================================  ===================
postgres      PostgreSQL 15, the registry: migrations + the stack's rows  postgres
victoria-...  VictoriaMetrics, the store (InfluxDB v2 write path)         _victoria-metrics
mosquitto     Mosquitto with dynamic security, config rendered like the   mosquitto (it drops
              ``MqttBroker`` component's: passwords over TLS on 8883,     privileges itself)
              certificates (CN = identity) on a second loopback port
ingest        the ingest worker (``python -m ingest``) as ``svc.ingest``  ironlink, or nobody
dead-letters  the dead-letter consumer (``python -m ingest.deadletters``)  ironlink, or nobody
              as ``svc.deadletters``: ``dlq/#`` into the registry
provisioning  the provisioning API (``python -m provisioning``), HTTPS on   ironlink, or nobody
              loopback with the dev CA's certificate, its own issuing CAs;
              drives the broker's plugin as ``admin.dynsec``
api           the Ironlink API (``python -m api``), HTTP on loopback: the  ironlink, or nobody
              registry over its socket, VictoriaMetrics as the store
============  ==========================================================  ===================

``up`` converges: a running process whose command line, environment and config files are
unchanged is left alone, a dead one is started again, and one whose configuration changed (an
edited stack file) is restarted. ``down`` stops them in reverse order and waits until no process of
theirs is left.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from pathlib import Path

import psycopg
from psycopg import sql

from api.settings import ApiSettings
from components.render.mosquitto import (
    DYNSEC_ADMIN,
    BrokerAccount,
    DynamicSecurity,
    MosquittoPaths,
    render_dynamic_security_config,
    render_mosquitto_conf,
)
from infra.config import PlatformConfig
from infra.fleet import Fleet
from infra.tenancy import (
    DEAD_LETTER_SERVICE,
    INGEST_SERVICE,
    device_username,
    tenant_service_username,
)
from ingest.deadletters.settings import dead_letter_settings_for
from ingest.settings import worker_settings_for
from localdev import pki, servers
from localdev.state import (
    Credentials,
    Layout,
    Ports,
    demo_fleet,
    generated_devices,
    load_json_secret,
    make_dir,
    with_device_credentials,
    write_public,
    write_secret,
)
from localdev.supervisor import PidFiles, ProcessRecord, fingerprint, listening, server_pid, stop
from localdev.victoria import StoreUnavailableError, TenantSeen, VictoriaMetrics
from provisioning.brokers import BrokerError, MosquittoDynamicSecurity
from provisioning.settings import ProvisioningSettings
from registry import store as registry
from registry.access import service_usernames
from registry.fleet_import import import_fleet
from registry.roles import INGEST_ROLE, role_exists
from registry.tenant_routes import tenant_route_for, upsert_tenant_route

LOOPBACK = "127.0.0.1"
# The dynamic-security admin ``up`` creates the demo devices as: not the provisioning service's
# ``admin.dynsec``, whose session a second login under that username (the client id) would take over.
DEVICE_SYNC_ADMIN = "admin.devsync"
# Start order: what the worker needs comes first; ``down`` goes the other way.
PROCESSES = ("postgres", "victoria-metrics", "mosquitto", "provisioning", "ingest", "dead-letters", "api")
# What ``up`` does between starting processes, reported like them: the registry's sync after
# PostgreSQL, the tenants' store routes once the store's port is final, the demo devices after
# Mosquitto, the issuing CAs after the provisioning service.
STEPS = ("registry", "store-routes", "devices", "device-cas")
# This project's own Python processes, not Debian servers: they run as the worker's account.
OWN_PYTHON = ("ingest", "dead-letters", "provisioning", "api")
# The accounts servers run as when ``ironlink dev`` runs as root (unused otherwise).
ACCOUNTS = {
    "postgres": "postgres",
    "victoria-metrics": "_victoria-metrics",
    "mosquitto": "mosquitto",
    "ingest": "ironlink",
    "dead-letters": "ironlink",
    "provisioning": "ironlink",
    "api": "ironlink",
}
# How each server shuts down cleanly: PostgreSQL's "fast" shutdown is SIGINT (SIGTERM waits for
# every client to disconnect).
STOP_SIGNALS = {
    "postgres": signal.SIGINT,
    "victoria-metrics": signal.SIGTERM,
    "mosquitto": signal.SIGTERM,
    "ingest": signal.SIGTERM,
    "dead-letters": signal.SIGTERM,
    "provisioning": signal.SIGTERM,
    "api": signal.SIGTERM,
}
PORT_FIELDS = {
    "postgres": "postgres",
    "victoria-metrics": "victoria_metrics",
    "mosquitto": "mqtt",
    "ingest": "worker",
    "dead-letters": "dead_letters",
    "provisioning": "provisioning",
    "api": "api",
}
Notify = Callable[[str, str], None]


def _quiet(process: str, event: str) -> None:
    """The default progress callback: says nothing."""


def python() -> str:
    """This environment's interpreter under one stable name (``python`` and ``python3`` are the same
    program, but a different name would count as a changed command line and restart the worker)."""
    canonical = Path(sys.executable).with_name("python3")
    return str(canonical) if canonical.exists() else sys.executable


class PlatformError(RuntimeError):
    """The dev platform cannot start or answer; the message says which process and why."""


@dataclass(frozen=True)
class ProcessHealth:
    """One process as ``status`` shows it."""

    name: str
    pid: int | None
    alive: bool
    port: int
    listening: bool
    user: str | None


@dataclass(frozen=True)
class TenantActivity:
    """One tenant as ``status`` shows it: what reached the store, and its dead letters in the
    registry (None: the registry does not answer)."""

    tenant_id: str
    name: str
    machines: int
    machines_seen: int
    messages_per_second: float
    last_seen: datetime | None
    dead_lettered: int | None


@dataclass(frozen=True)
class PlatformStatus:
    """What ``ironlink dev status`` shows (and prints as JSON with ``--json``)."""

    processes: list[ProcessHealth]
    tenants: list[TenantActivity]
    store_error: str | None = None

    @property
    def healthy(self) -> bool:
        return all(p.alive and p.listening for p in self.processes)


@dataclass
class _Spec:
    """How to run one process: the server (not started), its port and the files it reads."""

    port: int
    server: servers.Server
    files: list[Path] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.server.command(), self.server.env, self.files)


class UnsupportedStackError(ValueError):
    """The stack asks for something the local platform does not run; the message names the setting."""


class DevPlatform:
    """The dev platform of one stack in one state folder."""

    def __init__(
        self, config: PlatformConfig, state_dir: Path, stack: str = "dev", fleet: Fleet | None = None
    ) -> None:
        if config.broker.engine != "mosquitto":
            raise UnsupportedStackError(
                f"ironlink:broker.engine: {config.broker.engine!r} in stack {stack!r}: the dev platform runs "
                "Mosquitto (phase A); use a phase A stack such as 'dev'"
            )
        if config.broker.tls == "mtls":
            raise UnsupportedStackError(
                f"ironlink:broker.tls: 'mtls' in stack {stack!r}: the dev platform's devices and worker "
                "log in with passwords over TLS; set broker.tls to 'tls'"
            )
        self.config = config
        self.fleet = fleet if fleet is not None else demo_fleet(config)
        """The machines it simulates, imported into its registry (default: the demo fleet file)."""
        self.stack = stack
        self.layout = Layout.at(state_dir)
        self.pids = PidFiles(self.layout.run)
        self.warnings: list[str] = []

    # ------------------------------------------------------------------------------ accounts
    def account(self, process: str) -> str | None:
        """The unprivileged account ``process`` runs as; None when we are not root (then: as us)."""
        if process in OWN_PYTHON:
            return self.ingest_account
        return servers.service_user(ACCOUNTS[process])

    @cached_property
    def ingest_account(self) -> str | None:
        """The worker's account, if it can run this Python at all.

        The worker is this project's own Python: an interpreter the account cannot reach (pyenv
        under a 0700 ``/root``) keeps the worker running as root, with a warning saying why.
        """
        account = servers.service_user(ACCOUNTS["ingest"])
        if account is None:
            return None
        probe = subprocess.run(
            ["runuser", "-u", account, "--", python(), "-c", "import ingest.settings"],
            capture_output=True,
            text=True,
            cwd=self.layout.root,
            check=False,
        )
        if probe.returncode == 0:
            return account
        reason = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        self.warnings.append(
            f"ingest runs as root: {account!r} cannot run {python()} ({reason}); "
            "a virtualenv made from a system Python (/usr/bin/python3) lets it drop privileges"
        )
        return None

    @property
    def ports(self) -> Ports:
        ports = Ports.load(self.layout)
        if ports is None:
            raise PlatformError(f"{self.layout.root} holds no dev platform: run 'ironlink dev up' first")
        return ports

    @property
    def credentials(self) -> Credentials:
        return Credentials.load(self.layout)

    @property
    def store(self) -> VictoriaMetrics:
        return VictoriaMetrics(f"http://{LOOPBACK}:{self.ports.victoria_metrics}")

    @property
    def ca_file(self) -> Path:
        return self.layout.ca_cert

    def registry_dsn(self, dbname: str | None = None, user: str = "postgres") -> str:
        """Over the local socket (trust): the superuser by default, or a service's own role."""
        return (
            f"host={self.layout.postgres_sockets} port={self.ports.postgres} user={user} "
            f"dbname={dbname or self.config.postgres.database}"
        )

    # ------------------------------------------------------------------------------- prepare
    def prepare(self) -> None:
        """Create the folder, ports, credentials, PKI and rendered files (idempotent)."""
        make_dir(self.layout.root)
        self._check_reachable()
        for folder in (self.layout.logs, self.layout.run, self.layout.pki):
            make_dir(folder)
        Ports.load_or_choose(self.layout)
        credentials = self.credentials
        usernames = [
            *generated_devices(self.fleet),
            *service_usernames(self.config),
            DYNSEC_ADMIN,
            DEVICE_SYNC_ADMIN,
        ]
        if credentials.ensure(usernames):
            credentials.save(self.layout)
        self._prepare_pki()
        self._prepare_provisioning()
        self._render_mosquitto(credentials)
        self._write_store_tokens()

    def _check_reachable(self) -> None:
        """Each server's account must be able to enter the state folder (a checkout under a 0700
        home folder, ``/root`` say, is not): better said now than as a failing ``initdb``."""
        for process in ("postgres", "victoria-metrics", "mosquitto"):
            account = self.account(process)
            test = ["runuser", "-u", account, "--", "test", "-x", str(self.layout.root)] if account else None
            if test and subprocess.run(test, check=False).returncode != 0:
                raise PlatformError(
                    f"--state-dir: {account!r} ({process}) cannot enter {self.layout.root}: a parent folder "
                    "is closed to other accounts; choose a state folder under an open one "
                    "(--state-dir /var/tmp/ironlink-dev, or make demo STATE_DIR=/var/tmp/ironlink-dev)"
                )

    def _prepare_pki(self) -> None:
        if not (self.layout.ca_cert.exists() and self.layout.ca_key.exists()):
            ca = pki.make_ca("Ironlink dev CA")
            write_secret(self.layout.ca_key, ca.key_pem)
            write_public(self.layout.ca_cert, ca.cert_pem)
        paths = self.mosquitto_paths
        if not (Path(paths.certfile).exists() and Path(paths.keyfile).exists()):
            ca = pki.Issued(self.layout.ca_cert.read_bytes(), self.layout.ca_key.read_bytes())
            server = pki.issue_server_cert(ca)
            make_dir(self.layout.mosquitto)
            write_secret(Path(paths.keyfile), server.key_pem, self.account("mosquitto"))
            write_public(Path(paths.certfile), server.cert_pem)

    def _prepare_provisioning(self) -> None:
        """The provisioning service's folder (0700) with its HTTPS key pair from the dev CA, so clients
        verify it as they verify the broker; it generates its issuing CAs in ``ca/`` itself. The
        folder and its files belong to whichever account the service runs as this time."""
        owner = self.account("provisioning") or pwd.getpwuid(os.geteuid()).pw_name
        make_dir(self.layout.provisioning, 0o700, owner)
        if not (self.layout.provisioning_cert.exists() and self.layout.provisioning_key.exists()):
            ca = pki.Issued(self.layout.ca_cert.read_bytes(), self.layout.ca_key.read_bytes())
            server = pki.issue_server_cert(ca)
            write_secret(self.layout.provisioning_key, server.key_pem, owner)
            write_public(self.layout.provisioning_cert, server.cert_pem)
        servers.hand_over(self.layout.provisioning, owner)

    @property
    def provisioning_url(self) -> str:
        return f"https://{LOOPBACK}:{self.ports.provisioning}"

    @property
    def mosquitto_paths(self) -> MosquittoPaths:
        folder = self.layout.mosquitto
        return MosquittoPaths(
            cafile=str(self.layout.ca_cert),
            certfile=str(folder / "server.pem"),
            keyfile=str(folder / "server.key"),
            password_file="",  # dynamic-security mode: the plugin holds identities and ACLs
            acl_file="",
            persistence_dir=str(folder / "data") + "/",
        )

    @property
    def mosquitto_conf(self) -> Path:
        return self.layout.mosquitto / "mosquitto.conf"

    @property
    def dynamic_security(self) -> DynamicSecurity:
        """The broker's plugin, its state file, and the certificate listener trusting the provisioning
        service's issuing CAs only (a ``capath`` folder, filled once the service has made them)."""
        return DynamicSecurity(
            servers.dynamic_security_plugin(),
            str(self.layout.dynamic_security_file),
            self.ports.mqtt_certificates,
            device_capath=str(self.layout.device_ca_dir),
        )

    def _render_mosquitto(self, credentials: Credentials) -> None:
        """The config, and the plugin's first state (admin and services) only when it has none: the
        plugin rewrites that file after every change, and the devices it holds must survive."""
        owner, layout = self.account("mosquitto"), self.layout
        paths = self.mosquitto_paths
        make_dir(layout.mosquitto)
        make_dir(Path(paths.persistence_dir), 0o700, owner)
        make_dir(layout.device_ca_dir)
        make_dir(layout.dynamic_security, 0o700, owner)
        conf = render_mosquitto_conf(
            self.config,
            paths,
            tls_port=self.ports.mqtt,
            bind_address=LOOPBACK,
            dynamic_security=self.dynamic_security,
        )
        write_public(self.mosquitto_conf, conf)
        if not layout.dynamic_security_file.exists():
            hashed = {
                name: BrokerAccount(name, credentials.accounts[name].password_hash)
                for name in credentials.accounts
            }
            services = [hashed[name] for name in service_usernames(self.config)]
            seed = render_dynamic_security_config(
                self.config, hashed[DYNSEC_ADMIN], services, other_admins=[hashed[DEVICE_SYNC_ADMIN]]
            )
            write_secret(layout.dynamic_security_file, seed, owner)

    def _write_store_tokens(self) -> None:
        """One write token per tenant. VictoriaMetrics ignores tokens, but the worker reads them as
        it reads InfluxDB's, so pointing the store URL at an InfluxDB 2.x needs only real tokens here.
        The folder and file belong to whichever account the worker runs as this time."""
        owner = self.account("ingest") or pwd.getpwuid(os.geteuid()).pw_name
        make_dir(self.layout.ingest, 0o700, owner)
        tenants = {tenant.id for tenant in self.config.tenants}
        if set(load_json_secret(self.layout.store_tokens_file)) != tenants:
            tokens = {tenant: secrets.token_urlsafe(32) for tenant in sorted(tenants)}
            write_secret(self.layout.store_tokens_file, json.dumps(tokens, indent=2) + "\n", owner)
        servers.hand_over(self.layout.ingest, owner)

    # --------------------------------------------------------------------------------- specs
    def _spec(self, name: str) -> _Spec:
        return {
            "postgres": self._postgres_spec,
            "victoria-metrics": self._victoria_metrics_spec,
            "mosquitto": self._mosquitto_spec,
            "ingest": self._ingest_spec,
            "dead-letters": self._dead_letters_spec,
            "provisioning": self._provisioning_spec,
            "api": self._api_spec,
        }[name]()

    def _postgres_spec(self) -> _Spec:
        user = self.account("postgres")
        server = servers.postgres(
            self.layout.postgres_data,
            self.ports.postgres,
            self.layout.postgres_sockets,
            self.layout.log("postgres"),
            user,
        )
        return _Spec(self.ports.postgres, replace(server, cwd=self.layout.postgres_data))

    def _victoria_metrics_spec(self) -> _Spec:
        port = self.ports.victoria_metrics
        server = servers.victoria_metrics(
            self.layout.victoria_metrics, port, self.layout.log("victoria-metrics")
        )
        user = self.account("victoria-metrics")
        return _Spec(port, replace(server, user=user, cwd=self.layout.victoria_metrics))

    def _mosquitto_spec(self) -> _Spec:
        paths = self.mosquitto_paths
        server = servers.mosquitto(self.mosquitto_conf, self.ports.mqtt, self.layout.log("mosquitto"))
        # Mosquitto block-buffers ``log_dest stdout`` into a file: line-buffer it so the log is live.
        argv = [servers.find_binary("stdbuf"), "-oL", *server.argv]
        server = replace(server, argv=argv, cwd=self.layout.mosquitto)
        # Not the plugin's state nor device-ca/: both change at runtime, without a restart.
        read = (paths.cafile, paths.certfile, paths.keyfile)
        return _Spec(self.ports.mqtt, server, [self.mosquitto_conf, *map(Path, read)])

    def _ingest_spec(self) -> _Spec:
        ports = self.ports
        settings = worker_settings_for(
            self.config,
            mqtt_host=LOOPBACK,
            mqtt_port=ports.mqtt,
            from_registry=True,
            mqtt_ca_file=self.layout.ca_cert,
            http_host=LOOPBACK,
            http_port=ports.worker,
        )
        # Registry mode (ingest/fleet.py): no tenant (route, URL, token) and no machine in its
        # environment: the registry's are followed (sync_store_routes writes the routes).
        secrets_env = {
            "IRONLINK_MQTT_PASSWORD": self._service_password(INGEST_SERVICE),
            "IRONLINK_REGISTRY_DSN": self.registry_dsn(user=INGEST_ROLE),  # as in a cluster
        }
        server = servers.Server(
            name="ingest",
            argv=[python(), "-m", "ingest"],
            ready=lambda: servers.http_ok(f"http://{LOOPBACK}:{ports.worker}/readyz"),
            log_path=self.layout.log("ingest"),
            user=self.account("ingest"),
            env={**settings.to_env(), **secrets_env},
            cwd=self.layout.ingest,
        )
        return _Spec(ports.worker, server, [self.layout.ca_cert])

    def _service_password(self, username: str) -> str:
        password = self.credentials.password(username)
        if password is None:
            raise PlatformError(f"{self.layout.credentials_file}: has no credential for {username}")
        return password

    def _dead_letters_spec(self) -> _Spec:
        """The dead-letter consumer, like the worker: TLS to the broker as ``svc.deadletters``, the
        registry over its Unix socket."""
        ports = self.ports
        settings = dead_letter_settings_for(
            self.config,
            mqtt_host=LOOPBACK,
            mqtt_port=ports.mqtt,
            mqtt_ca_file=self.layout.ca_cert,
            http_host=LOOPBACK,
            http_port=ports.dead_letters,
        )
        secrets_env = {
            "IRONLINK_DLQ_MQTT_PASSWORD": self._service_password(DEAD_LETTER_SERVICE),
            "IRONLINK_DLQ_REGISTRY_DSN": self.registry_dsn(),
        }
        server = servers.Server(
            name="dead-letters",
            argv=[python(), "-m", "ingest.deadletters"],
            ready=lambda: servers.http_ok(f"http://{LOOPBACK}:{ports.dead_letters}/readyz"),
            log_path=self.layout.log("dead-letters"),
            user=self.account("dead-letters"),
            env={**settings.to_env(), **secrets_env},
            cwd=self.layout.dead_letters,
        )
        return _Spec(ports.dead_letters, server, [self.layout.ca_cert])

    def _provisioning_spec(self) -> _Spec:
        """The provisioning API over HTTPS on loopback, the registry over its Unix socket, and the
        broker's dynamic security as ``admin.dynsec`` over TLS: every device change reaches the
        running broker."""
        ports, layout = self.ports, self.layout
        settings = ProvisioningSettings.model_validate(
            {
                "region": self.config.region,
                "ca_dir": layout.provisioning_ca_dir,
                "http_host": LOOPBACK,
                "http_port": ports.provisioning,
                "tls_cert_file": layout.provisioning_cert,
                "tls_key_file": layout.provisioning_key,
                "public_url": f"https://localhost:{ports.provisioning}",
                "broker": "mosquitto",
                "mosquitto_host": LOOPBACK,
                "mosquitto_port": ports.mqtt,
                "mosquitto_username": DYNSEC_ADMIN,
                "mosquitto_ca_file": layout.ca_cert,
                # The broker's refused connections into the audit trail (provisioning.broker_log).
                "broker_log_file": layout.log("mosquitto"),
            }
        )
        ca_file = layout.ca_cert
        secrets_env = {
            "IRONLINK_PROV_REGISTRY_DSN": self.registry_dsn(),
            "IRONLINK_PROV_MOSQUITTO_PASSWORD": self._service_password(DYNSEC_ADMIN),
        }
        server = servers.Server(
            name="provisioning",
            argv=[python(), "-m", "provisioning"],
            ready=lambda: servers.http_ok(f"https://localhost:{ports.provisioning}/readyz", ca_file),
            log_path=layout.log("provisioning"),
            user=self.account("provisioning"),
            env={**settings.to_env(), **secrets_env},
            cwd=layout.provisioning,
        )
        return _Spec(ports.provisioning, server, [ca_file, layout.provisioning_cert, layout.provisioning_key])

    @property
    def api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.api}"

    def _api_spec(self) -> _Spec:
        """The API on loopback, the registry over its Unix socket, VictoriaMetrics as the store:
        each tenant's series bound by the label filter the API adds (``api/stores.py``)."""
        ports = self.ports
        settings = ApiSettings.model_validate(
            {
                "store_kind": "victoriametrics",
                "store_url": f"http://{LOOPBACK}:{ports.victoria_metrics}",
                "host": LOOPBACK,
                "port": ports.api,
            }
        )
        server = servers.Server(
            name="api",
            argv=[python(), "-m", "api"],
            ready=lambda: servers.http_ok(f"http://{LOOPBACK}:{ports.api}/readyz"),
            log_path=self.layout.log("api"),
            user=self.account("api"),
            env={**settings.to_env(), "IRONLINK_API_REGISTRY_DSN": self.registry_dsn()},
            cwd=self.layout.root,
        )
        return _Spec(ports.api, server)

    def _before_start(self, name: str) -> None:
        """Give each server its folders (as root: to its account) just before it starts."""
        if name == "postgres" and not (self.layout.postgres_data / "PG_VERSION").exists():
            make_dir(self.layout.postgres)
            servers.init_postgres(self.layout.postgres_data, self.account("postgres"))
        elif name == "victoria-metrics":
            make_dir(self.layout.victoria_metrics, 0o700, self.account("victoria-metrics"))
        elif name == "mosquitto":
            make_dir(Path(self.mosquitto_paths.persistence_dir), 0o700, self.account("mosquitto"))
        elif name == "dead-letters":
            owner = self.account("dead-letters") or pwd.getpwuid(os.geteuid()).pw_name
            make_dir(self.layout.dead_letters, 0o700, owner)

    # ------------------------------------------------------------------------------------ up
    def up(self, notify: Notify = _quiet) -> dict[str, str]:
        """Start what is not running (in dependency order), restart what changed; returns what was
        done per process: ``running`` (left alone), ``started``, ``restarted`` or ``reconfigured``."""
        for binary in ("postgres", "initdb", "pg_isready", "victoria-metrics", "mosquitto", "openssl"):
            servers.find_binary(binary)
        notify("state", "preparing")
        self.prepare()
        broker = self.pids.read("mosquitto")
        if not (broker and broker.alive) and servers.port_open(self.ports.mqtt):
            raise self._mqtt_port_taken()  # before anything starts, so nothing is left half-up
        notify("state", "ready")
        outcomes: dict[str, str] = {}
        for name in PROCESSES:
            notify(name, "starting")
            outcomes[name] = self._ensure(name)
            notify(name, outcomes[name])
            if name == "postgres":
                notify("registry", "syncing")
                notify("registry", self.sync_registry())
            elif name == "victoria-metrics":
                notify("store-routes", self.sync_store_routes())
            elif name == "mosquitto":
                notify("devices", "syncing")
                notify("devices", self.sync_broker_devices())
            elif name == "provisioning":
                notify("device-cas", self.install_device_cas())
        return outcomes

    def _ensure(self, name: str) -> str:
        record = self.pids.read(name)
        spec = self._spec(name)
        if record is not None and record.alive:
            if record.fingerprint == spec.fingerprint:
                return "running"
            stop(record, STOP_SIGNALS[name])
            outcome = "reconfigured"
        else:
            if record is not None:
                stop(record, signal.SIGKILL)  # clears what a crashed server left in its group
            outcome = "restarted" if record is not None else "started"
        self.pids.remove(name)
        if servers.port_open(spec.port):
            spec = self._move(name)
        self._before_start(name)
        try:
            spec.server.start(detach=True)
        except (TimeoutError, RuntimeError) as error:
            raise PlatformError(f"{name} did not start: {error}") from error
        leader = spec.server.pid
        assert leader is not None
        pid = server_pid(leader, through_runuser=spec.server.user is not None)
        user = self.account(name) or pwd.getpwuid(os.geteuid()).pw_name
        record = ProcessRecord.of(name, pid, leader, spec.port, spec.fingerprint, user, spec.server.cwd)
        self.pids.write(record)
        return outcome

    def _move(self, name: str) -> _Spec:
        """Another program holds ``name``'s port: MQTT's is the contract (refuse), others move."""
        if name == "mosquitto":
            raise self._mqtt_port_taken()
        ports = self.ports.model_copy(update={PORT_FIELDS[name]: servers.free_port()})
        ports.save(self.layout)
        return self._spec(name)

    def _mqtt_port_taken(self) -> PlatformError:
        return PlatformError(
            f"port {self.ports.mqtt} is in use by another program (a system Mosquitto? 'systemctl stop "
            "mosquitto'; another dev platform? 'ironlink dev down --state-dir ...'): the dev broker needs it"
        )

    # ------------------------------------------------------------------------------ registry
    def sync_registry(self) -> str:
        """Migrations, the stack's tenants, the service accounts, and the demo fleet with every
        device credential (through the same import as ``ironlink fleet import``)."""
        database = self.config.postgres.database
        with psycopg.connect(self.registry_dsn("postgres"), autocommit=True) as admin:
            if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is None:
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
            if not role_exists(admin, INGEST_ROLE):  # its privileges: the migration run below
                admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(INGEST_ROLE)))
        credentials = self.credentials
        config, fleet = self.config, with_device_credentials(self.fleet, credentials)
        actor = registry.default_actor()
        with psycopg.connect(self.registry_dsn(), autocommit=True) as conn:
            changes = [
                change
                for result in registry.sync_platform(conn, config, actor=actor)
                for change in result.changes
            ]
            changes += [
                change for result in import_fleet(conn, fleet, actor=actor) for change in result.changes
            ]
            for tenant_id, username in [
                (None, INGEST_SERVICE),
                (None, DEAD_LETTER_SERVICE),
                *((t.id, tenant_service_username(t.id)) for t in config.tenants),
            ]:
                wanted = credentials.accounts[username].password_hash
                # Idempotent: True only when the stored credential changed.
                issued = registry.issue_service_credential(
                    conn, username, wanted, actor=actor, tenant_id=tenant_id
                )
                if issued:
                    changes.append(f"credential.issued {username}")
        return f"synced ({len(changes)} changes)" if changes else "in sync"

    def sync_store_routes(self) -> str:
        """Each tenant's store route (the dev store's URL, its token from the tokens file) into the
        registry, where the worker and the dead-letter consumer read it at runtime; a tenant stack
        writes its own the same way (``registry.tenant_routes.upsert_tenant_route``)."""
        store_url = f"http://{LOOPBACK}:{self.ports.victoria_metrics}"
        tokens = load_json_secret(self.layout.store_tokens_file)
        actor = registry.default_actor()
        with psycopg.connect(self.registry_dsn(), autocommit=True) as conn:
            changed = [
                tenant.id
                for tenant in self.config.tenants
                if upsert_tenant_route(
                    conn,
                    tenant.id,
                    tenant_route_for(self.config, tenant, store_url, tokens[tenant.id]),
                    actor=actor,
                )
            ]
        return f"synced ({len(changed)} changes)" if changed else "in sync"

    # ------------------------------------------------------------------------ dynamic security
    def broker_clients(self) -> set[str]:
        """The identities the plugin holds, from its state file (it rewrites it after every change)."""
        try:
            state = json.loads(self.layout.dynamic_security_file.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise PlatformError(f"{self.layout.dynamic_security_file}: cannot be read ({error})") from error
        return {str(client["username"]) for client in state.get("clients", [])}

    def sync_broker_devices(self) -> str:
        """Create each demo device the broker lacks, through the provisioning service's broker
        directory (a client and its own role per device, with the simulator's password). A device
        the broker has is left alone (recreating it would drop its session). Logs in as its own
        admin (:data:`DEVICE_SYNC_ADMIN`), so the provisioning service's session stays up; a
        plugin state older than that admin gets it first, once, through ``admin.dynsec``."""
        present = self.broker_clients()
        missing = [
            (tenant_id, site.id, machine.id)
            for tenant_id, site, machine in self.fleet.machines()
            if machine.password_hash is None
            and device_username(tenant_id, site.id, machine.id) not in present
        ]
        if not missing:
            return "in sync"
        try:
            if DEVICE_SYNC_ADMIN not in present:
                with self._dynsec(DYNSEC_ADMIN) as admin:
                    admin.add_admin(DEVICE_SYNC_ADMIN, self._service_password(DEVICE_SYNC_ADMIN))
            with self._dynsec(DEVICE_SYNC_ADMIN) as directory:  # connects, and closes after
                for tenant_id, site_id, machine_id in missing:
                    username = device_username(tenant_id, site_id, machine_id)
                    directory.add_device(
                        username,
                        self._service_password(username),
                        tenant_id=tenant_id,
                        site_id=site_id,
                        machine_id=machine_id,
                    )
        except BrokerError as error:
            raise PlatformError(f"mosquitto: cannot create the demo devices: {error}") from error
        return f"{len(missing)} created"

    def _dynsec(self, username: str) -> MosquittoDynamicSecurity:
        password = self._service_password(username)
        ca_file = str(self.layout.ca_cert)
        return MosquittoDynamicSecurity(LOOPBACK, self.ports.mqtt, username, password, ca_file=ca_file)

    def install_device_cas(self) -> str:
        """Copy the provisioning service's issuing CAs (``/v1/ca.pem``) into the certificate
        listener's ``capath`` as ``<subject hash>.0``; OpenSSL reads that folder at each handshake,
        so the running broker trusts them at once. A CA the service no longer serves is removed."""
        url = f"https://localhost:{self.ports.provisioning}/v1/ca.pem"
        context = ssl.create_default_context(cafile=str(self.layout.ca_cert))
        try:
            with urllib.request.urlopen(url, timeout=10, context=context) as response:
                bundle = response.read()
        except (urllib.error.URLError, OSError) as error:
            raise PlatformError(f"provisioning: cannot read its issuing CAs from {url}: {error}") from error
        wanted = {}
        for block in re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", bundle, re.S):
            wanted[f"{servers.subject_hash(block)}.0"] = block
        folder = self.layout.device_ca_dir
        changed = 0
        for name, pem in wanted.items():
            path = folder / name
            if not path.exists() or path.read_bytes() != pem:
                write_public(path, pem)
                changed += 1
        for stale in folder.glob("*.0"):
            if stale.name not in wanted:
                stale.unlink()
                changed += 1
        return f"{len(wanted)} trusted" + (f" ({changed} changed)" if changed else "")

    # -------------------------------------------------------------------------------- status
    def processes(self) -> list[ProcessHealth]:
        ports = Ports.load(self.layout)
        health = []
        for name in PROCESSES:
            record = self.pids.read(name)
            port = record.port if record else (getattr(ports, PORT_FIELDS[name]) if ports else 0)
            alive = record is not None and record.alive
            health.append(
                ProcessHealth(
                    name=name,
                    pid=record.pid if record else None,
                    alive=alive,
                    port=port,
                    listening=alive and listening(port),
                    user=record.user if record else None,
                )
            )
        return health

    def status(self) -> PlatformStatus:
        processes = self.processes()
        running = {p.name for p in processes if p.alive and p.listening}
        dead_letters = self.dead_lettered() if "postgres" in running else None
        activity: dict[str, TenantSeen] = {}
        store_error = None if "victoria-metrics" in running else "victoria-metrics is not running"
        if store_error is None:
            try:
                self.store.force_flush()  # a live view should show the last seconds too
                activity = self.store.activity()
            except StoreUnavailableError as error:
                store_error = str(error)
        tenants = []
        for tenant in self.config.tenants:
            seen = activity.get(tenant.id)
            tenants.append(
                TenantActivity(
                    tenant_id=tenant.id,
                    name=tenant.name,
                    machines=sum(1 for _ in self.fleet.of(tenant.id).machines),
                    machines_seen=seen.machines if seen else 0,
                    messages_per_second=seen.messages_per_second if seen else 0.0,
                    last_seen=seen.last_seen if seen else None,
                    dead_lettered=None if dead_letters is None else dead_letters.get(tenant.id, 0),
                )
            )
        return PlatformStatus(processes, tenants, store_error)

    def dead_lettered(self, since: datetime | None = None) -> dict[str, int] | None:
        """Dead letters the registry holds per tenant (optionally those received since a time):
        what the consumer stored, which no restart resets, and what ``ironlink deadletters list``
        shows. None when the registry does not answer or has no dead-letter table yet."""
        try:
            with psycopg.connect(self.registry_dsn(), autocommit=True, connect_timeout=2) as conn:
                counts = registry.count_dead_letters(conn, since=since)
        except psycopg.Error:
            return None
        return {tenant: count for tenant, count in counts.items() if tenant is not None}


def down(state_dir: Path, notify: Notify = _quiet) -> dict[str, str]:
    """Stop every process of the platform in ``state_dir`` (reverse start order) and wait until
    none of theirs is left. Needs no stack: it must work even while the stack file is broken."""
    pids = PidFiles(Layout.at(state_dir).run)
    outcomes: dict[str, str] = {}
    for name in reversed(PROCESSES):
        record = pids.read(name)
        if record is None:
            outcomes[name] = "not started"
            continue
        notify(name, "stopping")
        was_running = record.alive
        stop(record, STOP_SIGNALS[name])
        pids.remove(name)
        outcomes[name] = "stopped" if was_running else "was not running"
        notify(name, outcomes[name])
    return outcomes


def purge(state_dir: Path) -> None:
    """Forget everything (credentials, CA, registry and store data); refused while anything runs."""
    layout = Layout.at(state_dir)
    pids = PidFiles(layout.run)
    running = [name for name in PROCESSES if (record := pids.read(name)) is not None and record.alive]
    if running:
        raise PlatformError(f"{', '.join(running)} still running: run 'ironlink dev down' first")
    shutil.rmtree(layout.root, ignore_errors=True)
