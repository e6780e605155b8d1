"""``/healthz``, ``/readyz`` and ``/metrics`` on one small HTTP server (a daemon thread), for the
worker and the dead-letter consumer alike.

- ``/healthz`` (liveness): the service's main loop has turned within ``STALL_S``; it keeps turning
  while it waits for a store or the registry, so an outage does not get the pod killed and its
  backlog redelivered.
- ``/readyz`` (readiness): what the service's ``readiness()`` says, with its detail as JSON.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

STALL_S = 60.0


class Probed(Protocol):
    """What the probes read of a service."""

    heartbeat: float

    @property
    def metrics_registry(self) -> CollectorRegistry: ...

    def readiness(self) -> tuple[bool, dict[str, Any]]: ...


class HealthServer:
    def __init__(self, host: str, port: int, service: Probed) -> None:
        handler = type("Handler", (_Handler,), {"service": service})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="health", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    service: Probed

    def do_GET(self) -> None:
        service = self.service
        if self.path == "/metrics":
            self._send(200, generate_latest(service.metrics_registry), CONTENT_TYPE_LATEST)
        elif self.path == "/healthz":
            stalled = time.monotonic() - service.heartbeat
            self._json(200 if stalled < STALL_S else 503, {"loop_stalled_s": round(stalled, 1)})
        elif self.path == "/readyz":
            ready, detail = service.readiness()
            self._json(200 if ready else 503, detail)
        else:
            self._json(404, {"error": f"no such path {self.path!r}"})

    def _json(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # probes every few seconds: not news
        return
