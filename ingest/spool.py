"""The worker's durable spool: points of a *held* tenant, kept on disk until its store takes them.

Why it exists: MQTT requires PUBACKs in the order the PUBLISHes arrived, and a worker holds one
session for every tenant, so a delivery it cannot acknowledge holds up every delivery behind it.
When one tenant's store route fails (its own InfluxDB down, a revoked token, a deleted bucket), the
worker writes that tenant's points here, then acknowledges the whole batch in order: the other
tenants flow on, and the held tenant's points are drained from here to its store by a thread of
their own once it answers again (:class:`ingest.worker.SpoolDrainer`).

Durability: SQLite in WAL mode with ``synchronous=FULL``, so a committed :meth:`Spool.put` is on
disk (fsynced) before the worker acknowledges anything it holds; a SIGKILL loses nothing the spool
took. Points carry their payload's timestamp, so a point written twice (a drain interrupted between
the write and the delete) is the same point again, not a duplicate.

Bounded: ``max_bytes_per_tenant`` per tenant and ``max_bytes`` in all, counting what a row keeps
(line, payload, topic); keep ``max_bytes`` well below the volume. A tenant at a cap is not spooled
further: the worker dead-letters its messages with reason ``store_unavailable`` (counted, and
replayable from the registry once the store is back), so one tenant's long outage neither fills the
disk nor stops anyone else.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spooled (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    line TEXT NOT NULL,
    ts REAL NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    received_at REAL NOT NULL,
    gateway TEXT,
    boot INTEGER,
    n INTEGER
);
CREATE INDEX IF NOT EXISTS spooled_by_tenant ON spooled (tenant, id);
"""
FILE_NAME = "spool.sqlite3"


@dataclass(frozen=True, slots=True)
class SpooledPoint:
    """A point waiting for its store, with what a dead letter of it would need."""

    id: int
    line: str
    ts: float
    topic: str
    payload: bytes
    received_at: float
    gateway: str | None = None
    boot: int | None = None
    n: int | None = None

    @property
    def seq(self) -> tuple[str, int, int] | None:
        """The v3 sequence id, as :attr:`ingest.pipeline.Point.seq`."""
        if self.gateway is None or self.boot is None or self.n is None:
            return None
        return self.gateway, self.boot, self.n


SpoolEntry = tuple[str, float, str, bytes, float, str | None, int | None, int | None]


class SpoolError(RuntimeError):
    """The spool's disk failed: the worker falls back to holding deliveries unacknowledged."""


class Spool:
    """One SQLite file per worker replica (on its volume), safe to use from two threads."""

    def __init__(self, folder: Path, max_bytes_per_tenant: int, max_bytes: int | None = None) -> None:
        self.max_bytes_per_tenant = max_bytes_per_tenant
        self.max_bytes = max_bytes if max_bytes is not None else max_bytes_per_tenant
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(folder / FILE_NAME, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            rows = self._db.execute(
                "SELECT tenant, COUNT(*),"
                " COALESCE(SUM(LENGTH(line) + LENGTH(payload) + LENGTH(topic)), 0)"
                " FROM spooled GROUP BY tenant"
            ).fetchall()
        except (OSError, sqlite3.Error) as error:
            raise SpoolError(f"spool {folder}: {error}") from error
        self._lock = threading.Lock()
        self._points = {tenant: count for tenant, count, _ in rows}
        self._bytes = {tenant: size for tenant, _, size in rows}

    def tenants(self) -> list[str]:
        """Tenants with spooled points (after a restart too: the spool outlives the process)."""
        with self._lock:
            return [tenant for tenant, count in self._points.items() if count]

    def points(self, tenant: str) -> int:
        with self._lock:
            return self._points.get(tenant, 0)

    def fitting(self, tenant: str, entries: Iterable[SpoolEntry]) -> int:
        """How many of ``entries``, from the first, fit under the tenant's cap and the spool's."""
        with self._lock:
            tenant_room = self.max_bytes_per_tenant - self._bytes.get(tenant, 0)
            room = min(tenant_room, self.max_bytes - sum(self._bytes.values()))
        count = 0
        for entry in entries:
            room -= _size(entry)
            if room < 0:
                break
            count += 1
        return count

    def describe_caps(self) -> str:
        with self._lock:
            used = sum(self._bytes.values())
        return f"{self.max_bytes_per_tenant} bytes per tenant, {self.max_bytes} in all, {used} used"

    def put(self, tenant: str, entries: list[SpoolEntry]) -> None:
        """Append ``(line, ts, topic, payload, received_at, gateway, boot, n)`` rows (the sequence
        id None for unsequenced telemetry) in one fsynced transaction."""
        rows = [(tenant, *entry) for entry in entries]
        with self._lock:
            try:
                with self._transaction():
                    self._db.executemany(
                        "INSERT INTO spooled"
                        " (tenant, line, ts, topic, payload, received_at, gateway, boot, n)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        rows,
                    )
            except sqlite3.Error as error:
                raise SpoolError(f"spool write for tenant {tenant!r}: {error}") from error
            self._points[tenant] = self._points.get(tenant, 0) + len(rows)
            self._bytes[tenant] = self._bytes.get(tenant, 0) + sum(map(_size, entries))

    def oldest(self, tenant: str, limit: int) -> list[SpooledPoint]:
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT id, line, ts, topic, payload, received_at, gateway, boot, n FROM spooled"
                    " WHERE tenant = ? ORDER BY id LIMIT ?",
                    (tenant, limit),
                ).fetchall()
            except sqlite3.Error as error:
                raise SpoolError(f"spool read for tenant {tenant!r}: {error}") from error
        return [SpooledPoint(*row) for row in rows]

    def remove(self, tenant: str, points: list[SpooledPoint]) -> None:
        """Forget points once they are stored (or dead-lettered and confirmed)."""
        with self._lock:
            try:
                with self._transaction():
                    self._db.executemany("DELETE FROM spooled WHERE id = ?", [(p.id,) for p in points])
            except sqlite3.Error as error:
                raise SpoolError(f"spool delete for tenant {tenant!r}: {error}") from error
            self._points[tenant] = max(0, self._points.get(tenant, 0) - len(points))
            self._bytes[tenant] = max(
                0,
                self._bytes.get(tenant, 0) - sum(len(p.line) + len(p.payload) + len(p.topic) for p in points),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT (the fsync), ROLLBACK on error: autocommit mode otherwise."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def _size(entry: SpoolEntry) -> int:
    """What a row keeps, as the caps count it: line, payload, topic."""
    line, _, topic, payload, *_ = entry
    return len(line) + len(payload) + len(topic)
