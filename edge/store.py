"""Store-and-forward on SQLite (WAL): a reading is on disk before it counts, forgotten only on a receipt.

- **Readings** (the history lane, FIFO by seq ``(boot, n)``) hold the exact bytes published, so a
  resend is an identical rewrite. ``latest`` pins, per (machine, metric), the newest reading that
  carries it: the latest-value lane, sent first after a reconnect and never dropped by a cap.
- **Seq**: ``boot`` is a counter kept in the file, raised at every open; ``n`` counts from 0 in it.
- **Durability**: ``always`` commits each batch of readings with ``synchronous=FULL`` (fsynced);
  ``batch:<ms>`` commits at most every <ms> with ``synchronous=NORMAL`` (a kill -9 loses at most
  the open batch; a power cut may lose commits since the last checkpoint).
- **Caps**: the file (database, WAL and shared-memory file together) stays under ``max_bytes``
  (``max_page_count`` enforces it, the WAL is checkpointed and truncated early); free disk under
  ``min_free_bytes`` and readings older than ``max_age_s`` drop history too. The oldest unpinned
  readings go first; every drop is summed into a **gap** (machine, time range, count, reason) that
  the uplink sends upstream.
- **Corruption**: a file SQLite cannot read, or that fails ``quick_check``, is moved aside to
  ``<name>.corrupt-<time>`` and a fresh store starts; ``moved_aside`` says where it went.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edge.normalize import Normalized, payload_with_seq

Key = tuple[int, int]  # (boot, n)
PAGE_SIZE = 4096
SHM_BYTES = 64 * 1024  # the -shm file: 32 KiB per 4,000 WAL frames, counted generously
DROP_REASONS = ("max_bytes", "disk_headroom", "max_age")

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
    last_boot INTEGER NOT NULL, last_n INTEGER NOT NULL, PRIMARY KEY (machine, reason)) WITHOUT ROWID;
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
        # a quarter of the cap, checkpointed at a quarter of that.
        wal_reserve = max(64 * 1024, min(max_bytes // 4, 16 * 1024 * 1024))
        self.max_bytes = max_bytes
        self._db_pages = (max_bytes - wal_reserve - SHM_BYTES) // PAGE_SIZE
        self._wal_pages = max(4, wal_reserve // PAGE_SIZE // 4)
        self._wal_limit = wal_reserve
        self.drops: Counter[str] = Counter()
        self.moved_aside: Path | None = None
        self._open_since: float | None = None
        self._last_sweep = 0.0
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = self._open()
        self.boot = self._next_boot()
        self._n = 0

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

    def close(self) -> None:
        self.commit()
        self.db.close()

    # ------------------------------------------------------------------------------- taking
    @property
    def next_key(self) -> Key:
        return self.boot, self._n

    def add(self, readings: list[Normalized], now: float | None = None) -> list[Row]:
        """Store readings with their seq; with ``always`` they are fsynced when this returns."""
        if not readings:
            return []
        now = time.time() if now is None else now
        rows = []
        self._begin()
        try:
            for reading in readings:
                key = (self.boot, self._n)
                payload = payload_with_seq(reading.document, self.gateway, *key)
                self._insert(key, reading, payload)
                self._n += 1
                rows.append(Row(key, reading.machine_id, reading.ts, payload))
        except BaseException:
            self._rollback()
            raise
        self._enforce_caps(now)
        if self.batch_ms is None or (now - (self._open_since or now)) * 1000 >= self.batch_ms:
            self.commit()
        return rows

    def _insert(self, key: Key, reading: Normalized, payload: bytes) -> None:
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
                return
            except sqlite3.OperationalError as error:  # max_page_count reached: make room
                if "full" not in str(error) or attempt == 7 or not self._drop_oldest(0.1, "max_bytes"):
                    raise

    def _begin(self) -> None:
        if self._open_since is None:
            self.db.execute("BEGIN IMMEDIATE")
            self._open_since = time.time()

    def commit(self) -> None:
        """Commit the open batch (``batch:<ms>`` calls this from a timer too)."""
        if self._open_since is not None:
            self.db.execute("COMMIT")
            self._open_since = None

    def _rollback(self) -> None:
        if self._open_since is not None:
            self.db.execute("ROLLBACK")
            self._open_since = None

    # ---------------------------------------------------------------------------------- caps
    def used_bytes(self) -> int:
        """Pages in use (not free) plus the WAL and shared-memory files: what the cap counts."""
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * PAGE_SIZE + self._wal_bytes()

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
            f"SELECT boot, n, machine, ts FROM readings r WHERE ts < ? AND {_UNPINNED}",
            (now - self.max_age_s,),
        ).fetchall()
        self._drop(old, "max_age")

    def _free_disk(self) -> int:
        stat = os.statvfs(self.path.parent)
        return stat.f_bavail * stat.f_frsize

    def _drop_oldest(self, share: float, reason: str) -> bool:
        """Drop the oldest ``share`` of unpinned readings (at least one); False when none is left."""
        total = self.db.execute("SELECT count(*) FROM readings").fetchone()[0]
        victims = self.db.execute(
            f"SELECT boot, n, machine, ts FROM readings r WHERE {_UNPINNED} ORDER BY boot, n LIMIT ?",
            (max(1, int(total * share)),),
        ).fetchall()
        self._drop(victims, reason)
        return bool(victims)

    def _drop(self, victims: list[tuple[int, int, str, float]], reason: str) -> None:
        if not victims:
            return
        self.db.executemany(
            "DELETE FROM readings WHERE boot = ? AND n = ?", [(b, n) for b, n, _, _ in victims]
        )
        self.drops[reason] += len(victims)
        by_machine: dict[str, list[tuple[int, int, str, float]]] = {}
        for victim in victims:
            by_machine.setdefault(victim[2], []).append(victim)
        for machine, rows in by_machine.items():
            first, last = min(rows), max(rows)
            self.db.execute(
                """INSERT INTO gaps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (machine, reason) DO UPDATE SET
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
        rows = self.db.execute(
            """SELECT DISTINCT r.boot, r.n, r.machine, r.ts, r.payload FROM latest l
               JOIN readings r ON r.boot = l.boot AND r.n = l.n WHERE l.machine = ? ORDER BY r.boot, r.n""",
            (machine,),
        ).fetchall()
        return [Row((b, n), m, ts, p) for b, n, m, ts, p in rows]

    def history(self, machine: str, after: Key, before: Key, limit: int) -> list[Row]:
        """Oldest first: readings of a machine with ``after < seq < before``."""
        rows = self.db.execute(
            """SELECT boot, n, machine, ts, payload FROM readings
               WHERE machine = ? AND (boot, n) > (?, ?) AND (boot, n) < (?, ?) ORDER BY boot, n LIMIT ?""",
            (machine, *after, *before, limit),
        ).fetchall()
        return [Row((b, n), m, ts, p) for b, n, m, ts, p in rows]

    def has_history(self, machine: str, before: Key) -> bool:
        return bool(
            self.db.execute(
                "SELECT 1 FROM readings WHERE machine = ? AND (boot, n) < (?, ?) LIMIT 1", (machine, *before)
            ).fetchone()
        )

    def confirm(self, machine: str, ranges: list[tuple[int, int, int]]) -> int:
        """A receipt: the worker stored these seq ranges of ``machine``; forget them."""
        self._begin()
        removed = 0
        for boot, first, last in ranges:
            removed += self.db.execute(
                "DELETE FROM readings WHERE machine = ? AND boot = ? AND n BETWEEN ? AND ?",
                (machine, boot, first, last),
            ).rowcount
        self.commit()
        return removed

    def gaps(self) -> list[Gap]:
        rows = self.db.execute("SELECT * FROM gaps ORDER BY machine, reason").fetchall()
        return [Gap(m, r, f, la, c, (fb, fn), (lb, ln)) for m, r, f, la, c, fb, fn, lb, ln in rows]

    def gap_sent(self, gap: Gap) -> None:
        """Forget a gap once the broker took it, unless more was dropped meanwhile (then its count grew)."""
        self._begin()
        self.db.execute(
            "DELETE FROM gaps WHERE machine = ? AND reason = ? AND count = ?",
            (gap.machine, gap.reason, gap.count),
        )
        self.commit()

    # -------------------------------------------------------------------------------- health
    def backlog(self, now: float | None = None) -> dict[str, float]:
        now = time.time() if now is None else now
        count, oldest, payload = self.db.execute(
            "SELECT count(*), min(ts), coalesce(sum(length(payload)), 0) FROM readings"
        ).fetchone()
        return {
            "messages": count,
            "payload_bytes": payload,
            "store_bytes": self.used_bytes(),
            "oldest_unsent_age_s": round(now - oldest, 3) if oldest is not None else 0.0,
        }
