"""A live feed of one site's machine status over WebSocket (``/v1/sites/{site_id}/live``).

The key is the REST API's: ``Authorization: Bearer <key>`` on the upgrade, or, where a client
cannot set headers (browsers), a first message ``{"api_key": "<key>"}`` within
``live_auth_timeout_s``. The site must be one of the key's tenant (a site key: its own). The feed
sends a ``snapshot`` of the site's machines (the registry's, with each one's latest status from
the store, ``stale`` once silent longer than ``uptime_hold_s``), then after each look at the
store (every ``live_poll_s``) the ``changes``: machines whose status, last-seen time or staleness
changed, and those ``removed`` from the site. Each look at the store is charged to the key's rate limit like a
request (1 + the machines read); the key is checked again every ``live_recheck_s``. A key holds
at most ``live_max_per_key`` feeds at once (per replica), a replica ``live_max_feeds``.

A refusal or an end is one ``{"type": "error", "code": ..., "detail": ...}`` message, then the
close code: 4401 key refused (missing, unknown, expired, revoked), 4404 site unknown, 4429 rate
limited or too many feeds, 1009 a client message over 4 KiB, 1011 store unavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Path, WebSocket, WebSocketDisconnect
from starlette.concurrency import run_in_threadpool

from api.auth import Caller, authenticate
from api.errors import STORE_UNAVAILABLE, store_unavailable
from api.fleet import STATUS_NAMES
from api.ratelimit import PointBuckets
from api.settings import ApiSettings
from api.stores import StoreError, TelemetryStore, latest_by_machine
from registry import api_keys

router = APIRouter(prefix="/v1", tags=["live"])
MESSAGE_MAX_BYTES = 4096
MACHINES_MAX = 1000
"""Most machines one feed carries (``machines_total`` says how many the site has)."""
_ID = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"


class Closed(Exception):
    """End the feed: an error message with ``code`` and ``detail``, then ``close_code``."""

    def __init__(self, close_code: int, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.close_code, self.code, self.detail = close_code, code, detail


class Feeds:
    """Open feeds per key and in all, in this process: a feed takes a slot or is refused."""

    def __init__(self, per_key: int, total: int) -> None:
        self.per_key, self.total = per_key, total
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def take(self, key_id: str) -> None:
        with self._lock:
            if self._open[key_id] >= self.per_key:
                raise Closed(
                    4429, "too_many_feeds", f"API key {key_id} has {self.per_key} live feeds open already"
                )
            if sum(self._open.values()) >= self.total:
                raise Closed(
                    4429, "too_many_feeds", "this API replica serves its most live feeds: retry later"
                )
            self._open[key_id] += 1

    def give_back(self, key_id: str) -> None:
        with self._lock:
            self._open[key_id] -= 1
            if self._open[key_id] <= 0:
                del self._open[key_id]


def feeds(websocket: WebSocket, settings: ApiSettings) -> Feeds:
    """The app's feed slots (made on first use, from the app's settings)."""
    state = websocket.app.state
    if not hasattr(state, "live_feeds"):
        state.live_feeds = Feeds(settings.live_max_per_key, settings.live_max_feeds)
    found: Feeds = state.live_feeds
    return found


async def _presented_key(websocket: WebSocket, settings: ApiSettings) -> str:
    header = websocket.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    try:
        first = await asyncio.wait_for(_receive(websocket), timeout=settings.live_auth_timeout_s)
    except TimeoutError as error:
        detail = (
            'an API key is required: Authorization: Bearer <key>, or {"api_key": "<key>"} as first'
            f" message within {settings.live_auth_timeout_s} s"
        )
        raise Closed(4401, "unauthorized", detail) from error
    key = first.get("api_key") if isinstance(first, dict) else None
    if not isinstance(key, str) or not key:
        raise Closed(4401, "unauthorized", 'the first message must be {"api_key": "<key>"}')
    return key


async def _receive(websocket: WebSocket) -> Any:
    """One client message (text or binary) as JSON, None when it is not JSON; bounded in size."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    data: str | bytes = message.get("text") or message.get("bytes") or b""
    if len(data.encode() if isinstance(data, str) else data) > MESSAGE_MAX_BYTES:
        raise Closed(1009, "message_too_large", f"client messages are at most {MESSAGE_MAX_BYTES} bytes")
    try:
        return json.loads(data)
    except ValueError:
        return None


async def _caller(websocket: WebSocket, presented: str) -> Caller:
    outcome = await run_in_threadpool(authenticate, websocket.app.state.pool, presented)
    if isinstance(outcome, api_keys.Refusal):
        raise Closed(4401, outcome.code, outcome.detail)
    return outcome


def _site_machines(websocket: WebSocket, caller: Caller, site_id: str) -> list[tuple[str, str]]:
    """(machine, type) of the site, or :class:`Closed` 4404 when the key does not see the site."""
    with websocket.app.state.pool.connection() as conn:
        known = conn.execute(
            "SELECT 1 FROM sites WHERE tenant_id = %s AND id = %s", (caller.tenant_id, site_id)
        ).fetchone()
        if known is None or not caller.sees_site(site_id):
            raise Closed(4404, "site_unknown", f"site {site_id!r} is not a site of this key's scope")
        rows = conn.execute(
            "SELECT id, type FROM machines WHERE tenant_id = %s AND site_id = %s ORDER BY id",
            (caller.tenant_id, site_id),
        ).fetchall()
    return [(row[0], row[1]) for row in rows]


def _charge(buckets: PointBuckets, caller: Caller, points: int) -> None:
    """A look costs what a request does: 1 to be admitted, then the machines it read."""
    allowed, tokens = buckets.admit(caller.key_id)
    if not allowed:
        retry = max(1, int((1 - tokens) / buckets.rate) + 1)
        raise Closed(4429, "rate_limited", f"API key {caller.key_id} has used its points; retry in {retry} s")
    buckets.charge(caller.key_id, points)


def _look(
    store: TelemetryStore,
    caller: Caller,
    site_id: str,
    machines: list[tuple[str, str]],
    settings: ApiSettings,
) -> dict[str, dict[str, Any]]:
    """Each machine's status now, as the feed shows it."""
    try:
        found = store.latest(caller.tenant_id, site_id, timedelta(seconds=settings.latest_lookback_s))
    except StoreError as error:
        store_unavailable(error)  # logs what went wrong; the client is told no more than REST's
        raise Closed(1011, "store_unavailable", STORE_UNAVAILABLE) from error
    latest = latest_by_machine(found)
    now = datetime.now(UTC)
    states: dict[str, dict[str, Any]] = {}
    for machine, machine_type in machines[:MACHINES_MAX]:
        seen = latest.get((site_id, machine))
        code = None if seen is None else seen.status_code
        states[machine] = {
            "machine_id": machine,
            "type": machine_type,
            "status": None if code is None else STATUS_NAMES.get(code),
            "status_code": code,
            "last_seen": None if seen is None else seen.last_seen.isoformat(),
            "stale": seen is None or (now - seen.last_seen).total_seconds() > settings.uptime_hold_s,
        }
    return states


async def _feed(
    websocket: WebSocket, caller: Caller, presented: str, site_id: str, settings: ApiSettings
) -> None:
    """Snapshot, then changes, until the client leaves or the feed must end."""
    store: TelemetryStore = websocket.app.state.store
    buckets: PointBuckets = websocket.app.state.rate_limits
    loop = asyncio.get_running_loop()
    left = asyncio.Event()

    async def listen() -> None:  # client messages are read (and bounded) only to notice leaving
        try:
            while True:
                await _receive(websocket)
        except WebSocketDisconnect:
            left.set()

    listener = asyncio.create_task(listen())
    try:
        machines = await run_in_threadpool(_site_machines, websocket, caller, site_id)
        checked_at, shown = loop.time(), None
        while not left.is_set():
            failed = listener.exception() if listener.done() else None
            if failed is not None:
                raise failed
            if loop.time() - checked_at >= settings.live_recheck_s:  # key still valid? machines added?
                caller, checked_at = await _caller(websocket, presented), loop.time()
                machines = await run_in_threadpool(_site_machines, websocket, caller, site_id)
            _charge(buckets, caller, len(machines))
            states = await run_in_threadpool(_look, store, caller, site_id, machines, settings)
            at = datetime.now(UTC).isoformat()
            if shown is None:
                await websocket.send_json(
                    {
                        "type": "snapshot",
                        "site_id": site_id,
                        "at": at,
                        "machines": list(states.values()),
                        "machines_total": len(machines),
                    }
                )
            else:
                changed = [state for machine, state in states.items() if shown.get(machine) != state]
                removed = sorted(set(shown) - set(states))  # taken off the site in the registry
                if changed or removed:
                    message = {"type": "changes", "site_id": site_id, "at": at, "machines": changed}
                    await websocket.send_json({**message, "removed": removed})
            shown = states
            with contextlib.suppress(TimeoutError):  # the poll interval, cut short by leaving
                await asyncio.wait_for(left.wait(), timeout=settings.live_poll_s)
    finally:
        listener.cancel()


@router.websocket("/sites/{site_id}/live")
async def live(websocket: WebSocket, site_id: Annotated[str, Path(pattern=_ID, max_length=32)]) -> None:
    settings: ApiSettings = websocket.app.state.settings
    await websocket.accept()
    slots = feeds(websocket, settings)
    holding: str | None = None  # the key whose slot this feed took
    try:
        presented = await _presented_key(websocket, settings)
        caller = await _caller(websocket, presented)
        slots.take(caller.key_id)
        holding = caller.key_id
        await _feed(websocket, caller, presented, site_id, settings)
    except Closed as closed:
        try:
            await websocket.send_json({"type": "error", "code": closed.code, "detail": closed.detail})
            await websocket.close(code=closed.close_code, reason=closed.code)
        except (WebSocketDisconnect, RuntimeError):
            return  # the client left first
    except WebSocketDisconnect:
        return
    finally:
        if holding is not None:
            slots.give_back(holding)
