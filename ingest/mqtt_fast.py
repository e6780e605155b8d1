"""Faster paths through paho-mqtt for a subscriber that receives QoS 1 at high rate.

Of the ~110 µs of CPU paho spends per delivered message, most goes to work a telemetry subscriber
does not need: a fresh ``Properties`` object (tables rebuilt each time) for every PUBLISH, three
``recv`` calls and one ``select`` per packet, one wake-up syscall and one ``send`` per PUBACK.
``accelerate(client)`` removes them without changing what paho does:

- **decode**: PUBLISH packets are decoded by ``decode_publish`` below, which gives the same
  ``PublishPacket`` as paho's own ``_packet.decode_publish`` (same types, same ``Properties``
  attributes) and hands every packet it is not sure about, malformed ones included, to paho's;
- **read**: the socket is read in chunks of ``READ_CHUNK`` bytes and up to ``READ_BURST`` packets
  are handled per wake-up, instead of 1-byte reads and one packet per ``select``;
- **acknowledge**: ``ack_many`` queues the PUBACKs of a whole batch as one write and wakes paho's
  network thread once.

Each relies on paho internals, listed by the functions that use them. They are checked when
``accelerate`` runs: on a paho outside ``SUPPORTED_PAHO`` or missing one of them, nothing is
installed and ``ack_many`` takes paho's public ``ack()``; behaviour stays the same, only slower.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

# The versions whose internals were read and are tested (tests/test_mqtt_fast.py); keep in step
# with the paho-mqtt pin in pyproject.toml.
SUPPORTED_PAHO = ((2, 2), (2, 3))  # [from, to)
READ_CHUNK = 65536
READ_BURST = 1000  # packets per wake-up before paho may write (PUBACKs, PINGREQ) again

_PUBACK = 0x40
_PUBACK_PACKET = struct.Struct("!BBH")
paho_decode_publish = _packet.decode_publish  # paho's own, the reference and the fallback


@dataclass(frozen=True)
class Acceleration:
    """What ``accelerate`` installed on one client (all False: paho's own paths)."""

    decode: bool
    read: bool
    ack: bool


def paho_version() -> tuple[int, int]:
    major, minor = paho.mqtt.__version__.split(".")[:2]
    return int(major), int(minor)


def _supported() -> bool:
    low, high = SUPPORTED_PAHO
    return low <= paho_version() < high


# ------------------------------------------------------------------------------------ decode
# Properties.__init__ rebuilds three tables (names, ids, types) for every object, ~17 µs. They
# are only ever read by Properties' methods, so every decoded PUBLISH shares one prototype's.
_PROTOTYPE_STATE = dict(vars(Properties(PacketTypes.PUBLISH)))
_PRIVATE = frozenset(_PROTOTYPE_STATE)


def _blank_properties() -> Properties:
    properties: Properties = object.__new__(Properties)
    properties.__dict__.update(_PROTOTYPE_STATE)
    return properties


class _Fallback(Exception):
    """Not a case this decoder is sure about: paho's decoder decides (and raises if it must)."""


def _vbi(buffer: bytes | bytearray, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    for index in range(pos, min(pos + 4, end)):
        digit = buffer[index]
        value |= (digit & 0x7F) << shift
        if not digit & 0x80:
            return value, index + 1
        shift += 7
    raise _Fallback


def _utf8(buffer: bytes | bytearray, pos: int, end: int) -> tuple[str, int]:
    if pos + 2 > end:
        raise _Fallback
    stop = pos + 2 + ((buffer[pos] << 8) | buffer[pos + 1])
    if stop > end:
        raise _Fallback
    try:
        text = bytes(buffer[pos + 2 : stop]).decode("utf-8")
    except UnicodeDecodeError:
        raise _Fallback from None
    if "\x00" in text or "\ufeff" in text:  # refused by paho's readUTF (MQTT-1.5.4-2, -3)
        raise _Fallback
    return text, stop


def _publish_properties(buffer: bytes | bytearray, pos: int, end: int) -> Properties:
    """The PUBLISH properties in ``buffer[pos:end]``, exactly as ``Properties.unpack`` sets them;
    ``_Fallback`` for anything unusual (unknown or repeated property, value out of range...)."""
    properties = _blank_properties()
    found = properties.__dict__
    while pos < end:
        identifier = buffer[pos]
        pos += 1
        if identifier == 1:  # Payload Format Indicator, byte 0 or 1
            if pos >= end or buffer[pos] > 1 or "PayloadFormatIndicator" in found:
                raise _Fallback
            found["PayloadFormatIndicator"] = buffer[pos]
            pos += 1
        elif identifier == 2:  # Message Expiry Interval, four bytes
            if pos + 4 > end or "MessageExpiryInterval" in found:
                raise _Fallback
            found["MessageExpiryInterval"] = int.from_bytes(buffer[pos : pos + 4], "big")
            pos += 4
        elif identifier == 35:  # Topic Alias, two bytes, 1..65535
            if pos + 2 > end or "TopicAlias" in found:
                raise _Fallback
            alias = (buffer[pos] << 8) | buffer[pos + 1]
            if alias == 0:
                raise _Fallback
            found["TopicAlias"] = alias
            pos += 2
        elif identifier in (3, 8):  # Content Type, Response Topic
            name = "ContentType" if identifier == 3 else "ResponseTopic"
            if name in found:
                raise _Fallback
            found[name], pos = _utf8(buffer, pos, end)
        elif identifier == 9:  # Correlation Data, binary
            if pos + 2 > end or "CorrelationData" in found:
                raise _Fallback
            stop = pos + 2 + ((buffer[pos] << 8) | buffer[pos + 1])
            if stop > end:
                raise _Fallback
            found["CorrelationData"] = bytes(buffer[pos + 2 : stop])
            pos = stop
        elif identifier == 11:  # Subscription Identifier, may repeat, 1..268435455
            value, pos = _vbi(buffer, pos, end)
            if value == 0:
                raise _Fallback
            found.setdefault("SubscriptionIdentifier", []).append(value)
        elif identifier == 38:  # User Property, may repeat
            key, pos = _utf8(buffer, pos, end)
            value_, pos = _utf8(buffer, pos, end)
            found.setdefault("UserProperty", []).append((key, value_))
        else:
            raise _Fallback
    return properties


def decode_publish_properties(buffer: bytes | bytearray) -> tuple[Properties, int]:
    """What ``Properties(PacketTypes.PUBLISH).unpack(buffer)`` returns, without its cost for the
    usual cases (no properties, a few well-formed ones); any other case is paho's own unpack."""
    if buffer:
        length = buffer[0]
        if length == 0:
            return _blank_properties(), 1
        if length < 0x80 and 1 + length <= len(buffer):
            try:
                return _publish_properties(buffer, 1, 1 + length), 1 + length
            except _Fallback:
                pass
    properties, consumed = _blank_properties().unpack(buffer)
    return properties, consumed


def decode_publish(
    header: int, packet: bytes | bytearray, protocol: MQTTProtocolVersion
) -> _packet.PublishPacket:
    """Drop-in for paho's ``_packet.decode_publish``: the same result for MQTT 5 packets (topic
    and payload as ``bytes``); anything else, or any packet short of its declared fields, goes to
    paho's decoder, which raises ``MalformedPacket`` as paho does."""
    size = len(packet)
    qos = (header & 0x06) >> 1
    if protocol == MQTTProtocolVersion.MQTTv5 and size >= 2:
        topic_end = 2 + ((packet[0] << 8) | packet[1])
        pos, mid = topic_end, 0
        if qos and pos + 2 <= size:
            mid = (packet[pos] << 8) | packet[pos + 1]
            pos += 2
        if pos < size and (pos == topic_end) == (qos == 0):
            length = packet[pos]
            properties: Properties | None = None
            if length == 0:
                properties, pos = _blank_properties(), pos + 1
            elif length < 0x80 and pos + 1 + length <= size:
                try:
                    properties = _publish_properties(packet, pos + 1, pos + 1 + length)
                    pos += 1 + length
                except _Fallback:
                    pass
            if properties is not None:
                return _packet.PublishPacket(
                    dup=(header & 0x08) != 0,
                    qos=qos,
                    retain=(header & 0x01) != 0,
                    topic=bytes(packet[2:topic_end]),
                    mid=mid,
                    properties=properties,
                    payload=bytes(packet[pos:]),
                )
    return paho_decode_publish(header, packet, protocol)


def _install_decoder() -> bool:
    """paho's client looks ``decode_publish`` up in ``paho.mqtt._packet`` for each PUBLISH
    (``Client._handle_publish``), so the decoder is installed there, for every client of the
    process: harmless, since it returns what paho's own would."""
    if not hasattr(_packet, "PublishPacket") or not callable(getattr(_packet, "decode_publish", None)):
        return False
    _packet.decode_publish = decode_publish
    return True


# -------------------------------------------------------------------------------------- read
class _BufferedReader:
    """Serves ``Client._sock_recv`` from chunks of ``READ_CHUNK`` bytes and makes ``loop_read``
    handle every packet already received, up to ``READ_BURST``, before it returns.

    Internals used: ``_sock``, ``_sock_recv(n)`` (raises ``BlockingIOError`` when nothing is
    there, returns ``b""`` at end of stream), ``_packet_read()`` (one packet, resumable, keeps a
    partial one in ``_in_packet``), ``_loop_rc_handle(rc)``; ``Client._loop`` calls
    ``self.loop_read()`` when ``select`` finds the socket readable. ``loop_read`` returns with the
    chunk consumed (the rest of a packet, if any, is still in the kernel, so ``select`` wakes paho
    again): no byte can wait here unseen. A chunk of a socket paho has since replaced is dropped.
    """

    def __init__(self, client: mqtt.Client) -> None:
        self._client = client
        self._recv = client._sock_recv
        self._sock: Any = None
        self._chunk = b""
        self._pos = 0
        self._refill = True

    def sock_recv(self, bufsize: int) -> bytes:
        if self._sock is not self._client._sock:
            self._sock, self._chunk, self._pos = self._client._sock, b"", 0
        if self._pos >= len(self._chunk):
            if not self._refill:
                raise BlockingIOError
            self._chunk, self._pos = self._recv(READ_CHUNK), 0
            if not self._chunk:
                return b""
        data = self._chunk[self._pos : self._pos + bufsize]
        self._pos += len(data)
        return data

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        client, handled = self._client, 0
        try:
            while True:
                if handled == READ_BURST:
                    self._refill = False  # finish the chunk, then let paho write
                if client._sock is None:
                    return MQTTErrorCode.MQTT_ERR_NO_CONN
                rc = client._packet_read()
                if rc > 0:
                    return client._loop_rc_handle(rc)
                # AGAIN: nothing left, or a huge packet paused after 100 reads (go on with it)
                if rc == MQTTErrorCode.MQTT_ERR_AGAIN and self._pos >= len(self._chunk):
                    return MQTTErrorCode.MQTT_ERR_SUCCESS
                handled += 1
        finally:
            self._refill = True


def _install_reader(client: mqtt.Client) -> bool:
    needed = ("_sock_recv", "_packet_read", "_loop_rc_handle", "_in_packet", "_sock", "_transport")
    if not all(hasattr(client, name) for name in needed) or client._transport not in ("tcp", "unix"):
        return False
    reader = _BufferedReader(client)
    client._sock_recv = reader.sock_recv  # type: ignore[method-assign]
    client.loop_read = reader.loop_read  # type: ignore[method-assign]
    return True


# --------------------------------------------------------------------------------------- ack
_FAST_ACK = "_ironlink_fast_ack"


def ack_many(client: mqtt.Client, deliveries: Iterable[tuple[int, int]]) -> MQTTErrorCode:
    """Acknowledge ``(mid, qos)`` deliveries of a ``manual_ack`` client, as ``client.ack`` each
    would, with one queued write and one wake-up of the network thread for all QoS 1 PUBACKs.

    Internals used: ``_manual_ack`` (``ack`` is a no-op without it) and ``_packet_queue(command,
    packet, mid, qos)``, which appends to ``_out_packet`` and writes one byte to the socket pair
    that wakes ``select``; ``_packet_write`` sends an out-packet's bytes as they are, only
    ``PUBLISH`` and ``DISCONNECT`` out-packets get special treatment, and a reconnect drops
    unsent ones (as it drops unsent single PUBACKs: the broker then redelivers)."""
    if not getattr(client, _FAST_ACK, False):
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        for mid, qos in deliveries:
            rc = client.ack(mid, qos) or rc
        return rc
    if not client._manual_ack:
        return MQTTErrorCode.MQTT_ERR_SUCCESS
    packets = []
    for mid, qos in deliveries:
        if qos == 1:
            packets.append(_PUBACK_PACKET.pack(_PUBACK, 2, mid))
        elif qos == 2:
            client.ack(mid, qos)
    if not packets:
        return MQTTErrorCode.MQTT_ERR_SUCCESS
    return client._packet_queue(_PUBACK, b"".join(packets), 0, 1)


def _install_ack(client: mqtt.Client) -> bool:
    if not (hasattr(client, "_manual_ack") and callable(getattr(client, "_packet_queue", None))):
        return False
    setattr(client, _FAST_ACK, True)
    return True


def accelerate(client: mqtt.Client) -> Acceleration:
    """Install the fast paths on ``client`` (before ``connect``) where this paho is one they were
    written for; report which are active."""
    if not _supported():
        return Acceleration(decode=False, read=False, ack=False)
    return Acceleration(decode=_install_decoder(), read=_install_reader(client), ack=_install_ack(client))
