"""Attack suite: a real Mosquitto running the rendered config keeps tenants apart.

Tenant A is ``acme`` (two presses on one site), tenant B is ``globex`` (``tests/fixtures/registry``).
Mosquitto never refuses a SUBSCRIBE (its ACL is checked per delivered message), so isolation is
proven by *no delivery*: every attacker subscribes to everything it might try, legitimate traffic
flows (and is seen arriving where it should, in the same test), then each attacker gets a message
it is allowed to see, or a SUBACK round trip, as a barrier. Mosquitto is single-threaded and
writes to each socket in order, so anything that leaked would have arrived before the barrier.
Publishing is checked through MQTT 5 PUBACK reason codes ("Not authorized").
"""

from __future__ import annotations

import itertools
import queue
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from components.render.mosquitto import (
    DYNSEC_ADMIN,
    BrokerAccount,
    DynamicSecurity,
    MosquittoPaths,
    device_accounts,
    render_acl_file,
    render_dynamic_security_config,
    render_mosquitto_conf,
    render_password_file,
)
from infra.tenancy import (
    DEAD_LETTER_SERVICE,
    dead_letter_subscription,
    device_username,
    ingest_subscription,
    receipts_topic,
    replay_subscription,
    shared_subscription,
)
from localdev import pki, servers
from provisioning.brokers import MosquittoDynamicSecurity
from registry.access import AccessRule, service_usernames
from registry.credentials import generate_password
from tests.conftest import MosquittoFactory
from tests.fixtures.registry import Platform, platform

pytestmark = pytest.mark.integration

WAIT = 5.0
A_PRESS = "acme.plant-1.press-01"
A_NEIGHBOUR = "acme.plant-1.press-02"
B_MOLDER = "globex.line-a.molder-01"
A_TOPIC = "ironlink/acme/plant-1/press-01/telemetry"
A_NEIGHBOUR_TOPIC = "ironlink/acme/plant-1/press-02/telemetry"
B_TOPIC = "ironlink/globex/line-a/molder-01/telemetry"
DEVICE_TOPICS = {A_PRESS: A_TOPIC, A_NEIGHBOUR: A_NEIGHBOUR_TOPIC, B_MOLDER: B_TOPIC}
# Everything an attacker might subscribe to in order to read another tenant's messages.
SNOOPING_FILTERS = [
    "#",
    "+/#",
    "ironlink/#",
    "ironlink/+/+/+/telemetry",
    "ironlink/acme/#",
    A_TOPIC,
    "$share/snoop/ironlink/#",
    "$share/ingest/ironlink/+/+/+/telemetry",
    "dlq/#",
    "dlq/ironlink/acme/#",
    "$SYS/#",
    "$share/snoop/$SYS/#",
]
_payloads = itertools.count()


def payload(label: str) -> bytes:
    return f"{label}-{next(_payloads)}".encode()


@dataclass
class Broker:
    port: int
    folder: Path
    ca: pki.Issued
    fixture: Platform
    plaintext_port: int
    mode: str
    server: servers.Server
    mtls_port: int | None = None
    """``DYNAMIC`` mode: the certificate listener (``port`` itself on an mTLS-only stack)."""
    directory: MosquittoDynamicSecurity | None = None
    """``DYNAMIC`` mode: the admin's connection, which created the devices."""
    device_ca: pki.Issued | None = None
    """``DYNAMIC`` mode beside a password listener: the only CA the certificate listener trusts (as
    the provisioning service's issuing CA in production); ``ca`` signs the server and services."""

    def password(self, username: str) -> str:
        return self.fixture.passwords[username]

    def admin(self, *, mtls: bool = False) -> MosquittoDynamicSecurity:
        """A connected admin client (with a certificate on the mTLS listener when ``mtls``)."""
        client_cert = None
        if mtls:
            issued = pki.issue_client_cert(self.ca, DYNSEC_ADMIN)
            (self.folder / "admin.pem").write_bytes(issued.cert_pem)
            (self.folder / "admin.key").write_bytes(issued.key_pem)
            client_cert = (str(self.folder / "admin.pem"), str(self.folder / "admin.key"))
        port = self.mtls_port if mtls and self.mtls_port else self.port
        admin = MosquittoDynamicSecurity(
            "127.0.0.1",
            port,
            DYNSEC_ADMIN,
            None if mtls else self.password(DYNSEC_ADMIN),
            ca_file=str(self.folder / "ca.pem"),
            client_cert=client_cert,
        )
        return admin.connect()

    def close(self) -> None:
        if self.directory is not None:
            self.directory.close()


@dataclass
class Probe:
    """One MQTT 5 client: records deliveries, PUBACK reason codes and disconnects."""

    broker: Broker
    username: str | None = None
    password: str | None = None
    client_id: str = ""
    tls: bool = True
    cert: pki.Issued | None = None
    clean_start: bool = True
    messages: queue.Queue[tuple[str, bytes]] = field(default_factory=queue.Queue)
    client: mqtt.Client = field(init=False)
    connack: ReasonCode | None = None
    disconnected: threading.Event = field(default_factory=threading.Event)
    _connected: threading.Event = field(default_factory=threading.Event)
    _acks: dict[int, threading.Event] = field(default_factory=dict)
    _codes: dict[int, ReasonCode] = field(default_factory=dict)

    def __post_init__(self) -> None:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            certfile = keyfile = None
            if self.cert is not None:
                certfile = self._write(f"{id(self)}.pem", self.cert.cert_pem)
                keyfile = self._write(f"{id(self)}.key", self.cert.key_pem)
            client.tls_set(
                ca_certs=str(self.broker.folder / "ca.pem"),
                certfile=certfile,
                keyfile=keyfile,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *_: self.disconnected.set()
        client.on_message = lambda _c, _u, msg: self.messages.put((msg.topic, bytes(msg.payload)))
        client.on_publish = self._on_ack
        client.on_subscribe = lambda _c, _u, mid, codes, _p: self._ack(mid, codes[0])
        self.client = client

    def _write(self, name: str, data: bytes) -> str:
        path = self.broker.folder / name
        path.write_bytes(data)
        return str(path)

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, code: ReasonCode, _p: object) -> None:
        self.connack = code
        self._connected.set()

    def _ack(self, mid: int, code: ReasonCode | None = None) -> None:
        if code is not None:
            self._codes[mid] = code
        self._acks.setdefault(mid, threading.Event()).set()

    def _on_ack(self, _c: mqtt.Client, _u: object, mid: int, code: ReasonCode, _p: object) -> None:
        self._ack(mid, code)

    def _wait(self, mid: int) -> None:
        assert self._acks.setdefault(mid, threading.Event()).wait(WAIT), f"{self.username}: no ack for {mid}"

    def connect(self, port: int | None = None) -> bool:
        """True when the broker accepted the connection (CONNACK success)."""
        properties = mqtt.Properties(mqtt.PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 0 if self.clean_start else 300
        try:
            self.client.connect(
                "127.0.0.1", port or self.broker.port, clean_start=self.clean_start, properties=properties
            )
        except (OSError, ssl.SSLError):
            return False
        self.client.loop_start()
        for _ in range(int(WAIT / 0.01)):
            if self._connected.is_set() or self.disconnected.is_set():
                break
            self._connected.wait(0.01)
        accepted = self.connack is not None and not self.connack.is_failure and not self.disconnected.is_set()
        if not accepted:
            self.client.loop_stop()  # no reconnect attempts by a refused client
        return accepted

    def subscribe(self, *filters: str) -> list[ReasonCode]:
        """SUBSCRIBE each filter in turn; their SUBACK reason codes (the acl-file grants them all)."""
        codes = []
        for topic in filters:
            result, mid = self.client.subscribe(topic, qos=1)
            assert result == mqtt.MQTT_ERR_SUCCESS and mid is not None, (
                f"{self.username}: SUBSCRIBE {topic} not sent"
            )
            self._wait(mid)
            codes.append(self._codes[mid])
        return codes

    def publish(self, topic: str, data: bytes) -> ReasonCode:
        info = self.client.publish(topic, data, qos=1)
        self._wait(info.mid)
        return self._codes[info.mid]

    def barrier(self) -> None:
        """A round trip: whatever the broker sent this client before has arrived once it returns."""
        self.subscribe(f"barrier/{next(_payloads)}")

    def received(self) -> list[tuple[str, bytes]]:
        items = []
        while not self.messages.empty():
            items.append(self.messages.get_nowait())
        return items

    def expect(self, topic: str, data: bytes) -> list[tuple[str, bytes]]:
        """Wait for one message; return everything received up to and including it."""
        seen: list[tuple[str, bytes]] = []
        while True:
            try:
                item = self.messages.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(
                    f"{self.username} never received {data!r} on {topic}; got {seen}"
                ) from None
            seen.append(item)
            if item == (topic, data):
                return seen

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _accepted(code: ReasonCode) -> bool:
    return not code.is_failure


# ----------------------------------------------------------------------------------------- broker
STATIC, DYNAMIC = "acl-file", "dynamic-security"


def dynamic_security_plugin() -> str:
    """Debian's plugin (``dpkg -L mosquitto``), wherever the architecture puts it."""
    found = sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so"))
    assert found, "mosquitto_dynamic_security.so is not installed (Debian package mosquitto)"
    return str(found[0])


def start_broker(
    start_mosquitto: MosquittoFactory,
    folder: Path,
    mode: str,
    overrides: dict[str, object] | None = None,
    extra_readers: dict[str, str] | None = None,
) -> Broker:
    """Render files for a fixture platform and start Mosquitto with them.

    ``STATIC``: the password and ACL files hold every identity. ``DYNAMIC``: the plugin starts with
    the admin and the services only; devices (certificate devices under ``broker.tls: mtls``) and
    ``extra_readers`` are then created at runtime through :class:`MosquittoDynamicSecurity`.
    The broker drops root for the ``mosquitto`` account, so ``folder`` must be one that account can
    read (pytest's ``tmp_path`` is root-only); the config itself is read as root.
    """
    fixture = platform(overrides)
    config = fixture.config
    extra_readers = extra_readers or {}
    fixture.passwords.update({name: f"{name}-password" for name in extra_readers})
    (folder / "data").mkdir(parents=True)
    ca = pki.make_ca()
    server_cert = pki.issue_server_cert(ca)
    paths = MosquittoPaths(
        cafile=str(folder / "ca.pem"),
        certfile=str(folder / "server.pem"),
        keyfile=str(folder / "server.key"),
        password_file=str(folder / "passwd"),
        acl_file=str(folder / "acl"),
        persistence_dir=f"{folder / 'data'}/",
    )
    services = [BrokerAccount(name, fixture.hash_of(name)) for name in service_usernames(config)]
    (folder / "ca.pem").write_bytes(ca.cert_pem)
    (folder / "server.pem").write_bytes(server_cert.cert_pem)
    (folder / "server.key").write_bytes(server_cert.key_pem)
    mtls_only = config.broker.tls == "mtls"
    plaintext_port, mtls_port = servers.free_port(), servers.free_port()
    dynamic = None
    device_ca: pki.Issued | None = None
    if mode == STATIC:
        readers = [BrokerAccount(name, fixture.hash_of(name)) for name in extra_readers]
        extra_acl = "".join(f"\nuser {name}\ntopic read {topic}\n" for name, topic in extra_readers.items())
        (folder / "passwd").write_text(
            render_password_file([*device_accounts(fixture.fleet), *services, *readers])
        )
        (folder / "acl").write_text(render_acl_file(config, fixture.fleet) + extra_acl)
    else:
        fixture.passwords[DYNSEC_ADMIN] = generate_password()
        admin = BrokerAccount(DYNSEC_ADMIN, fixture.hash_of(DYNSEC_ADMIN))
        dynamic_config = folder / "dynamic-security.json"
        dynamic_config.write_text(render_dynamic_security_config(config, admin, services))
        device_cafile = None
        if not mtls_only:  # where services connect with certificates too, the one CA serves both
            device_ca = pki.make_ca("Ironlink test device CA")
            device_cafile = str(folder / "device-ca.pem")
            Path(device_cafile).write_bytes(device_ca.cert_pem)
        dynamic = DynamicSecurity(
            dynamic_security_plugin(), str(dynamic_config), mtls_port, device_cafile=device_cafile
        )
    servers.hand_over(folder, servers.service_user("mosquitto"))

    def render(port: int) -> str:
        # Readiness is checked on ``port``: the mTLS listener's where it is the only TLS one.
        listener = replace(dynamic, mtls_port=port) if dynamic and mtls_only else dynamic
        return render_mosquitto_conf(
            config,
            paths,
            tls_port=port,
            plaintext_port=plaintext_port,
            bind_address="127.0.0.1",
            dynamic_security=listener,
        )

    server, port = start_mosquitto(render)
    broker = Broker(port, folder, ca, fixture, plaintext_port, mode, server, device_ca=device_ca)
    if dynamic is not None:
        broker.mtls_port = port if mtls_only else mtls_port
        broker.directory = broker.admin(mtls=mtls_only)
        for tenant_id, site, machine in fixture.fleet.machines():
            username = device_username(tenant_id, site.id, machine.id)
            password = None if mtls_only else fixture.passwords[username]
            broker.directory.add_device(
                username, password, tenant_id=tenant_id, site_id=site.id, machine_id=machine.id
            )
        for name, topic in extra_readers.items():
            rules = [AccessRule(name, "subscribe", topic)]
            broker.directory.add_identity(name, fixture.passwords[name], rules)
    return broker


@pytest.fixture(params=[STATIC, DYNAMIC])
def launch(
    request: pytest.FixtureRequest, start_mosquitto: MosquittoFactory, server_root: Path, tmp_path: Path
) -> Iterator[Callable[..., Broker]]:
    """``launch(overrides, extra_readers)``: every test of this suite runs against both modes."""
    started: list[Broker] = []

    def start(
        overrides: dict[str, object] | None = None, extra_readers: dict[str, str] | None = None
    ) -> Broker:
        folder = server_root / f"mosquitto-{tmp_path.name}-{next(_payloads)}"
        started.append(start_broker(start_mosquitto, folder, request.param, overrides, extra_readers))
        return started[-1]

    yield start
    for broker in started:
        broker.close()


@pytest.fixture
def clients() -> Iterator[Callable[..., Probe]]:
    opened: list[Probe] = []

    def open_client(broker: Broker, username: str | None, **options: object) -> Probe:
        if username is not None and "password" not in options and "cert" not in options:
            options["password"] = broker.password(username)
        probe = Probe(broker, username, client_id=str(options.pop("client_id", username or "")), **options)  # type: ignore[arg-type]
        opened.append(probe)
        return probe

    yield open_client
    for probe in opened:
        probe.close()


def connected(
    open_client: Callable[..., Probe],
    broker: Broker,
    username: str,
    port: int | None = None,
    **options: object,
) -> Probe:
    probe = open_client(broker, username, **options)
    assert probe.connect(port), f"{username} could not connect: {probe.connack}"
    return probe


# ------------------------------------------------------------------------------------------ tests
def test_tenant_a_reads_nothing_of_tenant_b_while_legitimate_traffic_flows(
    launch: Callable[..., Broker], clients: Callable[..., Probe]
) -> None:
    broker = launch()
    ingest = connected(clients, broker, "svc.ingest")
    ingest.subscribe(ingest_subscription(broker.fixture.config))
    svc_a = connected(clients, broker, "svc.acme")
    svc_a.subscribe("ironlink/acme/#", "dlq/ironlink/acme/#")
    svc_b = connected(clients, broker, "svc.globex")
    svc_b.subscribe("ironlink/globex/#")  # its own (dynamic security refuses the wider filters below)
    attackers = {
        "svc.globex": svc_b,
        B_MOLDER: connected(clients, broker, B_MOLDER),
        A_NEIGHBOUR: connected(clients, broker, A_NEIGHBOUR),
    }
    for attacker in attackers.values():
        attacker.subscribe(*SNOOPING_FILTERS)

    # Legitimate traffic: every device's telemetry, and a dead letter the worker writes for tenant A.
    devices = {name: attackers.get(name) or connected(clients, broker, name) for name in DEVICE_TOPICS}
    readings = {name: payload(name) for name in DEVICE_TOPICS}
    for name, probe in devices.items():
        assert _accepted(probe.publish(DEVICE_TOPICS[name], readings[name])), (
            f"{name} cannot publish its telemetry"
        )
    for name in DEVICE_TOPICS:
        assert (DEVICE_TOPICS[name], readings[name]) in ingest.expect(DEVICE_TOPICS[name], readings[name])
    dead = payload("a-dead-letter")
    assert _accepted(ingest.publish(f"dlq/{A_TOPIC}", dead))
    tenant_a = [
        (A_TOPIC, readings[A_PRESS]),
        (A_NEIGHBOUR_TOPIC, readings[A_NEIGHBOUR]),
        (f"dlq/{A_TOPIC}", dead),
    ]
    assert sorted(svc_a.expect(f"dlq/{A_TOPIC}", dead)) == sorted(tenant_a)

    # Tenant B's own telemetry reached svc.globex: its wildcard subscriptions do deliver.
    own = (B_TOPIC, readings[B_MOLDER])
    seen = {"svc.globex": svc_b.expect(*own)}
    for username, attacker in attackers.items():
        attacker.barrier()
        leaked = [message for message in seen.get(username, []) + attacker.received() if message != own]
        assert leaked == [], f"{username} received messages it may not read: {leaked}"


def test_joining_the_workers_share_group_cannot_starve_it(
    launch: Callable[..., Broker], clients: Callable[..., Probe]
) -> None:
    """Mosquitto picks a share-group member before checking its ACL, so a member that may not read
    swallows its turn. The worker therefore subscribes without ``$share`` on Mosquitto."""
    broker = launch()
    config = broker.fixture.config
    ingest = connected(clients, broker, "svc.ingest")
    ingest.subscribe(ingest_subscription(config))
    thieves = [connected(clients, broker, name) for name in ("svc.globex", B_MOLDER)]
    for thief in thieves:
        thief.subscribe(shared_subscription(config.ingest.share_group), "$share/other/ironlink/#")
    press = connected(clients, broker, A_PRESS)
    readings = [payload("a-reading") for _ in range(6)]
    for reading in readings:
        assert _accepted(press.publish(A_TOPIC, reading))
    assert [p for _, p in ingest.expect(A_TOPIC, readings[-1])] == readings, "the worker lost telemetry"
    for thief in thieves:
        thief.barrier()
        assert thief.received() == []


def test_nobody_publishes_outside_their_own_topic(
    launch: Callable[..., Broker], clients: Callable[..., Probe]
) -> None:
    broker = launch()
    watcher = connected(clients, broker, "svc.ingest")
    watcher.subscribe("ironlink/+/+/+/telemetry")
    svc_b = connected(clients, broker, "svc.globex")
    svc_b.subscribe("ironlink/globex/#", "dlq/ironlink/globex/#")
    press = connected(clients, broker, A_PRESS)
    svc_a = connected(clients, broker, "svc.acme")

    forbidden = {
        (A_PRESS, B_TOPIC): press,  # another tenant's device topic
        (A_PRESS, A_NEIGHBOUR_TOPIC): press,  # a neighbour in the same tenant
        (A_PRESS, "ironlink/acme/plant-1/press-01/status"): press,  # not the telemetry leaf
        (A_PRESS, f"dlq/{B_TOPIC}"): press,  # forging tenant B's dead letters
        (A_PRESS, "$SYS/broker/version"): press,
        ("svc.acme", A_TOPIC): svc_a,  # services are read-only
        ("svc.acme", f"dlq/{A_TOPIC}"): svc_a,
        ("svc.globex", B_TOPIC): svc_b,
        ("svc.ingest", B_TOPIC): watcher,
    }
    for (username, topic), probe in forbidden.items():
        code = probe.publish(topic, payload("forged"))
        assert code.is_failure and code.getName() == "Not authorized", (
            f"{username} published to {topic}: {code}"
        )

    sentinel = payload("b-sentinel")
    molder = connected(clients, broker, B_MOLDER)
    assert _accepted(molder.publish(B_TOPIC, sentinel))
    assert watcher.expect(B_TOPIC, sentinel) == [(B_TOPIC, sentinel)]
    assert svc_b.expect(B_TOPIC, sentinel) == [(B_TOPIC, sentinel)]


def test_sys_topics_are_delivered_only_to_a_reader_granted_them(
    launch: Callable[..., Broker], clients: Callable[..., Probe]
) -> None:
    # Positive control, added by this test only: an operator granted $SYS/# does get broker internals.
    broker = launch(extra_readers={"ops.test": "$SYS/#"})
    attackers = [connected(clients, broker, name) for name in ("svc.ingest", "svc.acme", A_PRESS)]
    for attacker in attackers:
        attacker.subscribe("$SYS/#", "$share/snoop/$SYS/#", "#")
    ops = connected(clients, broker, "ops.test")
    ops.subscribe("$SYS/#")
    version = ops.messages.get(timeout=WAIT)
    assert version[0].startswith("$SYS/broker/"), version
    for attacker in attackers:
        attacker.barrier()
        assert attacker.received() == [], f"{attacker.username} read broker internals"


def test_nobody_takes_over_another_identitys_session_or_client_id(
    launch: Callable[..., Broker], clients: Callable[..., Probe]
) -> None:
    broker = launch()
    svc_a = connected(clients, broker, "svc.acme", clean_start=False)
    svc_a.subscribe("ironlink/acme/#")
    press = connected(clients, broker, A_PRESS)
    # Tenant B's service and device claim tenant A's client ids (resuming the session if they could).
    thief = connected(clients, broker, "svc.globex", client_id="svc.acme", clean_start=False)
    impostor = connected(clients, broker, B_MOLDER, client_id=A_PRESS)
    thief.barrier()
    impostor.barrier()
    reading = payload("a-reading")
    assert _accepted(press.publish(A_TOPIC, reading)), "the real device lost its connection"
    assert svc_a.expect(A_TOPIC, reading) == [(A_TOPIC, reading)]
    assert not svc_a.disconnected.is_set() and not press.disconnected.is_set()
    thief.barrier()
    assert thief.received() == [], "the thief resumed tenant A's session"


def test_anonymous_wrong_password_and_plain_mqtt_are_refused(
    launch: Callable[..., Broker], clients: Callable[..., Probe]
) -> None:
    broker = launch()
    assert not clients(broker, None).connect(), "anonymous client accepted"
    assert not clients(broker, A_PRESS, password="guess").connect(), "wrong password accepted"
    assert not clients(broker, "svc.acme", password=broker.password(A_PRESS)).connect(), "another's password"
    assert not clients(broker, A_PRESS, tls=False).connect(), "plain MQTT accepted on the TLS port"
    assert not clients(broker, A_PRESS, tls=False).connect(broker.plaintext_port), "plaintext listener open"
    assert clients(broker, A_PRESS).connect(), "the legitimate device must still get in"


def test_plaintext_listener_where_allowed_still_requires_credentials(
    launch: Callable[..., Broker], clients: Callable[..., Probe]
) -> None:
    broker = launch({"broker": {"allow_plaintext": True}})
    port = broker.plaintext_port
    assert not clients(broker, None, tls=False).connect(port), "anonymous client accepted"
    assert not clients(broker, A_PRESS, password="guess", tls=False).connect(port), "wrong password accepted"
    svc_b = connected(clients, broker, "svc.globex", tls=False, port=port)
    svc_b.subscribe("#", "ironlink/globex/#")  # the wide filter, and its own for dynamic security
    press = connected(clients, broker, A_PRESS, tls=False, port=port)
    assert press.publish(B_TOPIC, payload("forged")).getName() == "Not authorized"
    reading, sentinel = payload("a-reading"), payload("b-sentinel")
    assert _accepted(press.publish(A_TOPIC, reading))
    molder = connected(clients, broker, B_MOLDER, tls=False, port=port)
    assert _accepted(molder.publish(B_TOPIC, sentinel))
    assert svc_b.expect(B_TOPIC, sentinel) == [(B_TOPIC, sentinel)]


def test_mtls_takes_identity_from_the_certificate_and_keeps_tenants_apart(
    launch: Callable[..., Broker], clients: Callable[..., Probe]
) -> None:
    broker = launch({"broker": {"tls": "mtls"}})
    cert = lambda name: pki.issue_client_cert(broker.ca, name)  # noqa: E731
    assert not clients(broker, A_PRESS).connect(), "password without a client certificate accepted"
    foreign = pki.issue_client_cert(pki.make_ca("rogue CA"), "svc.globex")
    assert not clients(broker, "svc.globex", cert=foreign).connect(), "certificate of a foreign CA accepted"

    # Tenant A's device certificate, claiming tenant B's service identity as MQTT username.
    press = connected(clients, broker, "svc.globex", cert=cert(A_PRESS))
    press.subscribe("#", "ironlink/globex/#")
    svc_b = connected(clients, broker, "svc.globex", cert=cert("svc.globex"), client_id="svc.globex")
    svc_b.subscribe("#", "ironlink/globex/#")  # the wide filter, and its own for dynamic security
    molder = connected(clients, broker, B_MOLDER, cert=cert(B_MOLDER))
    reading, sentinel = payload("a-reading"), payload("b-sentinel")
    assert _accepted(press.publish(A_TOPIC, reading)), "the CN's own topic must work"
    assert press.publish(B_TOPIC, payload("forged")).getName() == "Not authorized"
    assert _accepted(molder.publish(B_TOPIC, sentinel))
    assert svc_b.expect(B_TOPIC, sentinel) == [(B_TOPIC, sentinel)]
    press.barrier()
    assert press.received() == [], "a device certificate read tenant B's telemetry"


def test_only_the_dead_letter_consumer_reads_dead_letters_of_all_and_only_it_replays(
    launch: Callable[..., Broker], clients: Callable[..., Probe]
) -> None:
    broker = launch()
    dead_letters = connected(clients, broker, DEAD_LETTER_SERVICE)
    dead_letters.subscribe(dead_letter_subscription(broker.fixture.config))
    ingest = connected(clients, broker, "svc.ingest")
    ingest.subscribe(replay_subscription(broker.fixture.config))
    press = connected(clients, broker, A_PRESS)
    svc_a = connected(clients, broker, "svc.acme")
    snoopers = {A_PRESS: press, B_MOLDER: connected(clients, broker, B_MOLDER)}
    for snooper in snoopers.values():
        snooper.subscribe("dlq/#", f"dlq/{A_TOPIC}", "replay/#", f"replay/{A_TOPIC}", "$share/x/replay/#")

    for username, probe in {**snoopers, "svc.acme": svc_a, "svc.ingest": ingest}.items():
        code = probe.publish(f"replay/{A_TOPIC}", payload("forged-replay"))
        assert code.getName() == "Not authorized", f"{username} published a replay: {code}"
    assert dead_letters.publish(f"dlq/{A_TOPIC}", payload("forged")).getName() == "Not authorized"

    letters = {topic: payload(f"dead-{topic}") for topic in (A_TOPIC, B_TOPIC)}
    for topic, data in letters.items():
        assert _accepted(ingest.publish(f"dlq/{topic}", data))
    for topic, data in letters.items():
        assert (f"dlq/{topic}", data) in dead_letters.expect(f"dlq/{topic}", data), (
            "svc.deadletters reads dlq/#"
        )
    replayed = payload("replayed")
    assert _accepted(dead_letters.publish(f"replay/{A_TOPIC}", replayed))
    assert ingest.expect(f"replay/{A_TOPIC}", replayed) == [(f"replay/{A_TOPIC}", replayed)]

    for username, snooper in snoopers.items():
        snooper.barrier()
        assert snooper.received() == [], f"{username} read dead letters or replays"


def test_a_machines_receipts_reach_only_that_machine_and_only_the_worker_writes_them(
    launch: Callable[..., Broker], clients: Callable[..., Probe]
) -> None:
    """A receipt tells a gateway it may forget readings: a forged or misdirected one loses data."""
    broker = launch()
    ingest = connected(clients, broker, "svc.ingest")
    press = connected(clients, broker, A_PRESS)
    own = receipts_topic(*A_PRESS.split("."))
    press.subscribe(own)
    snoopers = {name: connected(clients, broker, name) for name in (A_NEIGHBOUR, B_MOLDER)}
    for snooper in snoopers.values():
        snooper.subscribe(own, "ironlink/+/+/+/receipts", "ironlink/#")

    for username, probe in {**snoopers, A_PRESS: press}.items():
        assert probe.publish(own, payload("forged-receipt")).getName() == "Not authorized", username
    receipt = payload("receipt")
    assert _accepted(ingest.publish(own, receipt))
    assert press.expect(own, receipt) == [(own, receipt)], "the machine reads its own receipts"
    for username, snooper in snoopers.items():
        snooper.barrier()
        assert all(topic != own for topic, _ in snooper.received()), f"{username} read another's receipt"
