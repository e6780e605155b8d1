# ruff: noqa: E402  (the imports follow the sys.path fix below)
"""Fleet provisioning through the API against a real PostgreSQL (``python bench/fleet.py``).

Starts its own PostgreSQL (``localdev/servers.py``) and ``python -m provisioning`` on free ports,
mints a claim token for ``--devices`` machines, and has them claim in ``--threads`` parallel
devices, each with its own key and CSR (made before the clock starts), over real HTTP. Prints, first:

    provisioning <N> devices/s
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

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
    finally:
        if service is not None:
            service.terminate()
            service.wait(15)
        postgres.stop()


if __name__ == "__main__":
    main()
