"""Writes to each tenant's bucket with ``influxdb-client``, synchronously.

Synchronous on purpose: the default ``write_api()`` batches in a background thread and reports
failures through callbacks, while the worker acknowledges a message to the broker only once its
point is stored, so it needs the write's outcome in hand. The client's own retries are off
(``retries=False`` is its default); the worker retries with its own backoff and stops
acknowledging meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from influxdb_client import InfluxDBClient, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS, WriteApi
from influxdb_client.rest import ApiException

from ingest.settings import WorkerSettings

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


class Store:
    """One client per (instance URL, token): level-3 tenants have their own instance, and each
    tenant's token may only write its own bucket."""

    def __init__(self, settings: WorkerSettings, tokens: Mapping[str, str]) -> None:
        self._routes = settings.tenants
        self._clients: dict[tuple[str, str], InfluxDBClient] = {}
        self._apis: dict[str, WriteApi] = {}
        for tenant, route in settings.tenants.items():
            url, token = settings.store_urls[route.instance], tokens.get(tenant, "")
            client = self._clients.get((url, token))
            if client is None:
                client = InfluxDBClient(
                    url=url, token=token, org=route.org, timeout=settings.store_timeout_ms
                )
                self._clients[(url, token)] = client
            self._apis[tenant] = client.write_api(write_options=SYNCHRONOUS)

    def write(self, tenant_id: str, lines: list[str]) -> None:
        """Write one tenant's lines; raises whatever the client raises when it did not succeed."""
        route = self._routes[tenant_id]
        # One joined string: the client would serialize a list line by line, at twice the cost.
        body = "\n".join(lines)
        self._apis[tenant_id].write(bucket=route.bucket, org=route.org, record=body, write_precision=_MS)

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
        for client in self._clients.values():
            client.close()
