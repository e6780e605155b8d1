"""Slack, Microsoft Teams and the generic webhook: one JSON POST each, over ``httpx``.

- **Slack** incoming webhook: ``{"text", "blocks"}``; Slack answers 200 ``ok``.
- **Teams**: the Adaptive Card message that both a Workflows ("When a Teams webhook request is
  received") URL and a legacy incoming webhook take: ``{"type": "message", "attachments":
  [{"contentType": "application/vnd.microsoft.card.adaptive", "content": <card>}]}``; Workflows
  answers 202.
- **Generic webhook** (WhatsApp/SMS gateways and the like): :func:`webhook_body`, a documented
  document of our own, with the route's ``Authorization`` header if it has one.

A destination is checked before anything is sent: https only unless ``allow_http``, and no
loopback, private or link-local address unless ``allow_private`` (a tenant's route must not make
the API post into the platform's own network). 429 and 5xx are retried (honouring
``Retry-After``); other 4xx are final (the hook was removed or the body refused).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import httpx

from api.notify.errors import DeliveryFailed
from api.notify.message import Message
from registry.alerts import AlertEvent

WEBHOOK_SCHEMA = "ironlink.alert.v1"
RESPONSE_SHOWN_CHARS = 300


def slack_body(message: Message) -> dict[str, Any]:
    facts = "\n".join(f"*{name}*: {value}" for name, value in message.facts)
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": message.title[:150]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": message.text}},
        {"type": "section", "text": {"type": "mrkdwn", "text": facts}},
    ]
    if message.link:
        blocks.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": f"<{message.link}|Open in Grafana>"}}
        )
    return {"text": f"{message.title}: {message.text}", "blocks": blocks}


def teams_body(message: Message) -> dict[str, Any]:
    card: dict[str, Any] = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": [
            {"type": "TextBlock", "text": message.title, "weight": "Bolder", "size": "Medium", "wrap": True},
            {"type": "TextBlock", "text": message.text, "wrap": True},
            {"type": "FactSet", "facts": [{"title": name, "value": value} for name, value in message.facts]},
        ],
    }
    if message.link:
        card["actions"] = [{"type": "Action.OpenUrl", "title": "Open in Grafana", "url": message.link}]
    attachment = {
        "contentType": "application/vnd.microsoft.card.adaptive",
        "contentUrl": None,
        "content": card,
    }
    return {"type": "message", "attachments": [attachment]}


def webhook_body(event: AlertEvent, message: Message) -> dict[str, Any]:
    """The generic webhook's document (``schema`` names its version; fields only ever get added)."""
    return {
        "schema": WEBHOOK_SCHEMA,
        "id": event.id,
        "tenant_id": event.tenant_id,
        "status": event.status,
        "alertname": event.alertname,
        "severity": event.severity,
        "site_id": event.site_id,
        "machine_id": event.machine_id,
        "starts_at": event.starts_at.isoformat(),
        "ends_at": None if event.ends_at is None else event.ends_at.isoformat(),
        "fingerprint": event.fingerprint,
        "title": message.title,
        "text": message.text,
        "labels": event.labels,
        "annotations": event.annotations,
        "link": message.link,
    }


def check_destination(url: str, *, allow_http: bool, allow_private: bool) -> str | None:
    """The address to post ``url`` to, or :class:`DeliveryFailed` (final) when it may not be
    posted to. The address is the one checked: connecting to it (:func:`post_json`) rather than
    resolving the name again means a DNS answer that changes after the check (rebinding) cannot
    turn the post towards a private address. None with ``allow_private``: resolve freely."""
    parts = urlsplit(url)
    if parts.scheme != "https" and not (allow_http and parts.scheme == "http"):
        raise DeliveryFailed(f"{parts.scheme}:// targets are not allowed (https only)", retryable=False)
    host = parts.hostname or ""
    if allow_private:
        return None
    try:
        found = socket.getaddrinfo(host, parts.port or 443, proto=socket.IPPROTO_TCP)
    except OSError as error:
        raise DeliveryFailed(f"cannot resolve {host}: {error}", retryable=True) from error
    addresses = list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in found))
    if not addresses or not all(ipaddress.ip_address(address).is_global for address in addresses):
        # Which private address is not said: the record is the tenant's, the network the platform's.
        raise DeliveryFailed(f"{host} resolves to an address that is not a public address", retryable=False)
    return addresses[0]


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def post_json(
    client: httpx.Client,
    url: str,
    body: dict[str, Any],
    *,
    authorization: str | None = None,
    address: str | None = None,
) -> None:
    """POST ``body`` (to ``address`` when given, with the URL's host as Host and TLS server name,
    so the certificate is still checked against it); :class:`DeliveryFailed` unless 2xx."""
    headers = {"Authorization": authorization} if authorization else {}
    target = httpx.URL(url)
    extensions: dict[str, Any] = {}
    if address is not None:
        headers["Host"] = target.netloc.decode("ascii")
        extensions["sni_hostname"] = target.host
        target = target.copy_with(host=address)
    try:
        response = client.post(target, json=body, headers=headers, extensions=extensions)
    except httpx.HTTPError as error:
        raise DeliveryFailed(f"{type(error).__name__}: {error}", retryable=True) from error
    if response.is_success:
        return
    status = response.status_code
    shown = response.text[:RESPONSE_SHOWN_CHARS]
    raise DeliveryFailed(
        f"HTTP {status}: {shown}",
        retryable=status == 429 or status >= 500,
        retry_after_s=_retry_after(response),
    )
