"""Pid records for detached servers: is a process alive, which config it runs, how to stop it.

``ironlink dev up`` starts each server in its own session (``Server.start(detach=True)``) and exits;
later commands find them again through ``run/<name>.pid``, a small JSON record:

- ``pid``: the server process itself (for a server started through ``runuser``, runuser's child),
  what ``status`` checks and a crash kills;
- ``pgid``: its session's process group, so that ``down`` also reaps whatever the server left
  behind (an orphan whose runuser parent was killed);
- ``workdir`` and ``comm``: the server's own folder (its working directory) and program name.
  PostgreSQL's children leave the process group (``setsid``), so a leftover is also recognised
  by running the server's program in the server's folder;
- ``fingerprint``: a digest of the command line, environment and config files it was started
  with, so that ``up`` restarts a server whose configuration changed and leaves the others alone.

Liveness is read from ``/proc``: a zombie (killed, not yet reaped by its parent) counts as dead, and
so does a recycled pid (the record keeps the boot id and the process start time, which a new
process with the same pid after a reboot or a wrap-around does not share).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError


class ProcessRecord(BaseModel):
    """What ``run/<name>.pid`` holds about one detached server."""

    model_config = ConfigDict(frozen=True)

    name: str
    pid: int
    pgid: int
    port: int
    fingerprint: str
    user: str | None = None
    workdir: str | None = None
    comm: str = ""
    boot_id: str
    start_ticks: int

    @classmethod
    def of(
        cls,
        name: str,
        pid: int,
        pgid: int,
        port: int,
        fingerprint: str,
        user: str | None,
        workdir: Path | None = None,
    ) -> ProcessRecord:
        stat = _stat(pid)
        if stat is None:
            raise RuntimeError(f"{name} (pid {pid}) exited while starting")
        return cls(
            name=name,
            pid=pid,
            pgid=pgid,
            port=port,
            fingerprint=fingerprint,
            user=user,
            workdir=str(workdir) if workdir else None,
            comm=stat.comm,
            boot_id=boot_id(),
            start_ticks=stat.start_ticks,
        )

    @property
    def alive(self) -> bool:
        """True while the recorded process itself runs (not a zombie, not a recycled pid)."""
        if self.boot_id != boot_id():
            return False
        _reap(self.pid)
        stat = _stat(self.pid)
        return stat is not None and stat.running and stat.start_ticks == self.start_ticks


class CorruptRecordError(ValueError):
    """A pid file that cannot be read; the message names the file."""


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


@dataclass(frozen=True)
class _Stat:
    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    start_ticks: int

    @property
    def running(self) -> bool:
        return self.state not in ("Z", "X")


def _stat(pid: int) -> _Stat | None:
    """``/proc/<pid>/stat``; None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields after it are fixed
    # (state is field 3, ppid 4, pgrp 5, starttime 22).
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return _Stat(pid, comm, fields[0], int(fields[1]), int(fields[2]), int(fields[19]))


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status when it is our own child, so that it does not stay a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _processes() -> Iterator[_Stat]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat.running:
                yield stat


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``."""
    return sorted(stat.pid for stat in _processes() if stat.pgrp == pgid)


def leftovers(record: ProcessRecord) -> list[int]:
    """Live processes the server left: its process group, and its program still running in its
    folder (whoever else works in that folder, a shell say, is not the server's)."""
    found = set(group_members(record.pgid))
    if record.workdir:
        for stat in _processes():
            if stat.comm == record.comm and _cwd(stat.pid) == record.workdir:
                found.add(stat.pid)
    return sorted(found)


def _cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def children(pid: int) -> list[int]:
    return sorted(stat.pid for stat in _processes() if stat.ppid == pid)


def server_pid(leader: int, through_runuser: bool, timeout: float = 5.0) -> int:
    """The server's own pid: ``leader`` itself, or runuser's child when it was started through runuser."""
    if not through_runuser:
        return leader
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = children(leader)
        if found:
            return found[0]
        time.sleep(0.02)
    raise RuntimeError(f"runuser (pid {leader}) started no server within {timeout:.0f}s")


def listening(port: int) -> bool:
    """True when some socket listens on TCP ``port`` (read from ``/proc/net``: unlike a test
    connection, this leaves no "client disconnected" line in the server's log)."""
    wanted = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[1].endswith(wanted) and fields[3] == "0A":  # local_address, st == LISTEN
                return True
    return False


def fingerprint(argv: Sequence[str], env: Mapping[str, str], files: Iterable[Path]) -> str:
    """Digest of what a server was started with; a change means ``up`` must restart it."""
    digest = hashlib.sha256()
    for part in argv:
        digest.update(part.encode() + b"\0")
    for key in sorted(env):
        digest.update(f"{key}={env[key]}".encode() + b"\0")
    for path in sorted(files):
        digest.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


class PidFiles:
    """The ``run/`` folder: one ``<name>.pid`` JSON record per detached server."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.pid"

    def write(self, record: ProcessRecord) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = self.path(record.name).with_suffix(".tmp")
        temporary.write_text(record.model_dump_json(indent=2) + "\n")
        temporary.replace(self.path(record.name))

    def read(self, name: str) -> ProcessRecord | None:
        path = self.path(name)
        try:
            return ProcessRecord.model_validate_json(path.read_text())
        except FileNotFoundError:
            return None
        except ValidationError as error:
            raise CorruptRecordError(
                f"{path}: is not a pid record ({error.error_count()} problems)"
            ) from error

    def remove(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)


def stop(record: ProcessRecord, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Stop a server with ``sig``, then clear its process group.

    The server gets ``timeout`` seconds to shut down cleanly (SIGKILL after that); whatever it left
    (:func:`leftovers`) gets two seconds to follow, then SIGKILL. A record from an earlier boot
    names no process of ours: nothing is signalled.
    """
    if record.boot_id != boot_id():
        return
    if record.alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, sig)
        if not _wait(lambda: not record.alive, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGKILL)
            _wait(lambda: not record.alive, 5)
    if not _wait(lambda: not leftovers(record), 2):
        for pid in leftovers(record):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait(lambda: not leftovers(record), 5)
    _reap(record.pgid)


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()
