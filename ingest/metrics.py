"""The worker's Prometheus metrics, in a registry of its own (``/metrics``).

Per tenant where an operator asks "whose data?": received, written, rejected (by reason),
deferred (by reason) and store write errors. Batch size, write latency and lag (payload ``ts``
to stored, i.e. device to database) are fleet-wide histograms.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Fine enough that bench/ingest.py reads p50/p99 from it.
LAG_BUCKETS = (
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75,
    1, 1.25, 1.5, 2, 3, 5, 10, 30, 60, 300,
)  # fmt: skip


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "ironlink_ingest_messages_received",
            "Messages delivered by the broker (each document of a batch counts as one)",
            ["tenant"],
            registry=r,
        )
        self.written = Counter(
            "ironlink_ingest_points_written",
            "Points written to the store and acknowledged",
            ["tenant"],
            registry=r,
        )
        self.rejected = Counter(
            "ironlink_ingest_messages_rejected",
            "Messages dead-lettered, by reason",
            ["tenant", "reason"],
            registry=r,
        )
        self.deferred = Counter(
            "ironlink_ingest_deferred",
            "Sequenced readings neither stored nor dead-lettered but left unreceipted for their "
            "gateway to send again, by reason (quota: the tenant's messages/s)",
            ["tenant", "reason"],
            registry=r,
        )
        self.gap_records = Counter(
            "ironlink_ingest_gap_records_stored",
            "Gap records (readings a gateway dropped) stored in the registry and confirmed",
            ["tenant"],
            registry=r,
        )
        self.gap_readings = Counter(
            "ironlink_ingest_gap_readings",
            "Readings gateways reported dropped, by their cap; a resent gap adds only its growth",
            ["tenant", "reason"],
            registry=r,
        )
        self.write_errors = Counter(
            "ironlink_ingest_store_write_errors", "Failed store write attempts", ["tenant"], registry=r
        )
        self.dead_letter_failures = Counter(
            "ironlink_ingest_dead_letter_failures", "Dead letters the broker refused", registry=r
        )
        self.batch_size = Histogram(
            "ironlink_ingest_batch_size",
            "Messages per acknowledged batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
            registry=r,
        )
        self.write_seconds = Histogram(
            "ironlink_ingest_store_write_seconds",
            "Duration of one store write attempt",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.flush_seconds = Histogram(
            "ironlink_ingest_batch_flush_seconds",
            "From a batch's first message to its acknowledgement, retries included",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.lag_seconds = Histogram(
            "ironlink_ingest_lag_seconds",
            "Payload ts to point stored (device clock to store)",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.unacked = Gauge(
            "ironlink_ingest_unacked_messages",
            "Messages received and not yet acknowledged to the broker",
            registry=r,
        )
        self.connected = Gauge(
            "ironlink_ingest_broker_connected", "1 while connected to the broker", registry=r
        )
        self.store_ok = Gauge(
            "ironlink_ingest_store_ok", "1 while no tenant's store route is held", registry=r
        )
        self.held = Gauge(
            "ironlink_ingest_tenant_held",
            "1 while a tenant's store fails and its points go to the durable spool",
            ["tenant"],
            registry=r,
        )
        self.spooled = Gauge(
            "ironlink_ingest_spooled_points",
            "Points in the durable spool, waiting for their tenant's store",
            ["tenant"],
            registry=r,
        )
        self.spool_failures = Counter(
            "ironlink_ingest_spool_failures",
            "Spool disk errors: the batch is then held unacknowledged until the store takes it",
            registry=r,
        )
