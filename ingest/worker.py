"""The ingestion worker: broker → contract → store, acknowledging each message only once it is safe.

Threads: paho's network thread only queues deliveries (``on_message``); the main thread runs the
pipeline, batches, writes and acknowledges; a small HTTP server answers probes and scrapes.

At least once, never more loss than the broker's own limits:

- MQTT 5, QoS 1, ``clean_start=False`` with a session expiry: the broker keeps our subscription
  and queues for us while we are away (restart, crash, SIGKILL);
- ``manual_ack``: a delivery is acknowledged only after the batch holding it has been written to
  the store *and* every dead letter of that batch has been confirmed (PUBACK) by the broker;
- while the store is down the batch is retried with exponential backoff and nothing is
  acknowledged, so the broker stops sending once ``receive_maximum`` deliveries are unacknowledged
  (that is our memory bound) and queues the rest;
- after a reconnect *without* a session, delivery ids of the old session are void: their
  acknowledgements are skipped (the broker redelivers nothing of a session it lost), so an old id
  can never acknowledge a new message that is not stored yet.
"""

from __future__ import annotations

import contextlib
import queue
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from infra.tenancy import dead_letter_topic
from ingest.contract import Reason, Rejected
from ingest.health import HealthServer
from ingest.metrics import WorkerMetrics
from ingest.pipeline import DeadLetter, Pipeline, Point, dead_letter_document
from ingest.settings import WorkerSettings
from ingest.store import Store, is_retryable

log = structlog.get_logger("ingest")
IDLE_WAIT_S = 0.5


@dataclass(frozen=True, slots=True)
class Delivery:
    mid: int
    qos: int
    topic: str
    payload: bytes
    received_at: float
    epoch: int


@dataclass
class Batch:
    """Deliveries waiting for one write: points by tenant, dead letters awaiting their PUBACK."""

    started: float = field(default_factory=time.monotonic)
    deliveries: list[Delivery] = field(default_factory=list)
    points: dict[str, list[tuple[Point, Delivery]]] = field(default_factory=dict)
    dead_letters: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.deliveries)


class Worker:
    def __init__(
        self, settings: WorkerSettings, *, tokens: dict[str, str], metrics: WorkerMetrics | None = None
    ):
        self.settings = settings
        self.metrics = metrics or WorkerMetrics()
        self.pipeline = Pipeline(settings)
        self.store = Store(settings, tokens)
        self.heartbeat = time.monotonic()
        self.store_ok = True
        self._inbox: queue.SimpleQueue[Delivery] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._give_up_at: float | None = None
        self._connected = threading.Event()
        self._epoch = 0
        self._confirmations = threading.Condition()
        self._confirmed: dict[int, bool] = {}
        # Single-writer counters (network thread, main thread): their difference is the backlog.
        self._delivered = 0
        self._settled = 0
        self._batch_limit = min(settings.batch_size, settings.receive_maximum)
        self._received = {tenant: self.metrics.received.labels(tenant) for tenant in settings.tenants}
        self.metrics.unacked.set_function(lambda: self.unacked)
        self.client = self._client()

    # ---------------------------------------------------------------------------- broker side
    def _client(self) -> mqtt.Client:
        s = self.settings
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=s.client_id, protocol=mqtt.MQTTv5, manual_ack=True
        )
        if s.mqtt_password is not None:
            client.username_pw_set(s.mqtt_username, s.mqtt_password.get_secret_value())
        else:
            client.username_pw_set(s.mqtt_username)
        if s.mqtt_tls:
            client.tls_set(
                ca_certs=str(s.mqtt_ca_file) if s.mqtt_ca_file else None,
                certfile=str(s.mqtt_cert_file) if s.mqtt_cert_file else None,
                keyfile=str(s.mqtt_key_file) if s.mqtt_key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.reconnect_delay_set(1, 10)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, code: ReasonCode, _p: Any) -> None:
        if code.is_failure:
            log.error("broker_refused", reason=str(code), host=self.settings.mqtt_host)
            return
        if not flags.session_present:
            self._epoch += 1
        client.subscribe(self.settings.mqtt_subscription, qos=1)
        self._connected.set()
        self.metrics.connected.set(1)
        log.info("broker_connected", session_present=flags.session_present, client_id=self.settings.client_id)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, code: ReasonCode, _p: Any) -> None:
        self._connected.clear()
        self.metrics.connected.set(0)
        level = log.info if self._stop.is_set() else log.warning
        level("broker_disconnected", reason=str(code), unacked=self.unacked)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: list[ReasonCode], _p: Any) -> None:
        if any(code.is_failure for code in codes):
            log.error(
                "subscribe_refused", topic=self.settings.mqtt_subscription, reasons=[str(c) for c in codes]
            )
        else:
            log.info("subscribed", topic=self.settings.mqtt_subscription)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        self._delivered += 1
        self._inbox.put(
            Delivery(
                message.mid, message.qos, message.topic, bytes(message.payload), time.time(), self._epoch
            )
        )

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, code: ReasonCode, _p: Any) -> None:
        with self._confirmations:
            self._confirmed[mid] = not code.is_failure
            self._confirmations.notify_all()

    # ----------------------------------------------------------------------------- main loop
    @property
    def unacked(self) -> int:
        """Deliveries not acknowledged yet: queued here, in the batch, or being written."""
        return self._delivered - self._settled

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self) -> None:
        """Ask the worker to finish: flush what it holds, acknowledge it, disconnect; a store or
        broker that stays away longer than ``shutdown_grace_s`` leaves the rest unacknowledged."""
        self._give_up_at = time.monotonic() + self.settings.shutdown_grace_s
        self._stop.set()

    def _giving_up(self) -> bool:
        return self._give_up_at is not None and time.monotonic() >= self._give_up_at

    def run(self) -> None:
        s = self.settings
        health = HealthServer(self, s.http_host, s.http_port).start()
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = s.mqtt_session_expiry_s
        properties.ReceiveMaximum = s.receive_maximum
        self.client.connect_async(
            s.mqtt_host, s.mqtt_port, keepalive=s.mqtt_keepalive_s, clean_start=False, properties=properties
        )
        self.client.loop_start()
        log.info("worker_started", broker=f"{s.mqtt_host}:{s.mqtt_port}", tenants=sorted(s.tenants))
        try:
            batch = Batch()
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                wait = s.flush_interval_ms / 1000 - (self.heartbeat - batch.started) if batch else IDLE_WAIT_S
                with contextlib.suppress(queue.Empty):
                    self._handle(self._inbox.get(timeout=max(wait, 0.0)), batch)
                if batch and (len(batch) >= self._batch_limit or self._due(batch)):
                    self._flush(batch)
                    batch = Batch()
            self._drain(batch)
        finally:
            self.client.disconnect()
            self.client.loop_stop()
            self.store.close()
            health.stop()
            log.info("worker_stopped", unacked=self.unacked)

    def _due(self, batch: Batch) -> bool:
        return time.monotonic() - batch.started >= self.settings.flush_interval_ms / 1000

    def _drain(self, batch: Batch) -> None:
        """On shutdown: take what has arrived, write it, acknowledge it; the rest stays with the broker."""
        while True:
            try:
                self._handle(self._inbox.get_nowait(), batch)
            except queue.Empty:
                break
        if batch:
            self._flush(batch)

    def _handle(self, delivery: Delivery, batch: Batch) -> None:
        if not batch:
            batch.started = time.monotonic()
        batch.deliveries.append(delivery)
        outcome = self.pipeline.process(delivery.topic, delivery.payload, delivery.received_at)
        if isinstance(outcome, Point):
            counter = self._received.get(outcome.tenant_id)
            (counter or self.metrics.received.labels(outcome.tenant_id)).inc()
            batch.points.setdefault(outcome.tenant_id, []).append((outcome, delivery))
        else:
            self.metrics.received.labels(outcome.tenant_label).inc()
            self._dead_letter(delivery, outcome, batch)

    def _dead_letter(self, delivery: Delivery, letter: DeadLetter, batch: Batch) -> None:
        info = self.client.publish(dead_letter_topic(delivery.topic), letter.document, qos=1)
        batch.dead_letters.append(info.mid)
        self.metrics.rejected.labels(letter.tenant_label, letter.reason.value).inc()
        log.info("rejected", topic=delivery.topic, reason=letter.reason.value, detail=letter.detail)

    # --------------------------------------------------------------------------------- flush
    def _flush(self, batch: Batch) -> None:
        """Write, confirm the dead letters, then acknowledge every delivery of the batch in order."""
        if not self._write(batch) or not self._confirm(batch):
            log.warning("batch_abandoned", messages=len(batch), note="left unacknowledged for redelivery")
            return
        now = time.time()
        for tenant, entries in batch.points.items():
            self.metrics.written.labels(tenant).inc(len(entries))
            for point, _ in entries:
                self.metrics.lag_seconds.observe(now - point.ts)
        acknowledged: set[int] = set()
        for delivery in batch.deliveries:
            if delivery.epoch == self._epoch and delivery.mid not in acknowledged:
                acknowledged.add(delivery.mid)
                self.client.ack(delivery.mid, delivery.qos)
        self._settled += len(batch)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.flush_seconds.observe(time.monotonic() - batch.started)

    def _write(self, batch: Batch) -> bool:
        pending = dict(batch.points)
        attempt = 0
        while pending:
            for tenant in list(pending):
                lines = [point.line for point, _ in pending[tenant]]
                started = time.perf_counter()
                try:
                    self.store.write(tenant, lines)
                except Exception as error:
                    self.metrics.write_errors.labels(tenant).inc()
                    if is_retryable(error):
                        log.warning(
                            "store_write_failed",
                            tenant=tenant,
                            points=len(lines),
                            attempt=attempt,
                            error=str(error)[:300],
                        )
                        continue
                    self._store_rejected(tenant, error, batch)
                else:
                    self.metrics.write_seconds.observe(time.perf_counter() - started)
                del pending[tenant]
            self.store_ok = not pending
            self.metrics.store_ok.set(1 if self.store_ok else 0)
            if pending:
                delay = min(self.settings.retry_max_ms, self.settings.retry_initial_ms * 2**attempt) / 1000
                attempt += 1
                if not self._pause(delay):
                    return False
        return True

    def _store_rejected(self, tenant: str, error: Exception, batch: Batch) -> None:
        """The store refused the data itself (400/413/422): retrying cannot help, so each message
        goes to the dead-letter topic with the store's answer instead of blocking everyone."""
        entries = batch.points.pop(tenant)
        log.error("store_rejected", tenant=tenant, points=len(entries), error=str(error)[:300])
        rejected = Rejected(Reason.STORE_REJECTED, str(error)[:500])
        for _, delivery in entries:
            document = dead_letter_document(
                rejected,
                delivery.topic,
                delivery.payload,
                delivery.received_at,
                self.settings.dead_letter_payload_bytes,
            )
            self._dead_letter(delivery, DeadLetter(tenant, rejected.reason, rejected.detail, document), batch)

    def _confirm(self, batch: Batch) -> bool:
        """Wait until the broker has confirmed every dead letter of the batch (paho resends them
        after a reconnect); a refused one is counted and logged, not retried forever."""
        with self._confirmations:
            for mid in batch.dead_letters:
                while mid not in self._confirmed:
                    self.heartbeat = time.monotonic()
                    if self._giving_up():
                        return False
                    self._confirmations.wait(0.5)
                if not self._confirmed.pop(mid):
                    self.metrics.dead_letter_failures.inc()
                    log.error("dead_letter_refused", mid=mid)
        return True

    def _pause(self, seconds: float) -> bool:
        """Sleep between retries, staying alive for probes; False once shutdown must give up."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.heartbeat = time.monotonic()
            if self._giving_up():
                return False
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))
        return True
