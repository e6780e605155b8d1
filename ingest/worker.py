"""The ingestion worker: broker → contract → store, acknowledging each message only once it is safe.

Threads: paho's network thread only queues deliveries (``on_message``); the main thread runs the
pipeline, batches, writes (each tenant's points in parallel, on the ``store`` threads) and
acknowledges; the spool drainer writes held tenants' points once their store answers again; a small
HTTP server answers probes and scrapes.

At least once, and no tenant waits for another:

- MQTT 5, QoS 1, ``clean_start=False`` with a session expiry, a client id stable per replica (a
  StatefulSet ordinal): the broker keeps our subscription and queues for us while we are away
  (restart, crash, SIGKILL), and the same replica resumes its own session;
- ``manual_ack``: a delivery is acknowledged only once every point of its batch is *safe*, that is
  written to its tenant's store or committed to the durable spool (``ingest/spool.py``), and every
  dead letter of the batch has been confirmed (PUBACK) by the broker;
- bulkheads: MQTT wants PUBACKs in arrival order, so a tenant whose store fails (down, slow past
  ``direct_write_timeout_ms``, 401/403/404) is *held*: its points go to the spool, the batch is
  acknowledged, and the drainer retries that tenant alone with backoff. A tenant at its spool cap
  is dead-lettered with ``store_unavailable`` (replayable), never silently dropped;
- a store refusing some points of a write (InfluxDB's 422 partial write) is answered point by
  point (:meth:`ingest.store.Store.write_each`): the refused ones are dead-lettered with the store's
  answer, the others count as stored;
- a graceful stop (SIGTERM) with a shared subscription unsubscribes, takes what is still arriving
  until the marker it sent itself after the UNSUBSCRIBE comes back (the broker's queue for it is
  then empty), writes and acknowledges it, then ends its session (session
  expiry 0) so the broker hands its share to the other replicas at once; with a plain
  subscription (one replica) the session is kept for the next start;
- delivery ids belong to one connection: after a reconnect, deliveries of the old one are written
  but not acknowledged (the broker redelivers them if it kept the session), so an old id can
  never acknowledge a new message;
- a batch (contract v4) is taken apart into its documents, each stored or dead-lettered on its
  own; gap records go to the registry's ``telemetry_gaps`` (``registry/gaps.py``) before the
  batch is acknowledged, and are confirmed on the receipts topic like stored readings. A gap the
  registry cannot take (none configured, or it fails) is dead-lettered ``store_unavailable`` and,
  unconfirmed, sent again by its gateway.
"""

from __future__ import annotations

import concurrent.futures
import json
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import CollectorRegistry, Counter

from infra.tenancy import REPLAY_ROOT, dead_letter_topic, drain_topic, original_topic, receipts_topic
from ingest.contract import MachineKey, Reason, Rejected, parse_topic
from ingest.fleet import Fleet
from ingest.health import HealthServer
from ingest.metrics import WorkerMetrics
from ingest.mqtt_fast import accelerate, ack_many
from ingest.pipeline import DeadLetter, Deferred, GapRecord, Pipeline, Point, dead_letter_document
from ingest.session import connect_persistent, persistent_client
from ingest.settings import WorkerSettings
from ingest.spool import Spool, SpooledPoint, SpoolEntry, SpoolError
from ingest.store import Store, store_answer
from ingest.usage import meter_for
from registry.gaps import upsert_gaps
from registry.tenant_routes import TenantStoreRoutes

log = structlog.get_logger("ingest")
_NO_SEQ = (None, None, None)
IDLE_WAIT_S = 0.5
REGISTRY_TIMEOUT_S = 5  # connecting to the registry, and each gap record's statement
_REPLAY_PREFIX = f"{REPLAY_ROOT}/"


@dataclass(frozen=True, slots=True)
class Delivery:
    mid: int
    qos: int
    topic: str
    payload: bytes
    received_at: float
    connection: int


@dataclass
class Batch:
    """Deliveries waiting for one write: points by tenant, dead letters awaiting their PUBACK."""

    started: float = field(default_factory=time.monotonic)
    deliveries: list[Delivery] = field(default_factory=list)
    points: dict[str, list[tuple[Point, Delivery]]] = field(default_factory=dict)
    gaps: list[tuple[GapRecord, Delivery]] = field(default_factory=list)
    dead_letters: list[SentLetter] = field(default_factory=list)
    documents: int = 0  # what the deliveries held: a v4 batch is many

    def __len__(self) -> int:
        return len(self.deliveries)


@dataclass(slots=True)
class SentLetter:
    """A dead letter on its way: kept until the broker confirms it, published again if refused."""

    mid: int
    topic: str
    document: bytes


Source = Delivery | SpooledPoint  # what a dead letter is made of: topic, payload, received_at


@dataclass
class Hold:
    """A tenant whose store route failed: since when, why, and when the drainer tries again."""

    since: float
    error: str
    attempts: int = 0
    next_try: float = 0.0


class Worker:
    def __init__(
        self, settings: WorkerSettings, *, tokens: dict[str, str], metrics: WorkerMetrics | None = None
    ):
        self.settings = settings
        self.metrics = metrics or WorkerMetrics()
        self.pipeline = Pipeline(settings)
        self._received: dict[str, Counter] = {}
        # Tenants: from the settings, or from the registry (none until its first copy).
        self.store = Store(settings.store_timeout_ms, {})
        self.usage = meter_for(settings, self.metrics.registry)  # before the tenants: their quotas
        if settings.registry_dsn is not None:
            self.fleet: Fleet | None = Fleet(
                settings.registry_dsn.get_secret_value(),
                settings.fleet_poll_s,
                self.pipeline.use_machine_types,
                self.metrics.registry,
                apply_tenants=self.use_tenants,
            )
            if settings.tenants:
                log.warning(
                    "settings_tenants_ignored",
                    tenants=sorted(settings.tenants),
                    note="with IRONLINK_REGISTRY_DSN the tenants are the registry's (tenant_store_routes)",
                )
        else:
            self.fleet = None
            self.use_tenants(settings.store_routes(tokens))
        self.spool = Spool(settings.spool_dir, settings.spool_max_bytes_per_tenant, settings.spool_max_bytes)
        self.heartbeat = time.monotonic()
        self._inbox: queue.SimpleQueue[Delivery] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._give_up_at: float | None = None
        self._connected = threading.Event()
        self._connection = 0  # which connection a delivery came on: only its own may ack it
        self._drain_topic = drain_topic(settings.client_id)
        self._drain_marker: bytes | None = None
        self._confirmations = threading.Condition()
        self._confirmed: dict[int, bool] = {}
        # Single-writer counters (network thread, main thread): their difference is the backlog.
        self._delivered = 0
        self._settled = 0
        self._batch_limit = min(settings.batch_size, settings.receive_maximum)
        self._receipts_unconfirmed: list[int] = []
        self._holds: dict[str, Hold] = {}
        self._hold_lock = threading.Lock()
        self._spool_failed = False
        self._writers = concurrent.futures.ThreadPoolExecutor(
            settings.store_write_threads, thread_name_prefix="store"
        )
        self._drainer_stop = threading.Event()
        self._drainer = threading.Thread(target=self._drain_spool, name="spool-drainer", daemon=True)
        self._drainer_started = False
        for tenant in self.spool.tenants():  # a previous run's held points: drain them first
            self._hold(tenant, "points spooled by a previous run")
        self.metrics.unacked.set_function(lambda: self.unacked)
        self.metrics.store_ok.set_function(lambda: 0 if self._holds else 1)
        self._gap_registry: psycopg.Connection | None = None  # opened at the first gap record
        self.client = self._client()

    def use_tenants(self, routes: TenantStoreRoutes) -> None:
        """A new tenant directory: its store clients first, so that a point the pipeline accepts
        for a new tenant finds its writer; metric labels for the tenants that appeared."""
        self.store.use_tenants(routes)
        self.pipeline.use_tenants(routes)
        if self.usage is not None:
            self.usage.use_tenants(routes)
        received = self.metrics.received
        self._received = {tenant: self._received.get(tenant) or received.labels(tenant) for tenant in routes}

    # ---------------------------------------------------------------------------- broker side
    def _client(self) -> mqtt.Client:
        client = persistent_client(self.settings)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        log.info("mqtt_fast_paths", **vars(accelerate(client)))
        return client

    @property
    def subscriptions(self) -> list[str]:
        """Telemetry, and dead letters replayed from the registry (same pipeline, same checks)."""
        s = self.settings
        return [s.mqtt_subscription] + ([s.mqtt_replay_subscription] if s.mqtt_replay_subscription else [])

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, code: ReasonCode, _p: Any) -> None:
        if code.is_failure:
            log.error("broker_refused", reason=str(code), host=self.settings.mqtt_host)
            return
        if not self._stop.is_set():
            filters = [*self.subscriptions, self._drain_topic]
            client.subscribe([(topic_filter, 1) for topic_filter in filters])
        self._connected.set()
        self.metrics.connected.set(1)
        log.info("broker_connected", session_present=flags.session_present, client_id=self.settings.client_id)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, code: ReasonCode, _p: Any) -> None:
        # Packet ids belong to a connection: after a reconnect the broker redelivers what we did not
        # acknowledge (session kept) or starts afresh (session lost), and an old id must never
        # acknowledge a new message. Deliveries of an earlier connection are written but not acked.
        self._connection += 1
        self._connected.clear()
        self.metrics.connected.set(0)
        level = log.info if self._stop.is_set() else log.warning
        level("broker_disconnected", reason=str(code), unacked=self.unacked)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: list[ReasonCode], _p: Any) -> None:
        if any(code.is_failure for code in codes):
            log.error("subscribe_refused", topics=self.subscriptions, reasons=[str(c) for c in codes])
        else:
            log.info("subscribed", topics=self.subscriptions)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        self._delivered += 1
        topic = message.topic
        if topic.startswith(_REPLAY_PREFIX):
            topic = original_topic(topic) or topic
        self._inbox.put(
            Delivery(message.mid, message.qos, topic, bytes(message.payload), time.time(), self._connection)
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

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self.metrics.registry

    @property
    def spool_ok(self) -> bool:
        """False after the spool's disk failed (held tenants are then dead-lettered) until it
        takes a write again, and if the drainer thread has died."""
        return not self._spool_failed and (self._drainer.is_alive() or not self._drainer_started)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready: connected, and the spool takes what a held tenant's store cannot. A held tenant
        does not make the worker unready (the others flow on, and a rollout must not stall on one
        customer's outage): it is listed under ``held_tenants``."""
        detail = {
            "broker_connected": self.connected,
            "spool_ok": self.spool_ok,
            "held_tenants": self.held_tenants(),
        }
        # The registry away is not unready (the last good copy serves); no copy yet is.
        fleet_loaded = self.fleet is None or self.fleet.loaded.is_set()
        if self.fleet is not None:
            detail["fleet"] = self.fleet.detail()
        return self.connected and self.spool_ok and fleet_loaded, detail

    def held_tenants(self) -> dict[str, dict[str, Any]]:
        """Readiness detail: each held tenant, since when, why, and what waits in the spool."""
        with self._hold_lock:
            holds = dict(self._holds)
        return {
            tenant: {
                "since": round(hold.since, 3),
                "error": hold.error,
                "attempts": hold.attempts,
                "spooled": self.spool.points(tenant),
            }
            for tenant, hold in holds.items()
        }

    def stop(self) -> None:
        """Ask the worker to finish: flush what it holds, acknowledge it, disconnect; a store or
        broker that stays away longer than ``shutdown_grace_s`` leaves the rest unacknowledged."""
        self._give_up_at = time.monotonic() + self.settings.shutdown_grace_s
        self._stop.set()

    def _giving_up(self) -> bool:
        return self._give_up_at is not None and time.monotonic() >= self._give_up_at

    def run(self) -> None:
        s = self.settings
        health = HealthServer(s.http_host, s.http_port, self).start()
        if self.fleet is not None:  # no delivery before the fleet is known: it would be unknown_machine
            self.fleet.start()
            while not self.fleet.wait_loaded(IDLE_WAIT_S) and not self._stop.is_set():
                self.heartbeat = time.monotonic()
        if self.usage is not None:  # a previous run's journal first, and the month so far
            self.usage.start()
        connect_persistent(self.client, s, s.receive_maximum)
        self.client.loop_start()
        self._drainer.start()
        self._drainer_started = True
        log.info(
            "worker_started",
            broker=f"{s.mqtt_host}:{s.mqtt_port}",
            client_id=s.client_id,
            tenants=self.pipeline.tenant_ids(),
            held=sorted(self._holds),
        )
        handed_over = False
        try:
            batch = Batch()
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                wait = s.flush_interval_ms / 1000 - (self.heartbeat - batch.started) if batch else IDLE_WAIT_S
                try:
                    self._handle(self._inbox.get(timeout=max(wait, 0.0)), batch)
                except queue.Empty:
                    pass
                else:
                    self._take_arrived(batch)
                if batch and (self._full(batch) or self._due(batch)):
                    self._flush(batch)
                    batch = Batch()
            handed_over = self._finish(batch)
        finally:
            self._drainer_stop.set()
            self._drainer.join(timeout=max(0.0, (self._give_up_at or time.monotonic()) - time.monotonic()))
            self._disconnect(end_session=handed_over)
            self.client.loop_stop()
            self._writers.shutdown(wait=False, cancel_futures=True)
            self.store.close()
            self.spool.close()
            self._drop_gap_registry()
            if self.usage is not None:
                self.usage.stop()
            if self.fleet is not None:
                self.fleet.stop()
            health.stop()
            log.info("worker_stopped", unacked=self.unacked, session_ended=handed_over)

    def _take_arrived(self, batch: Batch) -> None:
        """Whatever else has arrived, up to the batch's room: one wake-up serves a burst."""
        while not self._full(batch):
            try:
                self._handle(self._inbox.get_nowait(), batch)
            except queue.Empty:
                return

    def _full(self, batch: Batch) -> bool:
        """``batch_size`` deliveries, or as many documents (a store write stays one batch's size
        however many readings each delivery packs)."""
        return len(batch) >= self._batch_limit or batch.documents >= self.settings.batch_size

    def _due(self, batch: Batch) -> bool:
        return time.monotonic() - batch.started >= self.settings.flush_interval_ms / 1000

    def _finish(self, batch: Batch) -> bool:
        """On SIGTERM: with a shared subscription, unsubscribe and take everything the broker had
        already queued for us, so nothing is left in our session; otherwise keep the session (the
        next start resumes it) and take only what has arrived. Write and acknowledge it all. True
        when the session may end, handing our share of the group to the other replicas.

        "Everything queued" is known, not guessed from a silence: after the UNSUBSCRIBE the worker
        publishes a marker to its own drain topic; a broker delivers a session's queue in order,
        so once the marker arrives nothing queued before it is still on its way."""
        s = self.settings
        drained = False
        if s.shared_subscription and self.connected:
            self.client.unsubscribe(self.subscriptions)
            self._drain_marker = f"{s.client_id} {time.time_ns()}".encode()
            self.client.publish(self._drain_topic, self._drain_marker, qos=1)
            while self._drain_marker is not None and not self._giving_up():
                self.heartbeat = time.monotonic()
                try:
                    self._handle(self._inbox.get(timeout=0.05), batch)
                except queue.Empty:
                    if batch:  # acknowledge: the rest of the queue waits behind our window
                        self._flush(batch)
                        batch = Batch()
                    continue
                if self._full(batch):
                    self._flush(batch)
                    batch = Batch()
            drained = self._drain_marker is None
            if not drained:
                log.warning("drain_incomplete", note="the drain marker did not arrive: session kept")
        else:
            self._take_arrived(batch)
        while batch:
            self._flush(batch)
            batch = Batch()
            self._take_arrived(batch)
        if not drained or self.unacked:
            return False
        self._drainer_stop.set()
        self._drainer.join(timeout=max(0.0, (self._give_up_at or time.monotonic()) - time.monotonic()))
        return not self._drainer.is_alive() and self._hand_over_spool() and self.unacked == 0

    def _disconnect(self, *, end_session: bool) -> None:
        properties = None
        if end_session:
            properties = Properties(PacketTypes.DISCONNECT)
            properties.SessionExpiryInterval = 0
        self.client.disconnect(properties=properties)
        # paho sends what it has queued (the last PUBACKs, the DISCONNECT) on its own thread: let
        # it finish before the loop is stopped, or a restart gets those messages redelivered.
        deadline = time.monotonic() + 2.0
        while self.connected and time.monotonic() < deadline:
            time.sleep(0.01)

    def _handle(self, delivery: Delivery, batch: Batch) -> None:
        if not batch:
            batch.started = time.monotonic()
        batch.deliveries.append(delivery)
        if delivery.topic == self._drain_topic:  # acknowledged with its batch, never processed
            if delivery.payload == self._drain_marker:
                self._drain_marker = None
            return
        outcomes = self.pipeline.process_message(delivery.topic, delivery.payload, delivery.received_at)
        batch.documents += len(outcomes)
        deferred: list[Deferred] = []
        for document, outcome in outcomes:
            # A batch's document stands for itself from here on: spooled, dead-lettered, replayed.
            source = delivery if document is delivery.payload else replace(delivery, payload=document)
            if isinstance(outcome, DeadLetter):
                self.metrics.received.labels(outcome.tenant_label).inc()
                batch.dead_letters.append(self._dead_letter(delivery.topic, outcome))
                continue
            counter = self._received.get(outcome.tenant_id)
            (counter or self.metrics.received.labels(outcome.tenant_id)).inc()
            if isinstance(outcome, Deferred):
                deferred.append(outcome)
                continue
            if isinstance(outcome, GapRecord):
                batch.gaps.append((outcome, source))
                continue
            over_quota = self.usage.admit(outcome.tenant_id) if self.usage is not None else None
            if over_quota is not None:
                batch.dead_letters += self._dead_letter_refused(
                    outcome.tenant_id, {0: over_quota}, [source], Reason.MONTHLY_QUOTA_EXCEEDED
                )
                continue
            batch.points.setdefault(outcome.tenant_id, []).append((outcome, source))
        if deferred:
            self._defer(delivery.topic, deferred)

    def _defer(self, topic: str, deferred: Sequence[Deferred]) -> None:
        """Sequenced readings refused for now: acknowledged with their batch, never receipted, so
        their gateway sends them again; counted, and logged once per message with their range."""
        by_cause: dict[tuple[str, str, str, int], list[Deferred]] = {}
        for reading in deferred:
            gateway, boot, _ = reading.seq
            by_cause.setdefault((reading.tenant_id, reading.reason, gateway, boot), []).append(reading)
        for (tenant, reason, gateway, boot), readings in by_cause.items():
            self.metrics.deferred.labels(tenant, reason).inc(len(readings))
            numbers = [reading.seq[2] for reading in readings]
            log.warning(
                "deferred",
                topic=topic,
                reason=reason,
                readings=len(readings),
                gateway=gateway,
                boot=boot,
                first_n=min(numbers),
                last_n=max(numbers),
                detail=readings[0].detail,
                note="not receipted: the gateway sends these again",
            )

    def _dead_letter(self, topic: str, letter: DeadLetter) -> SentLetter:
        """Publish a dead letter (QoS 1), to be confirmed by the broker before anything is acked."""
        dlq_topic = dead_letter_topic(topic)
        info = self.client.publish(dlq_topic, letter.document, qos=1)
        self.metrics.rejected.labels(letter.tenant_label, letter.reason.value).inc()
        log.info("rejected", topic=topic, reason=letter.reason.value, detail=letter.detail)
        return SentLetter(info.mid, dlq_topic, letter.document)

    def _dead_letter_refused(
        self, tenant: str, refused: Mapping[int, str], sources: Sequence[Source], reason: Reason
    ) -> list[SentLetter]:
        """Messages the pipeline accepted but their store cannot take (``refused``: index into
        ``sources`` -> why), dead-lettered with the reason, to confirm."""
        mids = []
        for index, detail in refused.items():
            source = sources[index]
            rejected = Rejected(reason, detail[:500])
            document = dead_letter_document(
                rejected,
                source.topic,
                source.payload,
                source.received_at,
                self.settings.dead_letter_payload_bytes,
            )
            mids.append(
                self._dead_letter(source.topic, DeadLetter(tenant, reason, rejected.detail, document))
            )
        return mids

    # --------------------------------------------------------------------------------- flush
    def _flush(self, batch: Batch) -> None:
        """Make every point safe (stored, spooled or dead-lettered), confirm the dead letters,
        then acknowledge every delivery of the batch in arrival order."""
        self._store_batch(batch)
        if batch.gaps:
            self._store_gaps(batch)
        if not self._confirm(batch.dead_letters):
            log.warning("batch_abandoned", messages=len(batch), note="left unacknowledged for redelivery")
            return
        current = self._connection
        ack_many(self.client, {d.mid: d.qos for d in batch.deliveries if d.connection == current}.items())
        self._settled += len(batch)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.flush_seconds.observe(time.monotonic() - batch.started)

    def _store_batch(self, batch: Batch) -> None:
        """Write each tenant's points to its store in parallel; a held tenant, or one whose store
        fails or does not answer in time, is diverted to the spool instead of holding the batch."""
        direct: dict[str, list[tuple[Point, Delivery]]] = {}
        for tenant, entries in batch.points.items():
            if tenant not in self.store:  # removed from the registry while its batch filled
                why = f"tenant_id: {tenant!r} is no longer a tenant of this platform"
                refused = dict.fromkeys(range(len(entries)), why)
                sources = [delivery for _, delivery in entries]
                batch.dead_letters += self._dead_letter_refused(
                    tenant, refused, sources, Reason.UNKNOWN_TENANT
                )
            elif tenant in self._holds:
                self._divert(tenant, entries, batch)
            else:
                direct[tenant] = entries
        writes = {
            tenant: self._writers.submit(self.store.write_each, tenant, [point.line for point, _ in entries])
            for tenant, entries in direct.items()
        }
        timeout_s = self.settings.direct_write_timeout_ms / 1000
        concurrent.futures.wait(writes.values(), timeout=timeout_s)
        for tenant, write in writes.items():
            entries = direct[tenant]
            error = write.exception(timeout=0) if write.done() else TimeoutError(f"no answer in {timeout_s}s")
            if error is not None:
                self.metrics.write_errors.labels(tenant).inc()
                self._hold(tenant, store_answer(error))
                self._divert(tenant, entries, batch)
                continue
            self._stored(tenant, entries, write.result(), batch.dead_letters)

    def _store_gaps(self, batch: Batch) -> None:
        """Gap records into the registry, each in its own transaction, then confirmed to their
        gateways; one the registry refuses is dead-lettered ``store_rejected``, and the rest
        ``store_unavailable`` once the registry fails or while there is none to take them."""
        stored: list[GapRecord] = []
        for index, (record, source) in enumerate(batch.gaps):
            try:
                connection = self._registry_for_gaps()
                with connection.transaction():
                    added = upsert_gaps(connection, [record.row])[0]
            except (psycopg.IntegrityError, psycopg.DataError) as error:
                batch.dead_letters += self._dead_letter_refused(
                    record.tenant_id, {0: f"registry: {error}"}, [source], Reason.STORE_REJECTED
                )
                continue
            except (psycopg.Error, _NoRegistry) as error:
                self._drop_gap_registry()
                why = str(error) if isinstance(error, _NoRegistry) else f"registry: {error}"
                for tenant, sources in _by_tenant(batch.gaps[index:]).items():
                    refused = dict.fromkeys(range(len(sources)), why)
                    batch.dead_letters += self._dead_letter_refused(
                        tenant, refused, sources, Reason.STORE_UNAVAILABLE
                    )
                break
            stored.append(record)
            self.metrics.gap_records.labels(record.tenant_id).inc()
            self.metrics.gap_readings.labels(record.tenant_id, record.row.reason).inc(added)
            log.warning("gap_record_stored", added=added, **vars(record.row))
        if stored:
            self._publish_receipts([], stored)

    def _registry_for_gaps(self) -> psycopg.Connection:
        if self._gap_registry is None or self._gap_registry.closed:
            dsn = self.settings.registry_dsn
            if dsn is None:
                raise _NoRegistry("no registry to store gap records in (IRONLINK_REGISTRY_DSN is not set)")
            self._gap_registry = psycopg.connect(  # bounded: the main loop waits for it
                dsn.get_secret_value(),
                connect_timeout=REGISTRY_TIMEOUT_S,
                options=f"-c statement_timeout={REGISTRY_TIMEOUT_S * 1000}",
                autocommit=True,
            )
        return self._gap_registry

    def _drop_gap_registry(self) -> None:
        if self._gap_registry is not None:
            self._gap_registry.close()
            self._gap_registry = None

    def _stored(
        self,
        tenant: str,
        entries: Sequence[tuple[Point | SpooledPoint, Source]],
        refused: Mapping[int, str],
        mids: list[SentLetter],
    ) -> None:
        """A write the store answered: its refused points dead-lettered, the rest counted."""
        mids += self._dead_letter_refused(
            tenant, refused, [source for _, source in entries], Reason.STORE_REJECTED
        )
        if self.usage is not None:  # journalled before the batch is acknowledged
            self.usage.record(tenant, entries, refused)
        now = time.time()
        sequenced: list[tuple[str, tuple[str, int, int]]] = []
        for index, (point, source) in enumerate(entries):
            if index not in refused:
                self.metrics.lag_seconds.observe(now - point.ts)
                if point.seq is not None:
                    sequenced.append((source.topic, point.seq))
        self.metrics.written.labels(tenant).inc(len(entries) - len(refused))
        if sequenced:
            self._publish_receipts(sequenced)

    def _publish_receipts(
        self, stored: list[tuple[str, tuple[str, int, int]]], gaps: Sequence[GapRecord] = ()
    ) -> None:
        """Per machine and gateway, the ranges of ``n`` per boot now in the store, and the gap
        records now in the registry (with the count stored: a gap that grew since is not done), on
        the machine's receipts topic. QoS 1 but not awaited: a receipt lost on the way only makes
        the gateway send those readings again, which rewrites the same points."""
        ranges: dict[tuple[MachineKey, str], dict[int, list[int]]] = {}
        for topic, (gateway, boot, n) in stored:
            key = parse_topic(topic)
            if key is not None:
                ranges.setdefault((key, gateway), {}).setdefault(boot, []).append(n)
        gap_receipts: dict[tuple[MachineKey, str], list[dict[str, Any]]] = {}
        for record in gaps:
            row = record.row
            gap_receipts.setdefault(((row.tenant_id, row.site_id, row.machine_id), row.gateway), []).append(
                {"reason": row.reason, "boot": row.boot, "first_n": row.first_n, "count": row.count}
            )
        mids = []
        for key, gateway in ranges.keys() | gap_receipts.keys():
            boots = ranges.get((key, gateway), {})
            body: dict[str, Any] = {
                "gateway": gateway,
                "stored": [[boot, *run] for boot, ns in sorted(boots.items()) for run in _runs(ns)],
            }
            if (key, gateway) in gap_receipts:
                body["gaps"] = gap_receipts[(key, gateway)]
            mids.append(self.client.publish(receipts_topic(*key), json.dumps(body), qos=1).mid)
        with self._confirmations:
            # Their confirmations are not waited for: forget them as they come, or they pile up.
            pending = self._receipts_unconfirmed + mids
            self._receipts_unconfirmed = [mid for mid in pending if self._confirmed.pop(mid, None) is None]

    def _divert(self, tenant: str, entries: list[tuple[Point, Delivery]], batch: Batch) -> None:
        """A held tenant's points go to the durable spool. Beyond its caps, or should the spool's
        disk fail, they are dead-lettered as ``store_unavailable`` (replayable from the registry):
        a held tenant never holds the batch, whatever happens to it."""
        rows: list[SpoolEntry] = [
            (p.line, p.ts, d.topic, d.payload, d.received_at, *(p.seq or _NO_SEQ)) for p, d in entries
        ]
        hold = self._holds.get(tenant)
        why = f"tenant {tenant!r}: store unavailable ({hold.error if hold else 'held'})"
        with self._hold_lock:
            fitting = self.spool.fitting(tenant, rows)
            if fitting < len(rows):
                why += f" and its spool is full ({self.spool.describe_caps()})"
            try:
                if fitting:
                    self.spool.put(tenant, rows[:fitting])
            except SpoolError as error:
                self.metrics.spool_failures.inc()
                self._spool_failed = True
                log.error("spool_failed", tenant=tenant, error=str(error))
                why += f" and its spool failed ({str(error)[:200]})"
                fitting = 0
            else:
                self._spool_failed = False
                self.metrics.spooled.labels(tenant).set(self.spool.points(tenant))
        if fitting < len(rows):
            refused = dict.fromkeys(range(fitting, len(rows)), why)
            batch.dead_letters += self._dead_letter_refused(
                tenant, refused, [d for _, d in entries], Reason.STORE_UNAVAILABLE
            )

    def _backoff_s(self, attempt: int) -> float:
        s = self.settings
        return min(s.retry_max_ms, s.retry_initial_ms * 2 ** min(attempt, 30)) / 1000

    # --------------------------------------------------------------------------------- holds
    def _hold(self, tenant: str, error: str) -> None:
        with self._hold_lock:
            hold = self._holds.get(tenant)
            if hold is None:
                self._holds[tenant] = Hold(time.time(), error, next_try=time.monotonic() + self._backoff_s(0))
                self.metrics.held.labels(tenant).set(1)
                log.error("tenant_held", tenant=tenant, error=error, note="its points go to the spool")
            else:
                hold.error = error

    def _retry_later(self, tenant: str, error: str) -> None:
        with self._hold_lock:
            hold = self._holds.setdefault(tenant, Hold(time.time(), error))
            hold.error, hold.attempts = error, hold.attempts + 1
            hold.next_try = time.monotonic() + self._backoff_s(hold.attempts)
        log.warning("store_write_failed", tenant=tenant, attempt=hold.attempts, error=error)

    def _release_if_drained(self, tenant: str) -> None:
        with self._hold_lock:
            if self.spool.points(tenant) or tenant not in self._holds:
                return
            hold = self._holds.pop(tenant)
        self.metrics.held.labels(tenant).set(0)
        self.metrics.spooled.labels(tenant).set(0)
        log.info("tenant_released", tenant=tenant, held_s=round(time.time() - hold.since, 1))

    def _drain_spool(self) -> None:
        """The drainer thread: each held tenant's spooled points, oldest first, to its store."""
        while not self._drainer_stop.is_set():
            progressed = False
            with self._hold_lock:
                tenants = set(self._holds)
            for tenant in tenants.union(self.spool.tenants()):
                hold = self._holds.get(tenant)
                if hold is not None and time.monotonic() < hold.next_try:
                    continue
                try:
                    progressed |= self._drain_tenant(tenant)
                except Exception as error:  # the drainer must outlive any one tenant's trouble
                    if isinstance(error, SpoolError):
                        self.metrics.spool_failures.inc()
                    log.exception("spool_drain_failed", tenant=tenant)
                    self._retry_later(tenant, f"{type(error).__name__}: {str(error)[:300]}")
            if not progressed:
                self._drainer_stop.wait(0.1)

    def _drain_tenant(self, tenant: str) -> bool:
        points: list[SpooledPoint] = self.spool.oldest(tenant, self._batch_limit)
        if not points:
            self._release_if_drained(tenant)
            return False
        if tenant not in self.store:  # spooled while the tenant was still known
            why = f"tenant_id: {tenant!r} is no longer a tenant of this platform"
            return self._dead_letter_spooled(tenant, points, why, Reason.UNKNOWN_TENANT)
        try:
            refused = self.store.write_each(tenant, [point.line for point in points])
        except Exception as error:
            self.metrics.write_errors.labels(tenant).inc()
            self._retry_later(tenant, store_answer(error))
            return False
        letters: list[SentLetter] = []
        self._stored(tenant, [(point, point) for point in points], refused, letters)
        if not self._confirm(letters):
            return False
        self.spool.remove(tenant, points)
        self.metrics.spooled.labels(tenant).set(self.spool.points(tenant))
        self._release_if_drained(tenant)
        return True

    def _dead_letter_spooled(self, tenant: str, points: list[SpooledPoint], why: str, reason: Reason) -> bool:
        """Spooled points that can no longer wait for their store, dead-lettered (confirmed) and
        then forgotten by the spool. False if shutdown gave up first: they stay spooled."""
        letters = self._dead_letter_refused(tenant, dict.fromkeys(range(len(points)), why), points, reason)
        if not self._confirm(letters):
            return False
        self.spool.remove(tenant, points)
        self.metrics.spooled.labels(tenant).set(self.spool.points(tenant))
        self._release_if_drained(tenant)
        return True

    def _hand_over_spool(self) -> bool:
        """A replica leaving a shared group may never come back (scale-in, an old colour), and
        what its spool holds was acknowledged already: dead-letter it (``store_unavailable``,
        replayable once the store is back) before the session ends. True once the spool is empty."""
        for tenant in self.spool.tenants():
            hold = self._holds.get(tenant)
            why = (
                f"tenant {tenant!r}: store unavailable ({hold.error if hold else 'held'}) when replica "
                f"{self.settings.client_id!r} stopped; replay once the store is back"
            )
            while points := self.spool.oldest(tenant, self._batch_limit):
                reason = Reason.STORE_UNAVAILABLE if tenant in self.store else Reason.UNKNOWN_TENANT
                if not self._dead_letter_spooled(tenant, points, why, reason):
                    return False
        return not self.spool.tenants()

    def _confirm(self, letters: list[SentLetter]) -> bool:
        """Wait until the broker has confirmed every dead letter (paho resends them after a
        reconnect). One the broker refuses (its ACL) is published again with backoff: its message
        is held, never acknowledged without a trace. False once shutdown must give up."""
        for letter in letters:
            attempt = 0
            while not self._await_confirmation(letter.mid):
                if self._giving_up():
                    return False
                self.metrics.dead_letter_failures.inc()
                log.error(
                    "dead_letter_refused",
                    topic=letter.topic,
                    attempt=attempt,
                    note="held and published again: the broker must let svc.ingest publish to dlq/#",
                )
                if not self._pause(self._backoff_s(attempt)):
                    return False
                attempt += 1
                letter.mid = self.client.publish(letter.topic, letter.document, qos=1).mid
        return True

    def _await_confirmation(self, mid: int) -> bool:
        """The broker's answer to one publish: True accepted, False refused (or shutdown gave up)."""
        with self._confirmations:
            while mid not in self._confirmed:
                self.heartbeat = time.monotonic()
                if self._giving_up():
                    return False
                self._confirmations.wait(0.5)
            return self._confirmed.pop(mid)

    def _pause(self, seconds: float) -> bool:
        """Sleep between retries, staying alive for probes; False once shutdown must give up."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.heartbeat = time.monotonic()
            if self._giving_up():
                return False
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))
        return True


class _NoRegistry(Exception):
    """Gap records arrived at a worker that has no registry to keep them."""


def _by_tenant(entries: Sequence[tuple[GapRecord, Delivery]]) -> dict[str, list[Delivery]]:
    grouped: dict[str, list[Delivery]] = {}
    for record, source in entries:
        grouped.setdefault(record.tenant_id, []).append(source)
    return grouped


def _runs(numbers: list[int]) -> list[tuple[int, int]]:
    """Sorted runs of consecutive numbers as (first, last): [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    runs: list[tuple[int, int]] = []
    for n in sorted(set(numbers)):
        if runs and n == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    return runs
