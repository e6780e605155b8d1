"""Protocol adapters: one small interface, one module per protocol.

An adapter reads one machine and hands each :class:`edge.normalize.Reading` to ``emit``; the agent
normalizes and stores it. ``run`` never returns while the agent runs: a source that fails is
retried with backoff (full jitter, up to ``source_retry_max_s``), reported ``retrying`` at once and
``down`` once it has given nothing for ``source_down_after_s``, and ``up`` again when it answers.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from edge.config import Machine
from edge.normalize import Reading
from edge.uplink import backoff_delays

# The agent's intake: a future done once the reading counts as taken (None: rejected).
Emit = Callable[[Reading], Future[Any] | None]


@dataclass
class SourceStatus:
    state: str = "starting"  # starting | up | retrying | down
    since: float = 0.0
    last_reading: float | None = None
    last_error: str | None = None
    readings: int = 0
    failures: int = 0


class Adapter(ABC):
    def __init__(self, machine: Machine, *, down_after_s: float, retry_max_s: float) -> None:
        self.machine = machine
        self.down_after_s = down_after_s
        self.status = SourceStatus(since=time.time())
        self._delay = backoff_delays(min(0.2, retry_max_s), retry_max_s)
        self._failed_since: float | None = None

    @abstractmethod
    async def session(self, emit: Emit) -> None:
        """Connect and read until the source fails (raise) or the task is cancelled."""

    async def run(self, emit: Emit) -> None:
        attempt = 0

        def counted(reading: Reading) -> Future[Any] | None:
            nonlocal attempt
            attempt = 0
            self._mark("up", None)
            self.status.readings += 1
            self.status.last_reading = time.time()
            return emit(reading)

        while True:
            try:
                await self.session(counted)
                error = "session ended"
            except asyncio.CancelledError:
                raise
            except Exception as failure:  # any protocol error: report, back off, try again
                error = f"{type(failure).__name__}: {failure}"[:300]
            self.status.failures += 1
            self._failed()
            self.status.last_error = error
            deadline = time.monotonic() + self._delay(attempt)
            attempt += 1
            while time.monotonic() < deadline:  # keep the state current while waiting
                await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                self._failed()

    def _failed(self) -> None:
        now = time.time()
        if self.status.state in ("up", "starting"):
            self._failed_since = now
        since = self._failed_since or now
        self._mark("down" if now - since >= self.down_after_s else "retrying", self.status.last_error)

    def _mark(self, state: str, error: str | None) -> None:
        if state == "up":
            self._failed_since = None
            self.status.last_error = None
        if self.status.state != state:
            self.status.state, self.status.since = state, time.time()


# Each kind's module, imported only for a gateway that has such a machine (asyncua alone takes
# ~30 MB of a small gateway's memory).
_KINDS = {
    "modbus_tcp": ("edge.adapters.modbus", "ModbusAdapter"),
    "opcua": ("edge.adapters.opcua", "OpcUaAdapter"),
    "mqtt": ("edge.adapters.local_mqtt", "LocalMqttAdapter"),
    "http": ("edge.adapters.http_push", "HttpPushAdapter"),
}


def adapter_for(machine: Machine, *, down_after_s: float, retry_max_s: float) -> Adapter:
    """The adapter of a machine's configured kind."""
    module, name = _KINDS[machine.adapter.kind]
    kind: type[Adapter] = getattr(importlib.import_module(module), name)
    return kind(machine, down_after_s=down_after_s, retry_max_s=retry_max_s)
