"""Reading back what the worker wrote into the local VictoriaMetrics, per tenant.

VictoriaMetrics takes the worker's InfluxDB line protocol on ``/api/v2/write`` but ignores ``org``
and ``bucket``: each field becomes a series ``<measurement>_<field>`` carrying the point's tags.
Tenant separation in the local store therefore rests on the ``tenant_id`` tag, and a *point* (one
telemetry message) is recognised by its timestamp: the fields of one point share it. Reads go
through VictoriaMetrics' Prometheus-compatible API (``/api/v1/export``); ``/internal/force_flush``
makes points written a moment ago visible.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime

# The labels the worker's points carry (enriched tags of the canonical contract).
TENANT_LABEL = "tenant_id"
SITE_LABEL = "site_id"
MACHINE_LABEL = "machine_id"


class StoreUnavailableError(RuntimeError):
    """VictoriaMetrics did not answer; the message says where and why."""


@dataclass(frozen=True)
class Series:
    """One exported series: its labels, timestamps (epoch milliseconds) and values."""

    labels: dict[str, str]
    timestamps: list[int]
    values: list[float]

    @property
    def metric(self) -> str:
        return self.labels.get("__name__", "")


@dataclass
class MachinePoints:
    """What the store holds for one machine: distinct point timestamps (ms) and the metrics seen."""

    tenant_id: str
    site_id: str
    machine_id: str
    timestamps: set[int] = field(default_factory=set)
    metrics: set[str] = field(default_factory=set)

    @property
    def points(self) -> int:
        return len(self.timestamps)

    @property
    def last_seen_ms(self) -> int | None:
        return max(self.timestamps) if self.timestamps else None


@dataclass
class TenantSeen:
    """A tenant's recent activity in the store."""

    machines: int
    messages_per_second: float = 0.0
    last_seen: datetime | None = None


class VictoriaMetrics:
    """A small reader of one VictoriaMetrics instance (``base_url`` like ``http://127.0.0.1:8428``)."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, params: list[tuple[str, str]] | None = None) -> bytes:
        url = f"{self.base_url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace").strip()
            raise StoreUnavailableError(f"{url}: HTTP {error.code}: {detail}") from error
        except (urllib.error.URLError, OSError) as error:
            raise StoreUnavailableError(f"{url}: {error}") from error

    def force_flush(self) -> None:
        """Make recently written points searchable now (VictoriaMetrics buffers them for seconds)."""
        self._get("/internal/force_flush")

    def export(self, match: str, start: float | None = None) -> list[Series]:
        """Every series matching the selector ``match`` (e.g. ``{tenant_id="acme"}``)."""
        params = [("match[]", match)]
        if start is not None:
            params.append(("start", f"{start:.3f}"))
        body = self._get("/api/v1/export", params)
        series = []
        for line in body.splitlines():
            if line.strip():
                item = json.loads(line)
                series.append(Series(item["metric"], item["timestamps"], item["values"]))
        return series

    def query(self, expression: str) -> list[tuple[dict[str, str], float]]:
        """An instant MetricsQL query: (labels, value) per resulting series."""
        data = json.loads(self._get("/api/v1/query", [("query", expression)]))
        return [(item["metric"], float(item["value"][1])) for item in data["data"]["result"]]

    def activity(self, window_s: float = 60.0, seen_range: str = "1h") -> dict[str, TenantSeen]:
        """Per tenant: machines seen within ``seen_range``, points per second over the last
        ``window_s`` and the newest point, whatever the fields the worker writes.

        A point writes one sample per field, all with its timestamp: a machine's busiest series
        counts its points.
        """
        everything = f'{{{TENANT_LABEL}=~".+"}}'
        by_machine = f"{TENANT_LABEL}, {MACHINE_LABEL}"
        per_machine = f"count by ({by_machine}) (count_over_time({everything}[{seen_range}]))"
        machines = self.query(f"count by ({TENANT_LABEL}) ({per_machine})")
        last = self.query(f"max by ({TENANT_LABEL}) (tlast_over_time({everything}[{seen_range}]))")
        busiest = f"max by ({by_machine}) (count_over_time({everything}[{window_s:.0f}s]))"
        recent = self.query(f"sum by ({TENANT_LABEL}) ({busiest})")
        seen = {labels[TENANT_LABEL]: TenantSeen(machines=int(value)) for labels, value in machines}
        for labels, value in last:
            if labels[TENANT_LABEL] in seen:
                seen[labels[TENANT_LABEL]].last_seen = datetime.fromtimestamp(value, UTC)
        for labels, value in recent:
            if labels[TENANT_LABEL] in seen:
                seen[labels[TENANT_LABEL]].messages_per_second = value / window_s
        return seen

    def points_by_machine(
        self, tenant_id: str | None = None, since: float | None = None
    ) -> list[MachinePoints]:
        """Per (tenant, site, machine): the distinct points stored (all tenants when ``tenant_id`` is None).

        Grouping is by the labels *as stored*, so a point written with a wrong ``tenant_id`` shows up
        under that tenant: cross-tenant checks compare these groups with the stack's machines.
        """
        selector = f'{{{TENANT_LABEL}="{tenant_id}"}}' if tenant_id else f'{{{TENANT_LABEL}=~".+"}}'
        machines: dict[tuple[str, str, str], MachinePoints] = {}
        for series in self.export(selector, start=since):
            key = (
                series.labels.get(TENANT_LABEL, ""),
                series.labels.get(SITE_LABEL, ""),
                series.labels.get(MACHINE_LABEL, ""),
            )
            entry = machines.setdefault(key, MachinePoints(*key))
            entry.timestamps.update(series.timestamps)
            entry.metrics.add(series.metric)
        return sorted(machines.values(), key=lambda m: (m.tenant_id, m.site_id, m.machine_id))


def wait_for_points(
    store: VictoriaMetrics,
    expected: set[tuple[str, str, str]],
    *,
    since: float | None = None,
    timeout: float = 15.0,
    settle: float = 1.5,
) -> list[MachinePoints]:
    """Points since ``since`` (epoch seconds), read once every (tenant, site, machine) in
    ``expected`` has some and nothing new arrived for ``settle`` seconds, or at ``timeout``.

    The worker batches its writes (``ingest.flush_interval_ms``), so the last messages land a
    moment after the simulator stops.
    """
    deadline = time.monotonic() + timeout
    previous, stable_since = -1, time.monotonic()
    while True:
        store.force_flush()
        points = store.points_by_machine(since=since)
        seen = {(p.tenant_id, p.site_id, p.machine_id) for p in points if p.points}
        total = sum(p.points for p in points)
        if total != previous:
            previous, stable_since = total, time.monotonic()
        settled = time.monotonic() - stable_since >= settle
        if (expected <= seen and settled) or time.monotonic() > deadline:
            return points
        time.sleep(0.25)
