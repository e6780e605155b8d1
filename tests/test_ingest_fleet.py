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
from registry.tenant_routes import tenant_route_for
from tests.fixtures.ingest import ACME_MILL, ACME_PRESS, platform, topic, v1, v2, v3

ACTOR = "test@fleet"


def pipeline(**overrides: Any) -> Pipeline:
    settings = worker_settings_for(
        platform(), mqtt_host="broker", mqtt_port=1883, store_urls={"influxdb": "http://store"}, **overrides
    )
    return Pipeline(settings)


def registry_pipeline(**overrides: Any) -> Pipeline:
    """A pipeline in registry mode, handed acme's and globex's routes as the fleet thread would."""
    config = platform(**overrides)
    settings = worker_settings_for(
        config, mqtt_host="broker", mqtt_port=1883, from_registry=True, registry_dsn="host=registry"
    )
    subject = Pipeline(settings, clock=lambda: 0.0)  # a stopped clock: no bucket refills meanwhile
    subject.use_tenants({t.id: tenant_route_for(config, t, "http://store", "") for t in config.tenants})
    return subject


def reason(outcome: Point | DeadLetter) -> Reason | None:
    return outcome.reason if isinstance(outcome, DeadLetter) else None


def test_with_a_registry_a_machine_it_lacks_is_unknown_machine_in_every_version() -> None:
    subject = registry_pipeline()
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


def test_with_a_registry_the_tenants_are_the_directory_it_was_handed_and_follow_it() -> None:
    """No tenant before the registry's copy; a removed tenant is unknown_tenant; a re-read that
    leaves a quota as it was keeps its bucket (no fresh burst), a changed quota applies at once."""
    config = platform(broker={"tenant_quota": {"messages_per_second": 1}})
    empty = Pipeline(
        worker_settings_for(config, mqtt_host="b", mqtt_port=1, from_registry=True, registry_dsn="host=r")
    )
    now = time.time()
    empty.use_machine_types({ACME_PRESS: "hydraulic_press"})
    assert reason(empty.process(topic(ACME_PRESS), v2(ACME_PRESS, now - 5), now)) is Reason.UNKNOWN_TENANT

    subject = registry_pipeline(broker={"tenant_quota": {"messages_per_second": 1}})
    subject.use_machine_types({ACME_PRESS: "hydraulic_press"})
    routes = {t.id: tenant_route_for(config, t, "http://store", "") for t in config.tenants}
    burst = subject._tenants["acme"].quota
    assert burst is not None
    admitted = 0
    while reason(subject.process(topic(ACME_PRESS), v2(ACME_PRESS, now - 5 + admitted / 1e3), now)) is None:
        admitted += 1
    assert admitted == int(burst.capacity), "the bucket's burst, then quota_exceeded"

    subject.use_tenants(dict(routes))  # the poll's re-read: same quota
    assert subject._tenants["acme"].quota is burst
    assert reason(subject.process(topic(ACME_PRESS), v2(ACME_PRESS, now - 1), now)) is Reason.QUOTA_EXCEEDED

    raised = routes["acme"].model_copy(update={"messages_per_second": 1000.0})
    subject.use_tenants({**routes, "acme": raised})
    assert reason(subject.process(topic(ACME_PRESS), v2(ACME_PRESS, now - 1), now)) is None

    subject.use_tenants({"globex": routes["globex"]})
    outcome = subject.process(topic(ACME_PRESS), v2(ACME_PRESS, now - 0.5), now)
    assert isinstance(outcome, DeadLetter) and outcome.reason is Reason.UNKNOWN_TENANT
    assert outcome.tenant_label == "_unknown", "a tenant no longer known is no metric label either"


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
