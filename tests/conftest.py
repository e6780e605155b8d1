"""Shared fixtures: real servers (Mosquitto, PostgreSQL, VictoriaMetrics) on loopback.

Every integration test talks to the real binary from Debian's packages, started here in a
temporary folder on a free port and stopped at the end. See ``localdev/servers.py``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from _pytest.nodeid import NodeId

from infra.config import load_stack
from localdev import servers
from localdev.platform import DevPlatform


@pytest.fixture(autouse=True)
def _a_current_event_loop() -> None:
    """``asyncio.run()`` in an earlier test of the same process leaves the main thread with no
    current loop, and the Pulumi SDK's mocks create their futures on the current one."""
    try:
        asyncio.get_event_loop_policy().get_event_loop()
    except RuntimeError:
        asyncio.set_event_loop(asyncio.new_event_loop())


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep ``--dist loadgroup`` grouping (``make test``) on pytest 9.2: pytest-xdist 3.8 tags each
    grouped test by rewriting ``item._nodeid``, which pytest 9.2's structured node ids no longer
    read, so every ``xdist_group`` was silently ignored (pytest-dev/pytest-xdist#1386, fix pending
    in #1388). Put the same ``@<group>`` suffix into the structured id; a no-op where xdist did it."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        groups = sorted(
            {
                str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                for m in item.iter_markers("xdist_group")
            }
        )
        suffix = f"@{'_'.join(groups)}"
        if groups and not item.nodeid.endswith(suffix):
            item._id = NodeId.parse(item.nodeid + suffix)


@pytest.fixture(scope="session")
def server_root() -> Iterator[Path]:
    """A folder every service account can traverse (pytest's own tmp folders are root-only)."""
    root = Path(tempfile.mkdtemp(prefix="ironlink-test-"))
    os.chmod(root, 0o755)
    yield root


@pytest.fixture(scope="session")
def victoria_metrics(server_root: Path) -> Iterator[str]:
    """Base URL of a real VictoriaMetrics (InfluxDB line protocol on /api/v2/write)."""
    port = servers.free_port()
    server = servers.victoria_metrics(server_root / "vm", port, server_root / "vm.log").start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


class PostgresCluster:
    """A running PostgreSQL cluster; ``new_database()`` gives each test an empty database."""

    def __init__(self, socket_dir: Path, port: int) -> None:
        self.socket_dir, self.port = socket_dir, port

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.socket_dir} port={self.port} user=postgres dbname={dbname}"

    def new_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)


@pytest.fixture(scope="session")
def postgres_cluster(server_root: Path) -> Iterator[PostgresCluster]:
    user = servers.service_user("postgres")
    data, sockets = server_root / "pg", server_root / "pg-sockets"
    servers.init_postgres(data, user)
    port = servers.free_port()
    server = servers.postgres(data, port, sockets, server_root / "pg.log", user).start()
    yield PostgresCluster(sockets, port)
    server.stop()


@pytest.fixture
def postgres_dsn(postgres_cluster: PostgresCluster) -> str:
    """DSN of a fresh, empty database on the real PostgreSQL."""
    return postgres_cluster.new_database()


MosquittoFactory = Callable[[Callable[[int], str]], tuple[servers.Server, int]]


@pytest.fixture
def start_mosquitto(tmp_path: Path) -> Iterator[MosquittoFactory]:
    """Start a real Mosquitto with a config rendered for a free port: ``start(render)``."""
    started: list[servers.Server] = []

    def start(render: Callable[[int], str]) -> tuple[servers.Server, int]:
        port = servers.free_port()
        config = tmp_path / f"mosquitto-{port}.conf"
        config.write_text(render(port))
        server = servers.mosquitto(config, port, tmp_path / f"mosquitto-{port}.log").start()
        started.append(server)
        return server, port

    yield start
    for server in started:
        server.stop()


# --------------------------------------------------------------- the dev platform (ironlink dev)
class DevPlatformHandle:
    """A dev platform started through the real CLI in its own state folder (``ironlink dev up``).

    It holds MQTT's fixed port 8883: every test using it must be marked
    ``@pytest.mark.xdist_group("devplatform")`` so that one xdist worker runs them all.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.platform = DevPlatform(load_stack("dev"), state_dir)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ironlink <args> --state-dir <this platform>``; ``check`` fails the test on a non-zero exit."""
        command = [str(Path(sys.executable).parent / "ironlink"), *args, "--state-dir", str(self.state_dir)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
        if check and result.returncode != 0:
            pytest.fail(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def ensure_up(self) -> None:
        """Start whatever is not running (``up`` leaves running processes alone)."""
        self.cli("dev", "up")


@pytest.fixture(scope="session")
def dev_platform(server_root: Path) -> Iterator[DevPlatformHandle]:
    """The dev stack running locally (Mosquitto on 127.0.0.1:8883, PostgreSQL, VictoriaMetrics, worker)."""
    handle = DevPlatformHandle(server_root / "dev-platform")
    try:
        handle.ensure_up()
        yield handle
    finally:  # also when `up` failed half-way: whatever it started must not outlive the session
        handle.cli("dev", "down", "--purge", check=False)
