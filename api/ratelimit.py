"""Rate limits per API key, weighted by the points a request scans.

One token bucket per key in this process (a replica's share): ``rate_points_per_second`` refill,
``rate_burst_points`` deep. Every request costs 1 when it starts and is refused with 429 while its
key's bucket is below 1; what it then scans is charged in full after the store answered, and may
take the bucket below zero (as deep as the scan was: no floor, or a single huge scan would cost at
most two buckets), so a key that scanned a lot waits that long before its next request. Every
answer carries ``RateLimit-Limit``, ``RateLimit-Remaining`` and ``RateLimit-Reset`` (seconds
until the bucket is full); a 429 also ``Retry-After``.

The buckets are :class:`ingest.buckets.KeyedBuckets` (the provisioning service's too): memory is
bounded, the least recently used key forgotten first.
"""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import Depends, Request
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import Caller, CallerDep
from api.errors import ApiError
from ingest.buckets import KeyedBuckets

STATE_HEADERS = "ratelimit_headers"
"""``request.state`` attribute the middleware copies onto the response."""


class PointBuckets(KeyedBuckets):
    """Token buckets keyed by API key id, in points."""

    def admit(self, key: str) -> tuple[bool, float]:
        """Charge the 1 point every request costs: ``(allowed, tokens left)``."""
        with self._lock:
            bucket = self._refilled(key)
            if bucket.tokens < 1:
                return False, bucket.tokens
            bucket.tokens -= 1
            return True, bucket.tokens

    def charge(self, key: str, points: int) -> float:
        """Charge points already scanned (never refused); the tokens left."""
        with self._lock:
            bucket = self._refilled(key)
            bucket.tokens -= points
            return bucket.tokens

    def headers(self, tokens: float) -> dict[str, str]:
        reset = (self.burst - tokens) / self.rate
        return {
            "RateLimit-Limit": str(self.burst),
            "RateLimit-Remaining": str(max(0, math.floor(tokens))),
            "RateLimit-Reset": str(max(0, math.ceil(reset))),
        }


class Meter:
    """The calling key's meter for one request: :meth:`charge` what the request scanned."""

    def __init__(self, request: Request, buckets: PointBuckets, caller: Caller) -> None:
        self._request, self._buckets, self.caller = request, buckets, caller
        self.scanned = 0

    def charge(self, points: int) -> None:
        if points <= 0:
            return
        self.scanned += points
        tokens = self._buckets.charge(self.caller.key_id, points)
        setattr(self._request.state, STATE_HEADERS, self._buckets.headers(tokens))


def metered(request: Request, caller: CallerDep) -> Meter:
    """Admit the caller's request (1 point) or refuse it with 429."""
    buckets: PointBuckets = request.app.state.rate_limits
    allowed, tokens = buckets.admit(caller.key_id)
    headers = buckets.headers(tokens)
    if not allowed:
        retry = max(1, math.ceil((1 - tokens) / buckets.rate))
        raise ApiError(
            429,
            "rate_limited",
            f"API key {caller.key_id} has used its points; retry in {retry} s",
            headers={**headers, "Retry-After": str(retry)},
        )
    setattr(request.state, STATE_HEADERS, headers)
    return Meter(request, buckets, caller)


MeterDep = Annotated[Meter, Depends(metered)]
"""Every data route takes this (it implies :data:`api.auth.CallerDep`, resolved once)."""


class RateLimitHeaders:
    """ASGI middleware: the headers of the request's last charge (kept in the request's state)
    onto whatever response it got; a plain ASGI wrapper, not a ``BaseHTTPMiddleware``, which
    would cost every request a task and a copy of the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            charged = scope.get("state", {}).get(STATE_HEADERS)
            if message["type"] == "http.response.start" and charged:
                headers = MutableHeaders(scope=message)
                for name, value in charged.items():
                    if name not in headers:
                        headers.append(name, value)
            await send(message)

        await self.app(scope, receive, sending)
