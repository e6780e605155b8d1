"""The worker as a cluster runs it, against a real Mosquitto and real VictoriaMetrics instances:
bulkheads (one tenant's own store down for a minute stalls no other tenant and loses nothing),
rollouts (replicas of a shared subscription replaced one after the other while machines publish
lose nothing), and dead letters replayed through the normal path."""

from __future__ import annotations

import signal
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from infra.tenancy import replay_topic
from localdev import servers
from tests.conftest import MosquittoFactory
from tests.fixtures.ingest import (
    ACME_MILL,
    ACME_PRESS,
    ACME_PRESS_2,
    GLOBEX_MOLDER,
    Mqtt,
    WorkerProcess,
    broker_config,
    platform,
    start_store,
    stored,
    topic,
    v2,
    wait_stored,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MACHINES = (ACME_PRESS, ACME_PRESS_2, ACME_MILL, GLOBEX_MOLDER)


class RatePublisher:
    """Publishes v2 messages round-robin over ``machines`` at ``rate`` per second from one thread,
    QoS 1 without waiting for each PUBACK. After :meth:`stop`, ``acknowledged`` holds, per machine,
    the point timestamps (ms) the broker confirmed and when each was published."""

    def __init__(self, port: int, machines: tuple[tuple[str, str, str], ...], rate: float) -> None:
        self.machines, self.rate = machines, rate
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="rate-publisher", protocol=mqtt.MQTTv5
        )
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_publish = lambda _c, _u, mid, _code, _p: self._confirmed.append(mid)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self._sent: dict[int, tuple[tuple[str, str, str], int, float]] = {}
        self._confirmed: list[int] = []
        self.acknowledged: dict[tuple[str, str, str], dict[int, float]] = {m: {} for m in machines}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start, sent = time.time(), 0
        first_ms = int(start * 1000)
        while not self._stop.is_set() and sent < 60_000:  # message ids must not wrap (65,535)
            due = int((time.time() - start) * self.rate)
            while sent < due:
                machine = self.machines[sent % len(self.machines)]
                ts_ms = first_ms + sent // len(self.machines)  # one point per message and machine
                info = self.client.publish(topic(machine), v2(machine, ts_ms / 1000), qos=1)
                self._sent[info.mid] = (machine, ts_ms, time.time())
                sent += 1
            time.sleep(0.002)

    def start(self) -> RatePublisher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        servers.wait_until(lambda: len(self._confirmed) >= len(self._sent), 20, "every publish confirmed")
        self.client.disconnect()
        self.client.loop_stop()
        for mid in self._confirmed:
            machine, ts_ms, sent_at = self._sent[mid]
            self.acknowledged[machine][ts_ms] = sent_at


@pytest.fixture
def folder(server_root: Path, request: pytest.FixtureRequest) -> Path:
    path = server_root / f"cluster-{request.node.name}-{time.monotonic_ns()}"
    path.mkdir()
    return path


@pytest.fixture
def broker(folder: Path, start_mosquitto: MosquittoFactory) -> tuple[servers.Server, int]:
    return start_mosquitto(broker_config(folder / "mosquitto"))


@pytest.fixture
def stores(folder: Path) -> Iterator[dict[str, tuple[servers.Server, str]]]:
    """Two store instances: the shared one, and globex's own (as at isolation level 3)."""
    started = {name: start_store(folder / name) for name in ("influxdb", "globex")}
    yield started
    for server, _ in started.values():
        server.stop()


def test_a_tenants_own_store_down_for_a_minute_stalls_no_other_tenant_and_loses_nothing(
    folder: Path, broker: tuple[servers.Server, int], stores: dict[str, tuple[servers.Server, str]]
) -> None:
    _, port = broker
    worker = WorkerProcess.for_platform(
        platform(), port, stores["influxdb"][1], folder, store_urls={n: url for n, (_, url) in stores.items()}
    )
    routes = dict(worker.settings.tenants)
    routes["globex"] = routes["globex"].model_copy(update={"instance": "globex"})
    worker.settings = worker.settings.model_copy(update={"tenants": routes})
    worker.start()
    acme = (ACME_PRESS, ACME_MILL)
    publisher = RatePublisher(port, (*acme, GLOBEX_MOLDER), rate=30).start()
    try:
        time.sleep(2)
        globex_store, globex_url = stores["globex"]
        globex_store.stop()
        outage_started = time.time()
        seen: dict[tuple[tuple[str, str, str], int], float] = {}
        while time.time() - outage_started < 60:
            now = time.time()
            for machine in acme:
                for ts_ms in stored(stores["influxdb"][1], machine):
                    seen.setdefault((machine, ts_ms), now)
            time.sleep(0.25)
        assert worker.metric("ironlink_ingest_tenant_held", tenant="globex") == 1
        assert worker.metric("ironlink_ingest_tenant_held", tenant="acme") == 0
        assert worker.metric("ironlink_ingest_unacked_messages") < 50, "globex's points are spooled, not held"
        globex_store.start()
    finally:
        publisher.stop()

    during = [
        seen[(machine, ts_ms)] - sent
        for machine in acme
        for ts_ms, sent in publisher.acknowledged[machine].items()
        if outage_started + 1 <= sent <= outage_started + 58 and (machine, ts_ms) in seen
    ]
    published_during = sum(
        outage_started + 1 <= sent <= outage_started + 58
        for m in acme
        for sent in publisher.acknowledged[m].values()
    )
    assert published_during > 1000 and len(during) == published_during, (
        "acme's points landed during the outage"
    )
    p99 = statistics.quantiles(during, n=100)[98]
    print(
        f"acme publish->stored during globex's outage: p50 {statistics.median(during):.2f} s, p99 {p99:.2f} s"
    )
    assert p99 < 2.0, f"acme waited for globex: p99 {p99:.2f} s"

    for machine in (*acme, GLOBEX_MOLDER):
        url = globex_url if machine is GLOBEX_MOLDER else stores["influxdb"][1]
        wanted = publisher.acknowledged[machine].keys()
        points = wait_stored(url, machine, wanted, timeout=60)
        assert wanted <= points.keys(), f"{machine}: lost {len(wanted - points.keys())} of {len(wanted)}"
    servers.wait_until(
        lambda: worker.metric("ironlink_ingest_tenant_held", tenant="globex") == 0, 20, "globex released"
    )
    assert worker.stop() == 0


def test_replicas_replaced_one_after_the_other_then_scaled_in_at_1000_messages_a_second_lose_nothing(
    folder: Path, broker: tuple[servers.Server, int], stores: dict[str, tuple[servers.Server, str]]
) -> None:
    _, port = broker
    url = stores["influxdb"][1]
    shared = {"mqtt_subscription": "$share/ingest/ironlink/+/+/+/telemetry"}
    replicas = [
        WorkerProcess.for_platform(
            platform(),
            port,
            url,
            folder / f"ingest-{ordinal}",
            mqtt_client_id=f"svc.ingest-ingest-{ordinal}",
            **shared,
        )
        for ordinal in (0, 1)
    ]
    for replica in replicas:
        replica.log_path.parent.mkdir()
        replica.start()
    publisher = RatePublisher(port, MACHINES, rate=1000).start()
    try:
        time.sleep(3)
        for replica in replicas:  # a rolling update: one pod at a time, same identity back
            assert replica.stop(signal.SIGTERM) == 0, "a graceful stop drains and exits 0"
            assert "session_ended=True" in replica.log_path.read_text() or '"session_ended": true' in (
                replica.log_path.read_text()
            ), "the session is ended so the broker hands the share over"
            replica.start()
            time.sleep(3)
        assert replicas[1].stop(signal.SIGTERM) == 0  # then a scale-in: ingest-1 does not come back
        time.sleep(3)
    finally:
        publisher.stop()

    total = 0
    for machine in MACHINES:
        wanted = publisher.acknowledged[machine].keys()
        points = wait_stored(url, machine, wanted, timeout=60)
        assert wanted <= points.keys(), f"{machine}: lost {len(wanted - points.keys())} of {len(wanted)}"
        total += len(wanted)
    assert total > 9000, f"only {total} messages published"
    assert replicas[0].stop() == 0


def test_a_replayed_dead_letter_goes_through_the_pipeline_again(
    folder: Path, broker: tuple[servers.Server, int], stores: dict[str, tuple[servers.Server, str]]
) -> None:
    """The dead-letter consumer republishes a stored dead letter on ``replay/<topic>``; the worker
    takes it as if it came from its original topic: stored when good now, dead-lettered again if not."""
    _, port = broker
    url = stores["influxdb"][1]
    worker = WorkerProcess.for_platform(platform(), port, url, folder).start()
    replayer = Mqtt(port, "replayer")
    letters = Mqtt(port, "dlq-reader")
    letters.subscribe("dlq/#")
    ts = int(time.time()) - 30
    replayer.publish(replay_topic(topic(ACME_PRESS)), v2(ACME_PRESS, ts))
    replayer.publish(replay_topic(topic(ACME_PRESS)), v2(ACME_PRESS, ts + 1, oil_temp_c=900.0))
    try:
        assert wait_stored(url, ACME_PRESS, [ts * 1000]) == {ts * 1000: 1.0}
        ((dlq_topic, letter),) = letters.collect(1)
        assert dlq_topic == f"dlq/{topic(ACME_PRESS)}" and letter["reason"] == "out_of_bounds"
        assert letter["topic"] == topic(ACME_PRESS), "a replay is dead-lettered under its original topic"
    finally:
        replayer.close()
        letters.close()
        worker.stop()


def test_a_replica_leaving_the_group_hands_over_what_it_spooled_as_dead_letters(
    folder: Path, broker: tuple[servers.Server, int], stores: dict[str, tuple[servers.Server, str]]
) -> None:
    """Scale-in: the replica may never come back, and what its spool holds was acknowledged. So
    before it ends its session it dead-letters those points (``store_unavailable``, replayable)."""
    _, port = broker
    worker = WorkerProcess.for_platform(
        platform(),
        port,
        stores["influxdb"][1],
        folder,
        mqtt_client_id="svc.ingest-ingest-1",
        mqtt_subscription="$share/ingest/ironlink/+/+/+/telemetry",
    ).start()
    letters = Mqtt(port, "dlq-reader")
    letters.subscribe("dlq/#")
    device = Mqtt(port, "device")
    start = int(time.time()) - 300
    try:
        stores["influxdb"][0].stop()
        for offset in range(20):
            device.publish(topic(GLOBEX_MOLDER), v2(GLOBEX_MOLDER, start + offset))
        servers.wait_until(
            lambda: worker.metric("ironlink_ingest_spooled_points", tenant="globex") == 20, 10, "spooled"
        )
        assert worker.stop(signal.SIGTERM) == 0
        handed = letters.collect(20)
        assert len(handed) == 20 and {letter["reason"] for _, letter in handed} == {"store_unavailable"}
        assert all("replay once the store is back" in letter["detail"] for _, letter in handed)
        assert '"session_ended": true' in worker.log_path.read_text()
    finally:
        letters.close()
        device.close()
