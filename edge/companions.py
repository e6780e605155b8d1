"""What runs beside the agent's lanes: its identities' upkeep and its health publisher.

Each companion has ``run()`` (a task of the agent's loop, cancelled when it stops) and
``health()`` (its part of the status report).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from edge.agent import Agent


class Companion(Protocol):
    def run(self) -> Coroutine[Any, Any, None]: ...

    def health(self) -> dict[str, Any]: ...


def companions(agent: Agent, loop: asyncio.AbstractEventLoop) -> list[Companion]:
    """The enrollment (when ``uplink.claim`` is set) and the health publisher (when ``health`` is),
    wired so that a new certificate makes its session reconnect with it. Call once the agent's
    links exist."""
    from edge.health import HealthPublisher  # imported when configured: httpx and cryptography
    from edge.identity import Enrollment  # weigh about 15 MB on a gateway that needs neither

    links = dict(agent.links)
    found: list[Companion] = []
    if agent.config.health is not None:
        publisher = HealthPublisher(agent, loop)
        links[agent.config.gateway.id] = publisher.link
        found.append(publisher)
    if agent.config.uplink.claim is not None and agent.config.uplink.identity_dir is not None:
        found.insert(0, Enrollment(agent.config, lambda name: links[name].reconnect()))
    return found
