"""Where a broker learns its devices at runtime, without a restart.

EMQX authenticates and authorizes against the registry itself, so :class:`RegistryOnly` has
nothing to do. Mosquitto runs its dynamic-security plugin (``render_mosquitto_conf(...,
dynamic_security=...)``) and :class:`MosquittoDynamicSecurity` drives it over
``$CONTROL/dynamic-security/v1`` as the admin identity. The ACLs come from the one rule set
(:func:`registry.access.machine_rules` → :func:`components.render.mosquitto.dynsec_acls`).

Invariant kept by :class:`MosquittoDynamicSecurity`: each identity has exactly one role, named
after it, and a *disabled* client holds no role. Mosquitto never asks the plugin to authenticate
a client on its certificate listener (the CA vouches for the CN), so ``disableClient`` alone would
leave a certificate device connecting with its full rights; without its role it may do nothing.
"""

from __future__ import annotations

import itertools
import json
import ssl
import threading
import uuid
from collections.abc import Iterable
from typing import Any, Protocol

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.reasoncodes import ReasonCode

from components.render.mosquitto import DYNSEC_CONTROL, dynsec_admin_role, dynsec_role
from infra.tenancy import device_username
from registry.access import AccessRule, machine_rules

log = structlog.get_logger("provisioning.brokers")
RESPONSE_TOPIC = f"{DYNSEC_CONTROL}/response"
DEFAULT_TIMEOUT = 5.0


class BrokerDirectory(Protocol):
    """Where a broker learns its devices at runtime. EMQX reads the registry itself (no-op here)."""

    def add_device(
        self, username: str, password: str | None, *, tenant_id: str, site_id: str, machine_id: str
    ) -> None:
        """Create or update a device: it may publish its telemetry and read its receipts.
        ``password`` None: a certificate device (identity = certificate CN on the mTLS listener)."""
        ...

    def set_password(self, username: str, password: str) -> None: ...

    def disable(self, username: str) -> None:
        """Revocation: refused on its next connect and disconnected now."""
        ...

    def enable(self, username: str) -> None: ...

    def remove(self, username: str) -> None: ...


class RegistryOnly(BrokerDirectory):
    """EMQX: its authn/authz query the registry, which the provisioning service writes first."""

    def add_device(
        self, username: str, password: str | None, *, tenant_id: str, site_id: str, machine_id: str
    ) -> None:
        return None

    def set_password(self, username: str, password: str) -> None:
        return None

    def disable(self, username: str) -> None:
        return None

    def enable(self, username: str) -> None:
        return None

    def remove(self, username: str) -> None:
        return None


class BrokerError(RuntimeError):
    """The broker could not be reached, did not answer, or refused a command."""


class BrokerCommandError(BrokerError):
    def __init__(self, command: str, subject: str, error: str) -> None:
        super().__init__(f"dynamic security {command} {subject!r}: {error}")
        self.command, self.subject, self.error = command, subject, error


Command = dict[str, Any]


class MosquittoDynamicSecurity(BrokerDirectory):
    """A paho client logged in as the plugin's admin; one request/response per operation.

    Each command carries its own ``correlationData``; the plugin answers every batch with one
    message on ``.../response`` (sent to every admin subscribed), matched back by that id.
    """

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str | None,
        *,
        ca_file: str | None = None,
        client_cert: tuple[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """``ca_file``: TLS; ``client_cert`` (certificate, key files): the admin's certificate for an
        mTLS-only broker, whose CN must then be ``username``."""
        self.timeout = timeout
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[threading.Event, list[Command]]] = {}
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex
        self._ready = threading.Event()
        self._refused: ReasonCode | None = None
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"{username}-{self._prefix[:8]}",
            protocol=mqtt.MQTTv5,
        )
        client.username_pw_set(username, password)
        if ca_file is not None:
            certfile, keyfile = client_cert or (None, None)
            client.tls_set(
                ca_certs=ca_file, certfile=certfile, keyfile=keyfile, tls_version=ssl.PROTOCOL_TLS_CLIENT
            )
        self.disconnects = 0
        """Sessions lost since :meth:`connect` (another login with this username takes it over)."""
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client
        self._address = (host, port)

    # ------------------------------------------------------------------------------ connection
    def connect(self) -> MosquittoDynamicSecurity:
        """Connect and subscribe to the responses; raises :class:`BrokerError` within ``timeout``."""
        host, port = self._address
        try:
            self._client.connect(host, port, clean_start=True)
        except (OSError, ssl.SSLError) as error:
            raise BrokerError(f"dynamic security: cannot reach {host}:{port}: {error}") from error
        self._client.loop_start()
        if not self._ready.wait(self.timeout) or self._refused is not None:
            self.close()
            reason = self._refused or f"no answer within {self.timeout} s"
            raise BrokerError(f"dynamic security: {host}:{port} refused the admin connection: {reason}")
        return self

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> MosquittoDynamicSecurity:
        return self.connect()

    def __exit__(self, *_: object) -> None:
        self.close()

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, code: ReasonCode, _p: object) -> None:
        if code.is_failure:
            self._refused = code
            self._ready.set()
            return
        client.subscribe(RESPONSE_TOPIC, qos=1)  # again after every reconnect

    def _on_disconnect(self, _c: mqtt.Client, _u: object, _f: object, code: ReasonCode, _p: object) -> None:
        if code.is_failure:  # not our own disconnect(): paho reconnects by itself
            self.disconnects += 1
            log.warning("dynsec_admin_disconnected", address=self._address, reason=str(code))

    def _on_subscribe(
        self, _c: mqtt.Client, _u: object, _mid: int, codes: list[ReasonCode], _p: object
    ) -> None:
        if any(code.is_failure for code in codes):
            self._refused = codes[0]
        self._ready.set()

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        try:
            responses = json.loads(message.payload).get("responses", [])
        except (ValueError, AttributeError):
            return
        with self._lock:
            for response in responses:
                waiting = self._pending.get(str(response.get("correlationData")))
                if waiting is not None:
                    waiting[1].append(response)
                    waiting[0].set()

    # -------------------------------------------------------------------------------- commands
    def _run(self, *commands: Command) -> list[Command]:
        """Send one batch and return each command's response, in order (``error`` where refused)."""
        ids = [f"{self._prefix}-{next(self._ids)}" for _ in commands]
        slots: dict[str, tuple[threading.Event, list[Command]]] = {i: (threading.Event(), []) for i in ids}
        with self._lock:
            self._pending.update(slots)
        try:
            batch = [{**command, "correlationData": i} for command, i in zip(commands, ids, strict=True)]
            info = self._client.publish(DYNSEC_CONTROL, json.dumps({"commands": batch}), qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                names = ", ".join(str(command["command"]) for command in commands)
                raise BrokerError(f"dynamic security: cannot send {names}: {mqtt.error_string(info.rc)}")
            for (event, _), command in zip(slots.values(), commands, strict=True):
                if not event.wait(self.timeout):
                    raise BrokerError(
                        f"dynamic security {command['command']}: no response within {self.timeout} s"
                    )
            return [slots[i][1][0] for i in ids]
        finally:
            with self._lock:
                for i in ids:
                    self._pending.pop(i, None)

    def _execute(self, *commands: Command, tolerated: frozenset[str] = frozenset()) -> list[Command]:
        """:meth:`_run`, raising :class:`BrokerCommandError` for the first error not ``tolerated``."""
        responses = self._run(*commands)
        for command, response in zip(commands, responses, strict=True):
            error = response.get("error")
            if error and error not in tolerated:
                subject = str(command.get("username") or command.get("rolename") or "")
                raise BrokerCommandError(str(command["command"]), subject, str(error))
        return responses

    # -------------------------------------------------------------------------- the interface
    def add_device(
        self, username: str, password: str | None, *, tenant_id: str, site_id: str, machine_id: str
    ) -> None:
        expected = device_username(tenant_id, site_id, machine_id)
        if username != expected:
            raise ValueError(f"username: {username!r} is not the identity of that machine ({expected!r})")
        if password is not None and not password:
            raise ValueError("password: an empty password; pass None for a certificate device")
        self.add_identity(username, password, machine_rules(tenant_id, site_id, machine_id))

    def add_identity(self, username: str, password: str | None, rules: Iterable[AccessRule]) -> None:
        """Create or update any identity with exactly ``rules`` (its own role, named after it)."""
        role = dynsec_role(username, [rule for rule in rules if rule.username == username])
        created = self._execute(
            {"command": "createRole", **role}, tolerated=frozenset({"Role already exists"})
        )
        if created[0].get("error"):
            self._execute({"command": "modifyRole", **role})
        create = {"command": "createClient", "username": username, "roles": [{"rolename": username}]}
        if password is not None:
            create["password"] = password
        if not self._run(create)[0].get("error"):
            return
        # It exists: recreate it (a certificate device must lose any old password), keeping it disabled
        # (and roleless) if it was revoked.
        client = self._execute({"command": "getClient", "username": username})[0]["data"]["client"]
        disabled = bool(client.get("disabled"))
        batch: list[Command] = [
            {"command": "deleteClient", "username": username},
            {**create, "roles": [] if disabled else create["roles"]},
        ]
        if disabled:
            batch.append({"command": "disableClient", "username": username})
        self._execute(*batch)

    def add_admin(self, username: str, password: str) -> None:
        """Create another admin (its own client and role: the control topic only), or reset its
        password; for an older dev state that predates it (``localdev.platform``)."""
        role = dynsec_admin_role(username)
        self._execute({"command": "createRole", **role}, tolerated=frozenset({"Role already exists"}))
        create = {"command": "createClient", "username": username, "password": password}
        if self._run({**create, "roles": [{"rolename": username}]})[0].get("error"):
            self._execute({"command": "setClientPassword", "username": username, "password": password})

    def set_password(self, username: str, password: str) -> None:
        if not password:
            raise ValueError("password: must not be empty")
        self._execute({"command": "setClientPassword", "username": username, "password": password})

    def disable(self, username: str) -> None:
        """``disableClient`` refuses its passwords and disconnects it; dropping its role takes away
        what a certificate (which the plugin is never asked about) could still do."""
        self._execute(
            {"command": "disableClient", "username": username},
            {"command": "modifyClient", "username": username, "roles": []},
        )

    def enable(self, username: str) -> None:
        self._execute(
            {"command": "modifyClient", "username": username, "roles": [{"rolename": username}]},
            {"command": "enableClient", "username": username},
        )

    def remove(self, username: str) -> None:
        self._execute(
            {"command": "deleteClient", "username": username},
            {"command": "deleteRole", "rolename": username},
            tolerated=frozenset({"Client not found", "Role not found"}),
        )
