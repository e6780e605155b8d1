"""The per-second quota against an edge backfill, through the real worker (``python -m ingest``),
Mosquitto, VictoriaMetrics and PostgreSQL, the worker logged in as its own registry role
(``registry.roles``): sequenced readings over the quota are neither stored nor dead-lettered but
left unreceipted and counted deferred, so a gateway resending what stays unconfirmed gets it all
stored; unsequenced ones over the quota are dead-lettered ``quota_exceeded`` as before."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from infra.tenancy import receipts_topic
from ingest.contract import pack
from registry.roles import INGEST_ROLE
from registry.usage import hourly_usage
from tests.conftest import MosquittoFactory
from tests.fixtures.ingest import (
    ACME_PRESS,
    Mqtt,
    WorkerProcess,
    WorkerStack,
    platform,
    seed_registry,
    stored,
    topic,
    v2,
    wait_stored,
)
from tests.test_registry_roles import ingest_role  # noqa: F401 (a fixture)
from tests.test_worker_v4 import GATEWAY, WAIT, v4

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("postgres-cluster-roles")]
RATE = 20  # messages/s of the tenant; the bucket holds one second of it
BACKFILL = 40


class QuotaPlatform(WorkerStack):
    """Broker, store, registry, and a worker reading acme's press-01 from the registry as role
    ``ingest``, acme's quota RATE messages/s with a one-second bucket."""

    def __init__(
        self, folder: Path, start_mosquitto: MosquittoFactory, dsn: str, env: pytest.MonkeyPatch
    ) -> None:
        self.dsn = dsn

        def start_worker(mqtt_port: int, store_url: str) -> WorkerProcess:
            config = platform(broker={"tenant_quota": {"max_devices": 50, "messages_per_second": RATE}})
            seed_registry(dsn, config, store_url, [ACME_PRESS])
            env.setenv("IRONLINK_REGISTRY_DSN", dsn.replace("user=postgres", f"user={INGEST_ROLE}"))
            return WorkerProcess.for_platform(
                config,
                mqtt_port,
                store_url,
                folder,
                machines=None,
                from_registry=True,
                quota_burst_s=1,
                usage_flush_s=0.2,
            ).start()

        super().__init__(folder, start_mosquitto, start_worker)
        self.gateway = Mqtt(self.mqtt_port, "gateway-receipts")
        self.gateway.subscribe(receipts_topic(*ACME_PRESS))

    def settled(self, sent: int) -> tuple[float, float, float]:
        """(written, deferred, dead-lettered) once the worker has taken all ``sent`` documents."""
        deadline = time.monotonic() + WAIT
        while True:
            counts = tuple(
                self.worker.metric(name, tenant="acme")
                for name in (
                    "ironlink_ingest_points_written_total",
                    "ironlink_ingest_deferred_total",
                    "ironlink_ingest_messages_rejected_total",
                )
            )
            if sum(counts) >= sent or time.monotonic() > deadline:
                return counts[0], counts[1], counts[2]
            time.sleep(0.1)

    def receipted(self, count: int) -> set[int]:
        """The ``n`` of boot 1 the next receipts confirm, until ``count`` distinct ones are in."""
        ns: set[int] = set()
        deadline = time.monotonic() + WAIT
        while len(ns) < count and time.monotonic() < deadline:
            for _, receipt in self.gateway.collect(1, timeout=0.2):
                assert receipt["gateway"] == GATEWAY, receipt
                ns |= {
                    n for boot, first, last in receipt["stored"] if boot == 1 for n in range(first, last + 1)
                }
        return ns

    def close(self) -> None:
        self.gateway.close()
        super().close()


@pytest.fixture
def quota_platform(
    server_root: Path,
    start_mosquitto: MosquittoFactory,
    postgres_dsn: str,
    ingest_role: None,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[QuotaPlatform]:
    folder = server_root / f"quota-{time.monotonic_ns()}"
    folder.mkdir()
    stack = QuotaPlatform(folder, start_mosquitto, postgres_dsn, monkeypatch)
    yield stack
    stack.close()


def backfill(start: int, ns: list[int]) -> bytes:
    """One v4 batch of history readings ``n`` (ts ``start + n``), as a gateway backfills."""
    return pack([v4(ACME_PRESS, start + n, n, historical=True) for n in ns])


def test_a_sequenced_backfill_over_the_quota_is_deferred_then_stored_whole_never_dead_lettered(
    quota_platform: QuotaPlatform,
) -> None:
    live, start, everything = quota_platform, int(time.time()) - 600, set(range(BACKFILL))
    live.device.publish(topic(ACME_PRESS), backfill(start, sorted(everything)))

    written, deferred, rejected = live.settled(BACKFILL)
    assert (written + deferred, rejected) == (BACKFILL, 0), (
        "each reading stored or deferred, none dead-lettered"
    )
    assert written >= RATE and deferred >= 1, "the full bucket's worth stored, the rest deferred"
    receipted = live.receipted(int(written))
    wait_stored(live.store_url, ACME_PRESS, [(start + n) * 1000 for n in receipted])
    in_store = {ts_ms // 1000 - start for ts_ms in stored(live.store_url, ACME_PRESS)}
    assert receipted == in_store and len(in_store) == written, "receipts for exactly what was stored"
    log_text = live.worker.log_path.read_text()
    assert "deferred" in log_text and "not receipted" in log_text, "never silent"

    # The gateway sends what stays unconfirmed again, as it does: it all ends up stored.
    sent, deadline = BACKFILL, time.monotonic() + 4 * WAIT
    while receipted != everything and time.monotonic() < deadline:
        unconfirmed = sorted(everything - receipted)
        live.device.publish(topic(ACME_PRESS), backfill(start, unconfirmed))
        sent += len(unconfirmed)
        before = written
        written, _, _ = live.settled(sent)
        receipted |= live.receipted(int(written - before))
    assert receipted == everything
    points = wait_stored(live.store_url, ACME_PRESS, [(start + n) * 1000 for n in everything])
    assert {ts_ms // 1000 - start for ts_ms in points} == everything
    written, deferred, rejected = live.settled(sent)
    assert (written + deferred, rejected) == (sent, 0), "every copy sent: stored or deferred"
    assert live.dead_letters.collect(1, timeout=1) == []

    # Usage, written by the worker's own role, counts each stored reading once.
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)

    def points_counted() -> int:
        with psycopg.connect(live.dsn) as conn:
            return sum(
                h.points
                for h in hourly_usage(conn, "acme", hour - timedelta(hours=1), hour + timedelta(hours=1))
            )

    deadline = time.monotonic() + WAIT
    while points_counted() < BACKFILL and time.monotonic() < deadline:
        time.sleep(0.2)
    assert points_counted() == BACKFILL


def test_an_unsequenced_burst_over_the_quota_is_dead_lettered_as_before(
    quota_platform: QuotaPlatform,
) -> None:
    live, start = quota_platform, int(time.time()) - 300
    live.device.publish(topic(ACME_PRESS), pack([v2(ACME_PRESS, start + n) for n in range(BACKFILL)]))

    written, deferred, rejected = live.settled(BACKFILL)
    assert (written + rejected, deferred) == (BACKFILL, 0), "stored or dead-lettered, nothing deferred"
    assert written >= RATE and rejected >= 1
    letters = live.dead_letters.collect(int(rejected))
    assert len(letters) == rejected
    assert {letter["reason"] for _, letter in letters} == {"quota_exceeded"}
    quota_exceeded = live.worker.metric("ironlink_ingest_messages_rejected_total", reason="quota_exceeded")
    assert quota_exceeded == rejected
    dead = {int(json.loads(letter["payload"])["ts"]) - start for _, letter in letters}
    kept = [(start + n) * 1000 for n in range(BACKFILL) if n not in dead]
    points = wait_stored(live.store_url, ACME_PRESS, kept)
    assert set(points) == set(kept) and len(dead) == rejected, "each reading stored or dead-lettered once"
