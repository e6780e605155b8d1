"""Usage metering (issue 13 item 4): idempotent usage events, hourly rollups in the registry, and
the monthly quota, against real servers.

The registry functions run against a real PostgreSQL; the end-to-end tests run ``python -m
ingest`` reading its tenants from the registry (the real PostgreSQL), fed by a real Mosquitto,
storing into a real VictoriaMetrics, and read the counts back from ``usage_hourly``.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from infra.config import PlatformConfig, parse_platform
from infra.tenancy import replay_topic, telemetry_topic
from ingest.usage import UsageJournal, read_journal
from localdev import servers
from registry import store, tenant_routes, usage
from registry.migrate import apply_migrations
from registry.tenant_routes import tenant_route_for
from registry.usage import UsageEvent
from tests.conftest import MosquittoFactory
from tests.fixtures.ingest import (
    ACME_PRESS,
    ACME_PRESS_2,
    GLOBEX_MOLDER,
    MACHINE_TYPES,
    RegistryWorkerStack,
    topic,
    v2,
    v3,
    wait_stored,
)

ACTOR = "test@usage"
ACME_FAR_PRESS = ("acme", "plant-2", "press-09")  # a second site of acme: active_sites counts it
HOUR = 3600


def payload(machine: tuple[str, str, str], ts: float) -> bytes:
    """A v2 message of any of the test's machines (the presses' type for acme's second site)."""
    body = json.loads(v2(ACME_PRESS if machine == ACME_FAR_PRESS else machine, ts))
    body.update(tenant_id=machine[0], site_id=machine[1], machine_id=machine[2])
    return json.dumps(body).encode()


def config(acme_quota: dict[str, Any] | None = None) -> PlatformConfig:
    raw: dict[str, Any] = {
        "phase": "A",
        "region": "test",
        "tenants": [
            {"id": "acme", "name": "Acme", "tier": "basic", **({"quota": acme_quota} if acme_quota else {})},
            {"id": "globex", "name": "Globex", "tier": "basic"},
        ],
    }
    return parse_platform(raw, "usage-test")


def usage_of(dsn: str, tenant: str) -> list[usage.UsageHour]:
    with psycopg.connect(dsn) as conn:
        return usage.hourly_usage(
            conn, tenant, datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)
        )


def messages_of(dsn: str, tenant: str) -> int:
    return sum(hour.messages for hour in usage_of(dsn, tenant))


def clear_of_an_hour_boundary(margin_s: float = 60) -> None:
    """Wait out the end of the hour when it is near: a test's usage then falls in one hour."""
    left = HOUR - time.time() % HOUR
    if left < margin_s:
        time.sleep(left + 1)


class MeteredPlatform(RegistryWorkerStack):
    """Broker, store, registry and a worker reading its tenants from the registry, metering usage."""

    def __init__(
        self,
        folder: Path,
        start_mosquitto: MosquittoFactory,
        dsn: str,
        env: pytest.MonkeyPatch,
        platform: PlatformConfig,
        **worker: Any,
    ) -> None:
        # The tenants, their routes (with the monthly quota) and four machines, one on a second site.
        super().__init__(
            folder,
            start_mosquitto,
            dsn,
            env.setenv,
            platform,
            (ACME_PRESS, ACME_PRESS_2, ACME_FAR_PRESS, GLOBEX_MOLDER),
            {**MACHINE_TYPES, ACME_FAR_PRESS: "hydraulic_press"},
            **{"usage_flush_s": 0.2, **worker},  # a test's own flush interval wins
        )

    def publish(self, machine: tuple[str, str, str], timestamps: list[int]) -> list[bytes]:
        """One message per ts; the payloads sent."""
        sent = [payload(machine, ts) for ts in timestamps]
        for body in sent:
            self.device.publish(telemetry_topic(*machine), body)
        return sent


@pytest.fixture
def metered(
    server_root: Path,
    start_mosquitto: MosquittoFactory,
    postgres_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Iterator[MeteredPlatform]:
    folder = server_root / f"usage-{request.node.name}-{time.monotonic_ns()}"
    folder.mkdir()
    params = dict(getattr(request, "param", {}))
    platform = config(params.pop("acme_quota", None))
    stack = MeteredPlatform(folder, start_mosquitto, postgres_dsn, monkeypatch, platform, **params)
    yield stack
    stack.close()


# ------------------------------------------------------------------------------ end to end
@pytest.mark.integration
def test_usage_counts_what_was_published_with_duplicates_and_replays_counted_once(
    metered: MeteredPlatform,
) -> None:
    clear_of_an_hour_boundary()
    start = int(time.time()) - 600
    press = metered.publish(ACME_PRESS, list(range(start, start + 20)))
    press_2 = metered.publish(ACME_PRESS_2, list(range(start, start + 5)))
    far = metered.publish(ACME_FAR_PRESS, list(range(start, start + 3)))
    molder = metered.publish(GLOBEX_MOLDER, list(range(start, start + 4)))
    gateway = [v3(ACME_PRESS, start + 100 + n, "gw-1", 1, n) for n in range(4)]
    for body in gateway:
        metered.device.publish(topic(ACME_PRESS), body)
    unique_acme = press + press_2 + far + gateway
    wait_stored(metered.store_url, ACME_PRESS, [(start + s) * 1000 for s in [*range(20), *range(100, 104)]])
    servers.wait_until(
        lambda: metered.worker.metric("ironlink_ingest_usage_events_total") == len(unique_acme) + len(molder),
        20,
        "every point counted in the registry",
    )

    # Later copies, each counted in the registry already: a device sending five messages again,
    # the dead-letter consumer replaying three, an edge gateway resending four readings whose
    # receipt it missed (v3, same seq, same ts), twice.
    for body in press[:5]:
        metered.device.publish(topic(ACME_PRESS), body)
    for body in press_2[:3]:
        metered.device.publish(replay_topic(topic(ACME_PRESS_2)), body)
    for body in gateway + gateway:
        metered.device.publish(topic(ACME_PRESS), body)
    servers.wait_until(
        lambda: metered.worker.metric("ironlink_ingest_usage_duplicates_total") == 5 + 3 + 8,
        20,
        "every copy seen by the registry",
    )
    assert metered.worker.metric("ironlink_ingest_usage_events_total") == len(unique_acme) + len(molder)
    assert (
        metered.worker.metric("ironlink_ingest_points_written_total", tenant="acme") == len(unique_acme) + 16
    )
    [acme] = usage_of(metered.dsn, "acme")
    assert (acme.messages, acme.points) == (len(unique_acme), len(unique_acme))
    assert acme.bytes == sum(len(body) for body in unique_acme)
    assert (acme.active_machines, acme.active_sites) == (3, 2)
    assert acme.hour == datetime.fromtimestamp(time.time() // HOUR * HOUR, UTC)
    [globex] = usage_of(metered.dsn, "globex")
    assert (globex.messages, globex.points, globex.bytes) == (4, 4, sum(len(body) for body in molder))
    assert (globex.active_machines, globex.active_sites) == (1, 1)


@pytest.mark.integration
@pytest.mark.parametrize("metered", [{"usage_flush_s": 300}], indirect=True)
def test_a_worker_killed_before_its_usage_flush_counts_everything_once_after_restart(
    metered: MeteredPlatform,
) -> None:
    """Counts of acknowledged messages are in the journal before the acknowledgement, so a SIGKILL
    before the registry write loses none; what the broker redelivers or a device resends after
    the restart is the same identity again."""
    start = int(time.time()) - 600
    before = metered.publish(ACME_PRESS, list(range(start, start + 10)))
    wait_stored(metered.store_url, ACME_PRESS, [(start + s) * 1000 for s in range(10)])
    servers.wait_until(lambda: metered.worker.metric("ironlink_ingest_unacked_messages") == 0, 10, "acked")
    assert metered.worker.stop(signal.SIGKILL) == -signal.SIGKILL
    assert messages_of(metered.dsn, "acme") == 0, "the flush was 300 s away: the counts were journalled only"

    queued = metered.publish(ACME_PRESS, list(range(start + 100, start + 105)))
    for body in before:  # resent while the worker was away
        metered.device.publish(topic(ACME_PRESS), body)
    metered.worker.start()
    servers.wait_until(lambda: messages_of(metered.dsn, "acme") == len(before), 10, "the journal written")
    wait_stored(metered.store_url, ACME_PRESS, [(start + s) * 1000 for s in range(100, 105)])
    servers.wait_until(lambda: metered.worker.metric("ironlink_ingest_unacked_messages") == 0, 10, "acked")
    assert metered.worker.stop(signal.SIGTERM) == 0  # its last flush
    assert messages_of(metered.dsn, "acme") == len(before) + len(queued)
    assert sum(hour.points for hour in usage_of(metered.dsn, "acme")) == len(before) + len(queued)


QUOTA = {"max_devices": 50, "messages_per_second": 1000, "messages_per_month": 10}


@pytest.mark.integration
@pytest.mark.parametrize("metered", [{"acme_quota": QUOTA}], indirect=True)
def test_soft_quota_warns_at_80_percent_and_the_hard_quota_dead_letters_with_its_reason(
    metered: MeteredPlatform,
) -> None:
    month = usage.month_start(datetime.now(UTC))
    start = int(time.time()) - 600

    def flags() -> usage.QuotaFlags | None:
        with psycopg.connect(metered.dsn) as conn:
            return usage.quota_flags(conn, "acme", month)

    metered.publish(ACME_PRESS, list(range(start, start + 8)))
    servers.wait_until(lambda: flags() is not None, 10, "the soft flag")
    soft = flags()
    assert soft is not None and soft.soft_reached_at is not None and soft.hard_reached_at is None
    assert soft.messages_limit == 10
    assert (
        metered.worker.metric("ironlink_ingest_usage_quota_reached_total", tenant="acme", level="soft") == 1
    )
    assert metered.worker.metric("ironlink_ingest_usage_quota_used_ratio", tenant="acme") == 0.8
    assert "usage_soft_quota_reached" in metered.worker.log_path.read_text()

    metered.publish(ACME_PRESS, list(range(start + 8, start + 10)))
    servers.wait_until(lambda: (flags() or soft).hard_reached_at is not None, 10, "the hard flag")
    refused = metered.publish(ACME_PRESS, list(range(start + 10, start + 13)))
    letters = metered.dead_letters.collect(3)
    assert [letter["reason"] for _, letter in letters] == ["monthly_quota_exceeded"] * 3
    assert sorted(letter["payload"].encode() for _, letter in letters) == sorted(refused)
    assert "monthly quota of 10" in letters[0][1]["detail"]
    assert (
        metered.worker.metric(
            "ironlink_ingest_messages_rejected_total", tenant="acme", reason="monthly_quota_exceeded"
        )
        == 3
    )
    metered.publish(GLOBEX_MOLDER, [start])  # another tenant is not held by acme's quota
    wait_stored(metered.store_url, GLOBEX_MOLDER, [start * 1000])
    stored = wait_stored(metered.store_url, ACME_PRESS, [(start + s) * 1000 for s in range(10)])
    assert set(stored) == {(start + s) * 1000 for s in range(10)}, "nothing over the quota is stored"
    assert messages_of(metered.dsn, "acme") == 10


# ------------------------------------------------------------------------- registry alone
def event(machine: tuple[str, str, str], ts_ms: int, hour: int, size: int = 100) -> UsageEvent:
    return UsageEvent(*machine, ts_ms, hour, 1, size)


@pytest.fixture
def registry(postgres_dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        apply_migrations(conn)
        yield conn


def test_the_hourly_rollup_counts_each_identity_once_in_the_hour_its_first_copy_arrived(
    registry: psycopg.Connection,
) -> None:
    h0 = 1_767_225_600  # 2026-01-01T00:00Z
    h1 = h0 + HOUR
    first = [event(ACME_PRESS, ms, h0) for ms in (1, 2, 3)] + [event(ACME_FAR_PRESS, 1, h0, 40)]
    assert usage.record_usage(registry, first) == 4
    again = [
        event(ACME_PRESS, 3, h1),
        event(ACME_PRESS, 4, h1),
        event(ACME_PRESS, 4, h1),
        event(ACME_PRESS_2, 9, h1),
    ]
    assert usage.record_usage(registry, again) == 2, "ms 3 was counted in h0; ms 4 twice in one batch is one"
    assert usage.record_usage(registry, first + again) == 0

    rows = usage.hourly_usage(
        registry, "acme", datetime.fromtimestamp(h0, UTC), datetime.fromtimestamp(h1 + 1, UTC)
    )
    got = [
        (r.hour.timestamp(), r.messages, r.bytes, r.points, r.active_machines, r.active_sites) for r in rows
    ]
    assert got == [(h0, 4, 340, 4, 2, 2), (h1, 2, 200, 2, 2, 1)]


def test_a_message_of_several_points_counts_once_with_its_bytes(registry: psycopg.Connection) -> None:
    hour = 1_767_225_600
    batch = [UsageEvent(*ACME_PRESS, 1, hour, 1, 900), UsageEvent(*ACME_PRESS, 2, hour, 0, 0)]
    usage.record_usage(registry, batch)
    [row] = usage.hourly_usage(
        registry, "acme", datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)
    )
    assert (row.messages, row.points, row.bytes) == (1, 2, 900)


def test_replicas_recording_the_same_points_at_once_count_them_once(postgres_dsn: str) -> None:
    """Two connections (two worker replicas given the same redelivered batch) at the same time."""
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        apply_migrations(conn)
    hour = 1_767_225_600
    events = [event(machine, ms, hour) for machine in (ACME_PRESS, ACME_PRESS_2) for ms in range(500)]
    counted: list[int] = []
    barrier = threading.Barrier(2)

    def replica(events: list[UsageEvent]) -> None:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            barrier.wait()
            counted.append(usage.record_usage(conn, events))

    threads = [threading.Thread(target=replica, args=(e,)) for e in (events, list(reversed(events)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(counted) == len(events)
    with psycopg.connect(postgres_dsn) as conn:
        [row] = usage.hourly_usage(
            conn, "acme", datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)
        )
    assert (row.messages, row.active_machines, row.active_sites) == (1000, 2, 1)


def test_pruning_forgets_identities_but_keeps_the_rollup(registry: psycopg.Connection) -> None:
    old = int(time.time()) // HOUR * HOUR - 30 * HOUR
    recent = old + 29 * HOUR
    usage.record_usage(registry, [event(ACME_PRESS, 1, old), event(ACME_PRESS, 2, recent)])
    assert usage.prune_usage(registry, timedelta(hours=24)) == 1
    remembered = registry.execute("SELECT ts_ms FROM usage_points").fetchall()
    assert remembered == [(2,)]
    assert registry.execute("SELECT count(*) FROM usage_active_machines").fetchone() == (1,)
    total = registry.execute("SELECT sum(messages) FROM usage_hourly").fetchone()
    assert total == (2,)
    assert usage.record_usage(registry, [event(ACME_PRESS, 2, recent)]) == 0, "within the horizon: once"


def test_quota_flags_are_set_once_per_month(registry: psycopg.Connection) -> None:
    month = datetime(2026, 12, 1, tzinfo=UTC).date()
    assert usage.quota_levels(7, 10) == []
    assert usage.quota_levels(8, 10) == ["soft"]
    assert usage.quota_levels(12, 10) == ["soft", "hard"]
    assert usage.flag_quota(registry, "acme", month, 10, "soft") is True
    assert usage.flag_quota(registry, "acme", month, 10, "soft") is False, "another replica: already set"
    flags = usage.quota_flags(registry, "acme", month)
    assert flags is not None and flags.soft_reached_at is not None and flags.hard_reached_at is None
    assert usage.flag_quota(registry, "acme", month, 10, "hard") is True
    assert usage.quota_flags(registry, "acme", datetime(2027, 1, 1, tzinfo=UTC).date()) is None


def test_the_monthly_quota_goes_from_the_tier_to_the_route_the_worker_reads(
    registry: psycopg.Connection,
) -> None:
    platform = config({"max_devices": 5, "messages_per_second": 10, "messages_per_month": 1234})
    acme, globex = platform.tenants
    assert (
        platform.monthly_messages_of(globex) == platform.influxdb.retention_tiers["basic"].messages_per_month
    )
    assert platform.monthly_messages_of(acme) == 1234, "a tenant's own quota wins over its tier's"
    store.sync_platform(registry, platform, actor=ACTOR)
    for tenant in platform.tenants:
        route = tenant_route_for(platform, tenant, "http://store:8428", "")
        tenant_routes.upsert_tenant_route(registry, tenant.id, route, actor=ACTOR)
    routes = tenant_routes.tenant_routes(registry)
    assert routes["acme"].messages_per_month == 1234
    assert routes["globex"].messages_per_month == platform.monthly_messages_of(globex)


def test_the_journal_skips_a_line_torn_by_a_kill(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path, max_bytes=1 << 16)
    assert journal.append("acme\tplant-1\tpress-01\t1000\t0\t1\t300\n")
    journal._handle.write("acme\tplant-1\tpress-01\t20")  # a write cut short
    journal._handle.flush()
    reopened = UsageJournal(tmp_path, max_bytes=1 << 16)  # the next start seals what was left
    [sealed] = reopened.seal()
    events, torn = read_journal(sealed)
    assert events == [UsageEvent("acme", "plant-1", "press-01", 1000, 0, 1, 300)] and torn == 1
    assert not UsageJournal(tmp_path / "small", max_bytes=64).append("x" * 65), "past its cap: False"
