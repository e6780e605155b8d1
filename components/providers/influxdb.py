"""InfluxDB 2.x tenancy as Pulumi resources: organizations, buckets and scoped tokens.

No Pulumi provider exists for InfluxDB 2.x, so these are dynamic resources on ``influxdb-client``
(``OrganizationsApi``, ``BucketsApi``, ``AuthorizationsApi``)::

    connection = InfluxConnection(url=influxdb.url, admin_token=influxdb.admin_token)
    org = InfluxOrganization("acme-org", connection=connection, name="acme")
    bucket = InfluxBucket("acme-telemetry", connection=connection, org_id=org.id,
                          name="acme-telemetry", retention_seconds=30 * 86400)
    token = InfluxToken("acme-write", connection=connection, org_id=org.id, description="ingest",
                        permissions=[{"action": "write", "bucket_id": bucket.id}])
    token.token  # secret

What the API can change in place is updated in place (an org's or bucket's name and description, a
bucket's retention, a token's description); what it cannot forces a replacement (the org of a
bucket or token, a token's permissions, the server). A token's value is returned once, at creation
(InfluxDB OSS 2.9 keeps only a hash): it lives in Pulumi state as a secret and is never read back.
The connection's ``admin_token`` may rotate without touching anything.

The provider objects hold only a *connector* (by default :func:`connect`, a module function that
dill pickles by reference); each operation opens a client from the resource's own ``url`` and
``admin_token``. Tests pass a connector that records the API calls instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypedDict

import pulumi
from influxdb_client import (
    Authorization,
    AuthorizationsApi,
    BucketRetentionRules,
    BucketsApi,
    InfluxDBClient,
    Organization,
    OrganizationsApi,
    Permission,
    PermissionResource,
    PostBucketRequest,
)
from influxdb_client.domain.bucket import Bucket
from influxdb_client.rest import ApiException
from pulumi.dynamic import (
    CheckFailure,
    CheckResult,
    CreateResult,
    DiffResult,
    ReadResult,
    Resource,
    ResourceProvider,
    UpdateResult,
)

from components.providers import plan_diff

TIMEOUT_MS = 30_000
MIN_RETENTION_SECONDS = 3600  # InfluxDB refuses shorter retention; 0 keeps data forever
ACTIONS = ("read", "write")
CONNECTION_KEYS = ("url", "admin_token")


# --------------------------------------------------------------------------------- connection
@dataclass(frozen=True)
class InfluxApis:
    """The three tenancy APIs of one client."""

    organizations: OrganizationsApi
    buckets: BucketsApi
    authorizations: AuthorizationsApi


Connector = Callable[[str, str], AbstractContextManager[InfluxApis]]


@contextmanager
def connect(url: str, token: str) -> Iterator[InfluxApis]:
    """A client for one operation, closed afterwards."""
    with InfluxDBClient(url=url, token=token, timeout=TIMEOUT_MS) as client:
        yield InfluxApis(client.organizations_api(), client.buckets_api(), client.authorizations_api())


@dataclass(frozen=True)
class InfluxConnection:
    """Where an instance's API is and the operator token that may create orgs, buckets and tokens."""

    url: pulumi.Input[str]
    admin_token: pulumi.Input[str]

    def props(self) -> dict[str, Any]:
        return {"url": self.url, "admin_token": pulumi.Output.secret(self.admin_token)}


def _missing(error: ApiException) -> bool:
    return error.status == 404


class _Provider(ResourceProvider):
    """What the three providers share: the connector seam, validation and the diff rule."""

    replace_keys: ClassVar[tuple[str, ...]] = ("url",)
    update_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, connector: Connector = connect) -> None:
        super().__init__()
        self.connector = connector

    def apis(self, props: Mapping[str, Any]) -> AbstractContextManager[InfluxApis]:
        return self.connector(props["url"], props["admin_token"])

    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        failures = [CheckFailure(key, "is required") for key in CONNECTION_KEYS if not news.get(key)]
        return CheckResult(news, failures + list(self.problems(news)))

    def problems(self, news: Mapping[str, Any]) -> Iterator[CheckFailure]:
        yield from ()

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        # The admin token is how we talk to the server, not what the resource is: a rotation is
        # an update that only refreshes the state (delete must use the current token).
        return plan_diff(olds, news, replace=self.replace_keys, update=(*self.update_keys, "admin_token"))


def _required_text(news: Mapping[str, Any], key: str) -> Iterator[CheckFailure]:
    value = news.get(key)
    if not isinstance(value, str) or not value.strip():
        yield CheckFailure(key, f"{value!r} must be a non-empty string")


# ----------------------------------------------------------------------------- organizations
class OrganizationProvider(_Provider):
    """An org, or with ``adopt`` the org an instance set up at first start (never deleted, never
    renamed: the shared org of level-1 tenants)."""

    replace_keys = ("url", "adopt")
    update_keys = ("name", "description")

    def problems(self, news: Mapping[str, Any]) -> Iterator[CheckFailure]:
        yield from _required_text(news, "name")

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        if news.get("adopt"):
            return plan_diff(
                olds, news, replace=(*self.replace_keys, "name"), update=("description", "admin_token")
            )
        return super().diff(_id, olds, news)

    def create(self, props: dict[str, Any]) -> CreateResult:
        with self.apis(props) as api:
            if props.get("adopt"):
                found = api.organizations.find_organizations(org=props["name"])
                if not found:
                    raise LookupError(
                        f"name: org {props['name']!r} does not exist on {props['url']} (nothing to adopt)"
                    )
                org = found[0]
            else:
                org = api.organizations.create_organization(
                    organization=Organization(name=props["name"], description=props.get("description"))
                )
        return CreateResult(org.id, dict(props))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        with self.apis(props) as api:
            try:
                org = api.organizations.find_organization(id_)
            except ApiException as error:
                if _missing(error):
                    return ReadResult("", {})
                raise
        return ReadResult(id_, {**props, "name": org.name, "description": org.description})

    def update(self, id_: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        with self.apis(news) as api:
            api.organizations.update_organization(
                Organization(id=id_, name=news["name"], description=news.get("description"))
            )
        return UpdateResult(dict(news))

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        if props.get("adopt"):
            return
        with self.apis(props) as api:
            try:
                api.organizations.delete_organization(id_)
            except ApiException as error:
                if not _missing(error):
                    raise


class InfluxOrganization(Resource, module="influxdb", name="Organization"):
    """An InfluxDB org; its ``id`` is the org id buckets and tokens are created in."""

    def __init__(
        self,
        resource_name: str,
        *,
        connection: InfluxConnection,
        name: pulumi.Input[str],
        description: pulumi.Input[str] | None = None,
        adopt: bool = False,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        props = {**connection.props(), "name": name, "description": description, "adopt": adopt}
        super().__init__(OrganizationProvider(), resource_name, props, opts)


# ----------------------------------------------------------------------------------- buckets
def retention_rules(seconds: int) -> list[BucketRetentionRules]:
    """Expire after ``seconds``, ``0`` meaning forever, always as one explicit rule: the PATCH API
    reads an empty list as "no change", so a bucket going from 30 days to forever would keep its 30."""
    return [BucketRetentionRules(type="expire", every_seconds=seconds)]


def _retention_of(bucket: Bucket) -> int:
    rules = bucket.retention_rules or []
    return int(rules[0].every_seconds) if rules else 0


class BucketProvider(_Provider):
    """A bucket: name, description and retention change in place; a bucket cannot change org."""

    replace_keys = ("url", "org_id")
    update_keys = ("name", "description", "retention_seconds")

    def problems(self, news: Mapping[str, Any]) -> Iterator[CheckFailure]:
        yield from _required_text(news, "name")
        yield from _required_text(news, "org_id")
        seconds = news.get("retention_seconds")
        if (
            not isinstance(seconds, int | float)
            or isinstance(seconds, bool)
            or seconds != int(seconds)
            or seconds < 0
            or 0 < seconds < MIN_RETENTION_SECONDS
        ):
            yield CheckFailure(
                "retention_seconds",
                f"{seconds!r} is not a retention: whole seconds, 0 (forever) or >= {MIN_RETENTION_SECONDS}",
            )

    def create(self, props: dict[str, Any]) -> CreateResult:
        request = PostBucketRequest(
            org_id=props["org_id"],
            name=props["name"],
            description=props.get("description"),
            retention_rules=retention_rules(int(props["retention_seconds"])),
        )
        with self.apis(props) as api:
            bucket = api.buckets.create_bucket(bucket=request)
        return CreateResult(bucket.id, dict(props))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        with self.apis(props) as api:
            try:
                bucket = api.buckets.find_bucket_by_id(id_)
            except ApiException as error:
                if _missing(error):
                    return ReadResult("", {})
                raise
        live = {
            "name": bucket.name,
            "org_id": bucket.org_id,
            "description": bucket.description,
            "retention_seconds": _retention_of(bucket),
        }
        return ReadResult(id_, {**props, **live})

    def update(self, id_: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        bucket = Bucket(
            id=id_,
            org_id=news["org_id"],
            name=news["name"],
            description=news.get("description"),
            retention_rules=retention_rules(int(news["retention_seconds"])),
        )
        with self.apis(news) as api:
            api.buckets.update_bucket(bucket)
        return UpdateResult(dict(news))

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        with self.apis(props) as api:
            try:
                api.buckets.delete_bucket(id_)
            except ApiException as error:
                if not _missing(error):
                    raise


class InfluxBucket(Resource, module="influxdb", name="Bucket"):
    """A bucket; its ``id`` is what token permissions name."""

    def __init__(
        self,
        resource_name: str,
        *,
        connection: InfluxConnection,
        org_id: pulumi.Input[str],
        name: pulumi.Input[str],
        retention_seconds: pulumi.Input[int],
        description: pulumi.Input[str] | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        props = {
            **connection.props(),
            "org_id": org_id,
            "name": name,
            "retention_seconds": retention_seconds,
            "description": description,
        }
        super().__init__(BucketProvider(), resource_name, props, opts)


# ------------------------------------------------------------------------------------ tokens
class BucketPermission(TypedDict):
    """One grant of a token: ``read`` or ``write`` on one bucket (by id)."""

    action: Literal["read", "write"]
    bucket_id: pulumi.Input[str]


def permissions(org_id: str, grants: Sequence[Mapping[str, Any]]) -> list[Permission]:
    """The API's permission objects, each naming one bucket of ``org_id`` and nothing else."""
    return [
        Permission(
            action=grant["action"],
            resource=PermissionResource(type="buckets", org_id=org_id, id=grant["bucket_id"]),
        )
        for grant in grants
    ]


def _grants_of(authorization: Authorization) -> list[dict[str, Any]]:
    """Read a token's permissions back in the inputs' form (a wildcard grant shows as ``None``)."""
    return [
        {"action": permission.action, "bucket_id": permission.resource.id}
        for permission in authorization.permissions or []
    ]


class TokenProvider(_Provider):
    """An authorization (token) scoped to buckets; only its description changes in place."""

    replace_keys = ("url", "org_id", "permissions")
    update_keys = ("description",)

    def problems(self, news: Mapping[str, Any]) -> Iterator[CheckFailure]:
        yield from _required_text(news, "org_id")
        grants = news.get("permissions")
        if not isinstance(grants, list) or not grants:
            yield CheckFailure("permissions", f"{grants!r} must list at least one bucket permission")
            return
        for index, grant in enumerate(grants):
            action = grant.get("action") if isinstance(grant, Mapping) else None
            if action not in ACTIONS:
                yield CheckFailure(
                    f"permissions[{index}].action", f"{action!r} is not one of {', '.join(ACTIONS)}"
                )
            bucket_id = grant.get("bucket_id") if isinstance(grant, Mapping) else None
            if not isinstance(bucket_id, str) or not bucket_id:
                yield CheckFailure(
                    f"permissions[{index}].bucket_id",
                    f"{bucket_id!r} must name one bucket (no wildcard grants)",
                )

    def create(self, props: dict[str, Any]) -> CreateResult:
        request = Authorization(
            org_id=props["org_id"],
            permissions=permissions(props["org_id"], props["permissions"]),
            description=props.get("description"),
        )
        with self.apis(props) as api:
            created = api.authorizations.create_authorization(authorization=request)
        if not created.token:
            raise RuntimeError(
                f"InfluxDB at {props['url']} created authorization {created.id} without a token"
            )
        return CreateResult(created.id, {**props, "token": created.token})

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        with self.apis(props) as api:
            try:
                live = api.authorizations.find_authorization_by_id(id_)
            except ApiException as error:
                if _missing(error):
                    return ReadResult("", {})
                raise
        # The token itself is never read back: the server keeps only a hash of it.
        return ReadResult(
            id_,
            {
                **props,
                "org_id": live.org_id,
                "description": live.description,
                "permissions": _grants_of(live),
            },
        )

    def update(self, id_: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        # ``status=None`` keeps the default ``"active"`` off the wire: an update that sent it would
        # re-activate a token an operator had disabled. Only the description is managed.
        with self.apis(news) as api:
            api.authorizations.update_authorization(
                Authorization(id=id_, description=news.get("description"), status=None)
            )
        return UpdateResult({**news, "token": olds.get("token")})

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        with self.apis(props) as api:
            try:
                api.authorizations.delete_authorization(id_)
            except ApiException as error:
                if not _missing(error):
                    raise


class InfluxToken(Resource, module="influxdb", name="Token"):
    """A token scoped to the listed buckets; ``token`` is its value (secret)."""

    token: pulumi.Output[str]

    def __init__(
        self,
        resource_name: str,
        *,
        connection: InfluxConnection,
        org_id: pulumi.Input[str],
        permissions: Sequence[BucketPermission],
        description: pulumi.Input[str] | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        props = {
            **connection.props(),
            "org_id": org_id,
            "permissions": [dict(grant) for grant in permissions],
            "description": description,
            "token": None,
        }
        secret = pulumi.ResourceOptions(additional_secret_outputs=["token"])
        super().__init__(TokenProvider(), resource_name, props, pulumi.ResourceOptions.merge(opts, secret))
