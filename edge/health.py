"""The agent's own health, as ``ironlink-agent status`` shows it and as telemetry for the platform.

Both read the one report the agent writes (``Agent.health()``: the status file). For the platform
the gateway is a machine of type ``edge_gateway`` (``ingest/catalog.py``) whose id is the gateway's
id: :class:`HealthPublisher` holds that machine's own session (its own identity, enrolled like the
machines) and publishes a v2 reading on its own telemetry topic every ``health.interval_s``, so the
worker stores it like any machine's and the dashboards and alerts read it the same way
(``dashboards/gateway.py``). Health is live state, not a reading to backfill: it is published only
while that session is connected (the samples it could not send are counted, ``skipped``), and the
next one after an outage carries the backlog the outage built up.

A value outside the catalog's bounds (a source clock ahead of the gateway's makes a negative age)
is clamped to them: a clamped gauge is better than a health reading the worker dead-letters.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from edge.store import DROP_REASONS
from edge.uplink import MachineLink
from infra.tenancy import telemetry_topic
from ingest.catalog import GATEWAY_MACHINE_TYPE, MACHINE_TYPES
from ingest.contract import Accepted, Status, decode

if TYPE_CHECKING:
    from rich.console import Console

    from edge.agent import Agent

CATALOG = MACHINE_TYPES[GATEWAY_MACHINE_TYPE]
SOURCE_STATES = ("up", "retrying", "down")
USABLE_IDENTITY = ("valid", "renewing", "renew_pending")


def gateway_metrics(health: dict[str, Any]) -> tuple[Status, dict[str, float]]:
    """The ``edge_gateway`` reading of one report: its status (``fault`` while a source is down, a
    machine's session is not connected or a machine has no usable identity) and metrics."""
    backlog, drops = health["backlog"], health["drops"]
    sources = Counter(source["state"] for source in health["sources"].values())
    sources["retrying"] += sources.pop("starting", 0)
    connected = sum(link["state"] == "connected" for link in health["uplink"].values())
    missing = sum(s["state"] not in USABLE_IDENTITY for s in health.get("identity", {}).values())
    metrics: dict[str, float] = {
        "backlog_messages": backlog["messages"],
        "backlog_bytes": backlog["payload_bytes"],
        "store_bytes": backlog["store_bytes"],
        "oldest_unsent_age_s": backlog["oldest_unsent_age_s"],
        **{f"dropped_{reason}": drops.get(reason, 0) for reason in DROP_REASONS},
        "rejected_readings": sum(count for reason, count in drops.items() if reason.startswith("rejected:")),
        **{f"sources_{state}": sources[state] for state in SOURCE_STATES},
        "uplinks_connected": connected,
        "uplinks_disconnected": len(health["uplink"]) - connected,
        "identities_missing": missing,
    }
    faulty = sources["down"] or metrics["uplinks_disconnected"] or missing
    return ("fault" if faulty else "running"), {
        name: _clamped(name, value) for name, value in metrics.items()
    }


def _clamped(name: str, value: float) -> float:
    metric = CATALOG.metric(name)
    assert metric is not None, f"{name} is not an {GATEWAY_MACHINE_TYPE} metric of the catalog"
    return float(min(metric.maximum, max(metric.minimum, value)))


def health_document(tenant: str, site: str, gateway: str, health: dict[str, Any], ts: float) -> bytes:
    """The v2 reading the gateway publishes, checked by the worker's own decoder first."""
    status, metrics = gateway_metrics(health)
    document = {
        "schema_version": 2,
        "tenant_id": tenant,
        "site_id": site,
        "machine_id": gateway,
        "machine_type": GATEWAY_MACHINE_TYPE,
        "ts": round(ts, 3),
        "status": status,
        "metrics": metrics,
    }
    payload = json.dumps(document, separators=(",", ":")).encode()
    verdict = decode(
        telemetry_topic(tenant, site, gateway),
        payload,
        machine_types={(tenant, site, gateway): GATEWAY_MACHINE_TYPE},
    )
    assert isinstance(verdict, Accepted), f"the health reading breaks the contract: {verdict}"
    return payload


class HealthPublisher:
    """The gateway's own session, publishing its health (one of the agent's companions)."""

    def __init__(self, agent: Agent, loop: asyncio.AbstractEventLoop) -> None:
        config = agent.config
        assert config.health is not None
        self.agent, self.interval_s = agent, config.health.interval_s
        gateway = config.gateway
        self.link = MachineLink(
            config.uplink,
            gateway.tenant,
            gateway.site,
            gateway.id,
            gateway.id,
            loop,
            lambda _machine, _ranges: None,  # a v2 reading has no seq, so no receipts
            lambda _machine: None,
        )
        self.published = self.skipped = 0
        self.last_published: float | None = None

    def health(self) -> dict[str, Any]:
        link = self.link
        return {
            "health_uplink": {
                "state": link.state,
                "since": link.since,
                "reconnects": link.reconnects,
                "last_error": link.last_error,
                "published": self.published,
                "skipped": self.skipped,
                "last_published": self.last_published,
            }
        }

    async def run(self) -> None:
        self.link.start()
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                self.publish()
        finally:
            self.link.stop()

    def publish(self) -> None:
        if not self.link.connected:
            self.skipped += 1
            return
        gateway, now = self.agent.config.gateway, time.time()
        payload = health_document(gateway.tenant, gateway.site, gateway.id, self.agent.health(), now)
        if self.link.publish(payload) is None:
            self.skipped += 1
        else:
            self.published, self.last_published = self.published + 1, now


# ------------------------------------------------------------------------------ the status CLI
def render_status(health: dict[str, Any], console: Console, now: float | None = None) -> None:
    """``ironlink-agent status``: the report, the gateway's health line, one row per machine. rich is
    imported here only: the running agent never draws a table (its peak RSS is a figure of the issue)."""
    from rich.table import Table

    now = time.time() if now is None else now
    backlog = health["backlog"]
    console.print(
        f"gateway {health['gateway']} boot {health['boot']}, reported {now - health['written_at']:.1f} s ago;"
        f" backlog {backlog['messages']} messages, {backlog['payload_bytes']} bytes of payload,"
        f" store {backlog['store_bytes']} bytes, oldest unsent {backlog['oldest_unsent_age_s']} s"
    )
    drops = ", ".join(f"{reason} {count}" for reason, count in sorted(health["drops"].items())) or "none"
    console.print(f"drops: {drops}")
    if health.get("store_moved_aside"):
        console.print(f"store: an unreadable store was moved aside to {health['store_moved_aside']}")
    status, _ = gateway_metrics(health)
    published = health.get("health_uplink")
    if published is not None:
        error = f", {published['last_error']}" if published.get("last_error") else ""
        console.print(
            f"health: {status}; published {published['published']}, skipped {published['skipped']}"
            f" (session {published['state']}{error})"
        )
    else:
        console.print(f"health: {status} (not published: no health section)")
    identity = health.get("identity", {})
    table = Table("machine", "source", "since", "readings", "uplink", "identity", "last error")
    for machine, source in health["sources"].items():
        link = health["uplink"].get(machine, {})
        error = source.get("last_error") or link.get("last_error") or ""
        table.add_row(
            machine,
            source["state"],
            f"{now - source['since']:.0f} s",
            str(source["readings"]),
            link.get("state", "-"),
            _identity(identity.get(machine), now),
            error[:60],
        )
    if health["gateway"] in identity:
        state = published["state"] if published else "-"
        table.add_row(
            health["gateway"], "(gateway)", "", "", state, _identity(identity[health["gateway"]], now), ""
        )
    console.print(table)
    for name, state in identity.items():  # whole, not cut to a column: what the operator must act on
        if state.get("last_error"):
            console.print(f"identity {name}: {state['state']}: {state['last_error']}", soft_wrap=True)


def _identity(state: dict[str, Any] | None, now: float) -> str:
    if state is None:
        return "-"
    if state["state"] == "valid" and state.get("not_after"):
        return f"valid, {(state['not_after'] - now) / 86400:.0f} d left"
    return str(state["state"])
