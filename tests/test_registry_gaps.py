"""``telemetry_gaps`` (migration 0007) and ``registry/gaps.py`` on a real PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import psycopg
import pytest

from registry import provisioning, store
from registry.gaps import GapRow, epoch, list_gaps, upsert_gaps
from registry.migrate import apply_migrations
from tests.fixtures.ingest import platform

pytestmark = pytest.mark.integration
ACTOR = "test@gaps"
TS = 1_764_633_600.0


@pytest.fixture
def conn(postgres_dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        apply_migrations(connection)
        store.sync_platform(connection, platform(), actor=ACTOR)
        provisioning.add_site(connection, "acme", "plant-1", None, actor=ACTOR)
        for machine in ("press-01", "press-02"):
            provisioning.add_machine(connection, "acme", "plant-1", machine, "hydraulic_press", actor=ACTOR)
        yield connection


def gap(**changes: object) -> GapRow:
    row = GapRow(
        "acme",
        "plant-1",
        "press-01",
        gateway="gw-1",
        boot=3,
        first_n=100,
        last_n=199,
        reason="max_bytes",
        count=80,
        first_ts=epoch(TS),
        last_ts=epoch(TS + 60),
        received_at=epoch(TS + 120),
    )
    return dataclasses.replace(row, **changes)  # type: ignore[arg-type]


def test_a_resend_changes_nothing_and_a_grown_gap_updates_its_row(conn: psycopg.Connection) -> None:
    assert upsert_gaps(conn, [gap()]) == [80]
    assert upsert_gaps(conn, [gap(received_at=epoch(TS + 500))]) == [0], "a resend adds nothing"
    assert list_gaps(conn, "acme") == [gap()], "not even its received_at"
    grown = gap(last_n=260, count=140, last_ts=epoch(TS + 90), received_at=epoch(TS + 600))
    assert upsert_gaps(conn, [grown]) == [60]
    assert list_gaps(conn, "acme") == [grown]
    assert upsert_gaps(conn, [gap()]) == [0], "an older, smaller count arriving late changes nothing"
    assert list_gaps(conn, "acme") == [grown]


def test_a_gap_of_another_boot_reason_or_machine_is_a_row_of_its_own(conn: psycopg.Connection) -> None:
    rows = [gap(), gap(boot=4, first_n=0, last_n=99), gap(reason="max_age"), gap(machine_id="press-02")]
    assert upsert_gaps(conn, rows) == [80, 80, 80, 80]
    assert len(list_gaps(conn, "acme")) == 4
    assert list_gaps(conn, "acme", "plant-1", "press-02") == [gap(machine_id="press-02")]
    assert list_gaps(conn, "globex") == []


@pytest.mark.parametrize(
    ("changes", "constraint"),
    [
        ({"count": 101}, "telemetry_gaps_count_range"),
        ({"count": 0}, "telemetry_gaps_count_range"),
        ({"last_n": 99, "count": 1}, "telemetry_gaps_seq_order telemetry_gaps_count_range"),
        ({"last_ts": epoch(TS - 1)}, "telemetry_gaps_time_order"),
        ({"reason": "Max Bytes"}, "telemetry_gaps_reason_format"),
        ({"gateway": "GW_1"}, "telemetry_gaps_gateway_format"),
        ({"machine_id": "press-99"}, "telemetry_gaps_tenant_id_site_id_machine_id_fkey"),
    ],
)
def test_the_table_refuses_what_the_contract_refuses(
    conn: psycopg.Connection, changes: dict[str, object], constraint: str
) -> None:
    with pytest.raises(psycopg.errors.IntegrityError) as refused:
        upsert_gaps(conn, [gap(**changes)])
    assert refused.value.diag.constraint_name in constraint.split(), "one of the constraints it breaks"


def test_a_removed_machine_takes_its_gaps_with_it(conn: psycopg.Connection) -> None:
    upsert_gaps(conn, [gap(), gap(machine_id="press-02")])
    provisioning.remove_machine(conn, "acme", "plant-1", "press-01", actor=ACTOR)
    assert [row.machine_id for row in list_gaps(conn, "acme")] == ["press-02"]
