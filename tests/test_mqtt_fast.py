"""ingest.mqtt_fast: its decoder gives exactly what paho's gives, and its reading and batched
acknowledgements keep at-least-once on a real Mosquitto (acknowledged: gone; the rest: redelivered)."""

from __future__ import annotations

import queue
import re
import threading
import tomllib
from pathlib import Path
from typing import Any

import paho.mqtt
import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest import mqtt_fast
from tests.conftest import MosquittoFactory
from tests.fixtures.ingest import broker_config

ROOT = Path(__file__).resolve().parent.parent
PRIVATE = {"packetType", "types", "names", "properties"}
WAIT = 20.0


def packed(**values: Any) -> bytes:
    """PUBLISH properties as paho itself encodes them."""
    properties = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(properties, name, value)
    return bytes(properties.pack())


EVERY_PUBLISH_PROPERTY = {
    "empty": b"\x00",
    "payload format 0": packed(PayloadFormatIndicator=0),
    "payload format 1": packed(PayloadFormatIndicator=1),
    "message expiry": packed(MessageExpiryInterval=3600),
    "message expiry max": packed(MessageExpiryInterval=2**32 - 1),
    "topic alias": packed(TopicAlias=1),
    "topic alias max": packed(TopicAlias=65535),
    "response topic": packed(ResponseTopic="reply/ü/✓"),
    "correlation data": packed(CorrelationData=b"\x00\xff\x10"),
    "empty correlation data": packed(CorrelationData=b""),
    "user property": packed(UserProperty=("site", "plant-1")),
    "user properties": packed(UserProperty=[("k", "v"), ("k", "v2"), ("", "")]),
    "subscription identifier": packed(SubscriptionIdentifier=1),
    "subscription identifier 2 bytes": packed(SubscriptionIdentifier=128),
    "subscription identifier max": packed(SubscriptionIdentifier=268_435_455),
    "subscription identifiers": packed(SubscriptionIdentifier=[5, 300]),
    "content type": packed(ContentType="application/json"),
    "all of them": packed(
        PayloadFormatIndicator=1,
        MessageExpiryInterval=60,
        TopicAlias=7,
        ResponseTopic="r",
        CorrelationData=b"id",
        UserProperty=[("a", "1")],
        SubscriptionIdentifier=[3],
        ContentType="text/plain",
    ),
    "longer than 127 bytes": packed(UserProperty=[("key", "v" * 200)], ContentType="c"),
    # What paho refuses or decodes oddly: the fast decoder must agree, error for error.
    "payload format 2": b"\x02\x01\x02",
    "topic alias 0": b"\x03\x23\x00\x00",
    "subscription identifier 0": b"\x02\x0b\x00",
    "repeated payload format": b"\x04\x01\x00\x01\x01",
    "not a PUBLISH property": b"\x05\x11\x00\x00\x00\x01",
    "unknown property": b"\x02\x7f\x00",
    "multi-byte identifier": b"\x03\x81\x00\x00",
    "truncated four-byte integer": b"\x03\x02\x00\x00",
    "value past the properties": b"\x01\x02\x00\x00\x00\x05",
    "string past the properties": b"\x04\x03\x00\x09ab",
    "null in string": b"\x05\x03\x00\x02a\x00",
    "byte order mark in string": b"\x06\x03\x00\x03\xef\xbb\xbf",
    "invalid utf-8": b"\x04\x03\x00\x01\xff",
    "unfinished variable byte integer": b"\x02\x0b\x80",
    "length past the buffer": b"\x09\x01",
    "nothing": b"",
}


def outcome(decode: Any, *args: Any) -> Any:
    """A comparable picture of a decode: its result with every value's type, or its error's type."""
    try:
        result = decode(*args)
    except Exception as error:
        return ("raises", type(error).__name__)
    if isinstance(result, _packet.PublishPacket):
        fields = result._asdict()
        fields["properties"] = outcome(lambda p: (p, None), result.properties)
        return {name: (type(value).__name__, value) for name, value in fields.items()}
    properties, consumed = result
    if properties is None:
        return None
    attributes = {name: value for name, value in vars(properties).items() if name not in PRIVATE}
    return repr(attributes), str(properties), properties.json(), consumed


def paho_unpack(buffer: bytes) -> tuple[Properties, int]:
    return Properties(PacketTypes.PUBLISH).unpack(buffer)


@pytest.mark.parametrize("buffer", EVERY_PUBLISH_PROPERTY.values(), ids=EVERY_PUBLISH_PROPERTY.keys())
def test_properties_decode_as_paho_unpacks_them(buffer: bytes) -> None:
    assert outcome(mqtt_fast.decode_publish_properties, buffer) == outcome(paho_unpack, buffer)


def test_the_fast_decode_covers_every_publish_property_type() -> None:
    """Each of paho's PUBLISH property types appears in the table above, so none goes untested."""
    names = {name.replace(" ", ""): ident for name, ident in Properties(PacketTypes.PUBLISH).names.items()}
    publish_ids = {
        ident
        for ident, (_, packets) in Properties(PacketTypes.PUBLISH).properties.items()
        if PacketTypes.PUBLISH in packets
    }
    covered = {
        names[name]
        for buffer in EVERY_PUBLISH_PROPERTY.values()
        if buffer and isinstance(decoded := paho_unpack_or_none(buffer), Properties)
        for name in vars(decoded)
        if name not in PRIVATE
    }
    assert covered == publish_ids


def paho_unpack_or_none(buffer: bytes) -> Properties | None:
    try:
        return paho_unpack(buffer)[0]
    except Exception:
        return None


property_values = st.fixed_dictionaries(
    {},
    optional={
        "PayloadFormatIndicator": st.integers(0, 1),
        "MessageExpiryInterval": st.integers(0, 2**32 - 1),
        "TopicAlias": st.integers(1, 65535),
        "ResponseTopic": st.text(max_size=12),
        "CorrelationData": st.binary(max_size=12),
        "UserProperty": st.lists(st.tuples(st.text(max_size=6), st.text(max_size=6)), min_size=1, max_size=3),
        "SubscriptionIdentifier": st.lists(st.integers(1, 268_435_455), min_size=1, max_size=3),
        "ContentType": st.text(max_size=12),
    },
)


def safely_packed(values: dict[str, Any]) -> bytes:
    try:
        return packed(**values)
    except Exception:  # a value paho will not even encode (e.g. a string with U+0000)
        return b"\x00"


@settings(max_examples=400, deadline=None)
@given(property_values)
def test_any_valid_properties_decode_as_paho_unpacks_them(values: dict[str, Any]) -> None:
    buffer = safely_packed(values)
    assert outcome(mqtt_fast.decode_publish_properties, buffer) == outcome(paho_unpack, buffer)


@settings(max_examples=1500, deadline=None)
@given(st.integers(0, 40), st.binary(max_size=40))
def test_arbitrary_bytes_decode_or_fail_as_paho(length: int, rest: bytes) -> None:
    buffer = bytes([length]) + rest
    assert outcome(mqtt_fast.decode_publish_properties, buffer) == outcome(paho_unpack, buffer)


def publish_packet(topic: bytes, qos: int, mid: int, properties: bytes, payload: bytes) -> bytearray:
    """A PUBLISH packet after its fixed header, as paho holds it in ``_in_packet["packet"]``."""
    head = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"")
    return bytearray(head + properties + payload)


@settings(max_examples=600, deadline=None)
@given(
    st.integers(0, 15),
    st.binary(max_size=30),
    st.integers(0, 65535),
    property_values,
    st.binary(max_size=60),
)
def test_publish_packets_decode_as_paho_decodes_them(
    flags: int, topic: bytes, mid: int, values: dict[str, Any], payload: bytes
) -> None:
    header = 0x30 | flags
    packet = publish_packet(topic, (flags >> 1) & 3, mid, safely_packed(values), payload)
    for protocol in (MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311):
        fast = outcome(mqtt_fast.decode_publish, header, bytearray(packet), protocol)
        assert fast == outcome(mqtt_fast.paho_decode_publish, header, bytearray(packet), protocol)


@settings(max_examples=1500, deadline=None)
@given(st.integers(0, 15), st.binary(max_size=50))
def test_arbitrary_publish_packets_decode_or_fail_as_paho(flags: int, packet: bytes) -> None:
    header, protocol = 0x30 | flags, MQTTProtocolVersion.MQTTv5
    fast = outcome(mqtt_fast.decode_publish, header, bytearray(packet), protocol)
    assert fast == outcome(mqtt_fast.paho_decode_publish, header, bytearray(packet), protocol)


# ------------------------------------------------------------------------ installation, guards
def new_client(client_id: str = "fast-test") -> mqtt.Client:
    return mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=True
    )


def test_every_fast_path_is_active_on_the_pinned_paho() -> None:
    """The installed paho is one the fast paths were written for, and pyproject.toml pins that range."""
    (dependency,) = (
        d
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("paho-mqtt")
    )
    low, high = mqtt_fast.SUPPORTED_PAHO
    assert re.fullmatch(rf"paho-mqtt>={low[0]}\.{low[1]},<{high[0]}\.{high[1]}", dependency), dependency
    assert mqtt_fast.accelerate(new_client()) == mqtt_fast.Acceleration(decode=True, read=True, ack=True)
    assert _packet.decode_publish is mqtt_fast.decode_publish


def test_another_paho_gets_paho_own_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paho.mqtt, "__version__", "2.3.0")
    client = new_client()
    assert mqtt_fast.accelerate(client) == mqtt_fast.Acceleration(decode=False, read=False, ack=False)
    assert "loop_read" not in vars(client)


# -------------------------------------------------------------------------- against Mosquitto
class Subscriber:
    """A manual-ack MQTT 5 session on a real broker; deliveries land in ``received``."""

    def __init__(self, port: int, *, fast: bool) -> None:
        self.port, self.fast = port, fast
        self.received: queue.SimpleQueue[mqtt.MQTTMessage] = queue.SimpleQueue()
        self.client = new_client("fast-ack-session")
        expected = mqtt_fast.Acceleration(decode=fast, read=fast, ack=fast)
        assert mqtt_fast.accelerate(self.client) == expected
        self.client.on_message = lambda _c, _u, message: self.received.put(message)
        self.disconnected = threading.Event()
        self.client.on_disconnect = lambda *_: self.disconnected.set()
        self.subacks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.client.on_subscribe = lambda _c, _u, mid, _codes, _p: self.subacks.put(mid)

    def connect(self, *, clean: bool) -> None:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 300
        properties.ReceiveMaximum = 65535  # every delivery may be unacknowledged (Mosquitto's own: 20)
        self.client.connect("127.0.0.1", self.port, clean_start=clean, properties=properties)
        self.client.loop_start()

    def subscribe(self, topic: str) -> None:
        """Subscribe and wait for the SUBACK: Mosquitto handles a connection's packets in order, so
        everything sent before (PUBACKs) has been handled too."""
        _, mid = self.client.subscribe(topic, qos=1)
        assert self.subacks.get(timeout=WAIT) == mid

    def disconnect(self) -> None:
        """Leave once the broker has handled our PUBACKs (Mosquitto reads one packet per turn of
        its loop, and drops what it has not read of a connection that a reconnect takes over)."""
        self.subscribe("fast/#")
        self.disconnected.clear()
        self.client.disconnect()
        assert self.disconnected.wait(WAIT)
        self.client.loop_stop()

    def take(self, count: int) -> list[mqtt.MQTTMessage]:
        return [self.received.get(timeout=WAIT) for _ in range(count)]

    def take_until(self, payload: bytes) -> list[mqtt.MQTTMessage]:
        messages: list[mqtt.MQTTMessage] = []
        while not messages or messages[-1].payload != payload:
            messages.append(self.received.get(timeout=WAIT))
        return messages


def publish(port: int, messages: list[bytes]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fast-publisher", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = [client.publish("fast/test", payload, qos=1) for payload in messages]
    for info in infos:
        info.wait_for_publish(WAIT)
    client.disconnect()
    client.loop_stop()


@pytest.mark.integration
@pytest.mark.parametrize("fast", [True, False], ids=["fast-paths", "paho-fallback"])
def test_acknowledged_deliveries_are_gone_and_the_others_redelivered(
    fast: bool, server_root: Path, start_mosquitto: MosquittoFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not fast:
        monkeypatch.setattr(paho.mqtt, "__version__", "2.3.0")
    _, port = start_mosquitto(broker_config(server_root / f"mqtt-fast-{fast}"))
    subscriber = Subscriber(port, fast=fast)
    subscriber.connect(clean=True)
    subscriber.subscribe("fast/#")
    publish(port, [b"subscribed?"])
    subscriber.take_until(b"subscribed?")  # unacknowledged: it comes back below too
    # Thousands of small packets (several bursts and chunks) and one larger than 100 chunks.
    payloads = [b"big:" + b"x" * (7 << 20)] + [f"m{index}".encode() for index in range(5000)]
    publish(port, payloads)
    first = subscriber.take(len(payloads))
    assert [m.payload for m in first] == payloads
    acknowledged = {m.payload for index, m in enumerate(first) if index % 3}
    rc = mqtt_fast.ack_many(subscriber.client, [(m.mid, m.qos) for m in first if m.payload in acknowledged])
    assert rc == mqtt.MQTT_ERR_SUCCESS
    subscriber.disconnect()

    subscriber.connect(clean=False)
    publish(port, [b"after reconnect"])
    again = subscriber.take_until(b"after reconnect")
    assert [m.payload for m in again] == [b"subscribed?"] + [p for p in payloads if p not in acknowledged] + [
        b"after reconnect"
    ]
    assert all(m.dup for m in again[:-1]), "redeliveries carry DUP"
    mqtt_fast.ack_many(subscriber.client, [(m.mid, m.qos) for m in again])
    subscriber.disconnect()

    subscriber.connect(clean=False)
    publish(port, [b"last"])
    assert [m.payload for m in subscriber.take_until(b"last")] == [b"last"]
    subscriber.disconnect()
