"""The agent: adapters feed the store, the sender drains it over each machine's session.

Per machine, after every (re)connect, in this order:
1. the **latest-value lane**: each metric's newest reading still unconfirmed (the dashboards'
   current state comes back at once);
2. **live** readings, taken since the connect, sent as they come;
3. the **history**, oldest first, at ``backfill_share`` of the uplink's ``max_messages_per_s``,
   shared by the machines. Every ``resend_after_s`` what was sent live becomes history too, and a
   finished pass starts again over what is still unconfirmed: a reading is sent until a receipt
   covers it (then the store forgets it), so a broker that loses its queue loses nothing.
Gap records go on the machine's telemetry topic (``gap_document``), kept until the broker took them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

from edge.adapters import Adapter, adapter_for
from edge.config import AgentConfig
from edge.normalize import Normalized, Normalizer, Reading
from edge.store import EdgeStore, Gap, Key, Row
from edge.uplink import MachineLink, Receipt

SEND_WINDOW = 500  # messages handed to paho per machine before the broker acknowledged them
BEFORE_ALL: Key = (-1, -1)


def gap_document(tenant: str, site: str, gateway: str, gap: Gap) -> bytes:
    """A gap record: ``{"gap": {...}}``, no ``schema_version``. Until the worker knows the kind, it
    dead-letters it (``unknown_schema_version``) with the whole document: visible in the registry's
    dead letters (``ironlink deadletters list``), never silent."""
    body = {
        "gap": {
            "tenant_id": tenant,
            "site_id": site,
            "machine_id": gap.machine,
            "gateway": gateway,
            "reason": gap.reason,
            "count": gap.count,
            "first_ts": round(gap.first_ts, 3),
            "last_ts": round(gap.last_ts, 3),
            "first_seq": list(gap.first_seq),
            "last_seq": list(gap.last_seq),
        }
    }
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass
class Lanes:
    """Where a machine's sending stands in the current session."""

    live: deque[Row] = field(default_factory=lambda: deque(maxlen=10_000))
    live_from: Key = BEFORE_ALL  # readings from this seq on are sent live in this session
    cursor: Key = BEFORE_ALL  # the history pass has sent everything up to here
    last_history_sent: float = 0.0
    rebased_at: float = 0.0
    pinned_pending: bool = False
    gap_mids: dict[tuple[str, str], tuple[int, Gap]] = field(default_factory=dict)


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

    # --------------------------------------------------------------------------- taking
    def take(self, machine: str, reading: Reading) -> None:
        """An adapter's reading: normalized, on disk, and queued live when the machine is connected."""
        normalized = self.normalizers[machine].normalize(reading)
        if not isinstance(normalized, Normalized):
            self.rejected[f"rejected:{normalized.reason.value}"] += 1
            return
        rows = self.store.add([normalized])
        self.taken += len(rows)
        link = self.links.get(machine)
        if link is not None and link.connected:
            self.lanes[machine].live.extend(rows)

    # ----------------------------------------------------------------------------- session
    def connected(self, machine: str) -> None:
        now = time.time()
        lanes = self.lanes[machine]
        lanes.live.clear()
        lanes.live_from, lanes.cursor = self.store.next_key, BEFORE_ALL
        lanes.last_history_sent = lanes.rebased_at = now
        lanes.pinned_pending = True
        lanes.gap_mids.clear()

    def receipt(self, machine: str, ranges: Receipt) -> None:
        self.confirmed += self.store.confirm(machine, ranges)

    async def send(self) -> None:
        """The sender: one turn over every connected machine per tick."""
        uplink = self.config.uplink
        rate = uplink.max_messages_per_s * uplink.backfill_share
        tokens, last = 0.0, time.monotonic()
        while True:
            now_m = time.monotonic()
            tokens = min(rate * 0.05 + 1, tokens + rate * (now_m - last))
            last = now_m
            busy = False
            for machine, link in self.links.items():
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
        room = min(budget, link.room(SEND_WINDOW))
        if room <= 0:
            return 0, bool(lanes.live)
        rows = self.store.history(machine, lanes.cursor, lanes.live_from, room)
        for row in rows:
            self._publish(link, row, "history")
        if rows:
            lanes.cursor, lanes.last_history_sent = rows[-1].key, now
        elif now - lanes.last_history_sent >= resend_after and self.store.has_history(
            machine, lanes.live_from
        ):
            lanes.cursor = BEFORE_ALL  # a pass done long enough ago: resend what is still unconfirmed
        return len(rows), len(rows) == room

    def _publish(self, link: MachineLink, row: Row, lane: str) -> None:
        if link.publish(row.payload) is not None:
            self.sent[lane] += 1

    def _send_gaps(self, machine: str, link: MachineLink, lanes: Lanes) -> None:
        gateway = self.config.gateway
        for gap in self.store.gaps():
            if gap.machine != machine:
                continue
            key = (gap.machine, gap.reason)
            pending = lanes.gap_mids.get(key)
            if pending is not None:
                mid, sent_gap = pending
                done = link.acknowledged(mid)
                if done is False:
                    continue  # on its way
                del lanes.gap_mids[key]
                if done:  # taken; a gap that grew meanwhile stays, and goes again with its new count
                    self.store.gap_sent(sent_gap)
                    continue
            new_mid = link.publish(gap_document(gateway.tenant, gateway.site, gateway.id, gap), watch=True)
            if new_mid is not None:
                lanes.gap_mids[key] = (new_mid, gap)
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

    async def commit_batches(self, interval_ms: int) -> None:
        while True:
            await asyncio.sleep(interval_ms / 1000)
            self.store.commit()

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
            )
        tasks = [loop.create_task(self.send()), loop.create_task(self.report())]
        if self.config.store.batch_ms is not None:
            tasks.append(loop.create_task(self.commit_batches(self.config.store.batch_ms)))
        for machine_id, adapter in self.adapters.items():
            tasks.append(loop.create_task(adapter.run(functools.partial(self.take, machine_id))))
        for link in self.links.values():
            link.start()
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for link in self.links.values():
                link.stop()
            self.write_status()
            self.store.close()
