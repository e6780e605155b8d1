"""One broker session per machine, with that machine's own identity: it publishes only to its own
telemetry topic and reads only its own receipts, as the broker's rules allow a device.

Each link runs paho's network loop on a thread of its own and reconnects with exponential backoff
and full jitter (a gateway fleet coming back after a site outage must not reconnect in step).
Receipts are handed to the agent's event loop; the store is touched only there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from edge.config import Uplink
from infra.tenancy import receipts_topic, telemetry_topic

Receipt = list[tuple[int, int, int]]  # [(boot, first_n, last_n)]
GapReceipt = list[tuple[str, int, int, int]]  # [(reason, boot, first_n, count)]: gap records stored


def backoff_delays(
    initial: float, maximum: float, rng: random.Random | None = None
) -> Callable[[int], float]:
    """Full jitter: attempt ``k`` waits uniformly up to ``min(maximum, initial * 2**k)``, at least a
    tenth of ``initial`` (never a hot loop)."""
    rng = rng or random.Random()
    return lambda attempt: max(initial / 10, rng.uniform(0, min(maximum, initial * 2 ** min(attempt, 30))))


def stop_all(links: list[MachineLink], timeout: float) -> list[str]:
    """End every session at once and wait for them together, ``timeout`` in all (not per link:
    a gateway of many machines stops as fast as one); the machines whose thread did not end."""
    for link in links:
        link.begin_stop()
    deadline = time.monotonic() + timeout
    return [link.machine for link in links if not link.join(max(0.0, deadline - time.monotonic()))]


class MachineLink:
    """The session of one machine: ``connected``, ``publish``, receipts to ``on_receipt``."""

    def __init__(
        self,
        settings: Uplink,
        tenant: str,
        site: str,
        machine: str,
        gateway: str,
        loop: asyncio.AbstractEventLoop,
        on_receipt: Callable[[str, Receipt], None],
        on_connected: Callable[[str], None],
        on_gap_receipt: Callable[[str, GapReceipt], None] | None = None,
    ) -> None:
        self.settings, self.machine, self.gateway = settings, machine, gateway
        self._on_gap_receipt = on_gap_receipt
        self.topic = telemetry_topic(tenant, site, machine)
        self.receipts = receipts_topic(tenant, site, machine)
        self._loop, self._on_receipt, self._on_connected = loop, on_receipt, on_connected
        self.connected = False
        self.state = "connecting"
        self.since = time.time()
        self.last_error: str | None = None
        self.reconnects = 0
        self._outstanding = 0
        self._watched: dict[int, bool] = {}  # mid -> acknowledged, for messages sent only once
        self._early: deque[int] = deque(maxlen=4096)  # acknowledged before publish() returned
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake = threading.Event()  # reconnect now, without the backoff wait
        self._delay = backoff_delays(settings.reconnect_initial_s, settings.reconnect_max_s)
        self._tenant, self._site = tenant, site
        self.client = self._new_client()
        self._thread = threading.Thread(target=self._run, name=f"uplink-{machine}", daemon=True)

    def _new_client(self) -> mqtt.Client:
        """A fresh client per connection: paho would resend what it still held from the last one
        ahead of the latest values; the store resends what stays unconfirmed instead."""
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"{self.gateway}.{self.machine}", protocol=mqtt.MQTTv5
        )
        client.on_connect = self._connected
        client.on_message = self._message
        client.on_publish = self._published
        self._configure_identity(client, self._tenant, self._site)
        return client

    def _configure_identity(self, client: mqtt.Client, tenant: str, site: str) -> None:
        tls, identity = self.settings.tls, self.settings.identity_dir
        cert = key = None
        if identity is not None and (identity / f"{self.machine}.pem").is_file():
            cert, key = identity / f"{self.machine}.pem", identity / f"{self.machine}.key"
        elif tls is not None:
            cert, key = tls.cert_file, tls.key_file
        if tls is not None:
            context = ssl.create_default_context(cafile=str(tls.ca_file))
            if cert is not None and key is not None:
                context.load_cert_chain(str(cert), str(key))
            client.tls_set_context(context)
        if identity is not None and (identity / f"{self.machine}.password").is_file():
            username = f"{tenant}.{site}.{self.machine}"
            client.username_pw_set(username, (identity / f"{self.machine}.password").read_text().strip())

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.begin_stop()
        self._thread.join(timeout)

    def begin_stop(self) -> None:
        """Ask the session to end, without waiting: :func:`stop_all` ends many at once."""
        self._stopping.set()
        self._wake.set()
        self.client.disconnect()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the session's thread; True once it ended (it is a daemon: one
        stuck in a connect or a TLS handshake does not keep the process)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def reconnect(self) -> None:
        """End the session and start a new one at once: the identity on disk is new (claimed or
        renewed), and the broker checks a certificate only when a session starts."""
        self._wake.set()
        with self._lock:
            client = self.client
        client.disconnect()

    # ----------------------------------------------------------------------------- the session
    def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            try:
                self.client.connect(
                    self.settings.host, self.settings.port, keepalive=self.settings.keepalive_s
                )
                while not self._stopping.is_set():
                    if self.client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                        break
                    if self.connected:
                        attempt = 0
            except (OSError, ssl.SSLError) as error:
                self.last_error = str(error)
            self._down("reconnecting")
            with contextlib.suppress(OSError):
                self.client.disconnect()
            self._wake.wait(self._delay(attempt))
            self._wake.clear()
            if self._stopping.is_set():
                break
            with self._lock:
                self.client = self._new_client()
            attempt += 1
            self.reconnects += 1

    def _down(self, state: str) -> None:
        with self._lock:
            self._outstanding = 0
            self._watched.clear()
        if self.connected or self.state != state:
            self.connected, self.state, self.since = False, state, time.time()

    def _connected(self, client: mqtt.Client, _u: object, _f: object, code: ReasonCode, _p: object) -> None:
        if code.is_failure:
            self.last_error = f"CONNACK {code}"
            client.disconnect()
            return
        client.subscribe(self.receipts, qos=1)
        self._loop.call_soon_threadsafe(self._ready, client)

    def _ready(self, client: mqtt.Client) -> None:
        """On the agent's loop: its lanes are reset for the new session before anything is sent."""
        if client is not self.client or not client.is_connected():
            return  # that session is gone already
        self._on_connected(self.machine)
        self.connected, self.state, self.since, self.last_error = True, "connected", time.time(), None

    def _message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(message.payload)
            if body.get("gateway") != self.gateway:
                return
            ranges = [(int(b), int(f), int(la)) for b, f, la in body["stored"]]
            gaps = [
                (str(gap["reason"]), int(gap["boot"]), int(gap["first_n"]), int(gap["count"]))
                for gap in body.get("gaps", [])
            ]
        except (ValueError, KeyError, TypeError):
            return  # not a receipt of ours: nothing to forget
        if ranges:
            self._loop.call_soon_threadsafe(self._on_receipt, self.machine, ranges)
        if gaps and self._on_gap_receipt is not None:
            self._loop.call_soon_threadsafe(self._on_gap_receipt, self.machine, gaps)

    def _published(self, _c: mqtt.Client, _u: object, mid: int, _code: object, _p: object) -> None:
        with self._lock:
            self._outstanding = max(0, self._outstanding - 1)
            if mid in self._watched:
                self._watched[mid] = True
            else:
                self._early.append(mid)

    # ------------------------------------------------------------------------------- sending
    def room(self, window: int) -> int:
        """How many more messages may be handed to paho before the broker acknowledged earlier ones."""
        with self._lock:
            return max(0, window - self._outstanding) if self.connected else 0

    def publish(self, payload: bytes, *, watch: bool = False) -> int | None:
        """Hand a message to paho (QoS 1); its mid, or None when the session is gone. ``watch``:
        :meth:`acknowledged` will tell when the broker took it."""
        # Outside our lock: paho calls on_publish holding its own, and publish() takes that one.
        info = self.client.publish(self.topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        with self._lock:
            self._outstanding += 1
            if watch:
                self._watched[info.mid] = info.mid in self._early
        return info.mid

    def acknowledged(self, mid: int) -> bool | None:
        """True once the broker acknowledged a watched message (then forgotten), None if it never will."""
        with self._lock:
            done = self._watched.get(mid)
            if done:
                del self._watched[mid]
            return done
