"""Real servers from Debian's packages, started as child processes on loopback.

One launcher per server, shared by the integration tests (which start them in temporary folders)
and by ``ironlink dev`` (which keeps them under ``.ironlink/dev/``). Nothing here fakes a server:
each launcher runs the real binary and waits until it answers on its port.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
DEBIAN_PACKAGES = {
    "mosquitto": "mosquitto",
    "victoria-metrics": "victoria-metrics",
    "postgres": "postgresql",
    "promtool": "prometheus",
}


class MissingPackageError(RuntimeError):
    """A server binary is missing; the message says which Debian package provides it."""

    def __init__(self, binary: str) -> None:
        package = DEBIAN_PACKAGES.get(binary, binary)
        super().__init__(f"{binary!r} is not installed: run 'apt-get install {package}' (or 'make deps')")


def find_binary(name: str) -> str:
    candidates = [shutil.which(name), str(POSTGRES_BIN / name), f"/usr/sbin/{name}"]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise MissingPackageError(name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def http_ok(url: str, ca_file: Path | None = None) -> bool:
    """True when ``url`` answers 2xx within a second; an ``https`` URL is verified against ``ca_file``."""
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
    try:
        with urllib.request.urlopen(url, timeout=1, context=context) as response:
            return bool(200 <= response.status < 300)
    except (urllib.error.URLError, OSError):
        return False


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} was not ready after {timeout:.0f}s")


def peak_rss_mb(pid: int) -> float:
    """``VmHWM`` (peak resident set) of a running process, in MB (what the benches report)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def service_user(name: str) -> str | None:
    """The unprivileged account a server runs as when we are root; None when we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(name)
    except KeyError:
        return "nobody"
    return name


def hand_over(path: Path, user: str | None) -> None:
    """Give a folder tree to the account a server runs as (no-op when not root)."""
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for item in [path, *path.rglob("*")]:
        os.chown(item, entry.pw_uid, entry.pw_gid)


@dataclass
class Server:
    """A server process: its command line, the account it runs as, its log and readiness check."""

    name: str
    argv: Sequence[str]
    ready: Callable[[], bool]
    log_path: Path
    user: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 30.0
    process: subprocess.Popen[bytes] | None = None
    # Working directory (default: ours); a server running as another account needs one it can enter.
    cwd: Path | None = None

    def command(self) -> list[str]:
        return ["runuser", "-u", self.user, "--", *self.argv] if self.user else list(self.argv)

    def start(self, *, detach: bool = False) -> Server:
        """Start and wait until ready. ``detach`` puts it in its own session so it outlives us."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                start_new_session=detach,
                cwd=self.cwd,
            )
        try:
            wait_until(lambda: self._alive() and self.ready(), self.startup_timeout, self.name)
        except TimeoutError as error:
            self.stop()
            raise TimeoutError(f"{error}; last log lines:\n{self.tail()}") from error
        return self

    def _alive(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}; log:\n{self.tail()}")
        return True

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.stop(signal.SIGKILL)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def dynamic_security_plugin() -> str:
    """Debian's ``mosquitto_dynamic_security.so`` (``dpkg -L mosquitto``), wherever the architecture
    puts it."""
    found = sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so"))
    if not found:
        raise MissingPackageError("mosquitto")
    return str(found[0])


def subject_hash(cert_pem: bytes) -> str:
    """OpenSSL's subject hash of a certificate: its file name (``<hash>.0``) in a ``capath`` folder."""
    argv = [find_binary("openssl"), "x509", "-hash", "-noout"]
    return subprocess.run(argv, input=cert_pem, capture_output=True, check=True).stdout.decode().strip()


def mosquitto(config_path: Path, port: int, log_path: Path) -> Server:
    """Mosquitto with a rendered config; ready once ``port`` accepts connections."""
    return Server(
        name="mosquitto",
        argv=[find_binary("mosquitto"), "-c", str(config_path)],
        ready=lambda: port_open(port),
        log_path=log_path,
    )


# What a SIGKILL of VictoriaMetrics 1.79 (Debian's) may lose: points it answered 204 for within this
# many seconds. Written rows wait up to 2 s in memory (``rawRowsFlushInterval``, 1 s ticks), then sit
# in in-memory parts until one is 5 s old at a 5 s tick (``inmemoryPartsFlushInterval``): up to 12 s,
# plus 1 s for its whole-second clock. Both are constants in 1.79, no flag shortens them (newer
# releases have ``-inmemoryDataFlushInterval``). Measured: 5 s (tests/test_durability.py).
VICTORIA_METRICS_LOSS_WINDOW_S = 13.0


def victoria_metrics(data_dir: Path, port: int, log_path: Path) -> Server:
    """VictoriaMetrics: accepts InfluxDB line protocol on ``/api/v2/write``.

    ``-search.latencyOffset=0s`` lets tests read points as soon as they are flushed
    (``/internal/force_flush``) instead of 30 s later. ``-dedup.minScrapeInterval=1ms`` keeps one
    sample per series and millisecond: a message the broker redelivers after a crash, written
    again with its own timestamp, is stored once (as InfluxDB merges a rewritten point).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    return Server(
        name="victoria-metrics",
        argv=[
            find_binary("victoria-metrics"),
            f"-httpListenAddr=127.0.0.1:{port}",
            f"-storageDataPath={data_dir}",
            "-retentionPeriod=100y",
            "-search.latencyOffset=0s",
            "-search.disableCache",
            "-dedup.minScrapeInterval=1ms",
        ],
        ready=lambda: http_ok(f"http://127.0.0.1:{port}/health"),
        log_path=log_path,
    )


def init_postgres(data_dir: Path, user: str | None, superuser: str = "postgres") -> None:
    """``initdb`` a fresh cluster owned by ``user`` (trust auth on the local socket only)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    hand_over(data_dir, user)
    argv = [
        find_binary("initdb"),
        "-D",
        str(data_dir),
        "-U",
        superuser,
        "--auth-local=trust",
        "--auth-host=scram-sha-256",
        "--encoding=UTF8",
        "--no-instructions",
    ]
    command = ["runuser", "-u", user, "--", *argv] if user else argv
    subprocess.run(command, check=True, capture_output=True)


def postgres(data_dir: Path, port: int, socket_dir: Path, log_path: Path, user: str | None) -> Server:
    """PostgreSQL on 127.0.0.1:``port``; refuses to run as root, so it runs as ``user``."""
    socket_dir.mkdir(parents=True, exist_ok=True)
    hand_over(socket_dir, user)
    return Server(
        name="postgres",
        argv=[
            find_binary("postgres"),
            "-D",
            str(data_dir),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={socket_dir}",
            "-c",
            "fsync=off" if os.environ.get("IRONLINK_PG_FAST") else "fsync=on",
        ],
        ready=lambda: _pg_ready(socket_dir, port),
        log_path=log_path,
        user=user,
    )


def _pg_ready(socket_dir: Path, port: int) -> bool:
    """pg_isready: accepting connections, not merely listening (it listens while still starting)."""
    argv = [find_binary("pg_isready"), "-q", "-h", str(socket_dir), "-p", str(port), "-U", "postgres"]
    return subprocess.run(argv, check=False).returncode == 0
