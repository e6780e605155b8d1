"""OPC-UA: a subscription on the map's nodes; one reading per publishing interval with a change."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from asyncua import Client

from edge.adapters import Adapter, Emit
from edge.config import OpcUa
from edge.maps import OpcUaMap, machine_map
from edge.normalize import Reading


class _Changes:
    """asyncua's data-change handler: the newest value of each node."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.changed = False

    def datachange_notification(self, node: Any, value: Any, _data: Any) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool):
            self.values[node.nodeid.to_string()] = float(value)
            self.changed = True


class OpcUaAdapter(Adapter):
    async def session(self, emit: Emit) -> None:
        settings = self.machine.adapter
        assert isinstance(settings, OpcUa)
        nodes = machine_map(self.machine)
        assert isinstance(nodes, OpcUaMap)
        ids = {name: node.node.format(machine=self.machine.id) for name, node in nodes.nodes.items()}
        status_id = nodes.status.node.format(machine=self.machine.id) if nodes.status else None
        client = Client(settings.endpoint, timeout=settings.timeout_s, watchdog_intervall=settings.timeout_s)
        async with client:
            changes = _Changes()
            subscription = await client.create_subscription(settings.publishing_ms, changes)
            watched = [*ids.values(), *([status_id] if status_id else [])]
            await subscription.subscribe_data_change([client.get_node(node) for node in watched])
            while True:
                await asyncio.sleep(settings.publishing_ms / 1000)
                await client.check_connection()
                if not changes.changed or not all(node in changes.values for node in ids.values()):
                    continue
                changes.changed = False
                metrics = {name: nodes.nodes[name].value(changes.values[node]) for name, node in ids.items()}
                raw = changes.values.get(status_id or "")
                status = nodes.status.state(int(raw)) if nodes.status and raw is not None else "running"
                emit(Reading(time.time(), status, metrics))
