"""The dev platform's folder (default ``.ironlink/dev/``): layout, ports and generated secrets.

Everything ``ironlink dev`` makes lives under one folder, so that ``rm -rf .ironlink`` (``make clean``)
forgets it all::

    state.json                  ports chosen on the first ``up`` (MQTT is always 8883)
    secrets/credentials.json    generated broker passwords and their $7$ hashes (0600)
    ingest/store-tokens.json    the worker's store tokens (0600, owned by the worker's account)
    provisioning/               the provisioning service's folder (0700, its account): its TLS
                                key pair (key 0600) and ca/, the issuing CA keys it generates
    pki/                        local CA (key 0600) and the broker's server certificate
    mosquitto/                  rendered mosquitto.conf, the server key pair, data/, device-ca/
                                (the provisioning service's issuing CAs, ``<hash>.0``) and
                                dynamic-security/ (0700): the plugin's state, seeded once (0600)
    postgres/                   the registry cluster (0700, owned by postgres) and its socket
    victoria-metrics/           the store's data (owned by _victoria-metrics)
    logs/<process>.log          every process's output
    run/<process>.pid           pid records (see ``localdev/supervisor.py``)

Secrets are written with mode 0600 from the start (never chmod-ed after being readable), by the
account that creates them; :func:`write_secret` then hands them to the account that reads them.
"""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from infra.config import PlatformConfig
from infra.fleet import Fleet, Machine, load_fleet_file
from infra.tenancy import device_username
from localdev import servers
from registry.credentials import generate_password, hash_password

MQTT_TLS_PORT = 8883
DEFAULT_STATE_DIR = Path(".ironlink/dev")
M = TypeVar("M", bound=BaseModel)


class StateError(ValueError):
    """A file of the state folder cannot be used; the message names it and says what to do."""


@dataclass(frozen=True)
class Layout:
    """Every path of one state folder (absolute, so that detached servers do not depend on cwd)."""

    root: Path

    @classmethod
    def at(cls, state_dir: Path) -> Layout:
        return cls(state_dir.expanduser().resolve())

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def credentials_file(self) -> Path:
        return self.secrets / "credentials.json"

    @property
    def ingest(self) -> Path:
        return self.root / "ingest"

    @property
    def dead_letters(self) -> Path:
        """The dead-letter consumer's working folder (its own: the supervisor tells processes apart
        by program and folder)."""
        return self.root / "dead-letters"

    @property
    def provisioning(self) -> Path:
        """The provisioning service's own folder: its HTTPS key pair and its issuing CAs."""
        return self.root / "provisioning"

    @property
    def provisioning_ca_dir(self) -> Path:
        return self.provisioning / "ca"

    @property
    def provisioning_cert(self) -> Path:
        return self.provisioning / "server.pem"

    @property
    def provisioning_key(self) -> Path:
        return self.provisioning / "server.key"

    @property
    def store_tokens_file(self) -> Path:
        return self.ingest / "store-tokens.json"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def ca_cert(self) -> Path:
        return self.pki / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.pki / "ca.key"

    @property
    def mosquitto(self) -> Path:
        return self.root / "mosquitto"

    @property
    def dynamic_security(self) -> Path:
        """The plugin's folder (the broker's account): it rewrites its state file after every change."""
        return self.mosquitto / "dynamic-security"

    @property
    def dynamic_security_file(self) -> Path:
        return self.dynamic_security / "state.json"

    @property
    def device_ca_dir(self) -> Path:
        """What the certificate listener trusts (``capath``): the provisioning service's issuing CAs."""
        return self.mosquitto / "device-ca"

    @property
    def postgres(self) -> Path:
        return self.root / "postgres"

    @property
    def postgres_data(self) -> Path:
        return self.postgres / "data"

    @property
    def postgres_sockets(self) -> Path:
        return self.postgres / "sockets"

    @property
    def victoria_metrics(self) -> Path:
        return self.root / "victoria-metrics"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def log(self, process: str) -> Path:
        return self.logs / f"{process}.log"


# ------------------------------------------------------------------------------------------ files
def make_dir(path: Path, mode: int = 0o755, owner: str | None = None) -> Path:
    """A folder with ``mode`` (service accounts must traverse the public ones), owned by ``owner``."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    if owner is not None:
        servers.hand_over(path, owner)
    return path


def write_secret(path: Path, content: str | bytes, owner: str | None = None) -> None:
    """Write ``content`` to a file created 0600 (never readable by others, not even briefly)."""
    data = content.encode() if isinstance(content, str) else content
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    if owner is not None:
        entry = pwd.getpwnam(owner)
        os.chown(temporary, entry.pw_uid, entry.pw_gid)
    temporary.replace(path)


def write_public(path: Path, content: str | bytes) -> None:
    """Write a non-secret file (config, certificate) readable by the service accounts."""
    data = content.encode() if isinstance(content, str) else content
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.chmod(temporary, 0o644)
    temporary.replace(path)


def _read_model(model: type[M], path: Path) -> M | None:
    try:
        return model.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(file)'}: {e['msg']}" for e in error.errors()
        )
        raise StateError(
            f"{path}: {problems} (remove the file, or run 'ironlink dev down --purge')"
        ) from error


# ------------------------------------------------------------------------------------------ ports
class Ports(BaseModel):
    """Loopback ports of the dev platform: MQTT is the contract's 8883, the others free ports
    chosen on the first ``up`` and kept, so URLs stay the same from one ``up`` to the next."""

    model_config = ConfigDict(extra="forbid")

    mqtt: int = MQTT_TLS_PORT
    postgres: int
    victoria_metrics: int
    worker: int
    dead_letters: int = 0
    """The dead-letter consumer's probes and metrics; 0 in a state folder older than it (chosen then)."""
    provisioning: int = 0
    """The provisioning service's HTTPS API and probes; 0 in a state folder older than it."""
    mqtt_certificates: int = 0
    """The broker's certificate listener (CN = identity); 0 in a state folder older than it."""
    api: int = 0
    """The Ironlink API's HTTP port; 0 in a state folder older than it."""

    @classmethod
    def load_or_choose(cls, layout: Layout) -> Ports:
        ports = _read_model(cls, layout.state_file)
        if ports is None:
            ports = cls(
                postgres=servers.free_port(), victoria_metrics=servers.free_port(), worker=servers.free_port()
            )
        added = {name: servers.free_port() for name in _ADDED_LATER if getattr(ports, name) == 0}
        if added:
            ports = ports.model_copy(update=added)
            ports.save(layout)
        return ports

    @classmethod
    def load(cls, layout: Layout) -> Ports | None:
        return _read_model(cls, layout.state_file)

    def save(self, layout: Layout) -> None:
        write_public(layout.state_file, self.model_dump_json(indent=2) + "\n")


_ADDED_LATER = ("dead_letters", "provisioning", "mqtt_certificates", "api")
"""Ports a state folder made before their process existed lacks (0): chosen on the next ``up``."""


# ------------------------------------------------------------------------------------ credentials
class Credential(BaseModel):
    """A generated broker password and its ``$7$`` hash (kept so that ``up`` renders the same files)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    password: str
    password_hash: str

    @classmethod
    def generate(cls) -> Credential:
        password = generate_password()
        return cls(password=password, password_hash=hash_password(password))


class Credentials(BaseModel):
    """Every broker identity the dev platform generated a password for, by username."""

    model_config = ConfigDict(extra="forbid")

    accounts: dict[str, Credential] = {}

    @classmethod
    def load(cls, layout: Layout) -> Credentials:
        return _read_model(cls, layout.credentials_file) or cls()

    def ensure(self, usernames: Iterable[str]) -> bool:
        """Generate a credential for each username that has none; True when any was added."""
        missing = [name for name in usernames if name not in self.accounts]
        for name in missing:
            self.accounts[name] = Credential.generate()
        return bool(missing)

    def save(self, layout: Layout) -> None:
        make_dir(layout.secrets, 0o700)
        write_secret(layout.credentials_file, self.model_dump_json(indent=2) + "\n")

    def password(self, username: str) -> str | None:
        account = self.accounts.get(username)
        return account.password if account else None


DEMO_FLEET = Path(__file__).with_name("demo-fleet.yaml")
"""The dev platform's demo fleet: ``ironlink dev up`` imports it into its registry."""


def demo_fleet(config: PlatformConfig, path: Path = DEMO_FLEET) -> Fleet:
    """The fleet file's tenants that ``config`` declares (another stack may have fewer)."""
    fleet = load_fleet_file(path)
    declared = {tenant.id for tenant in config.tenants}
    return Fleet(tenants=[tenant for tenant in fleet.tenants if tenant.id in declared])


def generated_devices(fleet: Fleet) -> list[str]:
    """Device usernames the dev platform makes credentials for: machines without a ``password_hash``.

    A machine whose fleet entry sets ``password_hash`` keeps it (the fleet file wins), and then its
    password is unknown here: the simulator cannot publish for it.
    """
    return [
        device_username(tenant_id, site.id, machine.id)
        for tenant_id, site, machine in fleet.machines()
        if machine.password_hash is None
    ]


def with_device_credentials(fleet: Fleet, credentials: Credentials) -> Fleet:
    """``fleet`` with every machine's ``password_hash`` set: the fleet file's, or the generated one.

    The renderers and the registry import then see one fleet in which every device has a credential.
    """

    def machine(tenant_id: str, site_id: str, item: Machine) -> Machine:
        if item.password_hash is not None:
            return item
        account = credentials.accounts[device_username(tenant_id, site_id, item.id)]
        return item.model_copy(update={"password_hash": account.password_hash})

    tenants = [
        tenant.model_copy(
            update={
                "sites": [
                    site.model_copy(
                        update={"machines": [machine(tenant.id, site.id, m) for m in site.machines]}
                    )
                    for site in tenant.sites
                ]
            }
        )
        for tenant in fleet.tenants
    ]
    return fleet.model_copy(update={"tenants": tenants})


def load_json_secret(path: Path) -> dict[str, str]:
    """A ``{name: secret}`` JSON file written by :func:`write_secret` (e.g. the store tokens)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as error:
        raise StateError(f"{path}: is not valid JSON ({error})") from error
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise StateError(f"{path}: is not a JSON object of strings")
    return data
