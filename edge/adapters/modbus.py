"""Modbus TCP, or RTU framing over TCP (a serial-to-Ethernet gateway), polled with pymodbus."""

from __future__ import annotations

import asyncio
import time

from pymodbus import FramerType
from pymodbus.client import AsyncModbusTcpClient

from edge.adapters import Adapter, Emit
from edge.config import ModbusTcp
from edge.maps import ModbusMap, machine_map
from edge.normalize import Reading

_DATATYPE = {
    "uint16": AsyncModbusTcpClient.DATATYPE.UINT16,
    "int16": AsyncModbusTcpClient.DATATYPE.INT16,
    "uint32": AsyncModbusTcpClient.DATATYPE.UINT32,
    "int32": AsyncModbusTcpClient.DATATYPE.INT32,
    "float32": AsyncModbusTcpClient.DATATYPE.FLOAT32,
}


class ModbusAdapter(Adapter):
    async def session(self, emit: Emit) -> None:
        settings = self.machine.adapter
        assert isinstance(settings, ModbusTcp)
        registers = machine_map(self.machine)
        assert isinstance(registers, ModbusMap)
        first, count = registers.span()
        client = AsyncModbusTcpClient(
            settings.host,
            port=settings.port,
            framer=FramerType.RTU if settings.framing == "rtu" else FramerType.SOCKET,
            timeout=settings.timeout_s,
            retries=0,
            reconnect_delay=0,  # the adapter backs off itself, and reports while it does
        )
        read = client.read_holding_registers if registers.table == "holding" else client.read_input_registers
        try:
            if not await client.connect():
                raise ConnectionError(f"{settings.host}:{settings.port} refused or unreachable")
            while True:
                started = time.monotonic()
                answer = await read(first, count=count, device_id=settings.unit)
                if answer.isError():
                    raise ConnectionError(f"Modbus error answer: {answer}")
                emit(decode_registers(registers, first, list(answer.registers), time.time()))
                await asyncio.sleep(max(0.0, settings.poll_ms / 1000 - (time.monotonic() - started)))
        finally:
            client.close()


def decode_registers(registers: ModbusMap, first: int, words: list[int], ts: float) -> Reading:
    """Raw words of one read into a reading: each register decoded by its type, scaled."""
    metrics = {}
    for name, register in registers.registers.items():
        start = register.address - first
        width = _DATATYPE[register.type].value[1]
        raw = AsyncModbusTcpClient.convert_from_registers(
            words[start : start + width], _DATATYPE[register.type]
        )
        assert isinstance(raw, int | float)
        metrics[name] = register.value(float(raw))
    status = (
        registers.status.state(words[registers.status.address - first]) if registers.status else "running"
    )
    return Reading(ts, status, metrics)
