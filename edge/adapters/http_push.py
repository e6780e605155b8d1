"""HTTP push: a source POSTs one reading as JSON to ``/readings``; 202 once it is in the store."""

from __future__ import annotations

import asyncio

from edge.adapters import Adapter, Emit
from edge.adapters.pushed import MAX_BODY_BYTES, parse_pushed
from edge.config import HttpPush

_REASONS = {
    202: "Accepted",
    400: "Bad Request",
    404: "Not Found",
    413: "Content Too Large",
    503: "Service Unavailable",
}


class HttpPushAdapter(Adapter):
    async def session(self, emit: Emit) -> None:
        settings = self.machine.adapter
        assert isinstance(settings, HttpPush)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                code, text = await asyncio.wait_for(_answer(reader, emit), timeout=10)
            except (TimeoutError, ValueError, asyncio.IncompleteReadError, ConnectionError):
                code, text = 400, "unreadable request"
            body = text.encode()
            head = (
                f"HTTP/1.1 {code} {_REASONS[code]}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, settings.host, settings.port, limit=MAX_BODY_BYTES)
        async with server:
            self._mark("up", None)
            await server.serve_forever()


async def _answer(reader: asyncio.StreamReader, emit: Emit) -> tuple[int, str]:
    request = (await reader.readline()).decode("latin-1").split()
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if request[:2] != ["POST", "/readings"]:
        return 404, "POST /readings only"
    length = int(headers.get("content-length", "0"))
    if length > MAX_BODY_BYTES:
        return 413, f"body of {length} bytes exceeds {MAX_BODY_BYTES}"
    try:
        reading = parse_pushed(await reader.readexactly(length))
    except ValueError as error:
        return 400, str(error)
    taken = emit(reading)
    if taken is None:
        return 400, "rejected by normalization (counted in the agent's drops)"
    try:
        await asyncio.wrap_future(taken)  # 202 only once the store took it (with ``always``: fsynced)
    except Exception:  # the store rolled the commit back (a ``store_error`` drop)
        return 503, "the store refused the reading"
    return 202, "stored"
