"""One rendering of an alert event for every channel: a title, a short text, and the facts."""

from __future__ import annotations

from dataclasses import dataclass

from registry.alerts import AlertEvent

SUMMARY_MAX_CHARS = 1000


@dataclass(frozen=True)
class Message:
    title: str
    """``[FIRING] Lathe: machine in fault — plant-1/lathe-3``."""
    text: str
    """The summary (or description) annotation, else the alert name."""
    facts: tuple[tuple[str, str], ...]
    """Label-like pairs every channel lists: status, severity, tenant, site, machine, times."""
    link: str | None
    """Grafana's link to the rule, when it sent one."""


def render(event: AlertEvent) -> Message:
    where = "/".join(part for part in (event.site_id, event.machine_id) if part)
    title = f"[{event.status.upper()}] {event.alertname}" + (f" — {where}" if where else "")
    text = event.annotations.get("summary") or event.annotations.get("description") or event.alertname
    facts = [("status", event.status), ("tenant", event.tenant_id)]
    for name, value in (("severity", event.severity), ("site", event.site_id), ("machine", event.machine_id)):
        if value:
            facts.append((name, value))
    facts.append(("started", event.starts_at.isoformat()))
    if event.status == "resolved" and event.ends_at is not None:
        facts.append(("resolved", event.ends_at.isoformat()))
    link = event.links.get("generatorURL") or None
    return Message(title, text[:SUMMARY_MAX_CHARS], tuple(facts), link)
