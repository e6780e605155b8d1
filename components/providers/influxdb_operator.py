"""An operator token for an InfluxDB 2.x instance that was set up without one (Timestream for InfluxDB).

The in-cluster image sets its operator token at first start (``DOCKER_INFLUXDB_INIT_ADMIN_TOKEN``).
Timestream for InfluxDB sets up an org, a bucket, a user and a password, and keeps those four in a
Secrets Manager secret (``influx_auth_parameters_secret_arn``): no token, there or in any output.
AWS's documented way to one is to sign in as that user and create an operator token (``influx auth
create --operator``). This resource does that with ``influxdb-client`` at deploy time: it signs in
with the admin's username and password (a protected ``RandomPassword`` the stack generated, so the
secret need not be read back) and creates an authorization holding read and write on every
resource type of every org, as the CLI's ``--operator`` does. The token is returned once, kept in
state as a secret, and fed to the tenancy providers (:class:`components.providers.influxdb.InfluxConnection`)
like the in-cluster instance's token. Delete deletes the authorization.

Like the tenancy providers, the provider object holds only a connector (a module function by
default), so it pickles; tests pass one that records calls on the real API classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import pulumi
from influxdb_client import (
    Authorization,
    AuthorizationsApi,
    InfluxDBClient,
    OrganizationsApi,
    Permission,
    PermissionResource,
)
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
from components.providers.influxdb import TIMEOUT_MS

REQUIRED = ("url", "username", "password", "organization")
OPERATOR_RESOURCE_TYPES = (
    "authorizations", "buckets", "dashboards", "orgs", "sources", "tasks", "telegrafs", "users",
    "variables", "scrapers", "secrets", "labels", "views", "documents", "notificationRules",
    "notificationEndpoints", "checks", "dbrp", "notebooks", "annotations", "remotes", "replications",
)  # fmt: skip
"""InfluxDB 2.7's resource types (``influxdb.AllResourceTypes``): what an operator token covers."""
DESCRIPTION = "ironlink: operator token of the Pulumi tenancy providers"


@dataclass(frozen=True)
class SessionApis:
    organizations: OrganizationsApi
    authorizations: AuthorizationsApi


SessionConnector = Callable[[str, str, str], AbstractContextManager[SessionApis]]


@contextmanager
def sign_in(url: str, username: str, password: str) -> Iterator[SessionApis]:
    """A client on the user's session (``influxdb-client`` signs in on ``/api/v2/signin``)."""
    with InfluxDBClient(url=url, username=username, password=password, timeout=TIMEOUT_MS) as client:
        yield SessionApis(client.organizations_api(), client.authorizations_api())


def operator_permissions() -> list[Permission]:
    """Read and write on every resource type, in no particular org: all orgs."""
    return [
        Permission(action=action, resource=PermissionResource(type=kind))
        for kind in OPERATOR_RESOURCE_TYPES
        for action in ("read", "write")
    ]


class OperatorTokenProvider(ResourceProvider):
    def __init__(self, connector: SessionConnector = sign_in) -> None:
        super().__init__()
        self.connector = connector

    def _session(self, props: dict[str, Any]) -> AbstractContextManager[SessionApis]:
        return self.connector(props["url"], props["username"], props["password"])

    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        return CheckResult(news, [CheckFailure(key, "is required") for key in REQUIRED if not news.get(key)])

    def create(self, props: dict[str, Any]) -> CreateResult:
        with self._session(props) as apis:
            found = apis.organizations.find_organizations(org=props["organization"])
            if not found:
                raise ValueError(f"organization {props['organization']!r} not found at {props['url']}")
            request = Authorization(
                org_id=found[0].id, permissions=operator_permissions(), description=DESCRIPTION
            )
            auth = apis.authorizations.create_authorization(authorization=request)
        return CreateResult(auth.id, {**props, "token": auth.token})

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        with self._session(props) as apis:
            try:
                apis.authorizations.find_authorization_by_id(id_)
            except ApiException as error:
                if error.status == 404:
                    return ReadResult(None, {})
                raise
        return ReadResult(id_, props)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        # Another server or org is another token; the password is how we sign in, not what it is.
        return plan_diff(olds, news, replace=("url", "organization", "username"), update=("password",))

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        # A new admin password changes how we sign in, not the token (read once, at creation).
        return UpdateResult({**news, "token": olds.get("token")})

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        with self._session(props) as apis:
            try:
                apis.authorizations.delete_authorization(id_)
            except ApiException as error:
                if error.status != 404:
                    raise


class InfluxOperatorToken(Resource, module="influxdb", name="OperatorToken"):
    token: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        *,
        url: pulumi.Input[str],
        username: str,
        password: pulumi.Input[str],
        organization: str,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        props = {
            "url": url,
            "username": username,
            "password": pulumi.Output.secret(password),
            "organization": organization,
            "token": None,
        }
        merged = pulumi.ResourceOptions.merge(
            opts, pulumi.ResourceOptions(additional_secret_outputs=["token"])
        )
        super().__init__(OperatorTokenProvider(), name, props, merged)
