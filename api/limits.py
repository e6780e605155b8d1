"""A bound on every request body, applied before routing.

FastAPI reads a route's whole body before it resolves the route's dependencies (the API key
among them), so without this anyone could make a replica buffer any number of bytes. A body
over the bound (declared by ``Content-Length`` or counted as it streams) is answered 413
``payload_too_large`` before the app sees it; Grafana's webhook has its own, larger bound.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime

from pydantic import AfterValidator
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """ASGI middleware: buffer a body up to ``limit`` bytes (``per_path`` overrides), then hand it
    to the app; refuse it with 413 past that."""

    def __init__(self, app: ASGIApp, *, limit: int, per_path: Mapping[str, int] | None = None) -> None:
        self.app, self.limit, self.per_path = app, limit, dict(per_path or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope["path"], self.limit)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _too_large(send, f"body: {int(declared)} bytes is more than {limit}")
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(send, f"body: more than {limit} bytes")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        whole: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """``messages`` first, then whatever the client sends next (a disconnect)."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


async def _too_large(send: Send, detail: str) -> None:
    body = json.dumps({"code": "payload_too_large", "detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(3000, 1, 1, tzinfo=UTC)


def bounded_time(value: datetime) -> datetime:
    """Refuse a time outside [1970, 3000] (UTC; a naive one read as UTC, its handler names the
    missing zone). PostgreSQL stores 1 BC and 10000 AD but psycopg cannot read them back, the
    store has nothing before 1970, and ranges near year 9999 overflow ``datetime``."""
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    try:
        inside = EARLIEST <= aware <= LATEST
    except OverflowError:
        inside = False
    if not inside:
        raise ValueError(f"must be between {EARLIEST.date()} and {LATEST.date()} (UTC)")
    return value


InRange = AfterValidator(bounded_time)
"""``Annotated[datetime, ..., InRange]``: a time the registry and the store can hold."""
