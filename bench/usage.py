# ruff: noqa: E402  (the imports follow the sys.path fix below)
"""What usage metering costs the worker's hot path (issue 13 item 4), as a ratio in one run.

The same worker (``python -m ingest``, reading its tenants and machines from a real PostgreSQL
registry, as deployed) drains the same kind of queued backlog (``--messages`` v2 messages) from a
real Mosquitto into a real VictoriaMetrics, with ``usage_metering`` on and off, alternating which
goes first, for ``--rounds`` rounds. Each rate is the worker's points written from the first to
the last (``bench/ingest.py``'s ``worker_drain``); ``ratio`` is metered / unmetered, the median of
the rounds' ratios (each round's two runs back to back). Every round's backlog has timestamps of
its own, so every metered point is a new usage event; at the end the registry's ``usage_hourly``
must hold exactly the metered runs' messages.

On a shared 2-core machine the end-to-end ratio moves by tens of percent from run to run, more
than metering costs; so the run also times, in-process on the real classes, the pipeline per
message and what metering adds per point (``UsageMeter.admit`` + ``record``: the quota check and
the journal line), and prints that cost times the unmetered rate: metering's share of the worker.

    python bench/usage.py [--messages 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from types import ModuleType

# This file is bench/usage.py: drop bench/ from the path so that ``ingest`` is the package.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import psycopg
from prometheus_client import CollectorRegistry

from infra.config import PlatformConfig
from ingest.pipeline import Pipeline, Point
from ingest.settings import WorkerSettings, worker_settings_for
from ingest.usage import UsageMeter
from ingest.worker import Delivery
from localdev import servers
from localdev.state import demo_fleet
from registry import provisioning, store, tenant_routes
from registry.migrate import apply_migrations
from registry.tenant_routes import tenant_route_for

ROOT = Path(__file__).resolve().parent.parent
ACTOR = "bench@usage"
MODES = ["metered", "unmetered"]


def bench_ingest() -> ModuleType:
    """``bench/ingest.py``'s broker, backlog and drain helpers (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_ingest", ROOT / "bench" / "ingest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_registry(folder: Path) -> tuple[servers.Server, str]:
    user = servers.service_user("postgres")
    data, sockets = folder / "pg", folder / "pg-sockets"
    servers.init_postgres(data, user)
    port = servers.free_port()
    server = servers.postgres(data, port, sockets, folder / "pg.log", user).start()
    return server, f"host={sockets} port={port} user=postgres dbname=postgres"


def seed(dsn: str, config: PlatformConfig, store_url: str) -> None:
    """Tenants, routes and the demo fleet's machines, as tenant stacks and ``ironlink dev`` write them."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_migrations(conn)
        store.sync_platform(conn, config, actor=ACTOR)
        for tenant in config.tenants:
            route = tenant_route_for(config, tenant, store_url, "")
            tenant_routes.upsert_tenant_route(conn, tenant.id, route, actor=ACTOR)
        for tenant_id, machines in demo_fleet(config).route_machines().items():
            for site in sorted({path.split("/")[0] for path in machines}):
                provisioning.add_site(conn, tenant_id, site, None, actor=ACTOR)
            for path, kind in machines.items():
                site, machine = path.split("/")
                provisioning.add_machine(conn, tenant_id, site, machine, kind, actor=ACTOR)


def hot_path_costs(
    settings: WorkerSettings, workload: list[tuple[str, bytes]], folder: Path
) -> tuple[float, float]:
    """Seconds per message of the worker's pipeline (contract, checks, line protocol) and of the
    metering it adds per point (``admit`` and ``record``: the quota check and the journal line),
    on the real classes in this process: the part of the ratio above that is not noise."""
    pipeline = Pipeline(settings)
    now = time.time()
    started = time.perf_counter()
    outcomes = [(pipeline.process(topic, body, now), topic, body) for topic, body in workload]
    pipeline_s = (time.perf_counter() - started) / len(workload)
    by_tenant: dict[str, list[tuple[Point, Delivery]]] = {}
    for index, (outcome, topic, body) in enumerate(outcomes):
        assert isinstance(outcome, Point), outcome
        by_tenant.setdefault(outcome.tenant_id, []).append((outcome, Delivery(index, 1, topic, body, now, 0)))
    meter = UsageMeter(
        "",
        folder / "journal",
        flush_s=60,
        dedupe=timedelta(hours=24),
        journal_max_bytes=2**40,
        registry=CollectorRegistry(),
    )
    meter.use_tenants(
        {
            tenant: route.model_copy(update={"messages_per_month": 10**12})
            for tenant, route in settings.store_routes({}).items()
        }
    )
    started = time.perf_counter()
    for tenant, entries in by_tenant.items():
        for first in range(0, len(entries), settings.batch_size):
            batch = entries[first : first + settings.batch_size]
            for _ in batch:
                meter.admit(tenant)
            meter.record(tenant, batch, {})
    metering_s = (time.perf_counter() - started) / len(workload)
    return pipeline_s, metering_s


def counted_messages(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT coalesce(sum(messages), 0) FROM usage_hourly").fetchone()
    return int(row[0]) if row else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20_000, help="queued messages per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each mode once per round")
    args = parser.parse_args()
    problems = [
        f"--{name} must be {rule}, got {value}"
        for name, value, ok, rule in (
            ("messages", args.messages, 100 <= args.messages <= 200_000, "100..200000"),
            ("rounds", args.rounds, 1 <= args.rounds <= 20, "1..20"),
        )
        if not ok
    ]
    if problems:
        parser.error("; ".join(problems))

    ingest = bench_ingest()
    folder = Path(tempfile.mkdtemp(prefix="ironlink-bench-usage-"))
    folder.chmod(0o755)  # Mosquitto and PostgreSQL drop to their own accounts
    broker, mqtt_port = ingest.start_broker(folder, "worker")
    vm_port, http_port = servers.free_port(), servers.free_port()
    vm = servers.victoria_metrics(folder / "vm", vm_port, folder / "vm.log").start()
    store_url = f"http://127.0.0.1:{vm_port}"
    registry, dsn = start_registry(folder)
    config = ingest.bench_config()
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    try:
        seed(dsn, config, store_url)
        static = ingest.settings_for(mqtt_port, store_url, http_port)  # its workload's machines
        envs = {}
        for mode in MODES:
            settings = worker_settings_for(
                config,
                from_registry=True,
                mqtt_host="127.0.0.1",
                mqtt_port=mqtt_port,
                mqtt_tls=False,
                mqtt_client_id=ingest.WORKER_ID,
                http_host="127.0.0.1",
                http_port=http_port,
                log_level="warning",
                spool_dir=folder / f"spool-{mode}",
                usage_metering=mode == "metered",
            )
            envs[mode] = {
                **os.environ,
                **settings.to_env(),
                "IRONLINK_REGISTRY_DSN": dsn,
                "PYTHONPATH": str(ROOT),
            }
        command = [sys.executable, "-m", "ingest"]
        ingest.create_session(ingest.WORKER_ID, mqtt_port)
        start_ts = time.time() - 7200
        for round_ in range(args.rounds):
            order = MODES[round_ % 2 :] + MODES[: round_ % 2]
            for index, mode in enumerate(order):
                offset = (2 * round_ + index) * args.messages * 0.01 + 1
                backlog = list(ingest.workload(static, args.messages, start_ts + offset, 0.01))
                ingest.publish(mqtt_port, backlog)
                rates[mode].append(ingest.worker_drain(command, envs[mode], ROOT, http_port, args.messages))
        counted = counted_messages(dsn)
        backlog = list(ingest.workload(static, args.messages, time.time() - 3600, 0.01))
        pipeline_s, metering_s = hot_path_costs(static, backlog, folder)
    finally:
        broker.stop()
        vm.stop()
        registry.stop()

    medians = {mode: statistics.median(values) for mode, values in rates.items()}
    ratio = statistics.median(m / u for m, u in zip(rates["metered"], rates["unmetered"], strict=True))
    print(
        f"workload            {args.messages} queued messages x {args.rounds} rounds per mode over "
        f"{len(config.tenants)} tenants, batch {static.batch_size}, flush {static.flush_interval_ms} ms"
    )
    for mode in MODES:
        values = rates[mode]
        spread = (max(values) - min(values)) / medians[mode]
        listed = ", ".join(f"{rate:.0f}" for rate in values)
        print(f"{mode:<19} {medians[mode]:8.0f} msg/s  (median; spread {spread:4.0%}: {listed})")
    print(f"ratio               {ratio:8.2f}  (metered / unmetered, median of the rounds' ratios)")
    print(
        f"hot path            pipeline {pipeline_s * 1e6:.1f} us/message, metering "
        f"{metering_s * 1e6:.2f} us/point (admit + journal): {metering_s / pipeline_s:.1%} of the "
        "pipeline's time, measured in-process"
    )
    share = metering_s * medians["unmetered"]
    print(
        f"metering share      {share:8.1%}  (its per-point cost x the unmetered rate: of the worker's time)"
    )
    metered = args.rounds * args.messages
    print(f"usage counted       {counted} of {metered} metered messages in usage_hourly")
    print(f"worker peak RSS     {max(ingest.WORKER_PEAKS):8.1f} MiB")
    if counted != metered:
        raise SystemExit(f"usage counted {counted} messages, {metered} were metered")


if __name__ == "__main__":
    main()
