# ruff: noqa: E402  (the imports follow the sys.path fix below)
"""Fleet provisioning through the API against a real PostgreSQL (``python bench/fleet.py``).

Starts its own PostgreSQL (``localdev/servers.py``) and ``python -m provisioning`` on free ports,
mints a claim token for ``--devices`` machines, and has them claim in ``--threads`` parallel
devices, each with its own key and CSR (made before the clock starts), over real HTTP. Prints, first:

    provisioning <N> devices/s

(``--provisioning-only`` stops there: a quick run.)

Then (:func:`worker_start`) ``python -m ingest`` started against ``--fleet`` machines registered in
a database of the same PostgreSQL (a real Mosquitto beside it), timed from the process start to
``/readyz`` 200 with the whole fleet loaded (``ironlink_ingest_fleet_machines``), with its peak RSS
(``VmHWM``); then how long one machine registered meanwhile takes to reach it:

    worker start <S> s, peak RSS <M> MB

Last (:func:`claim_to_stored`), on the end-to-end platform of ``tests/test_provisioning_e2e.py``
(the API, Mosquitto with dynamic security and its mTLS listener, the worker reading the registry,
VictoriaMetrics), ``--claimers`` devices at once each claim with their own CSR, connect with their
certificate and publish a reading every 0.2 s until the store holds one:

    claim to first stored p50 <A> s, p99 <B> s
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]
sys.path.append(str(Path(__file__).resolve().parent.parent))  # tests.provisioning_platform

import psycopg
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from localdev import servers
from registry import provisioning as reg
from registry.migrate import apply_migrations


def _post(url: str, body: dict[str, object], headers: dict[str, str] | None = None) -> dict[str, object]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return dict(json.load(answer))


def _csr() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--fleet", type=int, default=50_000, help="machines the worker starts with")
    parser.add_argument("--claimers", type=int, default=50, help="devices timed from claim to stored")
    parser.add_argument(
        "--provisioning-only", action="store_true", help="a quick run: the provisioning rate line only"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ironlink-bench-fleet-"))
    os.chmod(root, 0o755)
    user = servers.service_user("postgres")
    servers.init_postgres(root / "pg", user)
    pg_port, http_port = servers.free_port(), servers.free_port()
    sockets = root / "pg-sockets"
    postgres = servers.postgres(root / "pg", pg_port, sockets, root / "pg.log", user).start()
    dsn = f"host={sockets} port={pg_port} user=postgres dbname=postgres"
    service = None
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            apply_migrations(conn)
            conn.execute(
                "INSERT INTO tenants (id, name, tier, isolation) VALUES ('acme', 'Acme', 'standard', 1)"
            )
            conn.execute("INSERT INTO sites (tenant_id, id) VALUES ('acme', 'plant-1')")
            admin = reg.create_admin_token(
                conn,
                tenant_id=None,
                label="bench",
                actor="bench",
                expires_at=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1),
            )
        env = {
            **os.environ,
            "IRONLINK_PROV_REGISTRY_DSN": dsn,
            "IRONLINK_PROV_CA_DIR": str(root / "ca"),
            "IRONLINK_PROV_HTTP_HOST": "127.0.0.1",
            "IRONLINK_PROV_HTTP_PORT": str(http_port),
            "IRONLINK_PROV_REGISTRY_POOL_SIZE": str(args.threads),
            "IRONLINK_PROV_CLAIM_RATE_PER_SOURCE": "1e9",
            "IRONLINK_PROV_CLAIM_BURST_PER_SOURCE": str(args.devices * 2),
            "IRONLINK_PROV_CLAIM_RATE_PER_TOKEN": "1e9",
            "IRONLINK_PROV_CLAIM_BURST_PER_TOKEN": str(args.devices * 2),
            "IRONLINK_PROV_LOG_LEVEL": "warning",
        }
        service = subprocess.Popen(
            [sys.executable, "-m", "provisioning"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{http_port}"
        servers.wait_until(lambda: servers.http_ok(base + "/readyz"), 30, "the provisioning service")
        token = _post(
            f"{base}/v1/tenants/acme/claim-tokens",
            {"site_id": "plant-1", "machine_type": "cnc_mill", "count": args.devices, "expires_in_hours": 1},
            {"Authorization": f"Bearer {admin.plaintext}"},
        )["token"]
        csrs = [_csr() for _ in range(args.devices)]

        def claim(i: int) -> str:
            answer = _post(f"{base}/v1/claim", {"token": token, "machine_id": f"m-{i}", "csr": csrs[i]})
            return str(answer["username"])

        started = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            usernames = set(pool.map(claim, range(args.devices)))
        elapsed = time.perf_counter() - started
        with psycopg.connect(dsn) as conn:
            stored = conn.execute("SELECT count(*) FROM device_certificates").fetchone()
        assert len(usernames) == args.devices and stored == (args.devices,), (len(usernames), stored)
        print(f"provisioning {args.devices / elapsed:.0f} devices/s")
        print(
            f"  {args.devices} devices claimed with their own CSR in {elapsed:.2f} s,"
            f" {args.threads} in parallel"
        )
        if not args.provisioning_only:
            worker_start(root, dsn, args.fleet)
            claim_to_stored(root, dsn, args.claimers)
    finally:
        if service is not None:
            service.terminate()
            service.wait(15)
        postgres.stop()


FLEET_TENANTS = ("acme", "globex", "initech", "umbrella")
FLEET_TYPES = ("cnc_mill", "hydraulic_press", "injection_molder")


def worker_start(root: Path, dsn: str, machines: int) -> None:
    """``worker start <S> s, peak RSS <M> MB`` for a worker whose registry holds ``machines``."""
    from infra.config import parse_platform
    from ingest.settings import worker_settings_for
    from registry import fleet

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE DATABASE worker_fleet")
    dsn = dsn.replace("dbname=postgres", "dbname=worker_fleet")
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_migrations(conn)
        for tenant in FLEET_TENANTS:
            conn.execute(
                "INSERT INTO tenants (id, name, tier, isolation) VALUES (%s, %s, 'basic', 1)",
                (tenant, tenant),
            )
            conn.execute(
                "INSERT INTO sites (tenant_id, id) SELECT %s, 'site-' || n FROM generate_series(0, 49) n",
                (tenant,),
            )
        with conn.cursor().copy("COPY machines (tenant_id, site_id, id, type) FROM STDIN") as copy:
            for n in range(machines):
                tenant = FLEET_TENANTS[n % len(FLEET_TENANTS)]
                copy.write_row(
                    (tenant, f"site-{n % 50}", f"machine-{n:06d}", FLEET_TYPES[n % len(FLEET_TYPES)])
                )
        started = time.perf_counter()
        whole = len(fleet.machine_types(conn))
        whole_s = time.perf_counter() - started
        started = time.perf_counter()
        fleet.machine_types(conn, FLEET_TENANTS[0])
        tenant_s = time.perf_counter() - started
    assert whole == machines, whole

    config = parse_platform(
        {
            "phase": "A",
            "region": "bench",
            "tenants": [{"id": t, "name": t, "tier": "basic"} for t in FLEET_TENANTS],
        }
    )
    mqtt_port, http_port = servers.free_port(), servers.free_port()
    persistence = root / "mosquitto"
    persistence.mkdir()
    servers.hand_over(persistence, servers.service_user("mosquitto"))
    broker_conf = root / "mosquitto.conf"
    template = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "ingest" / "mosquitto.conf"
    broker_conf.write_text(template.read_text().format(port=mqtt_port, persistence_dir=persistence))
    broker = servers.mosquitto(broker_conf, mqtt_port, root / "mosquitto.log").start()
    settings = worker_settings_for(
        config,
        mqtt_host="127.0.0.1",
        mqtt_port=mqtt_port,
        store_urls={"influxdb": "http://127.0.0.1:9"},  # readiness does not wait for the store
        mqtt_tls=False,
        http_host="127.0.0.1",
        http_port=http_port,
        spool_dir=root / "spool",
        log_level="warning",
    )
    url = f"http://127.0.0.1:{http_port}"
    env = {**os.environ, **settings.to_env(), "IRONLINK_REGISTRY_DSN": dsn}
    started = time.perf_counter()
    worker = subprocess.Popen([sys.executable, "-m", "ingest"], env=env, stdout=subprocess.DEVNULL)
    try:
        servers.wait_until(lambda: servers.http_ok(url + "/readyz"), 60, "the worker")
        start_s = time.perf_counter() - started
        loaded = _metric(url, "ironlink_ingest_fleet_machines")
        assert loaded == machines, f"ready with {loaded} of {machines} machines"
        peak_mb = servers.peak_rss_mb(worker.pid)
        print(f"worker start {start_s:.2f} s, peak RSS {peak_mb:.0f} MB")
        with psycopg.connect(dsn, autocommit=True) as conn:
            started = time.perf_counter()
            reg.add_machine(conn, FLEET_TENANTS[0], "site-0", "one-more", "cnc_mill", actor="bench")
            servers.wait_until(
                lambda: _metric(url, "ironlink_ingest_fleet_machines") == machines + 1, 10, "the new machine"
            )
            change_s = time.perf_counter() - started
        print(
            f"  {machines} machines in {len(FLEET_TENANTS)} tenants; one registered meanwhile known after"
            f" {change_s * 1000:.0f} ms (its tenant re-read); a whole read {whole_s * 1000:.0f} ms,"
            f" one tenant's {tenant_s * 1000:.0f} ms"
        )
    finally:
        worker.terminate()
        worker.wait(30)
        broker.stop()


def claim_to_stored(root: Path, dsn: str, devices: int) -> None:
    """``claim to first stored p50 <A> s, p99 <B> s`` (nearest rank) over ``devices`` devices."""
    import structlog

    from tests.provisioning_platform import SITE, running

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE DATABASE claim_stored")
    with running(root / "e2e", dsn.replace("dbname=postgres", "dbname=claim_stored")) as platform:
        token = str(platform.claim_token("acme", count=devices)["token"])

        def device(i: int) -> float:
            machine = ("acme", SITE, f"m-{i}")
            started = time.monotonic()
            answer, files = platform.claim(token, machine[2])
            assert answer.status_code == 201, answer.text
            session = platform.connect(str(answer.json()["username"]), cert=files)
            assert session is not None, f"{machine} refused"
            stored = platform.publish_until_stored(session, machine, "cnc_mill", started + 60)
            assert stored is not None, f"{machine}: nothing stored within 60 s"
            return stored - started

        with ThreadPoolExecutor(devices) as pool:
            times = sorted(pool.map(device, range(devices)))
    p50, p99 = (times[max(0, math.ceil(q * len(times)) - 1)] for q in (0.5, 0.99))
    print(f"claim to first stored p50 {p50:.2f} s, p99 {p99:.2f} s")
    print(f"  {devices} devices at once, each: claim, connect over mTLS, a reading every 0.2 s until stored")


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


if __name__ == "__main__":
    main()
