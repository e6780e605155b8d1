"""Usage metering in the worker: what each tenant sent, counted once per point, for usage-based
pricing, and its monthly message quota (issue 13 item 4).

What counts: every point the store took (direct or drained from the spool) is one usage event,
identified like the point itself, (tenant, site, machine, ts in ms): the identity that makes a
redelivered message rewrite the same point. A message delivered twice, redelivered after a
SIGKILL, replayed by an edge gateway or from the dead letters, is the same identity again and is
counted once (``registry/usage.py`` dedupes in the registry, across replicas, for
``usage_dedupe_hours`` after the first copy). Dead-lettered messages are not usage.

Off the hot path: :meth:`UsageMeter.record` only appends a line per point to a local journal
(``<spool_dir>/usage``, one ``write`` per batch, before the batch is acknowledged); a thread of
its own writes the journal to the registry every ``usage_flush_s``, one statement per chunk,
and reads back each tenant's month so far for the quota.

SIGKILL: the journal is written (to the OS) before the batch's PUBACKs, so a SIGKILL loses no
count of what was acknowledged; the next start writes what the journal holds. Counts of a batch
killed before its acknowledgement are journalled or not, and its messages are redelivered:
either way their identities are counted once. Only a crash of the node itself may lose the last
unsynced journal lines (no fsync on the hot path), and a journal past ``usage_journal_max_bytes``
(a registry away for long) counts what it cannot keep as lost (``usage_lost_events_total``).

Quota: a tenant whose route has ``messages_per_month`` (its tier's, ``infra/config.py``) is warned
at 80 % (a ``usage_soft_quota_reached`` log event, ``usage_quota_reached_total{level="soft"}``, the
registry's ``usage_quota_flags`` row the API shows) and at 100 % its further messages are
dead-lettered ``monthly_quota_exceeded`` (counted like every dead letter) until the month ends.
The month so far is the registry's, read after each flush, plus what this replica admitted since:
with several replicas the limit may be passed by what the others admit in one flush interval.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Protocol

import psycopg
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from ingest.contract import parse_topic
from ingest.settings import WorkerSettings
from ingest.spool import SpoolError
from registry.tenant_routes import TenantStoreRoutes
from registry.usage import (
    UsageEvent,
    flag_quota,
    month_messages,
    month_start,
    prune_usage,
    quota_levels,
    record_usage,
)

log = structlog.get_logger("ingest.usage")
CHUNK_EVENTS = 5000
"""Events per registry statement: a journal left by a long registry outage goes in pieces."""
PRUNE_EVERY_S = 600.0
MAX_TOPICS = 100_000
"""Topics whose site and machine are remembered (bounded: one per machine in practice)."""
CONNECT_TIMEOUT_S = 5


class Stored(Protocol):
    """A point the store took (``ingest.pipeline.Point`` or a spooled one): its ts."""

    @property
    def ts(self) -> float: ...


class Source(Protocol):
    """The message a point came from (a delivery or a spooled point)."""

    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def received_at(self) -> float: ...


class UsageJournal:
    """Usage events not yet in the registry, as tab-separated lines in append-only files: the one
    being written (``.open``) and sealed ones (``.tsv``) waiting for the registry. Files of a
    previous run, killed or not, are sealed at start and written first."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self._written = 0
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for left in folder.glob("*.open"):
                left.rename(left.with_suffix(".tsv"))
            numbers = [int(path.stem) for path in folder.glob("*.tsv") if path.stem.isdigit()]
            self._next = max(numbers, default=0) + 1
            self.bytes = sum(path.stat().st_size for path in folder.glob("*.tsv"))
            self._file = self._open()
        except OSError as error:  # reported like the spool's own folder (python -m ingest: exit 2)
            raise SpoolError(f"usage journal {folder}: {error}") from error

    def _open(self) -> Path:
        path = self.folder / f"{self._next:012d}.open"
        self._next += 1
        self._handle = path.open("a", encoding="utf-8")
        self._written = 0
        return path

    def append(self, text: str) -> bool:
        """Write ``text`` through to the OS (it survives a SIGKILL); False when it would pass the cap."""
        if self.bytes + len(text) > self.max_bytes:
            return False
        self._handle.write(text)
        self._handle.flush()
        self.bytes += len(text)
        self._written += len(text)
        return True

    def seal(self) -> list[Path]:
        """Close the file being written (when it holds anything); every sealed file, oldest first."""
        if self._written:
            self._handle.close()
            self._file.rename(self._file.with_suffix(".tsv"))
            self._file = self._open()
        return sorted(self.folder.glob("*.tsv"))

    def done(self, path: Path) -> None:
        """A sealed file the registry has counted."""
        self.bytes -= path.stat().st_size
        path.unlink()

    def close(self) -> None:
        self._handle.close()
        if not self._written:
            self._file.unlink(missing_ok=True)


def read_journal(path: Path) -> tuple[list[UsageEvent], int]:
    """A sealed file's events, and how many lines were torn (a write cut by a kill) and skipped.
    A line: tenant, site, machine, ts (ms), arrival hour (epoch s), message (1 on a message's first
    point, else 0), payload bytes (likewise), tab-separated (ids are DNS labels: no tab in them)."""
    events, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split("\t")
        try:
            tenant, site, machine, ts_ms, hour, message, size = fields
            events.append(UsageEvent(tenant, site, machine, int(ts_ms), int(hour), int(message), int(size)))
        except ValueError:
            torn += 1
    return events, torn


def _chunks(events: list[UsageEvent]) -> Iterator[list[UsageEvent]]:
    for start in range(0, len(events), CHUNK_EVENTS):
        yield events[start : start + CHUNK_EVENTS]


class UsageMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.events = Counter(
            "ironlink_ingest_usage_events", "Usage events (stored points) written to the registry", registry=r
        )
        self.duplicates = Counter(
            "ironlink_ingest_usage_duplicates",
            "Usage events the registry had counted already (redeliveries, replays)",
            registry=r,
        )
        self.lost = Counter(
            "ironlink_ingest_usage_lost_events",
            "Usage events neither journalled nor counted: the journal was at its cap",
            registry=r,
        )
        self.flush_failures = Counter(
            "ironlink_ingest_usage_flush_failures",
            "Failed writes of the usage journal to the registry",
            registry=r,
        )
        self.journal_bytes = Gauge(
            "ironlink_ingest_usage_journal_bytes", "Usage journal waiting for the registry", registry=r
        )
        self.quota_ratio = Gauge(
            "ironlink_ingest_usage_quota_used_ratio",
            "Share of the tenant's monthly message quota used (the registry's count)",
            ["tenant"],
            registry=r,
        )
        self.quota_reached = Counter(
            "ironlink_ingest_usage_quota_reached",
            "Quota levels (soft 80 %, hard 100 %) this replica saw a tenant reach first",
            ["tenant", "level"],
            registry=r,
        )


class UsageMeter:
    """Counts stored points per tenant into the registry and answers the monthly quota.

    ``record`` and ``admit`` run on the worker's threads (main, spool drainer) and never touch the
    network; ``flush`` runs on the meter's own thread."""

    def __init__(
        self,
        dsn: str,
        journal_dir: Path,
        *,
        flush_s: float,
        dedupe: timedelta,
        journal_max_bytes: int,
        registry: CollectorRegistry,
    ) -> None:
        self._dsn, self._flush_s, self._dedupe = dsn, flush_s, dedupe
        self.metrics = UsageMetrics(registry)
        self._lock = threading.Lock()
        self._journal = UsageJournal(journal_dir, journal_max_bytes)
        self._machines: dict[str, str | None] = {}  # topic -> site and machine, parsed once
        self._limits: Mapping[str, int] = {}
        self._used: Mapping[str, int] = {}
        self._admitted: dict[str, int] = {}
        self._flagged: set[tuple[str, date, str]] = set()
        self._conn: psycopg.Connection | None = None
        self._last_prune = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="usage", daemon=True)
        self.metrics.journal_bytes.set_function(lambda: self._journal.bytes)

    # ------------------------------------------------------------------------ worker threads
    def use_tenants(self, routes: TenantStoreRoutes) -> None:
        """The tenant directory's monthly quotas (replaced whole, like the routes)."""
        self._limits = {t: r.messages_per_month for t, r in routes.items() if r.messages_per_month}

    def admit(self, tenant: str) -> str | None:
        """None when ``tenant`` may send one more message this month, else why not."""
        limit = self._limits.get(tenant)
        if limit is None:
            return None
        # No lock on the hot path: the flusher swaps these dicts whole; an increment racing the
        # swap is lost, one message in an estimate that is approximate anyway (module docstring).
        admitted = self._admitted
        used = self._used.get(tenant, 0) + admitted.get(tenant, 0)
        if used < limit:
            admitted[tenant] = admitted.get(tenant, 0) + 1
            return None
        month = month_start(datetime.now(UTC))
        return (
            f"tenant {tenant!r} has sent {used} messages in {month:%Y-%m} (UTC), its monthly quota of "
            f"{limit} (its tier's messages_per_month); further messages are refused until the month "
            "ends or the quota is raised"
        )

    def record(
        self, tenant: str, entries: Sequence[tuple[Stored, Source]], refused: Mapping[int, str]
    ) -> None:
        """Points of ``tenant`` the store took (``entries`` but the ``refused`` indexes): journalled,
        to be counted once each. A message's size counts on its first point only."""
        lines, previous = [], None
        for index, (point, source) in enumerate(entries):
            if index in refused:
                continue
            machine = self._machines.get(source.topic) or self._machine(source.topic)
            if machine is None:
                continue
            hour = int(source.received_at) // 3600 * 3600
            if source is previous:
                lines.append(f"{tenant}\t{machine}\t{round(point.ts * 1000)}\t{hour}\t0\t0\n")
            else:
                size = len(source.payload)
                lines.append(f"{tenant}\t{machine}\t{round(point.ts * 1000)}\t{hour}\t1\t{size}\n")
            previous = source
        if not lines:
            return
        with self._lock:
            kept = self._journal.append("".join(lines))
        if not kept:
            self.metrics.lost.inc(len(lines))
            log.error("usage_journal_full", tenant=tenant, events=len(lines), cap=self._journal.max_bytes)

    def _machine(self, topic: str) -> str | None:
        """``site<TAB>machine`` of an accepted message's topic (None: not a telemetry topic)."""
        key = parse_topic(topic)
        found = None if key is None else f"{key[1]}\t{key[2]}"
        if len(self._machines) < MAX_TOPICS:
            self._machines[topic] = found
        return found

    # ---------------------------------------------------------------------------- its thread
    def start(self) -> None:
        """Write what a previous run journalled and read the month so far, then keep doing it."""
        self._flush_guarded()
        self._thread.start()

    def stop(self) -> None:
        """A last flush; what the registry does not take stays journalled for the next start."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._flush_guarded()
        with self._lock:
            self._journal.close()
        if self._conn is not None:
            self._conn.close()

    def _run(self) -> None:
        while not self._stop.wait(self._flush_s):
            self._flush_guarded()

    def _flush_guarded(self) -> None:
        """The meter outlives any one flush's trouble (the journal stays; retried next time) and
        never takes the worker's start or stop down with it."""
        try:
            self.flush()
        except Exception:
            self.metrics.flush_failures.inc()
            log.exception("usage_flush_crashed")

    def flush(self) -> bool:
        """Journal to registry, then the quotas; False (journal kept, retried) if the registry failed."""
        with self._lock:
            sealed = self._journal.seal()
            admitted, self._admitted = self._admitted, {}
        try:
            conn = self._connection()
            for path in sealed:
                self._write(conn, path)
            if time.monotonic() - self._last_prune >= PRUNE_EVERY_S:
                prune_usage(conn, self._dedupe)
                self._last_prune = time.monotonic()
            self._check_quotas(conn)
        except (psycopg.Error, OSError) as error:
            self.metrics.flush_failures.inc()
            log.warning("usage_flush_failed", error=str(error)[:300], journal_bytes=self._journal.bytes)
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            with self._lock:  # still not in the registry's count: keep them in the estimate
                for tenant, count in admitted.items():
                    self._admitted[tenant] = self._admitted.get(tenant, 0) + count
            return False
        return True

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        return self._conn

    def _write(self, conn: psycopg.Connection, path: Path) -> None:
        events, torn = read_journal(path)
        if torn:
            log.warning("usage_journal_torn_lines", file=path.name, lines=torn)
        for chunk in _chunks(events):
            new = record_usage(conn, chunk)
            self.metrics.events.inc(new)
            self.metrics.duplicates.inc(len(chunk) - new)
        with self._lock:
            self._journal.done(path)

    def _check_quotas(self, conn: psycopg.Connection) -> None:
        limits, month = self._limits, month_start(datetime.now(UTC))
        self._flagged = {flag for flag in self._flagged if flag[1] == month}
        if not limits:
            return
        used = month_messages(conn, month)
        with self._lock:
            self._used = {tenant: used.get(tenant, 0) for tenant in limits}
        for tenant, limit in limits.items():
            messages = used.get(tenant, 0)
            self.metrics.quota_ratio.labels(tenant).set(messages / limit)
            for level in quota_levels(messages, limit):
                if (tenant, month, level) in self._flagged:
                    continue
                if flag_quota(conn, tenant, month, limit, level):
                    self.metrics.quota_reached.labels(tenant, level).inc()
                    log.warning(
                        f"usage_{level}_quota_reached",
                        tenant=tenant,
                        month=f"{month:%Y-%m}",
                        messages=messages,
                        limit=limit,
                        ratio=round(messages / limit, 4),
                    )
                self._flagged.add((tenant, month, level))


def meter_for(settings: WorkerSettings, registry: CollectorRegistry) -> UsageMeter | None:
    """The worker's meter: with a registry and ``usage_metering`` on, else none (nothing counted)."""
    if settings.registry_dsn is None or not settings.usage_metering:
        return None
    return UsageMeter(
        settings.registry_dsn.get_secret_value(),
        settings.spool_dir / "usage",
        flush_s=settings.usage_flush_s,
        dedupe=timedelta(hours=settings.usage_dedupe_hours),
        journal_max_bytes=settings.usage_journal_max_bytes,
        registry=registry,
    )
