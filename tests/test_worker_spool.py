"""The worker's durable spool and the store's point-by-point answer to a partial write (units).

InfluxDB's 422 "partial write" cannot be produced here: VictoriaMetrics, the store these machines
have, skips a line it cannot take and answers 204. So the mapping is tested on the real
``influxdb-client`` write API with its HTTP call answered as InfluxDB 2.x documents it (status and
body of a partial write), and the README says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from influxdb_client.rest import ApiException

from ingest.settings import worker_settings_for
from ingest.spool import Spool, SpoolEntry
from ingest.store import Store
from tests.fixtures.ingest import fleet_machines, platform


def entry(line: str, ts: float = 1.0) -> SpoolEntry:
    return line, ts, "ironlink/acme/plant-1/press-01/telemetry", b"{}", 2.0, "gw-1", 7, 42


def test_spooled_points_survive_a_reopen_in_order_and_leave_only_when_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes_per_tenant=1 << 20)
    spool.put("acme", [entry("a 1"), entry("a 2")])
    spool.put("globex", [entry("g 1")])
    spool.put("acme", [entry("a 3")])
    spool.close()

    reopened = Spool(tmp_path, max_bytes_per_tenant=1 << 20)
    assert sorted(reopened.tenants()) == ["acme", "globex"], "a restart must find every held tenant"
    oldest = reopened.oldest("acme", 2)
    assert [point.line for point in oldest] == ["a 1", "a 2"], "oldest first"
    assert oldest[0].seq == ("gw-1", 7, 42), "the sequence id survives, for the receipt after the drain"
    reopened.remove("acme", oldest)
    assert reopened.points("acme") == 1
    assert [point.line for point in reopened.oldest("acme", 10)] == ["a 3"]
    reopened.remove("acme", reopened.oldest("acme", 10))
    assert reopened.tenants() == ["globex"]


def test_caps_count_what_a_row_keeps_per_tenant_and_in_all(tmp_path: Path) -> None:
    row_size = len("x" * 100) + len(b"{}") + len("ironlink/acme/plant-1/press-01/telemetry")
    spool = Spool(tmp_path, max_bytes_per_tenant=3 * row_size, max_bytes=5 * row_size)
    rows = [entry("x" * 100) for _ in range(4)]
    assert spool.fitting("acme", rows) == 3, "the tenant's cap counts line, payload and topic"
    spool.put("acme", rows[:3])
    assert spool.fitting("acme", rows) == 0
    assert spool.fitting("globex", rows) == 2, "the spool's own cap leaves globex two rows"
    spool.remove("acme", spool.oldest("acme", 1))
    assert spool.fitting("acme", rows) == 1, "room comes back as the spool drains"


def test_the_spool_is_durable_sqlite_in_wal_mode(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes_per_tenant=100)
    pragma = spool._db.execute("PRAGMA journal_mode").fetchone()[0]
    synchronous = spool._db.execute("PRAGMA synchronous").fetchone()[0]
    assert (pragma, synchronous) == ("wal", 2), "WAL with synchronous=FULL: a commit is fsynced"


# ------------------------------------------------------------------------- partial writes
class PartialWriteAnswers:
    """Stands in for InfluxDB's HTTP answer only: refuses the request with 422 (as a partial write)
    when it holds a line marked as outside the retention, records every request it got."""

    def __init__(self) -> None:
        self.requests: list[list[str]] = []

    def __call__(self, *, bucket: str, org: str, record: str, write_precision: str) -> None:
        lines = record.split("\n")
        self.requests.append(lines)
        if any("expired" in line for line in lines):
            body = json.dumps(
                {
                    "code": "unprocessable entity",
                    "message": "failure writing points to database: partial write: points beyond "
                    f"retention policy dropped={sum('expired' in line for line in lines)}",
                }
            )
            error = ApiException(status=422, reason="Unprocessable Entity")
            error.body = body
            raise error


@pytest.fixture
def store() -> Store:
    settings = worker_settings_for(
        platform(),
        mqtt_host="127.0.0.1",
        mqtt_port=1883,
        store_urls={"influxdb": "http://127.0.0.1:9"},
        machines=fleet_machines(),
    )
    return Store(settings.store_timeout_ms, settings.store_routes({}))


def test_a_partial_write_is_answered_point_by_point(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = PartialWriteAnswers()
    monkeypatch.setattr(store.writer("acme").api, "write", answers)
    lines = [f"telemetry,n={i} {'expired' if i in (3, 11) else 'ok'}=1 {i}" for i in range(16)]

    refused = store.write_each("acme", lines)

    assert sorted(refused) == [3, 11], "exactly the points the store dropped are refused"
    assert all("422" in answer and "partial write" in answer for answer in refused.values())
    accepted = {line for request in answers.requests for line in request if "expired" not in line}
    assert accepted == {line for index, line in enumerate(lines) if index not in (3, 11)}
    assert len(answers.requests) < len(lines), "halving, not one request per point"


def test_a_store_that_is_down_is_not_mistaken_for_a_refusal(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable(**_: object) -> None:
        raise ApiException(status=503, reason="Service Unavailable")

    monkeypatch.setattr(store.writer("acme").api, "write", unavailable)
    with pytest.raises(ApiException) as raised:
        store.write_each("acme", ["telemetry a=1 1", "telemetry a=2 2"])
    assert raised.value.status == 503, "retryable errors go back to the worker, which holds the tenant"
