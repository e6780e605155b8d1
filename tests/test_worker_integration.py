"""The worker against a real Mosquitto and a real VictoriaMetrics: what lands, what is dead-lettered,
and that no accepted message is lost when the store, the broker or the worker itself goes away.

The worker runs as ``python -m ingest`` (a process that can be SIGKILLed); each test has its own
broker (``tests/fixtures/ingest/mosquitto.conf``, persistence on) and its own VictoriaMetrics,
which it stops to simulate an outage. Points are read back through ``/api/v1/export``.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.tenancy import receipts_topic
from localdev import servers
from tests.conftest import MosquittoFactory
from tests.fixtures.ingest import (
    ACME_MILL,
    ACME_PRESS,
    ACME_PRESS_2,
    Mqtt,
    WorkerProcess,
    WorkerStack,
    platform,
    series,
    topic,
    v1,
    v2,
    v3,
    wait_stored,
)

pytestmark = pytest.mark.integration


class Platform(WorkerStack):
    """Broker, store and worker of one test; ``device`` publishes, ``dead_letters`` listens."""

    def __init__(self, folder: Path, start_mosquitto: MosquittoFactory, **worker: Any) -> None:
        super().__init__(
            folder,
            start_mosquitto,
            lambda mqtt_port, store_url: WorkerProcess.for_platform(
                platform(), mqtt_port, store_url, folder, **worker
            ).start(),
        )

    def publish_series(self, machine: tuple[str, str, str], start: int, count: int) -> list[int]:
        """``count`` v2 messages one second apart; their point timestamps in ms."""
        for offset in range(count):
            self.device.publish(topic(machine), v2(machine, start + offset))
        return [(start + offset) * 1000 for offset in range(count)]


@pytest.fixture
def live(
    server_root: Path, start_mosquitto: MosquittoFactory, request: pytest.FixtureRequest
) -> Iterator[Platform]:
    folder = server_root / f"ingest-{request.node.name}-{time.monotonic_ns()}"
    folder.mkdir()
    stack = Platform(folder, start_mosquitto, **getattr(request, "param", {}))
    yield stack
    stack.close()


def test_v1_and_v2_land_as_the_same_canonical_point(live: Platform) -> None:
    ts = int(time.time()) - 60
    live.device.publish(topic(ACME_PRESS), v1(ACME_PRESS, ts, T_OIL=51.5, systemPressure=210.0))
    live.device.publish(topic(ACME_PRESS_2), v2(ACME_PRESS_2, ts, oil_temp_c=51.5, pressure_bar=210.0))
    wait_stored(live.store_url, ACME_PRESS, [ts * 1000])
    wait_stored(live.store_url, ACME_PRESS_2, [ts * 1000])

    from_v1, from_v2 = series(live.store_url, ACME_PRESS), series(live.store_url, ACME_PRESS_2)
    assert from_v1 == from_v2
    assert from_v1["telemetry_oil_temp_c"] == {ts * 1000: 51.5}, "vendor signal T_OIL must land as oil_temp_c"
    assert from_v1["telemetry_pressure_bar"] == {ts * 1000: 210.0}
    assert from_v1["telemetry_status_code"] == {ts * 1000: 1.0}


def test_bad_payloads_reach_the_dead_letter_topic_with_their_reason_and_the_worker_keeps_going(
    live: Platform,
) -> None:
    ts = int(time.time()) - 60
    good = v2(ACME_PRESS, ts).decode()
    bad = {
        "malformed": b"{not json",
        "oversized": b'{"padding": "' + b"x" * 20_000 + b'"}',
        "wrong_type": good.replace(f'"ts": {ts}', '"ts": "yesterday"').encode(),
        "out_of_bounds": v2(ACME_PRESS, ts, oil_temp_c=900.0),
        "topic_mismatch": good.replace('"tenant_id": "acme"', '"tenant_id": "globex"').encode(),
        "unknown_schema_version": good.replace('"schema_version": 2', '"schema_version": 5').encode(),
    }
    for payload in bad.values():
        live.device.publish(topic(ACME_PRESS), payload)
    live.device.publish(topic(ACME_MILL), v2(ACME_MILL, ts, spindle_speed_rpm=12000.0))

    letters = live.dead_letters.collect(len(bad))
    reasons = {letter["reason"]: (dlq_topic, letter) for dlq_topic, letter in letters}
    assert sorted(reasons) == sorted(bad)
    for reason, (dlq_topic, letter) in reasons.items():
        assert dlq_topic == f"dlq/{topic(ACME_PRESS)}", reason
        assert letter["topic"] == topic(ACME_PRESS)
        assert letter["payload_bytes"] == len(bad[reason])
        assert letter["received_at"].startswith(time.strftime("%Y-", time.gmtime()))
    assert reasons["oversized"][1]["truncated"] is True
    assert reasons["malformed"][1]["payload"] == "{not json"
    assert (
        "900" in reasons["out_of_bounds"][1]["detail"]
        and "oil_temp_c" in reasons["out_of_bounds"][1]["detail"]
    )
    assert "'globex'" in reasons["topic_mismatch"][1]["detail"]

    assert wait_stored(live.store_url, ACME_MILL, [ts * 1000]) == {ts * 1000: 1.0}, (
        "the worker must keep going"
    )
    assert live.worker.alive()
    assert (
        live.worker.metric("ironlink_ingest_messages_rejected_total", tenant="acme", reason="out_of_bounds")
        == 1
    )
    assert series(live.store_url, ACME_PRESS) == {}, "nothing of a rejected message may reach the store"


def test_a_30_second_store_outage_loses_nothing(live: Platform) -> None:
    start = int(time.time()) - 600
    before = live.publish_series(ACME_PRESS, start, 5)
    wait_stored(live.store_url, ACME_PRESS, before)

    live.store.stop()
    outage_started = time.monotonic()
    during = []
    for second in range(30):
        during += live.publish_series(ACME_PRESS, start + 100 + 2 * second, 2)
        time.sleep(max(0.0, outage_started + second + 1 - time.monotonic()))
    servers.wait_until(
        lambda: live.worker.metric("ironlink_ingest_spooled_points", tenant="acme") == len(during),
        10,
        "every message of the outage in the spool",
    )
    assert live.worker.metric("ironlink_ingest_unacked_messages") == 0, "spooled, so acknowledged"
    assert live.worker.metric("ironlink_ingest_tenant_held", tenant="acme") == 1
    assert live.worker.metric("ironlink_ingest_store_write_errors_total", tenant="acme") > 0
    readiness = live.worker.readiness()
    assert readiness["held_tenants"]["acme"]["spooled"] == len(during), readiness
    live.store.start()

    points = wait_stored(live.store_url, ACME_PRESS, before + during, timeout=30)
    assert set(before + during) <= points.keys(), f"lost {sorted(set(before + during) - points.keys())}"
    servers.wait_until(
        lambda: live.worker.metric("ironlink_ingest_tenant_held", tenant="acme") == 0, 10, "released"
    )
    assert live.worker.metric("ironlink_ingest_spooled_points", tenant="acme") == 0
    assert live.worker.metric("ironlink_ingest_points_written_total", tenant="acme") >= len(before + during)


def test_a_broker_restart_loses_nothing(live: Platform) -> None:
    """With the store down the worker spools what it received; the worker's session and what the
    broker queued survive a Mosquitto restart (persisted), and so does what comes after."""
    start = int(time.time()) - 600
    live.store.stop()
    before = live.publish_series(ACME_PRESS, start, 15)
    servers.wait_until(
        lambda: live.worker.metric("ironlink_ingest_spooled_points", tenant="acme") == 15, 10, "spooled"
    )
    live.device.close()
    live.dead_letters.close()
    live.broker.stop()
    live.broker.start()
    servers.wait_until(
        lambda: live.worker.metric("ironlink_ingest_broker_connected") == 1, 20, "worker reconnect"
    )
    live.device = Mqtt(live.mqtt_port, "device")
    live.dead_letters = Mqtt(live.mqtt_port, "dead-letter-reader")
    after = live.publish_series(ACME_PRESS, start + 100, 10)
    live.store.start()

    points = wait_stored(live.store_url, ACME_PRESS, before + after)
    assert set(before + after) <= points.keys(), f"lost {sorted(set(before + after) - points.keys())}"


def test_a_worker_killed_with_sigkill_and_restarted_loses_nothing(live: Platform) -> None:
    """What the worker spooled before the kill is on disk and drains after the restart; what it
    had not acknowledged is redelivered to its persistent session, with everything queued meanwhile."""
    start = int(time.time()) - 600
    live.store.stop()
    held = live.publish_series(ACME_PRESS, start, 10)
    servers.wait_until(
        lambda: live.worker.metric("ironlink_ingest_store_write_errors_total") > 0, 10, "write"
    )
    assert live.worker.stop(signal.SIGKILL) == -signal.SIGKILL
    queued = live.publish_series(ACME_PRESS, start + 100, 10)
    live.store.start()
    live.worker.start()

    points = wait_stored(live.store_url, ACME_PRESS, held + queued)
    assert set(held + queued) <= points.keys(), f"lost {sorted(set(held + queued) - points.keys())}"
    servers.wait_until(
        lambda: live.worker.metric("ironlink_ingest_unacked_messages") == 0, 10, "all acknowledged"
    )
    assert live.worker.stop(signal.SIGTERM) == 0, "SIGTERM is a clean exit after flushing"


def test_a_skewed_clock_an_old_reading_and_non_integer_versions_are_dead_lettered_not_lost(
    live: Platform,
) -> None:
    """What the store would drop after answering (VictoriaMetrics: > ~2 days ahead; InfluxDB: outside
    the bucket's retention) and versions Python would take for 1 or 2 (``true``, ``1.0``) end on the
    dead-letter topic with their reason; the readings next to them, a little ahead or six days old
    on the "basic" tier (7 days), are stored. Every message ends in one place or the other."""
    day, now = 86_400, int(time.time())
    press, press_v1 = v2(ACME_PRESS, now - 30).decode(), v1(ACME_PRESS, now - 30, T_OIL=50.0).decode()
    refused = [  # (payload from press-01, reason)
        (v2(ACME_PRESS, now + 3 * day), "ts_in_future"),
        (v2(ACME_PRESS, now - 8 * day), "ts_too_old"),
        (press.replace('"schema_version": 2', '"schema_version": true').encode(), "unknown_schema_version"),
        (press.replace('"schema_version": 2', '"schema_version": 2.0').encode(), "unknown_schema_version"),
        (press_v1.replace('"schema_version": 1', '"schema_version": 1.0').encode(), "unknown_schema_version"),
    ]
    kept = [  # (machine, ts, payload)
        (ACME_PRESS_2, now + 2, v2(ACME_PRESS_2, now + 2)),
        (ACME_MILL, now - 6 * day, v1(ACME_MILL, now - 6 * day, spindle_speed_rpm=12000.0)),
    ]
    for payload, _ in refused:
        live.device.publish(topic(ACME_PRESS), payload)
    for machine, _, payload in kept:
        live.device.publish(topic(machine), payload)

    letters = {
        letter["payload"]: (dlq_topic, letter["reason"])
        for dlq_topic, letter in live.dead_letters.collect(len(refused))
    }
    for payload, reason in refused:
        assert letters.get(payload.decode()) == (f"dlq/{topic(ACME_PRESS)}", reason), payload
    assert series(live.store_url, ACME_PRESS) == {}, "nothing of a dead-lettered message is stored"
    for machine, ts, payload in kept:
        assert payload.decode() not in letters
        assert ts * 1000 in wait_stored(live.store_url, machine, [ts * 1000]), f"{payload!r} is gone"
    reasons = [reason for _, reason in refused]
    for reason in set(reasons):
        assert live.worker.metric(
            "ironlink_ingest_messages_rejected_total", tenant="acme", reason=reason
        ) == reasons.count(reason), reason


def confirmed(gateway: Mqtt, wanted: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """(boot, n) pairs the receipts confirm, collected until ``wanted`` are in (or the wait ends)."""
    got: set[tuple[int, int]] = set()
    deadline = time.monotonic() + 20
    while not wanted <= got and time.monotonic() < deadline:
        for _, receipt in gateway.collect(1, timeout=0.5):
            assert receipt["gateway"] == "gw-7", receipt
            got |= {(boot, n) for boot, first, last in receipt["stored"] for n in range(first, last + 1)}
    return got


def test_receipts_confirm_what_is_stored_not_what_was_acknowledged(live: Platform) -> None:
    """The hook for the edge agent: per gateway and boot, the ranges of ``n`` now in the store, on
    the machine's receipts topic. Points spooled while the store is down are acknowledged to the
    broker at once, but confirmed to the gateway only once they are written."""
    gateway = Mqtt(live.mqtt_port, "gateway-7")
    gateway.subscribe(receipts_topic(*ACME_PRESS))
    start = int(time.time()) - 300
    try:
        for n in range(5):
            live.device.publish(topic(ACME_PRESS), v3(ACME_PRESS, start + n, "gw-7", 1, n))
        assert confirmed(gateway, {(1, n) for n in range(5)}) == {(1, n) for n in range(5)}

        live.store.stop()
        for n in range(5, 10):
            live.device.publish(topic(ACME_PRESS), v3(ACME_PRESS, start + n, "gw-7", 1, n))
        live.device.publish(topic(ACME_PRESS), v3(ACME_PRESS, start + 20, "gw-7", 2, 0))
        servers.wait_until(
            lambda: live.worker.metric("ironlink_ingest_spooled_points", tenant="acme") == 6, 10, "spooled"
        )
        assert gateway.collect(1, timeout=1.0) == [], "acknowledged to the broker is not stored"
        live.store.start()

        wanted = {(1, n) for n in range(5, 10)} | {(2, 0)}
        assert confirmed(gateway, wanted) == wanted
        stored_ms = wait_stored(live.store_url, ACME_PRESS, [(start + n) * 1000 for n in (*range(10), 20)])
        assert len(stored_ms) == 11
    finally:
        gateway.close()


@pytest.mark.parametrize("live", [{"spool_max_bytes_per_tenant": 65_536}], indirect=True)
def test_a_held_tenant_past_its_spool_cap_is_dead_lettered_never_dropped(live: Platform) -> None:
    """Counts prove it: every message of the outage is either spooled (and stored once the store
    is back) or on the dead-letter topic as ``store_unavailable``, replayable from the registry."""
    start = int(time.time()) - 600
    live.store.stop()
    published = live.publish_series(ACME_PRESS, start, 300)
    servers.wait_until(lambda: live.worker.metric("ironlink_ingest_unacked_messages") == 0, 20, "all acked")
    spooled = int(live.worker.metric("ironlink_ingest_spooled_points", tenant="acme"))
    letters = live.dead_letters.collect(300 - spooled)
    assert 0 < spooled < 300, "the cap must bite within this outage"
    assert {letter["reason"] for _, letter in letters} == {"store_unavailable"}
    assert len(letters) == 300 - spooled, "spooled + dead-lettered = every message"
    assert "spool is full" in letters[0][1]["detail"]
    letter_ts = {json.loads(letter["payload"])["ts"] * 1000 for _, letter in letters}
    live.store.start()

    points = wait_stored(live.store_url, ACME_PRESS, set(published) - letter_ts, timeout=30)
    assert set(published) - letter_ts <= points.keys(), "what was spooled is stored"
    assert letter_ts.isdisjoint(points), "and what was dead-lettered was not also written"
