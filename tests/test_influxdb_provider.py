"""The InfluxDB dynamic provider's create/read/diff/update/delete, as unit tests.

No InfluxDB 2.x server exists on this machine, and ``create``/``diff`` never run under the mock
engine, so the providers are called directly with a connector that yields *autospecced* API
objects: every call must match the real ``OrganizationsApi``/``BucketsApi``/``AuthorizationsApi``
signatures, and is answered with the real ``influxdb_client`` domain classes. The tests assert
which API calls the provider makes and with what objects.
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest.mock import create_autospec

import dill
import pytest
from influxdb_client import (
    Authorization,
    AuthorizationsApi,
    BucketsApi,
    Organization,
    OrganizationsApi,
    Permission,
    PermissionResource,
    PostBucketRequest,
)
from influxdb_client.domain.bucket import Bucket
from influxdb_client.rest import ApiException
from pulumi.dynamic.dynamic import serialize_provider
from pulumi.runtime.rpc import UNKNOWN

from components.providers import influxdb
from components.providers.influxdb import (
    BucketProvider,
    InfluxApis,
    OrganizationProvider,
    TokenProvider,
    connect,
)

URL, ADMIN = "http://influxdb.ironlink.svc.cluster.local:8086", "operator-token"


class InfluxRecorder:
    """The three tenancy APIs in memory: real signatures (autospec), real domain objects."""

    def __init__(self) -> None:
        self.orgs: dict[str, Organization] = {}
        self.buckets: dict[str, Bucket] = {}
        self.auths: dict[str, Authorization] = {}
        self.connections: list[tuple[str, str]] = []
        self.failure: ApiException | None = None
        ids = itertools.count(1)
        self._next = lambda prefix: f"{prefix}{next(ids):014d}"
        self.org_api: Any = create_autospec(OrganizationsApi, instance=True)
        self.bucket_api: Any = create_autospec(BucketsApi, instance=True)
        self.auth_api: Any = create_autospec(AuthorizationsApi, instance=True)
        self.apis = InfluxApis(self.org_api, self.bucket_api, self.auth_api)
        o, b, a = self.org_api, self.bucket_api, self.auth_api
        o.create_organization.side_effect = self._create_org
        o.find_organizations.side_effect = lambda org=None, **_: [
            x for x in self.orgs.values() if x.name == org
        ]
        o.find_organization.side_effect = lambda org_id: self._get(self.orgs, org_id)
        o.delete_organization.side_effect = lambda org_id: self._pop(self.orgs, org_id)
        b.create_bucket.side_effect = self._create_bucket
        b.find_bucket_by_id.side_effect = lambda bucket_id: self._get(self.buckets, bucket_id)
        b.delete_bucket.side_effect = lambda bucket: self._pop(self.buckets, bucket)
        a.create_authorization.side_effect = self._create_auth
        a.find_authorization_by_id.side_effect = self._find_auth
        a.delete_authorization.side_effect = lambda auth: self._pop(self.auths, auth)

    @contextmanager
    def connect(self, url: str, token: str) -> Iterator[InfluxApis]:
        self.connections.append((url, token))
        yield self.apis

    def _get(self, table: dict[str, Any], key: str) -> Any:
        if self.failure is not None:
            raise self.failure
        if key not in table:
            raise ApiException(status=404, reason="Not Found")
        return table[key]

    def _pop(self, table: dict[str, Any], key: str) -> None:
        self._get(table, key)
        del table[key]

    def _create_org(self, name: str | None = None, organization: Organization | None = None) -> Organization:
        assert organization is not None
        created = Organization(
            id=self._next("0"), name=organization.name, description=organization.description
        )
        self.orgs[created.id] = created
        return created

    def _create_bucket(self, bucket: PostBucketRequest | None = None, **_: Any) -> Bucket:
        assert isinstance(bucket, PostBucketRequest), "the provider posts a complete PostBucketRequest"
        created = Bucket(
            id=self._next("b"),
            org_id=bucket.org_id,
            name=bucket.name,
            description=bucket.description,
            retention_rules=bucket.retention_rules,
        )
        self.buckets[created.id] = created
        return created

    def _create_auth(
        self, org_id: Any = None, permissions: Any = None, authorization: Any = None
    ) -> Authorization:
        assert isinstance(authorization, Authorization)
        created = Authorization(
            id=self._next("a"),
            org_id=authorization.org_id,
            permissions=authorization.permissions,
            description=authorization.description,
            token=f"secret-{len(self.auths)}",
        )
        self.auths[created.id] = created
        return created

    def _find_auth(self, auth_id: str) -> Authorization:
        live = self._get(self.auths, auth_id)
        # OSS 2.9 keeps only a hash: the value is never shown again.
        return Authorization(
            id=live.id,
            org_id=live.org_id,
            permissions=live.permissions,
            description=live.description,
            token=None,
        )


@pytest.fixture
def influx() -> InfluxRecorder:
    return InfluxRecorder()


def connection(**extra: Any) -> dict[str, Any]:
    return {"url": URL, "admin_token": ADMIN, **extra}


def bucket_props(**overrides: Any) -> dict[str, Any]:
    base = connection(
        org_id="0org0000000001", name="acme-telemetry", retention_seconds=604800, description=None
    )
    return {**base, **overrides}


# ---------------------------------------------------------------------------------- buckets
def test_bucket_is_created_in_its_org_with_the_tier_retention(influx: InfluxRecorder) -> None:
    result = BucketProvider(influx.connect).create(bucket_props())
    request = influx.bucket_api.create_bucket.call_args.kwargs["bucket"]
    assert (request.org_id, request.name) == ("0org0000000001", "acme-telemetry")
    assert [(r.type, r.every_seconds) for r in request.retention_rules] == [("expire", 604800)]
    assert result.id == next(iter(influx.buckets))
    assert influx.connections == [(URL, ADMIN)], "the client is built from the resource's own inputs"


def test_a_bucket_kept_forever_has_an_explicit_rule_of_zero_seconds(influx: InfluxRecorder) -> None:
    BucketProvider(influx.connect).create(bucket_props(retention_seconds=0))
    rules = influx.bucket_api.create_bucket.call_args.kwargs["bucket"].retention_rules
    assert [(r.type, r.every_seconds) for r in rules] == [("expire", 0)]


@pytest.mark.parametrize(
    ("change", "replaces"),
    [
        ({"retention_seconds": 2592000}, []),
        ({"description": "raw telemetry"}, []),
        ({"name": "acme-raw"}, []),
        ({"org_id": "0org0000000002"}, ["org_id"]),
        ({"org_id": UNKNOWN}, ["org_id"]),
        ({"url": "http://influxdb-acme:8086"}, ["url"]),
        ({"admin_token": "rotated"}, []),
    ],
)
def test_bucket_diff_replaces_only_what_the_api_cannot_change(
    change: dict[str, Any], replaces: list[str]
) -> None:
    diff = BucketProvider().diff("b1", bucket_props(), bucket_props(**change))
    assert diff.changes is True
    assert diff.replaces == replaces


def test_bucket_diff_sees_no_change_in_numbers_the_wire_made_floats() -> None:
    diff = BucketProvider().diff("b1", bucket_props(), bucket_props(retention_seconds=604800.0))
    assert diff.changes is False and diff.replaces == []


def test_bucket_update_changes_retention_in_place(influx: InfluxRecorder) -> None:
    created = BucketProvider(influx.connect).create(bucket_props())
    BucketProvider(influx.connect).update(created.id, bucket_props(), bucket_props(retention_seconds=2592000))
    sent = influx.bucket_api.update_bucket.call_args.args[0]
    assert sent.id == created.id
    assert [r.every_seconds for r in sent.retention_rules] == [2592000]
    influx.bucket_api.delete_bucket.assert_not_called()


def test_bucket_read_reports_retention_changed_behind_pulumis_back(influx: InfluxRecorder) -> None:
    created = BucketProvider(influx.connect).create(bucket_props())
    influx.buckets[created.id].retention_rules[0].every_seconds = 3600
    read = BucketProvider(influx.connect).read(created.id, bucket_props())
    assert read.outs is not None and read.outs["retention_seconds"] == 3600


def test_a_bucket_deleted_outside_pulumi_reads_as_gone_and_deletes_cleanly(influx: InfluxRecorder) -> None:
    created = BucketProvider(influx.connect).create(bucket_props())
    influx.buckets.clear()
    assert BucketProvider(influx.connect).read(created.id, bucket_props()).id == ""
    BucketProvider(influx.connect).delete(created.id, bucket_props())  # 404: already gone


def test_a_server_error_on_delete_is_not_swallowed(influx: InfluxRecorder) -> None:
    created = BucketProvider(influx.connect).create(bucket_props())
    influx.failure = ApiException(status=503, reason="Service Unavailable")
    with pytest.raises(ApiException):
        BucketProvider(influx.connect).delete(created.id, bucket_props())


@pytest.mark.parametrize("seconds", [60, -1, 3600.5, "30d"])
def test_bucket_check_refuses_a_retention_influxdb_would_refuse(seconds: Any) -> None:
    failures = BucketProvider().check({}, bucket_props(retention_seconds=seconds)).failures
    assert [(f.property, repr(seconds) in f.reason) for f in failures] == [("retention_seconds", True)]


# ----------------------------------------------------------------------------------- tokens
def token_props(**overrides: Any) -> dict[str, Any]:
    base = connection(
        org_id="0org0000000001",
        description="ingest worker: write acme-telemetry",
        permissions=[{"action": "write", "bucket_id": "b00000000000001"}],
        token=None,
    )
    return {**base, **overrides}


def test_token_permissions_name_only_the_given_buckets_of_the_org(influx: InfluxRecorder) -> None:
    grants = [{"action": "read", "bucket_id": "braw"}, {"action": "read", "bucket_id": "b1h"}]
    result = TokenProvider(influx.connect).create(token_props(permissions=grants))
    sent = influx.auth_api.create_authorization.call_args.kwargs["authorization"]
    assert sent.org_id == "0org0000000001"
    assert [(p.action, p.resource.type, p.resource.org_id, p.resource.id) for p in sent.permissions] == [
        ("read", "buckets", "0org0000000001", "braw"),
        ("read", "buckets", "0org0000000001", "b1h"),
    ]
    assert result.outs is not None and result.outs["token"] == "secret-0"


def test_token_read_keeps_the_value_from_creation(influx: InfluxRecorder) -> None:
    created = TokenProvider(influx.connect).create(token_props())
    assert created.outs is not None
    read = TokenProvider(influx.connect).read(created.id, created.outs)
    assert read.outs is not None
    assert read.outs["token"] == "secret-0", "the server shows a token once: state keeps it"
    assert read.outs["permissions"] == [{"action": "write", "bucket_id": "b00000000000001"}]


@pytest.mark.parametrize(
    ("change", "replaces"),
    [
        ({"permissions": [{"action": "read", "bucket_id": "b00000000000001"}]}, ["permissions"]),
        ({"permissions": [{"action": "write", "bucket_id": UNKNOWN}]}, ["permissions"]),
        ({"org_id": "0org0000000002"}, ["org_id"]),
        ({"description": "renamed"}, []),
    ],
)
def test_token_diff_replaces_on_new_permissions_only(change: dict[str, Any], replaces: list[str]) -> None:
    diff = TokenProvider().diff("a1", token_props(token="secret-0"), token_props(**change))
    assert diff.changes is True and diff.replaces == replaces


def test_token_description_update_keeps_the_token(influx: InfluxRecorder) -> None:
    created = TokenProvider(influx.connect).create(token_props())
    assert created.outs is not None
    updated = TokenProvider(influx.connect).update(
        created.id, created.outs, token_props(description="renamed")
    )
    sent = influx.auth_api.update_authorization.call_args.args[0]
    assert (sent.id, sent.description, sent.status) == (created.id, "renamed", None), (
        "a status sent on update would re-activate a token an operator disabled"
    )
    assert updated.outs is not None and updated.outs["token"] == "secret-0"


def test_token_check_refuses_wildcards_and_unknown_actions() -> None:
    grants = [{"action": "all", "bucket_id": "b1"}, {"action": "read", "bucket_id": None}]
    failures = TokenProvider().check({}, token_props(permissions=grants)).failures
    assert [f.property for f in failures] == ["permissions[0].action", "permissions[1].bucket_id"]
    assert "'all'" in failures[0].reason
    assert TokenProvider().check({}, token_props(permissions=[])).failures[0].property == "permissions"


def test_permissions_helper_builds_bucket_scoped_api_objects() -> None:
    built = influxdb.permissions("o1", [{"action": "write", "bucket_id": "b1"}])
    assert built == [
        Permission(action="write", resource=PermissionResource(type="buckets", org_id="o1", id="b1"))
    ]


# ------------------------------------------------------------------------------------- orgs
def test_own_org_is_created_and_deleted(influx: InfluxRecorder) -> None:
    props = connection(name="acme", description="Ironlink tenant Acme", adopt=False)
    created = OrganizationProvider(influx.connect).create(props)
    assert influx.orgs[created.id].name == "acme"
    OrganizationProvider(influx.connect).delete(created.id, props)
    assert influx.orgs == {}


def test_the_shared_org_is_adopted_and_never_deleted(influx: InfluxRecorder) -> None:
    setup = influx._create_org(organization=Organization(name="ironlink"))
    props = connection(name="ironlink", description=None, adopt=True)
    created = OrganizationProvider(influx.connect).create(props)
    assert created.id == setup.id
    influx.org_api.create_organization.assert_not_called()
    OrganizationProvider(influx.connect).delete(created.id, props)
    influx.org_api.delete_organization.assert_not_called()
    assert setup.id in influx.orgs


def test_adopting_a_missing_org_names_it(influx: InfluxRecorder) -> None:
    with pytest.raises(LookupError, match="'ironlink' does not exist"):
        OrganizationProvider(influx.connect).create(connection(name="ironlink", description=None, adopt=True))


def test_renaming_an_own_org_is_an_update_renaming_the_adopted_one_a_replacement() -> None:
    own = OrganizationProvider().diff(
        "o", connection(name="a", adopt=False), connection(name="b", adopt=False)
    )
    adopted = OrganizationProvider().diff(
        "o", connection(name="a", adopt=True), connection(name="b", adopt=True)
    )
    assert (own.changes, own.replaces) == (True, [])
    assert (adopted.changes, adopted.replaces) == (True, ["name"])


# --------------------------------------------------------------------------------- pickling
@pytest.mark.parametrize("provider", [OrganizationProvider, BucketProvider, TokenProvider])
def test_provider_pickles_without_a_client_and_reconnects_by_reference(provider: type[Any]) -> None:
    """What Pulumi does with the provider object: dill it into state, load it in the engine."""
    restored = dill.loads(base64.b64decode(serialize_provider(provider())))
    assert restored.connector is connect
    assert not any(type(value).__module__.startswith("influxdb_client") for value in vars(restored).values())
