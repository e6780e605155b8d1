"""The brokers' authentication failures into the registry's audit trail, bounded against floods.

Mosquitto 2.0.11 (Phase A, the dev platform) tells of a refused CONNECT only in its log, and says
less than one would like (measured with ``log_type`` error, notice and all, ``log_timestamp`` on):

- a wrong password, an unknown username, a disabled (revoked) dynamic-security client and an
  anonymous client are all ``Client <unknown> disconnected, not authorised.`` (``notice``); the
  username is never logged, the client id only when no username was given (``Client <id> ...``),
  and the address only on the ``New connection from <ip>:<port> on port <listener>.`` line that
  came before (``notice``). The line that would carry the address (``Sending CONNACK to <ip> (0,
  135)``) is ``debug``, which also logs every PUBLISH: not for a broker in service;
- a client certificate of another CA: ``OpenSSL Error[0]: ...certificate verify failed``
  (``error``), then ``Client <unknown> disconnected: Protocol error.``;
- no client certificate on an mTLS listener: ``Client connection from <ip> failed: ...peer did not
  return a certificate.`` (``error``).

:class:`MosquittoLogParser` turns those lines into :class:`AuthFailure` events. A refusal names no
connection, so it is given the newest connection still pending (accepted, neither connected nor
refused yet): exact when connections do not overlap, and the attacker's own address in a flood.
:class:`FailureWindow` then bounds what reaches the registry: per minute at most one row per
(reason, address) with its count, at most ``max_keys`` addresses a minute, the rest counted in one
row of address ``*`` per reason. :func:`follow` tails the log file (rotation and truncation
included) and hands each closed minute's rows to a sink: the registry itself (the dev platform,
inside the provisioning service) or ``POST /v1/broker/auth-failures`` (a broker-pod sidecar,
``python -m provisioning.broker_log``).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import re
import signal
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REASONS = ("not_authorised", "tls_certificate_rejected", "tls_no_certificate", "tls_handshake_failed")
"""What Mosquitto lets us tell apart; see the module's docstring for what each one covers."""
WINDOW_S = 60
MAX_KEYS = 100
MAX_PENDING = 1024
PENDING_TTL_S = 60.0
MAX_SAMPLES = 5
MAX_ROWS_PER_POST = 500
MAX_WAITING = 20_000
UNKNOWN = "<unknown>"
TOKEN_ENV = "IRONLINK_BROKER_LOG_TOKEN"
"""The sidecar's broker-log token (the service's ``IRONLINK_PROV_BROKER_LOG_TOKEN``): never a flag."""
AUTH_FAILURES_PATH = "/v1/broker/auth-failures"
"""The service's route the sidecar posts its rows to."""

_TIMESTAMP = re.compile(
    r"^(?P<ts>\d{9,11}|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:Z|[+-]\d\d:?\d\d)?): (?P<msg>.*)$"
)
_NEW = re.compile(r"^New connection from (?P<ip>\S+?):(?P<port>\d+) on port (?P<listener>\d+)\.$")
_CONNECTED = re.compile(r"^New client connected from (?P<ip>\S+?):(?P<port>\d+) as ")
_NOT_AUTHORISED = re.compile(r"^Client (?P<id>.+) disconnected, not authorised\.$")
_PROTOCOL_ERROR = re.compile(r"^Client (?P<id>.+) disconnected: Protocol error\.$")
_OPENSSL = re.compile(r"^OpenSSL Error\[\d+\]: (?P<error>.*)$")
_TLS_FAILED = re.compile(r"^Client connection from (?P<ip>\S+) failed: (?P<error>.*?)\.?$")


@dataclass(frozen=True)
class AuthFailure:
    """One refused connection as the broker's log tells it."""

    at: datetime.datetime
    reason: str
    address: str | None
    listener: int | None = None
    client_id: str | None = None
    detail: str | None = None
    username: str | None = None
    """Never in Mosquitto's log; EMQX's ``client.connack`` event has it."""


@dataclass
class _Pending:
    ip: str
    port: int
    listener: int
    seen: float
    tls_error: str | None = None


def _timestamp(text: str | None) -> datetime.datetime:
    if text is None:
        return datetime.datetime.now(datetime.UTC)
    if text.isdigit():
        return datetime.datetime.fromtimestamp(int(text), datetime.UTC)
    parsed = datetime.datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.astimezone()  # a naive stamp is the broker's local time


def _tls_reason(error: str) -> str:
    """OpenSSL's words, whichever line (``OpenSSL Error`` or ``... failed:``) carries them."""
    if "did not return a certificate" in error:
        return "tls_no_certificate"
    return "tls_certificate_rejected" if "verify failed" in error else "tls_handshake_failed"


class MosquittoLogParser:
    """Mosquitto 2.0 log lines in, :class:`AuthFailure` out; keeps the connections still pending."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._pending: OrderedDict[str, _Pending] = OrderedDict()

    def feed(self, line: str) -> AuthFailure | None:
        match = _TIMESTAMP.match(line.rstrip("\r\n"))
        stamp, message = (match["ts"], match["msg"]) if match else (None, line.rstrip("\r\n"))
        now = self._clock()
        self._expire(now)
        if found := _NEW.match(message):
            key = f"{found['ip']}:{found['port']}"
            self._pending[key] = _Pending(found["ip"], int(found["port"]), int(found["listener"]), now)
            self._pending.move_to_end(key)
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)
            return None
        if found := _CONNECTED.match(message):
            self._pending.pop(f"{found['ip']}:{found['port']}", None)
            return None
        if found := _OPENSSL.match(message):
            if self._pending:
                next(reversed(self._pending.values())).tls_error = found["error"]
            return None
        if found := _NOT_AUTHORISED.match(message):
            pending = self._take()
            client_id = None if found["id"] == UNKNOWN else found["id"]
            return self._failure(stamp, "not_authorised", pending, client_id=client_id)
        if (found := _PROTOCOL_ERROR.match(message)) and found["id"] == UNKNOWN:
            pending = self._take()
            if pending is None or pending.tls_error is None:
                return None  # a connection that broke before CONNECT: no authentication happened
            return self._failure(stamp, _tls_reason(pending.tls_error), pending, detail=pending.tls_error)
        if found := _TLS_FAILED.match(message):
            pending = self._take(found["ip"])
            error = found["error"]
            reason = _tls_reason(error)
            failure = self._failure(stamp, reason, pending, detail=error)
            return failure if pending else AuthFailure(failure.at, reason, found["ip"], detail=error)
        return None

    def _take(self, ip: str | None = None) -> _Pending | None:
        """The newest pending connection (of ``ip`` when given), forgotten."""
        for key in reversed(self._pending):
            if ip is None or self._pending[key].ip == ip:
                return self._pending.pop(key)
        return None

    def _expire(self, now: float) -> None:
        while self._pending and now - next(iter(self._pending.values())).seen > PENDING_TTL_S:
            self._pending.popitem(last=False)

    @staticmethod
    def _failure(
        stamp: str | None,
        reason: str,
        pending: _Pending | None,
        *,
        client_id: str | None = None,
        detail: str | None = None,
    ) -> AuthFailure:
        return AuthFailure(
            at=_timestamp(stamp),
            reason=reason,
            address=pending.ip if pending else None,
            listener=pending.listener if pending else None,
            client_id=client_id,
            detail=detail,
        )


@dataclass
class FailureRow:
    """What one audit row says: ``count`` refusals of ``reason`` from ``address`` in one window."""

    window_start: datetime.datetime
    reason: str
    address: str
    count: int = 0
    first_at: datetime.datetime | None = None
    last_at: datetime.datetime | None = None
    listeners: list[int] = field(default_factory=list)
    client_ids: list[str] = field(default_factory=list)
    usernames: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {
            "window_start": self.window_start.isoformat(),
            "reason": self.reason,
            "address": self.address,
            "count": self.count,
            "first_at": (self.first_at or self.window_start).isoformat(),
            "last_at": (self.last_at or self.window_start).isoformat(),
            "listeners": self.listeners,
            "client_ids": self.client_ids,
            "usernames": self.usernames,
        }


class FailureWindow:
    """Counts failures per window of ``window_s`` (by the log's own time) and (reason, address);
    at most ``max_keys`` addresses a window, the others in one ``*`` row per reason. So a window
    yields at most ``max_keys + len(REASONS)`` rows, however many failures it saw."""

    def __init__(self, window_s: int = WINDOW_S, max_keys: int = MAX_KEYS) -> None:
        self.window_s, self.max_keys = window_s, max_keys
        self._rows: dict[tuple[datetime.datetime, str, str], FailureRow] = {}
        self._addresses: dict[datetime.datetime, set[str]] = {}

    def _start(self, at: datetime.datetime) -> datetime.datetime:
        epoch = int(at.timestamp())
        return datetime.datetime.fromtimestamp(epoch - epoch % self.window_s, datetime.UTC)

    def add(self, failure: AuthFailure) -> None:
        start = self._start(failure.at)
        seen = self._addresses.setdefault(start, set())
        address = failure.address or UNKNOWN
        if address not in seen and len(seen) >= self.max_keys:
            address = "*"
        else:
            seen.add(address)
        row = self._rows.setdefault(
            (start, failure.reason, address), FailureRow(start, failure.reason, address)
        )
        row.count += 1
        row.first_at = min(row.first_at or failure.at, failure.at)
        row.last_at = max(row.last_at or failure.at, failure.at)
        if failure.listener is not None and failure.listener not in row.listeners:
            row.listeners.append(failure.listener)
        for sample, into in ((failure.client_id, row.client_ids), (failure.username, row.usernames)):
            if sample and sample[:128] not in into and len(into) < MAX_SAMPLES:
                into.append(sample[:128])

    def closed(self, now: datetime.datetime | None = None) -> list[FailureRow]:
        """Rows of the windows that ended before ``now`` (every window when None), removed."""
        limit = None if now is None else self._start(now)
        done = [key for key in self._rows if limit is None or key[0] < limit]
        rows = [self._rows.pop(key) for key in done]
        for start in [s for s in self._addresses if limit is None or s < limit]:
            del self._addresses[start]
        return sorted(rows, key=lambda row: (row.window_start, row.reason, row.address))


# ------------------------------------------------------------------------------------- following
Sink = Callable[[list[FailureRow]], None]


def follow(
    path: Path,
    sink: Sink,
    stop: threading.Event,
    *,
    poll_s: float = 1.0,
    from_start: bool = False,
    window: FailureWindow | None = None,
    truncate_over: int | None = None,
) -> None:
    """Tail ``path`` until ``stop``, handing each closed window's rows to ``sink`` (and the rest
    when stopping). A replaced file (rotation) is reopened from its start, a truncated one from 0;
    ``truncate_over``: empty the file once read past that many bytes (Mosquitto appends, so it
    writes on at the new end), which bounds a log volume no one rotates. A sink that fails keeps its
    rows for the next round."""
    parser, window = MosquittoLogParser(), window or FailureWindow()
    handle: io.TextIOWrapper | None = None
    inode: int | None = None
    waiting: list[FailureRow] = []
    position = 0
    try:
        while True:
            if handle is None:
                try:
                    handle = path.open("r", encoding="utf-8", errors="replace")
                except FileNotFoundError:
                    handle = None
                else:
                    inode = os.fstat(handle.fileno()).st_ino
                    if not from_start:
                        handle.seek(0, os.SEEK_END)
                    from_start = True  # a later (re)opened file is new: read it whole
                    position = handle.tell()
            if handle is not None:
                for line in iter(handle.readline, ""):
                    if not line.endswith("\n"):
                        handle.seek(position)  # a line still being written: next round
                        break
                    position = handle.tell()
                    if failure := parser.feed(line):
                        window.add(failure)
                handle, position = _reopen_if_replaced(path, handle, inode, position, truncate_over)
            stopping = stop.is_set()
            waiting += window.closed(None if stopping else datetime.datetime.now(datetime.UTC))
            if len(waiting) > MAX_WAITING:  # the service away for hours: keep the newest, say so
                print(f"broker_log: {len(waiting) - MAX_WAITING} rows dropped, sink away", file=sys.stderr)
                waiting = waiting[-MAX_WAITING:]
            if waiting:
                try:
                    sink(waiting)
                    waiting = []
                except Exception as error:  # kept for the next round; the follower must not die
                    print(f"broker_log: cannot record {len(waiting)} rows: {error}", file=sys.stderr)
            if stopping:
                return
            stop.wait(poll_s)
    finally:
        if handle is not None:
            handle.close()


def _reopen_if_replaced(
    path: Path, handle: io.TextIOWrapper, inode: int | None, position: int, truncate_over: int | None
) -> tuple[io.TextIOWrapper | None, int]:
    try:
        current = path.stat()
    except FileNotFoundError:
        return handle, position  # rotated away and not recreated yet: keep the old one
    if current.st_ino != inode:
        handle.close()
        return None, 0
    if current.st_size < position:
        handle.seek(0)
        return handle, 0
    if truncate_over is not None and position > truncate_over and current.st_size == position:
        os.truncate(path, 0)
        handle.seek(0)
        return handle, 0
    return handle, position


def http_sink(url: str, token: str, broker: str, *, ca_file: str | None = None, timeout: float = 10) -> Sink:
    """Rows to ``POST /v1/broker/auth-failures`` (``Authorization: Bearer <broker log token>``)."""
    context = ssl.create_default_context(cafile=ca_file) if url.startswith("https") else None

    def send(rows: list[FailureRow]) -> None:
        for first in range(0, len(rows), MAX_ROWS_PER_POST):
            body = {
                "broker": broker,
                "rows": [row.as_json() for row in rows[first : first + MAX_ROWS_PER_POST]],
            }
            request = urllib.request.Request(
                url,
                json.dumps(body).encode(),
                {"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=timeout, context=context):
                pass

    return send


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m provisioning.broker_log --log FILE --url URL``: the broker-pod sidecar. The token
    comes from ``IRONLINK_BROKER_LOG_TOKEN`` only, never from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m provisioning.broker_log", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--log", type=Path, required=True, help="the broker's log file (log_dest file)")
    parser.add_argument("--url", required=True, help="the service's /v1/broker/auth-failures")
    parser.add_argument("--broker", default=os.environ.get("HOSTNAME", "mosquitto"), help="who reports")
    parser.add_argument("--ca-file", help="the CA of the service's HTTPS certificate")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between reads (0.05 to 60)")
    parser.add_argument("--truncate-over", type=int, default=64 << 20, help="bytes; 0: never truncate")
    options = parser.parse_args(argv)
    problems = []
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        problems.append(f"{TOKEN_ENV}: is required")
    if not 0.05 <= options.poll <= 60:
        problems.append(f"--poll: {options.poll} is not between 0.05 and 60")
    if not re.match(r"^https?://[^\s]+$", options.url):
        problems.append(f"--url: {options.url!r} is not an http(s) URL")
    if options.truncate_over < 0:
        problems.append(f"--truncate-over: {options.truncate_over} must not be negative")
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sink = http_sink(options.url, token, options.broker[:64], ca_file=options.ca_file)
    try:
        follow(options.log, sink, stop, poll_s=options.poll, truncate_over=options.truncate_over or None)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
