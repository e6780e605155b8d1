# ruff: noqa: E402  (the imports follow the sys.path fix below)
"""The API's overhead over its store (``python bench/api.py``): requests/s and p50/p99 latency
through ``python -m api`` (uvicorn, real HTTP, a real PostgreSQL registry, a real
VictoriaMetrics), against the same data asked of the store directly (``api.stores`` in this
process: the same MetricsQL over HTTP, parsed), and the API's peak RSS.

Scenarios, each run ``--seconds`` by one client on one keep-alive connection, API and store
alternating for ``--rounds`` rounds (the medians are printed; ratio = store rps / API rps, the
API's cost factor):

1. ``latest``: one machine's latest status and last-seen time (``GET /v1/machines/{id}``);
2. ``series_auto``: a 24-hour series of a machine reporting at 1 point/s (86,400 points, three
   metrics), the resolution chosen by the server (10 s: 8,640 points in one page);
3. ``series_1s``: the same 24 hours at 1 s, every page (``limit`` = the cap, 10,000: 9 pages).

    python bench/api.py [--seconds 5] [--rounds 3] [--machines 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import httpx
import psycopg

from api.series import auto_resolution
from api.settings import ApiSettings
from api.stores import SeriesQuery, VictoriaMetricsStore
from ingest.contract import TelemetryV2
from ingest.points import to_line
from localdev import servers
from registry.api_keys import create_api_key
from registry.migrate import apply_migrations

ROOT = Path(__file__).resolve().parent.parent
TENANT, SITE, BUSY = "bench", "plant", "m0000"
DAY = 86_400


def seed(dsn: str, machines: int) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_migrations(conn)
        conn.execute(
            "INSERT INTO tenants (id, name, tier, isolation) VALUES (%s, 'Bench', 'standard', 1)", (TENANT,)
        )
        conn.execute("INSERT INTO sites (tenant_id, id) VALUES (%s, %s)", (TENANT, SITE))
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO machines (tenant_id, site_id, id, type) VALUES (%s, %s, %s, 'cnc_mill')",
                [(TENANT, SITE, f"m{i:04d}") for i in range(machines)],
            )
        _key, plaintext = create_api_key(
            conn, TENANT, site_id=None, label="bench", lifetime=timedelta(days=1), actor="bench"
        )
    return plaintext


def write_day(vm_url: str, end: int, machines: int) -> None:
    """24 h at 1 point/s for the busy machine; one recent point for every other machine."""

    def line(machine: str, ts: int, i: int) -> str:
        metrics = {"spindle_speed_rpm": 1000.0 + i % 50, "spindle_temp_c": 40.0 + i % 7, "power_kw": 5.5}
        sample = TelemetryV2.model_construct(
            schema_version=2, tenant_id=TENANT, site_id=SITE, machine_id=machine, machine_type="cnc_mill",
            ts=float(ts), status="running" if i % 600 else "fault", metrics=metrics,
        )  # fmt: skip
        return to_line(sample, {})

    with httpx.Client(base_url=vm_url, timeout=120) as client:
        for chunk in range(end - DAY + 1, end + 1, 10_000):
            rows = [line(BUSY, ts, ts) for ts in range(chunk, min(chunk + 10_000, end + 1))]
            client.post("/api/v2/write", content="\n".join(rows)).raise_for_status()
        others = [line(f"m{i:04d}", end - i, i) for i in range(1, machines)]
        client.post("/api/v2/write", content="\n".join(others)).raise_for_status()
        client.get("/internal/force_flush").raise_for_status()


def timed(call: Callable[[], object], seconds: float) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) of ``call`` repeated for ``seconds``."""
    latencies: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        began = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - began)
    elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return len(latencies) / elapsed, statistics.median(ordered) * 1000, p99 * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="per scenario, side and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--machines", type=int, default=200, help="machines of the tenant (one busy)")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="ironlink-bench-api-"))
    folder.chmod(0o755)
    user = servers.service_user("postgres")
    servers.init_postgres(folder / "pg", user)
    pg_port, vm_port, api_port = servers.free_port(), servers.free_port(), servers.free_port()
    postgres = servers.postgres(
        folder / "pg", pg_port, folder / "pg-sockets", folder / "pg.log", user
    ).start()
    store_server = servers.victoria_metrics(folder / "vm", vm_port, folder / "vm.log").start()
    api: subprocess.Popen[bytes] | None = None
    try:
        dsn = f"host={folder / 'pg-sockets'} port={pg_port} user=postgres dbname=postgres"
        vm_url = f"http://127.0.0.1:{vm_port}"
        key = seed(dsn, args.machines)
        end = int(time.time()) // 60 * 60 - 120
        write_day(vm_url, end, args.machines)

        settings = ApiSettings(
            store_url=vm_url, port=api_port, host="127.0.0.1", rate_points_per_second=1e12,
            rate_burst_points=10**15, log_level="warning",
        )  # fmt: skip
        env = {**os.environ, **settings.to_env(), "IRONLINK_API_REGISTRY_DSN": dsn, "PYTHONPATH": str(ROOT)}
        api = subprocess.Popen([sys.executable, "-m", "api"], env=env, cwd=ROOT)
        servers.wait_until(lambda: servers.http_ok(f"http://127.0.0.1:{api_port}/readyz"), 60, "api")

        client = httpx.Client(
            base_url=f"http://127.0.0.1:{api_port}", headers={"Authorization": f"Bearer {key}"}, timeout=120
        )
        store = VictoriaMetricsStore(vm_url, timeout_s=120)
        start, stop = datetime.fromtimestamp(end - DAY, UTC), datetime.fromtimestamp(end, UTC)
        window = {"from": start.isoformat(), "to": stop.isoformat()}
        cap = settings.series_max_points
        auto_step = auto_resolution(DAY, cap)

        def api_series_1s() -> None:
            page = client.get(f"/v1/machines/{BUSY}/series", params={**window, "step": 1}).json()
            while page["next"]:
                page = client.get(page["next"]).json()

        def store_series_1s() -> None:
            at = start
            while at < stop:
                until = min(stop, at + timedelta(seconds=cap))
                store.series(SeriesQuery(TENANT, SITE, BUSY, (), at, until, 1))
                at = until

        checks = {
            "latest": client.get(f"/v1/machines/{BUSY}").json()["status"],
            "series_auto": len(client.get(f"/v1/machines/{BUSY}/series", params=window).json()["points"]),
        }
        assert checks["latest"] in ("running", "fault") and checks["series_auto"] == DAY // auto_step, checks

        scenarios: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
            "latest": (
                lambda: client.get(f"/v1/machines/{BUSY}").raise_for_status(),
                lambda: store.latest(TENANT, SITE, timedelta(seconds=settings.latest_lookback_s), BUSY),
            ),
            "series_auto": (
                lambda: client.get(f"/v1/machines/{BUSY}/series", params=window).raise_for_status(),
                lambda: store.series(SeriesQuery(TENANT, SITE, BUSY, (), start, stop, auto_step)),
            ),
            "series_1s": (api_series_1s, store_series_1s),
        }
        print(
            f"{args.machines} machines; {BUSY}: {DAY} points in 24 h, 3 metrics; series_auto at {auto_step} s"
        )
        columns = ("api rps", "p50 ms", "p99 ms", "store rps", "p50 ms", "p99 ms", "ratio")
        print(f"{'scenario':<12}" + "".join(f"{column:>10}" for column in columns))
        for name, (through_api, direct) in scenarios.items():
            api_runs, store_runs = [], []
            for _round in range(args.rounds):
                api_runs.append(timed(through_api, args.seconds))
                store_runs.append(timed(direct, args.seconds))
            a = [statistics.median(run[i] for run in api_runs) for i in range(3)]
            s = [statistics.median(run[i] for run in store_runs) for i in range(3)]
            cells = (*a, *s, s[0] / a[0])
            print(f"{name:<12}" + "".join(f"{cell:>10.2f}" for cell in cells))
        print(f"api peak RSS: {servers.peak_rss_mb(api.pid):.1f} MiB")
        client.close()
        store.close()
    finally:
        if api is not None:
            api.terminate()
            api.wait(10)
        store_server.stop()
        postgres.stop()


if __name__ == "__main__":
    main()
