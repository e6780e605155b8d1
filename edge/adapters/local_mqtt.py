"""A local MQTT broker on the plant network (a PLC or sensor that publishes itself)."""

from __future__ import annotations

import asyncio

import paho.mqtt.client as mqtt

from edge.adapters import Adapter, Emit
from edge.adapters.pushed import parse_pushed
from edge.config import LocalMqtt


class LocalMqttAdapter(Adapter):
    async def session(self, emit: Emit) -> None:
        settings = self.machine.adapter
        assert isinstance(settings, LocalMqtt)
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[str] = loop.create_future()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"ironlink-agent.{self.machine.id}")

        def received(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
            try:
                reading = parse_pushed(bytes(message.payload))
            except ValueError as error:
                self.status.last_error = str(error)[:300]
                return
            loop.call_soon_threadsafe(emit, reading)

        def lose() -> None:
            if not lost.done():
                lost.set_result("disconnected")

        def gone(*_: object) -> None:
            loop.call_soon_threadsafe(lose)

        client.on_connect = lambda c, *_: c.subscribe(settings.topic, qos=1)
        client.on_message = received
        client.on_disconnect = gone
        await loop.run_in_executor(None, client.connect, settings.host, settings.port)
        client.loop_start()
        try:
            raise ConnectionError(await lost)
        finally:
            client.disconnect()
            client.loop_stop()
