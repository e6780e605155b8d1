"""``/healthz``, ``/readyz`` and ``/metrics`` on one small HTTP server (a daemon thread).

- ``/healthz`` (liveness): the main loop has turned within ``STALL_S``; it keeps turning while
  it waits for the store, so an outage does not get the pod killed and its backlog redelivered.
- ``/readyz`` (readiness): connected to the broker, and the spool takes what a held tenant's store
  cannot. A held tenant does not make the worker unready (the others flow on, and a rollout must
  not stall on one customer's outage): the answer lists it under ``held_tenants``.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from ingest.worker import Worker

STALL_S = 60.0


class HealthServer:
    def __init__(self, worker: Worker, host: str, port: int) -> None:
        handler = type("Handler", (_Handler,), {"worker": worker})
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
    worker: Worker

    def do_GET(self) -> None:
        worker = self.worker
        if self.path == "/metrics":
            self._send(200, generate_latest(worker.metrics.registry), CONTENT_TYPE_LATEST)
        elif self.path == "/healthz":
            stalled = time.monotonic() - worker.heartbeat
            self._json(200 if stalled < STALL_S else 503, {"loop_stalled_s": round(stalled, 1)})
        elif self.path == "/readyz":
            ready = worker.connected and worker.spool_ok
            self._json(
                200 if ready else 503,
                {
                    "broker_connected": worker.connected,
                    "spool_ok": worker.spool_ok,
                    "held_tenants": worker.held_tenants(),
                },
            )
        else:
            self._json(404, {"error": f"no such path {self.path!r}"})

    def _json(self, status: int, body: dict[str, object]) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # probes every few seconds: not news
        return
