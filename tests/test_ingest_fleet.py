"""The fleet as the worker reads it: the registry's query and notifications (real PostgreSQL),
and the pipeline's verdicts when the registry is its source of machines."""

from __future__ import annotations

import time
from typing import Any

import psycopg

from infra.config import parse_platform
from ingest.contract import Reason
from ingest.pipeline import DeadLetter, Pipeline, Point
from ingest.settings import worker_settings_for
from registry import fleet, provisioning, store
from registry.migrate import apply_migrations
from tests.fixtures.ingest import ACME_MILL, ACME_PRESS, platform, topic, v1, v2, v3

ACTOR = "test@fleet"


def pipeline(**overrides: Any) -> Pipeline:
    settings = worker_settings_for(
        platform(), mqtt_host="broker", mqtt_port=1883, store_urls={"influxdb": "http://store"}, **overrides
    )
    return Pipeline(settings)


def reason(outcome: Point | DeadLetter) -> Reason | None:
    return outcome.reason if isinstance(outcome, DeadLetter) else None


def test_with_a_registry_a_machine_it_lacks_is_unknown_machine_in_every_version() -> None:
    subject = pipeline(registry_dsn="host=registry")
    subject.use_machine_types({ACME_PRESS: "hydraulic_press"})
    now = time.time()
    assert reason(subject.process(topic(ACME_PRESS), v2(ACME_PRESS, now - 5), now)) is None
    for payload in (
        v1(ACME_MILL, int(now) - 5, S_RPM=1.0),
        v2(ACME_MILL, now - 5),
        v3(ACME_MILL, now, "g", 1, 1),
    ):
        outcome = subject.process(topic(ACME_MILL), payload, now)
        assert isinstance(outcome, DeadLetter) and outcome.reason is Reason.UNKNOWN_MACHINE
        assert "acme/plant-1/mill-01" in outcome.detail

    subject.use_machine_types({ACME_MILL: "cnc_mill"})  # the next fleet: press-01 removed
    assert reason(subject.process(topic(ACME_MILL), v2(ACME_MILL, now - 4), now)) is None
    assert reason(subject.process(topic(ACME_PRESS), v2(ACME_PRESS, now - 4), now)) is Reason.UNKNOWN_MACHINE


def test_without_a_registry_the_settings_machines_keep_todays_rules() -> None:
    """v2 names its own type: a machine of a known tenant that the settings lack still passes."""
    subject = pipeline(machines={"acme": {"plant-1/press-01": "hydraulic_press"}})
    now = time.time()
    assert reason(subject.process(topic(ACME_MILL), v2(ACME_MILL, now - 5), now)) is None
    assert (
        reason(subject.process(topic(ACME_MILL), v1(ACME_MILL, int(now) - 5, S_RPM=1.0), now))
        is Reason.UNKNOWN_MACHINE
    )


def test_the_registry_lists_the_fleet_and_notifies_each_tenant_a_statement_changed(postgres_dsn: str) -> None:
    config = parse_platform(
        {
            "phase": "A",
            "region": "test",
            "tenants": [{"id": t, "name": t, "tier": "basic"} for t in ("acme", "globex")],
        }
    )
    with (
        psycopg.connect(postgres_dsn, autocommit=True) as conn,
        psycopg.connect(postgres_dsn, autocommit=True) as listener,
    ):
        apply_migrations(conn)
        store.sync_platform(conn, config, actor=ACTOR)
        for tenant in ("acme", "globex"):
            provisioning.add_site(conn, tenant, "plant-1", None, actor=ACTOR)
        fleet.listen(listener)
        with conn.cursor().copy("COPY machines (tenant_id, site_id, id, type) FROM STDIN") as copy:
            for n in range(1000):
                copy.write_row(("globex", "plant-1", f"m-{n}", "cnc_mill"))
        provisioning.add_machine(conn, "acme", "plant-1", "press-01", "hydraulic_press", actor=ACTOR)
        conn.execute(
            "UPDATE machines SET type = 'injection_molder' WHERE tenant_id = 'globex' AND id = 'm-0'"
        )
        provisioning.remove_machine(conn, "acme", "plant-1", "press-01", actor=ACTOR)
        notes = [note.payload for note in listener.notifies(timeout=1.0)]
        assert notes == ["globex", "acme", "globex", "acme"], "one per tenant and statement, not per row"

        everything = fleet.machine_types(conn)
        assert len(everything) == 1000 and everything[("globex", "plant-1", "m-0")] == "injection_molder"
        assert fleet.machine_types(conn, "acme") == {}

        store.remove_tenant(conn, "globex", actor=ACTOR)  # its machines go by ON DELETE CASCADE
        assert [note.payload for note in listener.notifies(timeout=1.0)] == ["globex"]
        assert fleet.machine_types(conn) == {}
