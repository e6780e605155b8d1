"""Writes to each tenant's bucket with ``influxdb-client``, synchronously.

Synchronous on purpose: the default ``write_api()`` batches in a background thread and reports
failures through callbacks, while the worker acknowledges a message to the broker only once its
point is stored, so it needs the write's outcome in hand. The client's own retries are off
(``retries=False`` is its default); the worker retries with its own backoff and stops
acknowledging meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from influxdb_client import InfluxDBClient, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS, WriteApi
from influxdb_client.rest import ApiException

from registry.tenant_routes import TenantStoreRoute

# Line protocol timestamps are milliseconds (the client types the constant as a plain str).
_MS = cast(WritePrecision, WritePrecision.MS)
# The store read the request and refused the data: sending it again cannot succeed.
_DATA_REJECTED = {400, 413, 422}


def is_retryable(error: Exception) -> bool:
    """Everything but a refusal of the data itself: network errors, 5xx, 429, and also 401/403/404,
    which an operator fixes (token, bucket) without the data having to change."""
    return not (isinstance(error, ApiException) and error.status in _DATA_REJECTED)


def store_answer(error: BaseException) -> str:
    """What the store said, bounded: the status and the body's message for an API error."""
    if isinstance(error, ApiException):
        return f"{error.status} {error.reason}: {(error.body or '')[:400]}".strip()
    return f"{type(error).__name__}: {str(error)[:400]}"


@dataclass(frozen=True, slots=True)
class TenantWriter:
    """One tenant's way into its store: the route and the write API of its (URL, token) client."""

    route: TenantStoreRoute
    api: WriteApi


class Store:
    """One client per (instance URL, token): level-3 tenants have their own instance, and each
    tenant's token may only write its own bucket.

    The tenants change at runtime (:meth:`use_tenants`, from the registry): the map of writers is
    replaced whole, and every request looks its tenant up again, so the first write after a
    token rotation already carries the new token. A client no longer used is closed one request
    timeout after it was retired, by the next change: a write in flight on it has ended by then.
    """

    def __init__(self, timeout_ms: int, routes: Mapping[str, TenantStoreRoute]) -> None:
        self._timeout_ms = timeout_ms
        self._clients: dict[tuple[str, str], InfluxDBClient] = {}
        self._writers: dict[str, TenantWriter] = {}
        self._retired: list[tuple[float, InfluxDBClient]] = []
        self._lock = threading.Lock()  # changes only: writes read the current map without it
        self.use_tenants(routes)

    def use_tenants(self, routes: Mapping[str, TenantStoreRoute]) -> None:
        with self._lock:
            clients: dict[tuple[str, str], InfluxDBClient] = {}
            writers: dict[str, TenantWriter] = {}
            for tenant, route in routes.items():
                key = (route.url, route.token.get_secret_value())
                client = clients.get(key) or self._clients.get(key)
                if client is None:
                    client = InfluxDBClient(url=key[0], token=key[1], org=route.org, timeout=self._timeout_ms)
                clients[key] = client
                old = self._writers.get(tenant)
                if old is not None and (old.route.url, old.route.token) == (route.url, route.token):
                    writers[tenant] = TenantWriter(route, old.api)
                else:
                    writers[tenant] = TenantWriter(route, client.write_api(write_options=SYNCHRONOUS))
            now = time.monotonic()
            self._retired += [(now, c) for key, c in self._clients.items() if key not in clients]
            self._clients, self._writers = clients, writers
            self._close_retired(now - self._timeout_ms / 1000 - 1)

    def _close_retired(self, before: float) -> None:
        keep = []
        for retired_at, client in self._retired:
            if retired_at <= before:
                client.close()
            else:
                keep.append((retired_at, client))
        self._retired = keep

    def __contains__(self, tenant_id: object) -> bool:
        return tenant_id in self._writers

    def writer(self, tenant_id: str) -> TenantWriter:
        """The tenant's current route and write API (KeyError for a tenant no longer known)."""
        return self._writers[tenant_id]

    def write(self, tenant_id: str, lines: list[str]) -> None:
        """Write one tenant's lines; raises whatever the client raises when it did not succeed."""
        writer = self._writers[tenant_id]
        route = writer.route
        # One joined string: the client would serialize a list line by line, at twice the cost.
        body = "\n".join(lines)
        writer.api.write(bucket=route.bucket, org=route.org, record=body, write_precision=_MS)

    def write_each(self, tenant_id: str, lines: list[str]) -> dict[int, str]:
        """Write ``lines`` and say, point by point, which ones the store refused.

        InfluxDB answers 422 "partial write" when some points fall outside the bucket's retention,
        having stored the others; 400 names a line it cannot parse; 413 a body too large. None of
        them says which points were refused, so a refused request is split in halves until each
        refused line stands alone (rewriting a stored point is harmless: same series, same time).
        Returns the refused lines' indexes with the store's answer; raises a retryable error (store
        down, 5xx, 401/403/404) as it comes, leaving the caller to hold the whole set.
        """
        refused: dict[int, str] = {}
        pending = [(0, len(lines))]
        while pending:
            low, high = pending.pop()
            try:
                self.write(tenant_id, lines[low:high])
            except ApiException as error:
                if is_retryable(error):
                    raise
                if high - low == 1:
                    refused[low] = store_answer(error)
                else:
                    middle = (low + high) // 2
                    pending += [(middle, high), (low, middle)]
        return refused

    def close(self) -> None:
        with self._lock:
            self._close_retired(float("inf"))
            for client in self._clients.values():
                client.close()
