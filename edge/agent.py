"""The agent: adapters feed the store, the sender drains it over each machine's session.

Per machine, after every (re)connect, in this order:
1. the **latest-value lane**: each metric's newest reading still unconfirmed (the dashboards'
   current state comes back at once);
2. **live** readings, taken since the connect, sent as they come;
3. the **history**, oldest first, at ``backfill_share`` of the uplink's ``max_messages_per_s``,
   shared by the machines. Every ``resend_after_s`` what was sent live becomes history too, and a
   finished pass starts again over what is still unconfirmed: a reading is sent until a receipt
   covers it (then the store forgets it), so a broker that loses its queue loses nothing.
   History goes in compressed batches (contract v4, ``ingest.contract.pack``) of up to
   ``HISTORY_BATCH`` readings, one message each against the budget: that is what lets the backfill
   run far above the live rate. The latest and live lanes send each reading on its own (latency).
   History in flight (sent, no receipt yet) is bounded by ``uplink.history_in_flight`` readings
   for all machines together, so the backlog waits here rather than in the broker's and the
   worker's queues ahead of live readings (the broker's PUBACKs alone would let all of it through);
   what a machine sent and never got a receipt for stops counting when its pass starts again.
A reading taken while its machine's session is down is marked ``historical`` (``edge/normalize.py``).
Gap records (contract v4, ``gap_document``) go on the machine's telemetry topic, again whenever
their count grew or ``resend_after_s`` passed, until the worker's receipt says they are stored.

SIGTERM stops it in bounded time (``STOP_*_S``): tasks cancelled, every session ended at once, the
store's queue committed (what is still queued past its bound was never taken: ``shutdown`` drops).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import json
import logging
import os
import signal
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

from edge.adapters import Adapter, adapter_for
from edge.companions import Companion, companions
from edge.config import AgentConfig
from edge.normalize import Normalized, Normalizer, Reading
from edge.store import EdgeStore, Gap, Key, Row
from edge.uplink import GapReceipt, MachineLink, Receipt, stop_all
from ingest.contract import DEFAULT_MAX_PAYLOAD_BYTES, pack

SEND_WINDOW = 500  # messages handed to paho per machine before the broker acknowledged them
BEFORE_ALL: Key = (-1, -1)
HISTORY_BATCH = 200  # readings per history message (the worker takes up to 2,000)
HISTORY_TURN = 8  # history messages per machine per turn: a turn stays short, live data waits little
# SIGTERM's bounds, 8 s in all (a container runtime's default grace is 10 s, the systemd unit's 30 s).
STOP_TASKS_S = 2.0  # adapters and companions, once cancelled
STOP_LINKS_S = 3.0  # every broker session, ended together
STOP_STORE_S = 3.0  # the store's writer, to commit what is queued
_log = logging.getLogger(__name__)


def gap_document(tenant: str, site: str, gateway: str, gap: Gap) -> bytes:
    """A gap record (contract v4, ``"kind": "gap"``): the worker stores it in the registry's
    ``telemetry_gaps`` and confirms it on the receipts topic. The store keeps a gap per boot, so
    its seq range is one boot's."""
    body = {
        "schema_version": 4,
        "kind": "gap",
        "tenant_id": tenant,
        "site_id": site,
        "machine_id": gap.machine,
        "reason": gap.reason,
        "count": gap.count,
        "first_ts": round(gap.first_ts, 3),
        "last_ts": round(gap.last_ts, 3),
        "seq": {
            "gateway": gateway,
            "boot": gap.first_seq[0],
            "first_n": gap.first_seq[1],
            "last_n": gap.last_seq[1],
        },
    }
    return json.dumps(body, separators=(",", ":")).encode()


def history_batches(rows: list[Row], limit: int = DEFAULT_MAX_PAYLOAD_BYTES) -> list[tuple[list[Row], bytes]]:
    """History rows as compressed batches of up to ``HISTORY_BATCH`` readings, each within the
    worker's ``limit`` on a message (a batch that compresses past it is split in two)."""
    found: list[tuple[list[Row], bytes]] = []
    pending = [rows[start : start + HISTORY_BATCH] for start in range(0, len(rows), HISTORY_BATCH)]
    while pending:
        chunk = pending.pop(0)
        payload = pack([row.payload for row in chunk])
        if len(payload) > limit and len(chunk) > 1:
            half = len(chunk) // 2
            pending[:0] = [chunk[:half], chunk[half:]]
            continue
        found.append((chunk, payload))
    return found


@dataclass
class Lanes:
    """Where a machine's sending stands in the current session."""

    live: deque[Row] = field(default_factory=lambda: deque(maxlen=10_000))
    live_from: Key = BEFORE_ALL  # readings from this seq on are sent live in this session
    cursor: Key = BEFORE_ALL  # the history pass has sent everything up to here
    last_history_sent: float = 0.0
    rebased_at: float = 0.0
    pinned_pending: bool = False
    history_out: list[Key] = field(default_factory=list)  # sent as history, no receipt yet (sorted)
    # (reason, first seq) -> (count, when) of each gap sent in this session and not yet confirmed.
    gaps_sent: dict[tuple[str, Key], tuple[int, float]] = field(default_factory=dict)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        store = config.store
        self.store = EdgeStore(
            store.path,
            gateway=config.gateway.id,
            batch_ms=store.batch_ms,
            max_bytes=store.max_bytes,
            min_free_bytes=store.min_free_bytes,
            max_age_s=store.max_age_s,
        )
        self.normalizers = {m.id: Normalizer(config.gateway, m) for m in config.machines}
        self.adapters: dict[str, Adapter] = {
            m.id: adapter_for(
                m, down_after_s=config.source_down_after_s, retry_max_s=config.source_retry_max_s
            )
            for m in config.machines
        }
        self.lanes = {m.id: Lanes() for m in config.machines}
        self.links: dict[str, MachineLink] = {}
        self.rejected: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.confirmed = 0
        self.taken = 0
        self.stopping = False  # set on SIGTERM: receipts arriving after it are left for the next boot
        self.companions: list[Companion] = []  # enrollment, health publisher (edge/companions.py)

    # --------------------------------------------------------------------------- taking
    def take(self, machine: str, reading: Reading) -> Future[list[Row]] | None:
        """An adapter's reading: normalized and handed to the store's writer; the future is done once
        it counts as taken (on disk with ``always``). None when normalization rejected it.

        After the stop it ends the adapter instead: Python 3.11's ``asyncio.wait_for`` loses a cancel
        that races the read it waits for (pymodbus polls through it), and the adapter would poll on
        and hold the exit; a reading it hands over now has not counted, so nothing is lost."""
        if self.stopping:
            raise asyncio.CancelledError
        link = self.links.get(machine)
        historical = link is None or not link.connected  # it will be backfilled
        normalized = self.normalizers[machine].normalize(reading, historical=historical)
        if not isinstance(normalized, Normalized):
            self.rejected[f"rejected:{normalized.reason.value}"] += 1
            return None
        stored = self.store.submit([normalized])
        loop = asyncio.get_running_loop()
        stored.add_done_callback(lambda done: loop.call_soon_threadsafe(self._stored, machine, done))
        return stored

    def _stored(self, machine: str, stored: Future[list[Row]]) -> None:
        """On the loop, once the store's writer committed a reading (``batch:<ms>``: inserted): it
        counts as taken, and goes live unless its session began later (then it is history)."""
        if stored.exception() is not None:
            return  # a commit the disk refused: counted as a ``store_error`` drop by the store
        rows = stored.result()
        self.taken += len(rows)
        link, lanes = self.links.get(machine), self.lanes[machine]
        if link is not None and link.connected:
            lanes.live.extend(row for row in rows if row.key >= lanes.live_from)

    # ----------------------------------------------------------------------------- session
    def connected(self, machine: str) -> None:
        now = time.time()
        lanes = self.lanes[machine]
        lanes.live.clear()
        lanes.live_from, lanes.cursor = self.store.next_key, BEFORE_ALL
        lanes.last_history_sent = lanes.rebased_at = now
        lanes.pinned_pending = True
        lanes.gaps_sent.clear()
        lanes.history_out.clear()  # the new session's pass sends it all again

    def receipt(self, machine: str, ranges: Receipt) -> None:
        if self.stopping:
            return  # the store is closing: those readings are sent again, and rewritten the same
        out = self.lanes[machine].history_out
        for boot, first, last in ranges:
            del out[bisect.bisect_left(out, (boot, first)) : bisect.bisect_right(out, (boot, last))]
        forgotten = self.store.confirm(machine, ranges)
        loop = asyncio.get_running_loop()
        forgotten.add_done_callback(lambda done: loop.call_soon_threadsafe(self._forgotten, done))

    def gap_receipt(self, machine: str, stored: GapReceipt) -> None:
        """The worker stored these gap records: forget each, unless it grew since it was sent (then
        it goes again with its new count)."""
        if self.stopping:
            return
        confirmed = set(stored)
        for gap in self.store.gaps():
            if gap.machine == machine and (gap.reason, *gap.first_seq, gap.count) in confirmed:
                self.store.gap_sent(gap)
                self.lanes[machine].gaps_sent.pop((gap.reason, gap.first_seq), None)

    def _forgotten(self, forgotten: Future[int]) -> None:
        if forgotten.exception() is None:  # a failed one is resent, and confirmed again
            self.confirmed += forgotten.result()

    async def send(self) -> None:
        """The sender: one turn over every connected machine per tick, each tick starting at the next
        machine (the budget and ``history_in_flight`` are shared: no machine always comes first)."""
        uplink = self.config.uplink
        rate = uplink.max_messages_per_s * uplink.backfill_share
        tokens, last, tick = 0.0, time.monotonic(), 0
        while True:
            now_m = time.monotonic()
            tokens = min(rate * 0.05 + 1, tokens + rate * (now_m - last))
            last, tick = now_m, tick + 1
            busy = False
            links = list(self.links.items())
            start = tick % len(links) if links else 0
            for machine, link in links[start:] + links[:start]:
                if not link.connected:
                    continue
                sent_history, more = self._send_machine(machine, link, int(tokens))
                tokens -= sent_history
                busy = busy or more
            await asyncio.sleep(0 if busy and tokens >= 1 else 0.005)

    def _send_machine(self, machine: str, link: MachineLink, budget: int) -> tuple[int, bool]:
        lanes, now = self.lanes[machine], time.time()
        resend_after = self.config.uplink.resend_after_s
        if lanes.pinned_pending:
            for row in self.store.pinned(machine):
                self._publish(link, row, "latest")
            lanes.pinned_pending = False
        while lanes.live and link.room(SEND_WINDOW):
            self._publish(link, lanes.live.popleft(), "live")
        self._send_gaps(machine, link, lanes)
        if now - lanes.rebased_at >= resend_after:  # what went live unconfirmed is history now
            lanes.live_from, lanes.rebased_at = self.store.next_key, now
            lanes.live.clear()
        room = min(budget, link.room(SEND_WINDOW), HISTORY_TURN)  # messages: a batch is one
        if room <= 0:
            return 0, bool(lanes.live)
        limit = min(room * HISTORY_BATCH, self._history_room())
        rows = self.store.history(machine, lanes.cursor, lanes.live_from, limit) if limit > 0 else []
        batches = 0
        for chunk, payload in history_batches(rows):
            if link.publish(payload) is None:
                break  # the session is gone: the next one starts its pass again
            batches += 1
            self.sent["history"] += len(chunk)
            self.sent["history_batches"] += 1
            self._sent_history(lanes.history_out, chunk)
            lanes.cursor, lanes.last_history_sent = chunk[-1].key, now
        if (
            not rows  # the pass is done, or waits for receipts
            and now - lanes.last_history_sent >= resend_after
            and self.store.has_history(machine, lanes.live_from)
        ):
            # Sent long enough ago: resend what is still unconfirmed; what this machine had in flight
            # is taken as lost (a broker that lost its queue sends no receipt for it).
            lanes.cursor = BEFORE_ALL
            lanes.history_out.clear()
        return batches, limit > 0 and len(rows) == limit

    def history_in_flight(self) -> int:
        """History readings sent and not yet confirmed, all machines together."""
        return sum(len(lanes.history_out) for lanes in self.lanes.values())

    def _history_room(self) -> int:
        """Readings the history may send now: what ``history_in_flight`` leaves, once it leaves a
        whole batch (receipts trickling in do not become a stream of tiny batches)."""
        cap = self.config.uplink.history_in_flight
        free = cap - self.history_in_flight()
        return free if free >= min(HISTORY_BATCH, cap) else 0

    @staticmethod
    def _sent_history(out: list[Key], chunk: list[Row]) -> None:
        if not out or chunk[0].key > out[-1]:
            out.extend(row.key for row in chunk)  # a pass sends oldest first: the usual case
        else:
            for row in chunk:
                bisect.insort(out, row.key)

    def _publish(self, link: MachineLink, row: Row, lane: str) -> None:
        if link.publish(row.payload) is not None:
            self.sent[lane] += 1

    def _send_gaps(self, machine: str, link: MachineLink, lanes: Lanes) -> None:
        """Each gap of the machine not sent in this session, grown since, or unconfirmed for
        ``resend_after_s``; :meth:`gap_receipt` forgets it once the worker stored it."""
        gateway, now = self.config.gateway, time.time()
        for gap in self.store.gaps():
            if gap.machine != machine:
                continue
            key = (gap.reason, gap.first_seq)
            sent = lanes.gaps_sent.get(key)
            if (
                sent is not None
                and sent[0] == gap.count
                and now - sent[1] < self.config.uplink.resend_after_s
            ):
                continue
            if link.publish(gap_document(gateway.tenant, gateway.site, gateway.id, gap)) is not None:
                lanes.gaps_sent[key] = (gap.count, now)
                self.sent["gap"] += 1

    # ---------------------------------------------------------------------------- health
    def health(self) -> dict[str, Any]:
        now = time.time()
        drops = {**self.store.drops, **self.rejected}
        return {
            "gateway": self.config.gateway.id,
            "boot": self.store.boot,
            "written_at": now,
            "taken": self.taken,
            "confirmed": self.confirmed,
            "sent": dict(self.sent),
            "history_in_flight": self.history_in_flight(),
            "backlog": self.store.backlog(now),
            "drops": drops,
            "store_moved_aside": str(self.store.moved_aside) if self.store.moved_aside else None,
            "sources": {machine: asdict(adapter.status) for machine, adapter in self.adapters.items()},
            "uplink": {
                machine: {
                    "state": link.state,
                    "since": link.since,
                    "reconnects": link.reconnects,
                    "last_error": link.last_error,
                }
                for machine, link in self.links.items()
            },
            **{key: part for companion in self.companions for key, part in companion.health().items()},
        }

    def write_status(self) -> None:
        path = self.config.status_path
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(self.health(), indent=1))
        os.replace(temporary, path)

    async def report(self) -> None:
        while True:
            self.write_status()
            await asyncio.sleep(self.config.status_interval_s)

    # ------------------------------------------------------------------------------- run
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        gateway = self.config.gateway
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        for machine in self.config.machines:
            self.links[machine.id] = MachineLink(
                self.config.uplink,
                gateway.tenant,
                gateway.site,
                machine.id,
                gateway.id,
                loop,
                self.receipt,
                self.connected,
                on_gap_receipt=self.gap_receipt,
            )
        tasks = [loop.create_task(self.send()), loop.create_task(self.report())]
        self.companions = companions(self, loop)
        tasks += [loop.create_task(companion.run()) for companion in self.companions]
        for machine_id, adapter in self.adapters.items():
            tasks.append(loop.create_task(adapter.run(functools.partial(self.take, machine_id))))
        for link in self.links.values():
            link.start()
        try:
            await stop.wait()
        finally:
            await self.shut_down(tasks)

    async def shut_down(self, tasks: list[asyncio.Task[None]]) -> None:
        """Bounded (``STOP_*_S``): the tasks, then every session at once, then the store's queue;
        the last status is written after the store closed, so it shows what closing left."""
        self.stopping = True
        loop = asyncio.get_running_loop()
        deadline, pending = loop.time() + STOP_TASKS_S, set(tasks)
        while pending and loop.time() < deadline:  # cancelled again: a cancel can be lost (see take)
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=min(0.1, max(0.0, deadline - loop.time())))
        if pending:
            names = ", ".join(sorted(task.get_coro().__qualname__ for task in pending))  # type: ignore[union-attr]
            _log.warning("tasks still running %.0f s after their cancel: %s", STOP_TASKS_S, names)
            for task in pending:
                task.print_stack()
        stuck = stop_all(list(self.links.values()), STOP_LINKS_S)
        if stuck:
            _log.warning("sessions left running at exit (daemon threads): %s", ", ".join(stuck))
        unstored = self.store.close(STOP_STORE_S)
        if unstored:
            _log.warning(
                "%d readings still queued %.0f s after the stop were not stored (shutdown drops)",
                unstored,
                STOP_STORE_S,
            )
        await asyncio.sleep(0)  # the commits' callbacks run: the last status counts what was taken
        self.write_status()
