"""What the InfluxDB provider's updates put on the wire: the HTTP requests the real ``influxdb-client``
stack sends (``InfluxDBClient`` → API classes → services → serializer → ``urllib3``), captured at
the client's connection pool instead of a socket, since no InfluxDB 2.x server exists here.

Two PATCH semantics of InfluxDB's API are at stake (its OpenAPI ``PatchBucketRequest`` and
``AuthorizationUpdateRequest``): an empty ``retentionRules`` list means "leave the rules as they
are", and a ``status`` in a token update sets the token's status.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import urllib3
from influxdb_client import InfluxDBClient

from components.providers.influxdb import BucketProvider, InfluxApis, TokenProvider

URL, ADMIN = "http://influxdb.ironlink.svc.cluster.local:8086", "operator-token"


class WireRecorder:
    """Stands in for ``urllib3.PoolManager``: records each request and answers it with ``answer``."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        self.requests: list[tuple[str, str, Any]] = []

    def request(self, method: str, url: str, body: Any = None, **_: Any) -> urllib3.HTTPResponse:
        self.requests.append((method, url, json.loads(body) if body else None))
        return urllib3.HTTPResponse(
            body=json.dumps(self.answer).encode(),
            status=200,
            headers={"Content-Type": "application/json"},
            preload_content=False,
        )

    @contextmanager
    def connect(self, url: str, token: str) -> Iterator[InfluxApis]:
        with InfluxDBClient(url=url, token=token) as client:
            client.api_client.rest_client.pool_manager = self
            yield InfluxApis(client.organizations_api(), client.buckets_api(), client.authorizations_api())


def bucket_props(retention_seconds: int) -> dict[str, Any]:
    return {
        "url": URL,
        "admin_token": ADMIN,
        "org_id": "0org0000000001",
        "name": "acme-telemetry",
        "retention_seconds": retention_seconds,
        "description": None,
    }


def test_a_bucket_changed_to_forever_is_patched_with_an_explicit_rule_of_zero_seconds() -> None:
    wire = WireRecorder(
        {"id": "b1", "name": "acme-telemetry", "orgID": "0org0000000001", "retentionRules": []}
    )
    BucketProvider(wire.connect).update("b1", bucket_props(2592000), bucket_props(0))
    ((method, url, body),) = wire.requests
    assert (method, url) == ("PATCH", f"{URL}/api/v2/buckets/b1")
    assert body["retentionRules"] == [{"type": "expire", "everySeconds": 0}], (
        "an empty list is read as 'no change': the bucket would keep expiring its data"
    )


def test_a_bucket_kept_forever_is_created_with_the_same_explicit_rule() -> None:
    wire = WireRecorder(
        {"id": "b1", "name": "acme-telemetry", "orgID": "0org0000000001", "retentionRules": []}
    )
    BucketProvider(wire.connect).create(bucket_props(0))
    ((method, url, body),) = wire.requests
    assert (method, url) == ("POST", f"{URL}/api/v2/buckets")
    assert body["retentionRules"] == [{"type": "expire", "everySeconds": 0}]


def test_a_token_update_sends_its_description_and_never_its_status() -> None:
    wire = WireRecorder({"id": "a1", "orgID": "0org0000000001", "status": "inactive"})
    props = {
        "url": URL,
        "admin_token": ADMIN,
        "org_id": "0org0000000001",
        "description": "renamed",
        "permissions": [{"action": "write", "bucket_id": "b1"}],
        "token": None,
    }
    TokenProvider(wire.connect).update("a1", {**props, "token": "secret-0"}, props)
    ((method, url, body),) = wire.requests
    assert (method, url) == ("PATCH", f"{URL}/api/v2/authorizations/a1")
    assert body.get("description") == "renamed"
    assert "status" not in body, "sending status would re-activate a token an operator disabled"
