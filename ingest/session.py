"""The MQTT session both consumers of the platform hold: the worker and the dead-letter consumer.

MQTT 5, manual acknowledgement, ``clean_start=False`` with a session expiry, so the broker keeps
the subscription and queues while the client is away; credentials and TLS from the settings.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import SecretStr


class BrokerSettings(Protocol):
    """What a persistent session needs of a service's settings."""

    @property
    def mqtt_host(self) -> str: ...
    @property
    def mqtt_port(self) -> int: ...
    @property
    def mqtt_tls(self) -> bool: ...
    @property
    def mqtt_ca_file(self) -> Path | None: ...
    @property
    def mqtt_cert_file(self) -> Path | None: ...
    @property
    def mqtt_key_file(self) -> Path | None: ...
    @property
    def mqtt_username(self) -> str: ...
    @property
    def mqtt_password(self) -> SecretStr | None: ...
    @property
    def mqtt_keepalive_s(self) -> int: ...
    @property
    def mqtt_session_expiry_s(self) -> int: ...
    @property
    def client_id(self) -> str: ...


def persistent_client(settings: BrokerSettings) -> mqtt.Client:
    """A client for ``settings``' broker and identity; callbacks are the caller's to set."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=settings.client_id, protocol=mqtt.MQTTv5, manual_ack=True
    )
    password = settings.mqtt_password.get_secret_value() if settings.mqtt_password is not None else None
    client.username_pw_set(settings.mqtt_username, password)
    if settings.mqtt_tls:
        client.tls_set(
            ca_certs=str(settings.mqtt_ca_file) if settings.mqtt_ca_file else None,
            certfile=str(settings.mqtt_cert_file) if settings.mqtt_cert_file else None,
            keyfile=str(settings.mqtt_key_file) if settings.mqtt_key_file else None,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    # At most 2 s between attempts: a handful of replicas cannot storm a broker, and every second
    # the worker stays away after a broker outage is a second of every gateway's live data waiting
    # behind its backlog (bench/edge.py: 3.5 s of a 4.2 s live p99 with a 10 s maximum).
    client.reconnect_delay_set(1, 2)
    return client


def connect_persistent(client: mqtt.Client, settings: BrokerSettings, receive_maximum: int) -> None:
    """Connect in the background, resuming the session; ``receive_maximum`` deliveries may be
    unacknowledged at once (MQTT 5's window: the memory bound of a consumer that is held up)."""
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = settings.mqtt_session_expiry_s
    properties.ReceiveMaximum = receive_maximum
    client.connect_async(
        settings.mqtt_host,
        settings.mqtt_port,
        keepalive=settings.mqtt_keepalive_s,
        clean_start=False,
        properties=properties,
    )
