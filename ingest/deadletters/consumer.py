"""The dead-letter consumer: ``dlq/#`` → the registry's ``dead_letters``, replays → ``replay/<topic>``.

One main thread does everything that touches the registry, in turn: store what arrived, republish
what an operator asked to replay (every ``replay_poll_s``), purge what is past its tenant's
retention (every ``purge_interval_s``). paho's network thread only queues deliveries.

At least once, like the worker: MQTT 5, QoS 1, a persistent session (``clean_start=False``) and
manual acknowledgements. A dead letter is acknowledged only once its row is committed (or was
already there: the fingerprint makes a redelivery a no-op), in the order it arrived; while the
registry is down nothing is acknowledged, so the broker stops at ``mqtt_receive_maximum`` and
queues the rest. A replay is marked replayed only after the broker's PUBACK.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import structlog
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import CollectorRegistry, Counter, Gauge

from infra.tenancy import replay_topic
from ingest.contract import Reason
from ingest.deadletters.document import read_dead_letter
from ingest.deadletters.settings import DeadLetterSettings
from ingest.health import HealthServer
from ingest.session import connect_persistent, persistent_client
from registry import store, tenant_routes
from registry.migrate import apply_migrations

log = structlog.get_logger("deadletters")
UNKNOWN_TENANT_LABEL = "_unknown"
OTHER_REASON_LABEL = "other"
# Metric labels stay bounded: the worker's reasons and ours; anything else is "other".
KNOWN_REASONS = frozenset({*(reason.value for reason in Reason), store.MALFORMED_DEAD_LETTER})
IDLE_WAIT_S = 0.5


class DeadLetterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.stored = Counter(
            "ironlink_deadletters_stored",
            "Dead letters stored in the registry",
            ["tenant", "reason"],
            registry=r,
        )
        self.duplicates = Counter(
            "ironlink_deadletters_duplicates", "Redelivered dead letters already stored", registry=r
        )
        self.replayed = Counter(
            "ironlink_deadletters_replayed", "Dead letters republished to replay/ and confirmed", registry=r
        )
        self.purged = Counter(
            "ironlink_deadletters_purged", "Dead letters deleted past retention", ["tenant"], registry=r
        )
        self.failures = Counter(
            "ironlink_deadletters_failures",
            "Failed operations (store: registry write; replay: publish refused or unconfirmed; purge)",
            ["operation"],
            registry=r,
        )
        self.unacked = Gauge(
            "ironlink_deadletters_unacked", "Dead letters received and not acknowledged yet", registry=r
        )
        self.connected = Gauge("ironlink_deadletters_broker_connected", "1 while connected", registry=r)
        self.registry_ok = Gauge(
            "ironlink_deadletters_registry_ok", "1 when the last registry operation succeeded", registry=r
        )


@dataclass(frozen=True, slots=True)
class Delivery:
    mid: int
    qos: int
    topic: str
    payload: bytes
    epoch: int


class DeadLetterConsumer:
    def __init__(self, settings: DeadLetterSettings, metrics: DeadLetterMetrics | None = None) -> None:
        self.settings = settings
        self.dsn = settings.dsn()
        self.metrics = metrics or DeadLetterMetrics()
        self.heartbeat = time.monotonic()
        self.registry_ok = False
        self._routed: dict[str, int | None] = {}
        """The registry's tenants with a store route and their dead-letter retention."""
        self._conn: psycopg.Connection | None = None
        self._inbox: queue.SimpleQueue[Delivery] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._give_up_at: float | None = None
        self._connected = threading.Event()
        self._epoch = 0
        self._delivered = 0
        self._settled = 0
        self._confirmations = threading.Condition()
        self._confirmed: dict[int, ReasonCode] = {}
        self.metrics.unacked.set_function(lambda: self._delivered - self._settled)
        self.client = self._client()

    # ------------------------------------------------------------------------------ broker
    def _client(self) -> mqtt.Client:
        client = persistent_client(self.settings)
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
            self._epoch += 1  # delivery ids of a lost session must never acknowledge new messages
        client.subscribe(self.settings.mqtt_subscription, qos=1)
        self._connected.set()
        self.metrics.connected.set(1)
        log.info("broker_connected", session_present=flags.session_present, client_id=self.settings.client_id)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, code: ReasonCode, _p: Any) -> None:
        self._connected.clear()
        self.metrics.connected.set(0)
        (log.info if self._stop.is_set() else log.warning)("broker_disconnected", reason=str(code))

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: list[ReasonCode], _p: Any) -> None:
        topic = self.settings.mqtt_subscription
        if any(code.is_failure for code in codes):
            log.error("subscribe_refused", topic=topic, reasons=[str(c) for c in codes])
        else:
            log.info("subscribed", topic=topic)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        self._delivered += 1
        self._inbox.put(
            Delivery(message.mid, message.qos, message.topic, bytes(message.payload), self._epoch)
        )

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, code: ReasonCode, _p: Any) -> None:
        with self._confirmations:
            self._confirmed[mid] = code
            self._confirmations.notify_all()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self.metrics.registry

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready: connected to the broker and the registry reachable."""
        detail = {"broker_connected": self.connected, "registry_ok": self.registry_ok}
        return self.connected and self.registry_ok, detail

    # ----------------------------------------------------------------------------- main loop
    def stop(self) -> None:
        """Finish: store and acknowledge what has arrived; a registry that stays away longer than
        ``shutdown_grace_s`` leaves the rest unacknowledged, for the broker to redeliver."""
        self._give_up_at = time.monotonic() + self.settings.shutdown_grace_s
        self._stop.set()

    def _giving_up(self) -> bool:
        return self._give_up_at is not None and time.monotonic() >= self._give_up_at

    def run(self) -> None:
        s = self.settings
        health = HealthServer(s.http_host, s.http_port, self).start()
        connect_persistent(self.client, s, s.mqtt_receive_maximum)
        self.client.loop_start()
        log.info("consumer_started", broker=f"{s.mqtt_host}:{s.mqtt_port}", subscription=s.mqtt_subscription)
        next_replay = next_purge = time.monotonic()
        try:
            while not self._stop.is_set():
                self.heartbeat = now = time.monotonic()
                if now >= next_purge:
                    self._purge()
                    next_purge = time.monotonic() + s.purge_interval_s
                if now >= next_replay:
                    self._replay()
                    next_replay = time.monotonic() + s.replay_poll_s
                with contextlib.suppress(queue.Empty):
                    self._handle(self._inbox.get(timeout=max(0.0, min(IDLE_WAIT_S, next_replay - now))))
            while not self._giving_up():
                try:
                    self._handle(self._inbox.get_nowait())
                except queue.Empty:
                    break
        finally:
            self.client.disconnect()
            self.client.loop_stop()
            if self._conn is not None:
                self._conn.close()
            health.stop()
            log.info("consumer_stopped", unacked=self._delivered - self._settled)

    # ------------------------------------------------------------------------------ registry
    def _registry(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
            apply_migrations(self._conn)
        return self._conn

    def _with_registry(self, operation: str, action: Any, *, retry: bool) -> Any:
        """Run ``action(conn)``; on a connection failure reconnect and, with ``retry``, try again
        with backoff until it works or shutdown gives up (then raise :class:`GaveUp`)."""
        attempt = 0
        while True:
            try:
                result = action(self._registry())
            except psycopg.OperationalError as error:
                self._lost_registry(operation, error)
                if not retry:
                    return None
            else:
                self.registry_ok = True
                self.metrics.registry_ok.set(1)
                return result
            delay = min(self.settings.retry_max_ms, self.settings.retry_initial_ms * 2**attempt) / 1000
            attempt += 1
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline:
                self.heartbeat = time.monotonic()
                if self._giving_up():
                    raise GaveUp
                time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))

    def _lost_registry(self, operation: str, error: Exception) -> None:
        self.registry_ok = False
        self.metrics.registry_ok.set(0)
        self.metrics.failures.labels(operation).inc()
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        log.warning("registry_unavailable", operation=operation, error=str(error)[:300])

    def _tenant_label(self, tenant: str | None) -> str:
        known = tenant in self.settings.retention_s or tenant in self._routed
        return tenant if tenant is not None and known else UNKNOWN_TENANT_LABEL

    def _learn_tenants(self, conn: psycopg.Connection) -> None:
        """The tenants' retention from their registry routes (``tenant_store_routes``), read at each
        replay poll and before each purge, so a tenant added at runtime needs no restart."""
        self._routed = tenant_routes.dead_letter_retention(conn)

    def _retention(self) -> dict[str, int]:
        """Per tenant: its route's retention, else the settings' (a stack that writes no routes)."""
        routed = {tenant: seconds for tenant, seconds in self._routed.items() if seconds is not None}
        return {**self.settings.retention_s, **routed}

    # ---------------------------------------------------------------------------- dead letters
    def _handle(self, delivery: Delivery) -> None:
        s = self.settings
        letter = read_dead_letter(
            delivery.topic,
            delivery.payload,
            now=datetime.now(UTC),
            max_document_bytes=s.max_document_bytes,
            max_sample_bytes=s.max_sample_bytes,
        )
        try:
            stored = self._with_registry("store", lambda conn: self._store(conn, letter), retry=True)
        except GaveUp:
            return  # left unacknowledged: the broker redelivers it to the next session
        if delivery.epoch == self._epoch:
            self.client.ack(delivery.mid, delivery.qos)
        self._settled += 1
        if stored is None:
            self.metrics.duplicates.inc()
            return
        reason = letter.reason if letter.reason in KNOWN_REASONS else OTHER_REASON_LABEL
        self.metrics.stored.labels(self._tenant_label(letter.tenant_id), reason).inc()
        log.info("dead_letter_stored", id=stored, topic=letter.topic, reason=letter.reason)

    def _store(self, conn: psycopg.Connection, letter: store.NewDeadLetter) -> int | None:
        """Store the row; a row the schema or the database refuses (a constraint, a value it cannot
        take) is stored as ``malformed_dead_letter`` instead, so one letter cannot block the ones
        behind it nor crash-loop the consumer."""
        try:
            return store.store_dead_letter(conn, letter)
        except (store.RegistryError, psycopg.DatabaseError) as error:
            if isinstance(error, psycopg.OperationalError):
                raise  # the registry is away: retried with backoff, nothing acknowledged
            self.metrics.failures.labels("store").inc()
            log.error("dead_letter_refused", topic=letter.topic, error=str(error)[:300])
            return store.store_dead_letter(
                conn,
                store.NewDeadLetter(
                    tenant_id=letter.tenant_id,
                    reason=store.MALFORMED_DEAD_LETTER,
                    detail=str(error)[: store.DEAD_LETTER_DETAIL_MAX],
                    topic=letter.topic[:1024] or "-",
                    received_at=letter.received_at,
                    payload=letter.payload[: store.DEAD_LETTER_SAMPLE_MAX],
                    payload_bytes=letter.payload_bytes,
                    truncated=True,
                    fingerprint=letter.fingerprint,
                ),
            )

    # -------------------------------------------------------------------------------- replay
    def _replay(self) -> None:
        """Republish each requested dead letter to ``replay/<topic>`` and wait for its PUBACK; a
        refused or unconfirmed one stays requested and is tried again at the next poll."""
        if not self.connected:
            return
        pending = self._with_registry("replay", self._pending_replays, retry=False)
        for letter in pending or []:
            self.heartbeat = time.monotonic()
            if self._stop.is_set() or not self._publish(letter):
                return
            if self._with_registry(
                "replay", functools.partial(store.mark_replayed, dead_letter_id=letter.id), retry=False
            ):
                self.metrics.replayed.inc()
                log.info("dead_letter_replayed", id=letter.id, topic=replay_topic(letter.topic))

    def _pending_replays(self, conn: psycopg.Connection) -> list[store.DeadLetter]:
        self._learn_tenants(conn)
        return store.pending_replays(conn, self.settings.replay_batch)

    def _publish(self, letter: store.DeadLetter) -> bool:
        info = self.client.publish(replay_topic(letter.topic), letter.payload or b"", qos=1)
        deadline = time.monotonic() + self.settings.replay_timeout_s
        with self._confirmations:
            while info.mid not in self._confirmed and time.monotonic() < deadline:
                self.heartbeat = time.monotonic()
                self._confirmations.wait(0.2)
            code = self._confirmed.pop(info.mid, None)
        if code is None or code.is_failure:
            self.metrics.failures.labels("replay").inc()
            log.error(
                "replay_failed", id=letter.id, topic=letter.topic, reason=str(code) if code else "no PUBACK"
            )
            return False
        return True

    # --------------------------------------------------------------------------------- purge
    def _purge(self) -> None:
        purged = self._with_registry("purge", self._purge_expired, retry=False)
        for tenant, count in (purged or {}).items():
            self.metrics.purged.labels(self._tenant_label(tenant)).inc(count)
        if purged:
            log.info("dead_letters_purged", counts={str(t): n for t, n in purged.items()})

    def _purge_expired(self, conn: psycopg.Connection) -> dict[str | None, int]:
        self._learn_tenants(conn)
        return store.purge_dead_letters(conn, self._retention(), self.settings.default_retention_s)


class GaveUp(Exception):
    """Shutdown's grace ran out while the registry was away."""
