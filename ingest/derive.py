"""Derived metrics, computed per machine from the samples the worker has seen.

- ``duty_cycle_pct``: share of the window the machine was ``running``;
- ``uptime_pct``: share of the window it was not in ``fault`` (running or stopped = available);
- ``temp_delta_c``: change of the machine type's temperature metric since the previous sample.

The time between two samples is credited to the status of the earlier one, at most
``max_gap_s`` of it: a silent machine is not assumed to keep running. State lives in this
process's memory: it starts empty after a restart (the first sample of a machine carries no
derived fields) and each replica sees only the machines the broker gives it (see README).
A sample older than the machine's last one (a redelivery, a late backfill) changes nothing and
carries no derived fields, so rewriting it cannot overwrite the fields computed the first time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ingest.catalog import MACHINE_TYPES
from ingest.contract import MachineKey, TelemetryV2


@dataclass
class _Span:
    start: float
    end: float
    status: str


@dataclass
class _Machine:
    last_ts: float
    last_status: str
    last_temperature: float | None
    spans: deque[_Span] = field(default_factory=deque)
    # Seconds per status within the window, kept in step with ``spans`` (O(1) per sample).
    seconds: dict[str, float] = field(default_factory=lambda: {"running": 0.0, "stopped": 0.0, "fault": 0.0})


class DerivedMetrics:
    def __init__(self, window_s: float, max_gap_s: float) -> None:
        self.window_s = window_s
        self.max_gap_s = max_gap_s
        self._machines: dict[MachineKey, _Machine] = {}

    def update(self, sample: TelemetryV2) -> dict[str, float]:
        """Fold ``sample`` into its machine's state; the derived fields to store with it."""
        key = (sample.tenant_id, sample.site_id, sample.machine_id)
        metric = MACHINE_TYPES[sample.machine_type].temperature_metric
        temperature = sample.metrics.get(metric) if metric else None
        machine = self._machines.get(key)
        if machine is None:
            self._machines[key] = _Machine(sample.ts, sample.status, temperature)
            return {}
        if sample.ts <= machine.last_ts:
            return {}
        self._credit(machine, sample.ts)
        derived: dict[str, float] = {}
        seconds = machine.seconds
        observed = seconds["running"] + seconds["stopped"] + seconds["fault"]
        if observed > 0:
            derived["duty_cycle_pct"] = min(100.0, 100.0 * seconds["running"] / observed)
            derived["uptime_pct"] = max(0.0, 100.0 * (observed - seconds["fault"]) / observed)
        if temperature is not None and machine.last_temperature is not None:
            derived["temp_delta_c"] = temperature - machine.last_temperature
        machine.last_ts, machine.last_status = sample.ts, sample.status
        if temperature is not None:
            machine.last_temperature = temperature
        return derived

    def _credit(self, machine: _Machine, now: float) -> None:
        """Credit ``[last_ts, now)`` (capped) to the last status and drop what left the window."""
        start = max(machine.last_ts, now - self.max_gap_s)
        spans, seconds = machine.spans, machine.seconds
        seconds[machine.last_status] += now - start
        if spans and spans[-1].status == machine.last_status and spans[-1].end == start:
            spans[-1].end = now
        else:
            spans.append(_Span(start, now, machine.last_status))
        horizon = now - self.window_s
        while spans and spans[0].end <= horizon:
            gone = spans.popleft()
            seconds[gone.status] -= gone.end - gone.start
        if spans and spans[0].start < horizon:
            seconds[spans[0].status] -= horizon - spans[0].start
            spans[0].start = horizon
