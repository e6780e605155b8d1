"""A machine's states over a range, from the status its telemetry reported (``status_code``: 0
stopped, 1 running, 2 fault): what the uptime report (``api/uptime.py``) adds up.

The store answers per bucket of ``step`` seconds (epoch-aligned, stamped with its end ``e``) with
the last status reported in ``(e - step, e]``: the machine's state at ``e``, which then holds
over ``[e, e + step)`` (sample and hold). Without a new report, the last one holds for
``hold_s`` seconds; after that the state is *unknown*: a silent machine is not counted as down,
and neither is the time an edge gateway said it lost (``telemetry_gaps``: unknown whatever the
buckets say). A transition is thus placed at most one ``step`` late (the answer's stated
resolution); with whole-second timestamps and a 1 s step, exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

State = Literal["running", "stopped", "fault", "unknown"]
DownState = Literal["stopped", "fault"]
STATES: dict[int, State] = {0: "stopped", 1: "running", 2: "fault"}
"""``status_code`` values (``ingest.points.STATUS_CODES``) and what they mean here."""
NICE_STEPS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def step_for(range_s: float, max_buckets: int, min_step_s: int = 1) -> int:
    """The finest step from :data:`NICE_STEPS_S` (then whole days) that covers ``range_s`` in at
    most ``max_buckets`` buckets, and no finer than ``min_step_s``."""
    for step in NICE_STEPS_S:
        if step >= min_step_s and range_s / step <= max_buckets:
            return step
    days = -(-range_s // (86400 * max_buckets))
    return int(max(days, 1) * 86400)


@dataclass(frozen=True)
class Interval:
    start: float
    end: float
    state: State

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Tally:
    """Seconds per state over a range (``gap_s`` is the part of ``unknown_s`` the edge reported lost)."""

    running_s: float = 0.0
    stopped_s: float = 0.0
    fault_s: float = 0.0
    unknown_s: float = 0.0
    gap_s: float = 0.0
    machines: int = 0

    def add(self, other: Tally) -> None:
        self.running_s += other.running_s
        self.stopped_s += other.stopped_s
        self.fault_s += other.fault_s
        self.unknown_s += other.unknown_s
        self.gap_s += other.gap_s
        self.machines += other.machines


@dataclass
class MachineTimeline:
    intervals: list[Interval] = field(default_factory=list)
    tally: Tally = field(default_factory=lambda: Tally(machines=1))

    def downtime(self) -> list[Interval]:
        return [i for i in self.intervals if i.state in ("stopped", "fault")]


def _merge(intervals: Iterable[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for interval in intervals:
        if interval.end <= interval.start:
            continue
        if merged and merged[-1].state == interval.state and merged[-1].end >= interval.start:
            merged[-1] = Interval(merged[-1].start, max(merged[-1].end, interval.end), interval.state)
        else:
            merged.append(interval)
    return merged


def _without(intervals: list[Interval], holes: list[tuple[float, float]]) -> list[Interval]:
    """``intervals`` with the ``holes`` cut out (both sorted and disjoint: one sweep)."""
    out: list[Interval] = []
    first = 0
    for interval in intervals:
        at = interval.start
        while first < len(holes) and holes[first][1] <= at:
            first += 1
        index = first
        while index < len(holes) and holes[index][0] < interval.end:
            hole_start, hole_end = holes[index]
            if hole_start > at:
                out.append(Interval(at, hole_start, interval.state))
            at = max(at, hole_end)
            index += 1
        if at < interval.end:
            out.append(Interval(at, interval.end, interval.state))
    return out


def _union(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    union: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if union and start <= union[-1][1]:
            union[-1] = (union[-1][0], max(union[-1][1], end))
        elif end > start:
            union.append((start, end))
    return union


def build_timeline(
    reports: Mapping[int, int],
    *,
    start: float,
    end: float,
    step: int,
    hold_s: float,
    gaps: Iterable[tuple[float, float]] = (),
) -> MachineTimeline:
    """The states of one machine over ``[start, end)`` from ``reports`` (bucket end, epoch seconds
    -> the last ``status_code`` up to it; earlier buckets give the state held into the range) and
    the spans the edge reported lost (``gaps``)."""
    reach = max(1, math.ceil(hold_s / step)) * step  # a report's bucket and the held ones after it
    known: list[Interval] = []
    run: list[Any] = []  # [start, end, state] of the run being extended: no object per bucket
    times = sorted(reports)
    for index, at in enumerate(times):
        following = times[index + 1] if index + 1 < len(times) else math.inf
        begin, until = max(start, at), min(end, following, at + reach)
        if until <= begin:
            continue
        state = STATES.get(reports[at], "unknown")
        if run and run[2] == state and run[1] >= begin:
            run[1] = until
        else:
            if run:
                known.append(Interval(*run))
            run = [begin, until, state]
    if run:
        known.append(Interval(*run))
    silent = _without([Interval(start, end, "unknown")], [(i.start, i.end) for i in known])
    raw = sorted([*known, *silent], key=_key)
    lost = _union((max(start, a), min(end, b)) for a, b in gaps if b > start and a < end)
    timeline = _merge(sorted([*_without(raw, lost), *(Interval(a, b, "unknown") for a, b in lost)], key=_key))
    tally = Tally(machines=1, gap_s=sum(b - a for a, b in lost))
    for interval in timeline:
        setattr(tally, f"{interval.state}_s", getattr(tally, f"{interval.state}_s") + interval.seconds)
    return MachineTimeline(timeline, tally)


def _key(interval: Interval) -> float:
    return interval.start
