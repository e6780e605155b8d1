"""Store-and-forward on SQLite (WAL): a reading is on disk before it counts, forgotten only on a receipt.

- **Readings** (the history lane, FIFO by seq ``(boot, n)``) hold the exact bytes published, so a
  resend is an identical rewrite. ``latest`` pins, per (machine, metric), the newest reading that
  carries it: the latest-value lane, sent first after a reconnect and never dropped by a cap.
- **Seq**: ``boot`` is a counter kept in the file, raised at every open; ``n`` counts from 0 in it.
- **One writer thread** owns the writing connection: :meth:`submit`, :meth:`confirm` and
  :meth:`gap_sent` queue jobs and return a :class:`~concurrent.futures.Future`; the caller (the
  agent's event loop) never waits for a commit or an fsync. Jobs run in arrival order; those queued
  while a commit was under way share the next transaction (group commit: one fsync for many
  readings). Reads (:meth:`pinned`, :meth:`history`, :meth:`gaps`) use a second connection and see
  committed data only.
- **Durability**: ``always`` (``batch_ms=None``) commits with ``synchronous=FULL`` and resolves a
  reading's future only after its commit returned: a reading counts as taken once fsynced, so a
  kill -9 or a power cut loses nothing that counted (what was still queued had not counted yet).
  ``batch:<ms>`` resolves a future once the reading is in the open transaction and commits at most
  <ms> after that transaction began (``synchronous=NORMAL``): a kill -9 loses at most the last <ms>
  of readings; a power cut may also lose commits since the last WAL checkpoint.
- **Caps**: the file (database, WAL and shared-memory file together) stays under ``max_bytes``
  (``max_page_count`` enforces it, the WAL is checkpointed and truncated early, and a transaction
  is committed once it wrote a share of the WAL's reserve); free disk under ``min_free_bytes`` and
  readings older than ``max_age_s`` drop history too. The oldest unpinned readings go first; every
  drop is summed into a **gap** (machine, time range, count, reason) that the uplink sends upstream.
  A transaction the disk refused loses its readings; they are counted as ``store_error`` drops.
- **Closing** (:meth:`close`) runs what is queued and commits it; with a ``timeout``, jobs still
  queued when it passed are not run: their futures fail with :class:`StoreClosed` and their
  readings, which had not counted as taken (no seq, never sent), are counted as ``shutdown`` drops.
  What ran is committed, so nothing that counted as taken is lost.
- **Corruption**: a file SQLite cannot read, or that fails ``quick_check``, is moved aside to
  ``<name>.corrupt-<time>`` and a fresh store starts; ``moved_aside`` says where it went.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.normalize import Normalized, payload_with_seq

Key = tuple[int, int]  # (boot, n)
PAGE_SIZE = 4096
SHM_BYTES = 64 * 1024  # the -shm file: 32 KiB per 4,000 WAL frames, counted generously
DROP_REASONS = ("max_bytes", "disk_headroom", "max_age")
STORE_ERROR = "store_error"  # a commit the disk refused: its readings are lost, and counted
SHUTDOWN = "shutdown"  # queued when the store closed and not reached within its bound: never taken
MAX_JOBS_PER_TRANSACTION = 2000
_log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS readings (
    boot INTEGER NOT NULL, n INTEGER NOT NULL, machine TEXT NOT NULL, ts REAL NOT NULL,
    payload BLOB NOT NULL, PRIMARY KEY (boot, n)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS readings_by_machine ON readings (machine, boot, n);
CREATE TABLE IF NOT EXISTS latest (
    machine TEXT NOT NULL, metric TEXT NOT NULL, boot INTEGER NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (machine, metric)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS latest_by_seq ON latest (boot, n);
CREATE TABLE IF NOT EXISTS gaps (
    machine TEXT NOT NULL, reason TEXT NOT NULL, first_ts REAL NOT NULL, last_ts REAL NOT NULL,
    count INTEGER NOT NULL, first_boot INTEGER NOT NULL, first_n INTEGER NOT NULL,
    last_boot INTEGER NOT NULL, last_n INTEGER NOT NULL,
    PRIMARY KEY (machine, reason, first_boot)) WITHOUT ROWID;
"""
_UNPINNED = "NOT EXISTS (SELECT 1 FROM latest l WHERE l.boot = r.boot AND l.n = r.n)"


@dataclass(frozen=True)
class Row:
    key: Key
    machine: str
    ts: float
    payload: bytes


@dataclass(frozen=True)
class Gap:
    """Readings a cap dropped before they were confirmed: what the cloud is told it will not get."""

    machine: str
    reason: str
    first_ts: float
    last_ts: float
    count: int
    first_seq: Key
    last_seq: Key


class StoreClosed(RuntimeError):
    """The store closed before this job ran."""


@dataclass
class _Job:
    """Work for the writer thread; ``future`` gets ``run``'s result (see ``early``)."""

    run: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)
    readings: int = 0  # readings it inserts: lost as ``store_error`` if their transaction fails
    early: bool = False  # resolved when run (batch:<ms> readings), not after the commit
    commit: bool = False  # commit right after it (a flush)
    result: Any = None


@dataclass(frozen=True)
class _Backlog:
    """What the store holds, as of the last commit (the writer publishes it whole)."""

    messages: int = 0
    payload_bytes: int = 0
    store_bytes: int = 0
    oldest_ts: float | None = None


class EdgeStore:
    def __init__(
        self,
        path: Path,
        *,
        gateway: str,
        batch_ms: int | None = None,
        max_bytes: int = 256 * 1024 * 1024,
        min_free_bytes: int = 0,
        max_age_s: float = 30 * 86400,
    ) -> None:
        self.path, self.gateway, self.batch_ms = path, gateway, batch_ms
        self.max_age_s, self.min_free_bytes = max_age_s, min_free_bytes
        # The WAL grows past its checkpoint size by one transaction (a drop rewrites many pages):
        # a quarter of the cap, checkpointed at a quarter of that; a transaction commits once its
        # readings reach an eighth of it.
        wal_reserve = max(64 * 1024, min(max_bytes // 4, 16 * 1024 * 1024))
        self.max_bytes = max_bytes
        self._db_pages = (max_bytes - wal_reserve - SHM_BYTES) // PAGE_SIZE
        self._wal_pages = max(4, wal_reserve // PAGE_SIZE // 4)
        self._wal_limit = wal_reserve
        self._transaction_bytes = wal_reserve // 8
        # Replaced whole by the writer thread, never changed in place: safe to read from any thread.
        self.drops: Counter[str] = Counter()
        self.moved_aside: Path | None = None
        self._last_sweep = 0.0
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = self._open()  # the writer's connection: only the writer thread uses it from now on
        self.boot = self._next_boot()
        self._n = 0
        self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._reader.execute("PRAGMA busy_timeout = 5000")
        self._messages, self._payload_bytes = self.db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM readings"
        ).fetchone()
        self._backlog = self._measure()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closing = False
        self._close_by: float | None = None  # monotonic: jobs queued past it are refused, not run
        self._writer = threading.Thread(target=self._write, name="store-writer", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------------------- opening
    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as error:
            self.moved_aside = self._move_aside(str(error))
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            db.execute("PRAGMA journal_mode = WAL")
            verdict = db.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {verdict}")
            db.execute(f"PRAGMA synchronous = {'FULL' if self.batch_ms is None else 'NORMAL'}")
            db.execute(f"PRAGMA wal_autocheckpoint = {self._wal_pages}")
            db.execute(f"PRAGMA journal_size_limit = {self._wal_limit}")
            db.execute(f"PRAGMA max_page_count = {max(self._db_pages, 16)}")
            db.executescript(_SCHEMA)
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _move_aside(self, why: str) -> Path:
        target = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                os.replace(source, Path(f"{target}{suffix}"))
        (target.parent / f"{target.name}.why").write_text(why + "\n")
        return target

    def _next_boot(self) -> int:
        self.db.execute("BEGIN IMMEDIATE")
        row = self.db.execute("SELECT value FROM meta WHERE key = 'boot'").fetchone()
        boot = 0 if row is None else int(row[0]) + 1
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('boot', ?)", (boot,))
        self.db.execute("COMMIT")
        return boot

    def close(self, timeout: float | None = None) -> int:
        """Commit what is queued, stop the writer, close both connections. With ``timeout`` (seconds),
        what is still queued then is refused (see Closing): how many readings that was."""
        if self._closing:
            return 0
        self._closing = True
        self._close_by = None if timeout is None else time.monotonic() + timeout
        before = self.drops[SHUTDOWN]
        self._jobs.put(None)
        self._writer.join()
        self._reader.close()
        self.db.close()
        return self.drops[SHUTDOWN] - before

    # ------------------------------------------------------------------------------- writing
    def _queue(self, job: _Job) -> Future[Any]:
        if self._closing or not self._writer.is_alive():
            raise StoreClosed("the store is closed")
        self._jobs.put(job)
        return job.future

    def _write(self) -> None:
        """The writer thread: jobs in order, as many per transaction as were queued meanwhile (within
        the transaction's budget); ``batch:<ms>`` keeps a transaction open up to <ms>."""
        window = (self.batch_ms or 0) / 1000
        done: list[_Job] = []  # run in the open transaction, resolved at its commit
        began, written, first_n = 0.0, 0, 0
        while True:
            if not done:
                job = self._jobs.get()
            else:
                try:
                    job = self._jobs.get(timeout=max(0.0, began + window - time.monotonic()))
                except queue.Empty:
                    job = _IDLE
            if job is None:
                break
            if job is not _IDLE and self._close_by is not None and time.monotonic() > self._close_by:
                self._refuse(job)
                continue
            if job is not _IDLE:
                try:
                    if not done:
                        began, written, first_n = time.monotonic(), self._payload_bytes, self._n
                        self.db.execute("BEGIN IMMEDIATE")
                    job.result = job.run()
                except Exception as error:  # the transaction is lost: count it, say so, go on
                    self._abandon([*done, job], first_n, error)
                    done = []
                    continue
                if job.early:
                    job.future.set_result(job.result)
                done.append(job)
            full = (
                job.commit
                or len(done) >= MAX_JOBS_PER_TRANSACTION
                or self._payload_bytes - written >= self._transaction_bytes
            )
            due = time.monotonic() - began >= window and (window > 0 or self._jobs.empty())
            if done and (job is _IDLE or full or due):
                self._commit(done, first_n)
                done = []
        if done:
            self._commit(done, first_n)

    def _commit(self, jobs: list[_Job], first_n: int) -> None:
        try:
            self._enforce_caps(time.time())
            self.db.execute("COMMIT")
        except sqlite3.Error as error:
            self._abandon(jobs, first_n, error)
            return
        self._backlog = self._measure()
        for job in jobs:
            if not job.early:
                job.future.set_result(job.result)

    def _abandon(self, jobs: list[_Job], first_n: int, error: Exception) -> None:
        """A transaction that failed: roll back, count its readings as lost, fail its futures."""
        _log.error("store transaction failed: %s", error)
        with contextlib.suppress(sqlite3.Error):
            self.db.execute("ROLLBACK")
        if not any(job.early for job in jobs):  # none of them counted (nor was sent): seqs again
            self._n = first_n
        with contextlib.suppress(sqlite3.Error):  # else the counts stay as they were
            self._messages, self._payload_bytes = self.db.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM readings"
            ).fetchone()
        self.drops = self.drops + Counter({STORE_ERROR: sum(job.readings for job in jobs)})
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)

    def _refuse(self, job: _Job) -> None:
        """A job queued at a bounded close, not reached in time: never run, its readings counted."""
        if job.readings:
            self.drops = self.drops + Counter({SHUTDOWN: job.readings})
        job.future.set_exception(StoreClosed("the store closed before this job ran"))

    def _measure(self) -> _Backlog:
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        oldest = self.db.execute("SELECT ts FROM readings ORDER BY boot, n LIMIT 1").fetchone()
        return _Backlog(
            self._messages,
            self._payload_bytes,
            (pages - free) * PAGE_SIZE + self._wal_bytes(),
            oldest[0] if oldest else None,
        )

    # ------------------------------------------------------------------------------- taking
    @property
    def next_key(self) -> Key:
        """The seq the next reading will get (every reading taken from now on has this or higher)."""
        return self.boot, self._n

    def submit(self, readings: list[Normalized]) -> Future[list[Row]]:
        """Queue readings; the future has their rows once they count as taken (see Durability)."""
        return self._queue(
            _Job(
                lambda: [self._insert(reading) for reading in readings],
                readings=len(readings),
                early=self.batch_ms is not None,
            )
        )

    def add(self, readings: list[Normalized]) -> list[Row]:
        """:meth:`submit` and wait: with ``always`` the readings are fsynced when this returns."""
        return self.submit(readings).result() if readings else []

    def flush(self) -> None:
        """Wait until everything queued before is committed (``batch:<ms>`` included)."""
        self._queue(_Job(lambda: None, commit=True)).result()

    def _insert(self, reading: Normalized) -> Row:
        key = (self.boot, self._n)
        payload = payload_with_seq(reading.document, self.gateway, *key)
        for attempt in range(8):
            try:
                self.db.execute(
                    "INSERT INTO readings VALUES (?, ?, ?, ?, ?)",
                    (*key, reading.machine_id, reading.ts, payload),
                )
                self.db.executemany(
                    "INSERT OR REPLACE INTO latest VALUES (?, ?, ?, ?)",
                    [(reading.machine_id, metric, *key) for metric in reading.metrics],
                )
                break
            except sqlite3.OperationalError as error:  # max_page_count reached: make room
                if "full" not in str(error) or attempt == 7 or not self._drop_oldest(0.1, "max_bytes"):
                    raise
        self._n += 1
        self._messages += 1
        self._payload_bytes += len(payload)
        return Row(key, reading.machine_id, reading.ts, payload)

    # ---------------------------------------------------------------------------------- caps
    def used_bytes(self) -> int:
        """Pages in use (not free) plus the WAL and shared-memory files, as of the last commit:
        what the cap counts."""
        return self._backlog.store_bytes

    def file_bytes(self) -> int:
        """What the store occupies on disk: database, WAL and shared-memory files."""
        return sum(
            Path(f"{self.path}{suffix}").stat().st_size
            for suffix in ("", "-wal", "-shm")
            if Path(f"{self.path}{suffix}").exists()
        )

    def _wal_bytes(self) -> int:
        with contextlib.suppress(OSError):
            return Path(f"{self.path}-wal").stat().st_size
        return 0

    def _enforce_caps(self, now: float) -> None:
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        if pages - free > self._db_pages * 0.95:
            self._drop_oldest(0.05, "max_bytes")
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        while self.min_free_bytes and self._free_disk() < self.min_free_bytes:
            if not self._drop_oldest(0.1, "disk_headroom"):
                break
        old = self.db.execute(
            f"SELECT boot, n, machine, ts, length(payload) FROM readings r WHERE ts < ? AND {_UNPINNED}",
            (now - self.max_age_s,),
        ).fetchall()
        self._drop(old, "max_age")

    def _free_disk(self) -> int:
        stat = os.statvfs(self.path.parent)
        return stat.f_bavail * stat.f_frsize

    def _drop_oldest(self, share: float, reason: str) -> bool:
        """Drop the oldest ``share`` of unpinned readings (at least one); False when none is left."""
        victims = self.db.execute(
            f"""SELECT boot, n, machine, ts, length(payload) FROM readings r WHERE {_UNPINNED}
                ORDER BY boot, n LIMIT ?""",
            (max(1, int(self._messages * share)),),
        ).fetchall()
        self._drop(victims, reason)
        return bool(victims)

    def _drop(self, victims: list[tuple[int, int, str, float, int]], reason: str) -> None:
        if not victims:
            return
        self.db.executemany("DELETE FROM readings WHERE boot = ? AND n = ?", [(b, n) for b, n, *_ in victims])
        self._messages -= len(victims)
        self._payload_bytes -= sum(victim[4] for victim in victims)
        self.drops = self.drops + Counter({reason: len(victims)})
        # A gap per machine and boot: its seq range is one boot's (contract v4's gap record).
        by_machine: dict[tuple[str, int], list[tuple[int, int, str, float, int]]] = {}
        for victim in victims:
            by_machine.setdefault((victim[2], victim[0]), []).append(victim)
        for (machine, _), rows in by_machine.items():
            first, last = min(rows), max(rows)
            self.db.execute(
                """INSERT INTO gaps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (machine, reason, first_boot) DO UPDATE SET
                     first_ts = min(first_ts, excluded.first_ts), last_ts = max(last_ts, excluded.last_ts),
                     count = count + excluded.count,
                     last_boot = excluded.last_boot, last_n = excluded.last_n""",
                (
                    machine,
                    reason,
                    min(r[3] for r in rows),
                    max(r[3] for r in rows),
                    len(rows),
                    first[0],
                    first[1],
                    last[0],
                    last[1],
                ),
            )

    # ------------------------------------------------------------------------------- sending
    def pinned(self, machine: str) -> list[Row]:
        """The latest-value lane of a machine: readings that are still some metric's newest."""
        rows = self._reader.execute(
            """SELECT DISTINCT r.boot, r.n, r.machine, r.ts, r.payload FROM latest l
               JOIN readings r ON r.boot = l.boot AND r.n = l.n WHERE l.machine = ? ORDER BY r.boot, r.n""",
            (machine,),
        ).fetchall()
        return [Row((b, n), m, ts, p) for b, n, m, ts, p in rows]

    def history(self, machine: str, after: Key, before: Key, limit: int) -> list[Row]:
        """Oldest first: committed readings of a machine with ``after < seq < before``."""
        rows = self._reader.execute(
            """SELECT boot, n, machine, ts, payload FROM readings
               WHERE machine = ? AND (boot, n) > (?, ?) AND (boot, n) < (?, ?) ORDER BY boot, n LIMIT ?""",
            (machine, *after, *before, limit),
        ).fetchall()
        return [Row((b, n), m, ts, p) for b, n, m, ts, p in rows]

    def has_history(self, machine: str, before: Key) -> bool:
        return bool(
            self._reader.execute(
                "SELECT 1 FROM readings WHERE machine = ? AND (boot, n) < (?, ?) LIMIT 1", (machine, *before)
            ).fetchone()
        )

    def confirm(self, machine: str, ranges: list[tuple[int, int, int]]) -> Future[int]:
        """A receipt: the worker stored these seq ranges of ``machine``; forget them. The future has
        how many readings were forgotten."""

        def forget() -> int:
            removed = 0
            for boot, first, last in ranges:
                lengths = self.db.execute(
                    """DELETE FROM readings WHERE machine = ? AND boot = ? AND n BETWEEN ? AND ?
                       RETURNING length(payload)""",
                    (machine, boot, first, last),
                ).fetchall()
                removed += len(lengths)
                self._payload_bytes -= sum(length for (length,) in lengths)
            self._messages -= removed
            return removed

        return self._queue(_Job(forget))

    def gaps(self) -> list[Gap]:
        rows = self._reader.execute("SELECT * FROM gaps ORDER BY machine, reason").fetchall()
        return [Gap(m, r, f, la, c, (fb, fn), (lb, ln)) for m, r, f, la, c, fb, fn, lb, ln in rows]

    def gap_sent(self, gap: Gap) -> Future[None]:
        """Forget a gap once the worker confirmed it stored, unless more was dropped meanwhile (then
        its count grew)."""
        return self._queue(
            _Job(
                lambda: self.db.execute(
                    """DELETE FROM gaps
                       WHERE machine = ? AND reason = ? AND first_boot = ? AND first_n = ? AND count = ?""",
                    (gap.machine, gap.reason, *gap.first_seq, gap.count),
                ).close()
            )
        )

    # -------------------------------------------------------------------------------- health
    def backlog(self, now: float | None = None) -> dict[str, float]:
        """What waits for a receipt, as of the last commit (counted by the writer, not scanned)."""
        now = time.time() if now is None else now
        backlog = self._backlog
        oldest = backlog.oldest_ts
        return {
            "messages": backlog.messages,
            "payload_bytes": backlog.payload_bytes,
            "store_bytes": backlog.store_bytes,
            "oldest_unsent_age_s": round(now - oldest, 3) if oldest is not None else 0.0,
        }


_IDLE = _Job(lambda: None)  # the writer's own marker: a batch window ended with nothing new
