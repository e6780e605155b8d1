"""Dead letters land in the registry per tenant, can be listed and replayed: a real Mosquitto
running the rendered ACL, a real PostgreSQL, the real consumer (``ingest.deadletters``) in a thread.

Dead letters are published the way the worker publishes them: as ``svc.ingest``, with the
document :func:`ingest.pipeline.dead_letter_document` builds. Replays are received by a client
holding ``svc.ingest``'s rights, on the filter the worker subscribes to.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from typer.testing import CliRunner

from infra.cli import app
from infra.tenancy import REPLAY_FILTER, dead_letter_topic, replay_topic, store_routes
from ingest.contract import Reason, Rejected
from ingest.deadletters.consumer import DeadLetterConsumer
from ingest.deadletters.document import read_dead_letter
from ingest.deadletters.settings import DeadLetterSettings, dead_letter_settings_for
from ingest.pipeline import dead_letter_document
from registry import store, tenant_routes
from registry.tenant_routes import tenant_route_for
from tests import test_broker_isolation as isolation
from tests.conftest import PostgresCluster
from tests.fixtures.ingest import ACME_PRESS_2, WorkerProcess, series, start_store, v1, wait_stored
from tests.test_broker_isolation import (
    A_NEIGHBOUR,
    A_NEIGHBOUR_TOPIC,
    A_TOPIC,
    B_TOPIC,
    Broker,
    Probe,
    connected,
)

# The attack suite's broker (rendered files, real Mosquitto) and its MQTT 5 probes.
launch = isolation.launch
clients = isolation.clients

pytestmark = pytest.mark.integration

WAIT_S = 10.0
runner = CliRunner()


def document(
    topic: str, payload: bytes, reason: Reason = Reason.OUT_OF_BOUNDS, at: float | None = None
) -> bytes:
    rejected = Rejected(reason, f"metrics.oil_temp_c: 900 is above 150 ({topic})")
    return dead_letter_document(rejected, topic, payload, time.time() if at is None else at, 4096)


def eventually(check: Callable[[], object], what: str) -> object:
    """Poll ``check`` until it returns something truthy (bounded wait, no timing asserted)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {WAIT_S:.0f}s")


@pytest.fixture
def registry(postgres_dsn: str, launch: Callable[..., Broker]) -> Iterator[tuple[psycopg.Connection, Broker]]:
    broker = launch()
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        store.sync_platform(conn, broker.fixture.config, actor="test")
        yield conn, broker


@pytest.fixture
def consumer(
    registry: tuple[psycopg.Connection, Broker], postgres_dsn: str
) -> Iterator[Callable[..., DeadLetterConsumer]]:
    """Start the real consumer against the test broker and registry (``start(**overrides)``)."""
    _, broker = registry
    running: list[tuple[DeadLetterConsumer, threading.Thread]] = []

    def start(**overrides: object) -> DeadLetterConsumer:
        settings = dead_letter_settings_for(
            broker.fixture.config,
            mqtt_host="127.0.0.1",
            mqtt_port=broker.port,
            mqtt_ca_file=broker.folder / "ca.pem",
            mqtt_password=broker.password("svc.deadletters"),
            registry_dsn=postgres_dsn,
            http_host="127.0.0.1",
            http_port=0,
            replay_poll_s=0.2,
            **overrides,
        )
        service = DeadLetterConsumer(settings)
        thread = threading.Thread(target=service.run, daemon=True)
        thread.start()
        eventually(lambda: service.connected and service.registry_ok, "the consumer connecting")
        running.append((service, thread))
        return service

    yield start
    for service, thread in running:
        service.stop()
        thread.join(timeout=WAIT_S)


def unacked(service: DeadLetterConsumer) -> float | None:
    return service.metrics.registry.get_sample_value("ironlink_deadletters_unacked")


def stored(conn: psycopg.Connection, count: int, **filters: object) -> list[store.DeadLetter]:
    return eventually(  # type: ignore[return-value]
        lambda: (found := store.list_dead_letters(conn, **filters)) and len(found) >= count and found,  # type: ignore[arg-type]
        f"{count} dead letters stored",
    )


def test_consumer_stores_each_dead_letter_with_its_tenant_reason_topic_time_and_sample(
    registry: tuple[psycopg.Connection, Broker],
    consumer: Callable[..., DeadLetterConsumer],
    clients: Callable[..., Probe],
) -> None:
    conn, broker = registry
    service = consumer()
    ingest = connected(clients, broker, "svc.ingest")
    received = datetime(2026, 11, 3, 8, 30, 15, 250_000, tzinfo=UTC)
    unknown_topic = "ironlink/initech/hq/robot-01/telemetry"
    letters = {
        A_TOPIC: document(A_TOPIC, b'{"schema_version": 2, "oil": 900}', at=received.timestamp()),
        B_TOPIC: document(B_TOPIC, b"\xff\xfe not utf-8", Reason.MALFORMED),
        unknown_topic: document(unknown_topic, b"{}", Reason.UNKNOWN_TENANT),
    }
    for topic, body in letters.items():
        assert not ingest.publish(dead_letter_topic(topic), body).is_failure
    assert not ingest.publish(dead_letter_topic(A_TOPIC), b"not a document").is_failure

    acme = stored(conn, 2, tenant_id="acme")
    malformed = next(letter for letter in acme if letter.reason == store.MALFORMED_DEAD_LETTER)
    assert (malformed.topic, malformed.payload_bytes) == (A_TOPIC, len(b"not a document"))
    assert "Invalid JSON" in malformed.detail
    press = next(letter for letter in acme if letter.reason == "out_of_bounds")
    assert (press.topic, press.received_at, press.payload_bytes, press.truncated) == (
        A_TOPIC,
        received,
        33,
        False,
    )
    assert press.detail.startswith("metrics.oil_temp_c: 900 is above 150")
    full = store.get_dead_letter(conn, press.id)
    assert full is not None and full.payload == b'{"schema_version": 2, "oil": 900}'

    (globex,) = stored(conn, 1, tenant_id="globex")
    assert globex.reason == "malformed"
    globex_full = store.get_dead_letter(conn, globex.id)
    assert globex_full is not None and globex_full.payload == b"\xff\xfe not utf-8"
    # A topic naming a tenant the registry does not have is stored, with no tenant.
    everything = stored(conn, 4)
    assert [(letter.tenant_id, letter.reason) for letter in everything if letter.topic == unknown_topic] == [
        (None, "unknown_tenant")
    ]
    assert store.count_dead_letters(conn) == {"acme": 2, "globex": 1, None: 1}
    assert service.metrics.stored.labels("acme", "out_of_bounds")._value.get() == 1


def test_redelivered_dead_letters_are_stored_once(
    registry: tuple[psycopg.Connection, Broker],
    consumer: Callable[..., DeadLetterConsumer],
    clients: Callable[..., Probe],
) -> None:
    conn, broker = registry
    service = consumer()
    ingest = connected(clients, broker, "svc.ingest")
    body, malformed = document(A_TOPIC, b"{}"), b"\x00 not json"
    for _ in range(3):  # what a redelivery after a lost PUBACK looks like to the consumer
        assert not ingest.publish(dead_letter_topic(A_TOPIC), body).is_failure
        assert not ingest.publish(dead_letter_topic(A_TOPIC), malformed).is_failure
    sentinel = document(A_TOPIC, b"sentinel")
    assert not ingest.publish(dead_letter_topic(A_TOPIC), sentinel).is_failure
    eventually(lambda: service.metrics.duplicates._value.get() == 4, "four duplicates seen")
    letters = stored(conn, 3, tenant_id="acme")
    assert sorted(letter.reason for letter in letters) == [
        "malformed_dead_letter",
        "out_of_bounds",
        "out_of_bounds",
    ]


def test_a_dead_letter_stays_unacknowledged_while_the_registry_is_down_and_lands_after(
    registry: tuple[psycopg.Connection, Broker],
    consumer: Callable[..., DeadLetterConsumer],
    clients: Callable[..., Probe],
    postgres_cluster: PostgresCluster,
) -> None:
    """The registry refuses every new session and the consumer's is killed: nothing is
    acknowledged until it is back, then the same message is stored (the broker kept it)."""
    conn, broker = registry
    service = consumer(retry_initial_ms=50, retry_max_ms=200)
    database = sql.Identifier(conn.info.dbname)
    with psycopg.connect(postgres_cluster.dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(database))
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> %s",
            (conn.info.dbname, conn.info.backend_pid),
        )
        ingest = connected(clients, broker, "svc.ingest")
        try:
            assert not ingest.publish(dead_letter_topic(A_TOPIC), document(A_TOPIC, b"late")).is_failure
            eventually(lambda: service.metrics.failures.labels("store")._value.get() >= 2, "failed stores")
            assert unacked(service) == 1
            assert not service.registry_ok
        finally:
            admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(database))
    (letter,) = stored(conn, 1, tenant_id="acme")
    assert letter.payload_bytes == 4
    eventually(lambda: unacked(service) == 0, "the dead letter acknowledged")


def test_replay_request_republishes_the_original_payload_on_the_replay_topic(
    registry: tuple[psycopg.Connection, Broker],
    consumer: Callable[..., DeadLetterConsumer],
    clients: Callable[..., Probe],
    postgres_dsn: str,
) -> None:
    conn, broker = registry
    service = consumer()
    # The worker's identity both dead-letters and takes replays (Mosquitto: one session per identity).
    worker = ingest = connected(clients, broker, "svc.ingest")
    worker.subscribe(REPLAY_FILTER)
    original = b'{"schema_version": 2, "tenant_id": "acme"}'
    assert not ingest.publish(dead_letter_topic(A_TOPIC), document(A_TOPIC, original)).is_failure
    assert not ingest.publish(dead_letter_topic(B_TOPIC), document(B_TOPIC, b"globex")).is_failure
    stored(conn, 2)

    result = runner.invoke(
        app, ["deadletters", "replay", "--registry", postgres_dsn, "--tenant", "acme", "--json"]
    )
    assert result.exit_code == 0, result.output
    (requested,) = json.loads(result.output)["requested"]
    assert worker.expect(replay_topic(A_TOPIC), original)[-1] == (replay_topic(A_TOPIC), original)
    eventually(lambda: (row := store.get_dead_letter(conn, requested)) and row.replayed_at, "marked replayed")
    assert service.metrics.replayed._value.get() == 1
    worker.barrier()
    assert worker.received() == [], "only the requested tenant's dead letter was replayed"

    again = runner.invoke(
        app, ["deadletters", "replay", str(requested), "--registry", postgres_dsn, "--json"]
    )
    assert json.loads(again.output) == {
        "requested": [],
        "skipped": {str(requested): "replay already replayed"},
    }


def test_a_dead_letter_replayed_once_its_cause_is_fixed_is_stored_by_the_worker(
    registry: tuple[psycopg.Connection, Broker],
    consumer: Callable[..., DeadLetterConsumer],
    clients: Callable[..., Probe],
    postgres_dsn: str,
    server_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """End to end, every hop real: the worker (a process, over TLS as ``svc.ingest``) dead-letters
    a v1 reading of a machine its settings lack, the consumer stores it, the operator lists it,
    fixes the settings, replays it by tenant and reason; the worker stores the point."""
    conn, broker = registry
    consumer()
    folder = server_root / f"replay-{tmp_path.name}"
    folder.mkdir()
    vm, store_url = start_store(folder)
    monkeypatch.setenv("IRONLINK_MQTT_PASSWORD", broker.password("svc.ingest"))
    fixed = WorkerProcess.for_platform(
        broker.fixture.config,
        broker.port,
        store_url,
        folder,
        mqtt_tls=True,
        mqtt_ca_file=broker.folder / "ca.pem",
        store_urls={route.instance: store_url for route in store_routes(broker.fixture.config).values()},
    )
    routes = dict(fixed.settings.tenants)
    unregistered = dict(routes["acme"].machines)
    del unregistered["plant-1/press-02"]  # the cause: the registry export the worker read missed it
    routes["acme"] = routes["acme"].model_copy(update={"machines": unregistered})
    broken = WorkerProcess(fixed.settings.model_copy(update={"tenants": routes}), folder / "broken.log")
    worker = broken.start()
    try:
        ts = int(time.time()) - 30
        reading = v1(ACME_PRESS_2, ts, systemPressure=187.5)
        press = connected(clients, broker, A_NEIGHBOUR)
        assert not press.publish(A_NEIGHBOUR_TOPIC, reading).is_failure

        (letter,) = stored(conn, 1, tenant_id="acme")
        assert (letter.reason, letter.topic, letter.payload_bytes) == (
            "unknown_machine",
            A_NEIGHBOUR_TOPIC,
            len(reading),
        )
        listed = runner.invoke(
            app, ["deadletters", "list", "--registry", postgres_dsn, "--tenant", "acme", "--json"]
        )
        assert listed.exit_code == 0, listed.output
        assert [(row["id"], row["reason"], row["replay"]) for row in json.loads(listed.output)] == [
            (letter.id, "unknown_machine", "none")
        ]

        assert worker.stop() == 0  # a plain subscription: the session stays for the next start
        worker = WorkerProcess(fixed.settings, folder / "fixed.log").start()
        replay = runner.invoke(
            app,
            [
                *("deadletters", "replay", "--registry", postgres_dsn),
                *("--tenant", "acme", "--reason", "unknown_machine", "--json"),
            ],
        )
        assert replay.exit_code == 0, replay.output
        assert json.loads(replay.output)["requested"] == [letter.id]

        wait_stored(store_url, ACME_PRESS_2, [ts * 1000])
        assert series(store_url, ACME_PRESS_2)["telemetry_pressure_bar"] == {ts * 1000: 187.5}
        eventually(
            lambda: (row := store.get_dead_letter(conn, letter.id)) and row.replayed_at, "marked replayed"
        )
        # Through the pipeline once, stored, not dead-lettered again: still the one row.
        assert worker.metric("ironlink_ingest_messages_received_total", tenant="acme") == 1
        assert worker.metric("ironlink_ingest_messages_rejected_total") == 0
        assert [row.id for row in store.list_dead_letters(conn)] == [letter.id]
    finally:
        if worker.process is not None and worker.process.poll() is None:
            worker.stop()
        vm.stop()


def test_cli_lists_per_tenant_and_shows_one_with_its_payload(
    registry: tuple[psycopg.Connection, Broker], postgres_dsn: str
) -> None:
    conn, _ = registry
    now = time.time()
    for topic, age_h, payload in (
        (A_TOPIC, 1, b"a-recent"),
        (A_TOPIC, 30, b"a-old"),
        (B_TOPIC, 1, b"b-recent"),
    ):
        letter = read_dead_letter(
            dead_letter_topic(topic),
            document(topic, payload, at=now - age_h * 3600),
            now=datetime.now(UTC),
            max_document_bytes=1 << 20,
            max_sample_bytes=4096,
        )
        store.store_dead_letter(conn, letter)

    listed = runner.invoke(
        app, ["deadletters", "list", "--registry", postgres_dsn, "--tenant", "acme", "--json"]
    )
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert [(row["tenant_id"], row["topic"], row["payload_bytes"]) for row in rows] == [
        ("acme", A_TOPIC, len(b"a-recent")),
        ("acme", A_TOPIC, len(b"a-old")),
    ], "newest first, tenant B's left out"
    recent = runner.invoke(
        app,
        ["deadletters", "list", "--registry", postgres_dsn, "--tenant", "acme", "--since", "12h", "--json"],
    )
    assert [row["id"] for row in json.loads(recent.output)] == [rows[0]["id"]]
    assert store.count_dead_letters(conn, since=datetime.now(UTC) - timedelta(hours=12)) == {
        "acme": 1,
        "globex": 1,
    }
    table = runner.invoke(app, ["deadletters", "list", "--registry", postgres_dsn, "--tenant", "acme"])
    assert table.exit_code == 0 and "out_of_bounds" in table.output

    shown = runner.invoke(
        app, ["deadletters", "show", str(rows[1]["id"]), "--registry", postgres_dsn, "--json"]
    )
    assert json.loads(shown.output)["payload"] == "a-old"
    assert json.loads(shown.output)["payload_encoding"] == "text"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list", "--tenant", "Acme Corp"], "--tenant: 'Acme Corp' is not a tenant id"),
        (["list", "--limit", "5000"], "--limit: 5000 is not between 1 and 1000"),
        (["list", "--since", "yesterday"], "--since: 'yesterday' is neither an ISO 8601 time"),
        (["list", "--reason", "Out-Of-Bounds"], "--reason: 'Out-Of-Bounds' is not a reason"),
        (["replay"], "--tenant: is required to replay by filter"),
        (["replay", "3", "--tenant", "acme"], "ID: replay either by id or by --tenant"),
        (["show", "0"], "ID: 0 is not a dead letter id"),
    ],
)
def test_cli_refuses_bad_input_naming_the_flag_and_value(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["deadletters", *args, "--registry", "host=/nonexistent dbname=x"])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_cli_reports_every_filter_problem_at_once() -> None:
    result = runner.invoke(app, ["deadletters", "list", "--tenant", "X", "--limit", "0", "--since", "soon"])
    assert result.exit_code == 2
    assert all(flag in result.output for flag in ("--tenant: 'X'", "--limit: 0", "--since: 'soon'"))


def store_aged(conn: psycopg.Connection, ages: dict[tuple[str, float], bool], now: datetime) -> None:
    """One dead letter per (topic, age in days), its payload the age as text."""
    for topic, days in ages:
        at = (now - timedelta(days=days)).timestamp()
        letter = read_dead_letter(
            dead_letter_topic(topic), document(topic, f"{days}".encode(), at=at), now=now,
            max_document_bytes=1 << 20, max_sample_bytes=64,
        )  # fmt: skip
        store.store_dead_letter(conn, letter)


def test_purge_removes_dead_letters_past_their_tenants_retention(
    registry: tuple[psycopg.Connection, Broker], consumer: Callable[..., DeadLetterConsumer]
) -> None:
    """acme is on the basic tier (raw 7 d), globex on standard (30 d); unassigned ones get the default."""
    conn, _ = registry
    now = datetime.now(UTC)
    ages = {
        ("ironlink/acme/plant-1/press-01/telemetry", 8): False,
        ("ironlink/acme/plant-1/press-01/telemetry", 6): True,
        ("ironlink/globex/line-a/molder-01/telemetry", 8): True,
        ("ironlink/globex/line-a/molder-01/telemetry", 31): False,
        ("ironlink/initech/hq/robot-01/telemetry", 2): False,
    }
    store_aged(conn, ages, now)
    service = consumer(default_retention_s=86_400)  # purges on start, then every purge_interval_s
    eventually(lambda: len(store.list_dead_letters(conn)) == 2, "three dead letters purged")
    kept = {(letter.topic, letter.payload_bytes) for letter in store.list_dead_letters(conn)}
    assert kept == {(topic, len(str(days))) for (topic, days), keep in ages.items() if keep}
    assert service.metrics.purged.labels("acme")._value.get() == 1
    assert service.metrics.purged.labels("_unknown")._value.get() == 1


def test_purge_takes_each_tenants_retention_from_its_registry_route(
    registry: tuple[psycopg.Connection, Broker], consumer: Callable[..., DeadLetterConsumer]
) -> None:
    """No retention in the consumer's settings (a platform stack lists no tenant): acme's route
    keeps its dead letters 1 day, globex's route names none, so the default (30 d) applies."""
    conn, broker = registry
    config, now = broker.fixture.config, datetime.now(UTC)
    for tenant in config.tenants:
        route = tenant_route_for(config, tenant, "http://store", "")
        kept_s = 86_400 if tenant.id == "acme" else None
        route = route.model_copy(update={"dead_letter_retention_s": kept_s})
        tenant_routes.upsert_tenant_route(conn, tenant.id, route, actor="test")
    ages = {
        ("ironlink/acme/plant-1/press-01/telemetry", 2.0): False,
        ("ironlink/acme/plant-1/press-01/telemetry", 0.5): True,
        ("ironlink/globex/line-a/molder-01/telemetry", 8.0): True,
    }
    store_aged(conn, ages, now)
    service = consumer(retention_s={}, default_retention_s=30 * 86_400)
    eventually(lambda: len(store.list_dead_letters(conn)) == 2, "acme's 2-day-old dead letter purged")
    kept = {(letter.topic, letter.payload_bytes) for letter in store.list_dead_letters(conn)}
    assert kept == {(topic, len(str(days))) for (topic, days), keep in ages.items() if keep}
    assert service.metrics.purged.labels("acme")._value.get() == 1, "a routed tenant is a known label"


def test_settings_name_every_bad_variable() -> None:
    from ingest.settings import SettingsError

    with pytest.raises(SettingsError) as refused:
        DeadLetterSettings.from_env(
            {
                "IRONLINK_DLQ_MQTT_PORT": "eighty",
                "IRONLINK_DLQ_RETENTION_S": "{",
                "IRONLINK_DLQ_MAX_SAMPLE_BYTES": "1e9",
            }
        )
    assert "IRONLINK_DLQ_RETENTION_S: '{' is not valid JSON" in str(refused.value)
    with pytest.raises(SettingsError) as refused:
        DeadLetterSettings.from_env(
            {"IRONLINK_DLQ_MQTT_PORT": "eighty", "IRONLINK_DLQ_MAX_SAMPLE_BYTES": "99999999"}
        )
    problems = str(refused.value)
    assert "IRONLINK_DLQ_MQTT_HOST: is required" in problems
    assert "IRONLINK_DLQ_MQTT_PORT: 'eighty' is invalid" in problems
    assert "IRONLINK_DLQ_MAX_SAMPLE_BYTES: '99999999' is invalid" in problems
    with pytest.raises(SettingsError, match="IRONLINK_DLQ_REGISTRY_DSN: is required"):
        DeadLetterSettings.from_env({"IRONLINK_DLQ_MQTT_HOST": "broker"}).dsn()
