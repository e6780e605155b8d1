"""The managed stores of a Phase C region (RDS for the registry, Timestream for InfluxDB for
telemetry), declared under the mock engine with the scale stacks' own config; and the two dynamic
providers they add: the registry's roles (against a real PostgreSQL) and Timestream's operator
token (on the real ``influxdb-client`` API classes with recorded calls; no InfluxDB server here).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest.mock import create_autospec

import psycopg
import pulumi_aws as aws
import pulumi_kubernetes as k8s
import pytest
from influxdb_client import Authorization, AuthorizationsApi, Organization, OrganizationsApi
from pulumi.runtime import mocks, settings
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

from components.aws.database import RegistryDatabase, RegistryDatabaseArgs
from components.aws.placement import PrivatePlacement
from components.aws.telemetry import MULTI_AZ, TelemetryStore, TelemetryStoreArgs, instance_name
from components.providers.database_roles import RegistryRolesProvider
from components.providers.influxdb_operator import (
    OPERATOR_RESOURCE_TYPES,
    OperatorTokenProvider,
    SessionApis,
)
from infra import plan_aws  # noqa: F401  (registers the AWS engine outputs)
from infra.plan import SECRET, Plan, PlanMocks, RecordingMonitor, tree_order
from tests.pulumi_mocks import stack_config

PHASE_C = ["scale-eu-west-1", "scale-us-east-1"]
CLUSTER_SG = "sg-cluster0000"
SUBNETS = ["subnet-private-a", "subnet-private-b", "subnet-private-c"]


def declare_stores(stack: str) -> tuple[Plan, dict[str, tuple[bool, Any]]]:
    """Both stores of ``stack``'s config, placed in a stand-in VPC; their secret outputs."""
    config = stack_config(stack)
    monitor = RecordingMonitor(PlanMocks())
    settings.ROOT.set(None)
    mocks.set_mocks(
        monitor.mocks, project="ironlink", stack=stack, monitor=monitor, logger=logging.getLogger("t")
    )
    found: dict[str, tuple[bool, Any]] = {}

    async def program() -> None:
        assert config.aws is not None
        placement = PrivatePlacement(
            aws.Provider("aws", region=config.aws.region), "vpc-0", SUBNETS, CLUSTER_SG
        )
        database = RegistryDatabase(
            "registry",
            RegistryDatabaseArgs(config=config, placement=placement, k8s_provider=k8s.Provider("k8s")),
        )
        store = TelemetryStore(
            "influxdb", TelemetryStoreArgs(instance="influxdb", config=config, placement=placement)
        )
        for label, output in (
            ("dsn", database.dsn),
            ("owner_password", database.owner_password),
            ("admin_token", store.admin_token),
            ("admin_password", store.admin_password),
            ("url", store.url),
        ):
            found[label] = (await output.is_secret(), await output.future())

    _sync_await(run_pulumi_func(program))
    return Plan(stack, tree_order(monitor.recorded)), found


@pytest.fixture(scope="module", params=PHASE_C)
def declared(request: pytest.FixtureRequest) -> tuple[Plan, dict[str, tuple[bool, Any]]]:
    return declare_stores(request.param)


def test_rds_is_multi_az_encrypted_deletion_protected_protected_and_private(declared: Any) -> None:
    plan, _ = declared
    rds = plan.one("rds/instance:Instance", "registry")
    assert rds.protect, f"{rds.urn} must be protected"
    expected = {
        "engine": "postgres",
        "engineVersion": "16",
        "multiAz": True,
        "storageEncrypted": True,
        "deletionProtection": True,
        "publiclyAccessible": False,
        "skipFinalSnapshot": False,
        "autoMinorVersionUpgrade": True,
    }
    assert {key: rds.get(key) for key in expected} == expected, rds.urn
    assert rds.get("finalSnapshotIdentifier") and rds.get("backupRetentionPeriod") >= 1
    assert rds.get("password") == SECRET, "the master password must reach the plan as a secret only"
    assert plan.one("rds/subnetGroup:SubnetGroup", "registry-subnets").get("subnetIds") == SUBNETS


@pytest.mark.parametrize(("kind", "port"), [("registry-sg", 5432), ("influxdb-sg", 8086)])
def test_each_store_admits_its_port_from_the_cluster_security_group_alone(
    declared: Any, kind: str, port: int
) -> None:
    plan, _ = declared
    group = plan.one("ec2/securityGroup:SecurityGroup", kind)
    rules = group.get("ingress")
    assert [(r["fromPort"], r["toPort"], r["protocol"]) for r in rules] == [(port, port, "tcp")], group.urn
    assert [r.get("securityGroups") for r in rules] == [[CLUSTER_SG]], group.urn
    assert not any(r.get("cidrBlocks") or r.get("ipv6CidrBlocks") for r in rules), group.urn


def test_the_telemetry_store_is_a_private_protected_multi_az_timestream_instance(declared: Any) -> None:
    plan, _ = declared
    store = plan.one("timestreaminfluxdb/dbInstance:DbInstance", "influxdb")
    assert store.protect, f"{store.urn} must be protected"
    assert store.get("deploymentType") == MULTI_AZ
    assert store.get("publiclyAccessible") is False
    assert store.get("vpcSubnetIds") == SUBNETS
    assert store.get("allocatedStorage") >= 400 and store.get("dbStorageType") == "InfluxIOIncludedT2"
    assert store.get("password") == SECRET


def test_the_dsn_tokens_and_passwords_are_secrets_and_the_url_is_the_timestream_endpoint(
    declared: Any,
) -> None:
    plan, outputs = declared
    for label in ("dsn", "owner_password", "admin_token", "admin_password"):
        assert outputs[label][0], f"{label} must be an Output.secret"
    dsn = outputs["dsn"][1]
    assert dsn.startswith("postgresql://ironlink:") and ".rds.amazonaws.com:5432/" in dsn
    url = outputs["url"][1]
    assert url.startswith("https://") and url.endswith(".timestream-influxdb.amazonaws.com:8086")
    every_input = json.dumps([r.inputs for r in plan.resources])
    for label in ("dsn", "owner_password", "admin_token", "admin_password"):
        assert outputs[label][1] not in every_input, f"{label} appears in the plan in clear"


def test_in_cluster_clients_reach_rds_through_an_external_name_service(declared: Any) -> None:
    plan, _ = declared
    service = plan.one("Service", "postgres")
    assert service.get("spec.type") == "ExternalName"
    assert service.get("spec.externalName").endswith(".rds.amazonaws.com")
    assert not plan.find("StatefulSet"), "managed stores declare no in-cluster database"


def test_long_tenant_instance_names_fit_timestream_and_stay_distinct() -> None:
    first, second = (f"influxdb-{'a' * 31}{suffix}" for suffix in "xy")
    assert instance_name("influxdb-umbrella") == "influxdb-umbrella"
    assert len(instance_name(first)) <= 40 and instance_name(first) != instance_name(second)


# ------------------------------------------------------------------------- registry roles
@pytest.mark.xdist_group("postgres-cluster-roles")  # roles are the server's, not a database's
def test_the_registry_roles_are_created_as_the_first_start_script_does_and_again_idempotently(
    postgres_dsn: str,
) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        owner, database = conn.execute("SELECT current_user, current_database()").fetchone() or ("", "")
        conn.execute("DROP DATABASE IF EXISTS grafana")
        conn.execute("CREATE TABLE IF NOT EXISTS devices (id text)")
    props = {
        "dsn": postgres_dsn,
        "owner": owner,
        "database": database,
        "emqx_password": "emqx-pw-1",
        "grafana_password": "grafana-pw-1",
    }
    provider = RegistryRolesProvider()
    assert not provider.check({}, props).failures
    provider.create(props)
    provider.update("roles", props, {**props, "emqx_password": "emqx-pw-2"})  # again: adopts and resets
    as_emqx = psycopg.conninfo.make_conninfo(postgres_dsn, user="emqx", password="emqx-pw-2")
    with psycopg.connect(as_emqx) as conn:
        assert conn.execute("SELECT count(*) FROM devices").fetchone() == (0,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO devices VALUES ('x')")
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        owner_of = conn.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'grafana'"
        ).fetchone()
        assert owner_of == ("grafana",)
        # The roles are the server's: leave none behind for the other tests of this group.
        conn.execute("DROP DATABASE grafana")
        conn.execute("DROP OWNED BY emqx, grafana")
        conn.execute("DROP ROLE emqx, grafana")


def test_the_registry_roles_name_every_missing_input() -> None:
    failures = RegistryRolesProvider().check({}, {"owner": "ironlink"}).failures
    assert {f.property for f in failures} == {"dsn", "database", "emqx_password", "grafana_password"}


# ------------------------------------------------------------------------- operator token
class SessionRecorder:
    def __init__(self) -> None:
        self.sessions: list[tuple[str, str, str]] = []
        self.orgs: Any = create_autospec(OrganizationsApi, instance=True)
        self.auths: Any = create_autospec(AuthorizationsApi, instance=True)
        self.orgs.find_organizations.side_effect = lambda org=None, **_: (
            [Organization(id="0123456789abcdef", name=org)] if org == "ironlink" else []
        )
        self.auths.create_authorization.side_effect = lambda authorization=None, **_: Authorization(
            id="auth0001",
            token="operator-token-value",
            org_id=authorization.org_id,
            permissions=authorization.permissions,
            description=authorization.description,
        )

    @contextmanager
    def connect(self, url: str, username: str, password: str) -> Iterator[SessionApis]:
        self.sessions.append((url, username, password))
        yield SessionApis(self.orgs, self.auths)


PROPS = {"url": "https://ts.example:8086", "username": "admin", "password": "pw", "organization": "ironlink"}


def test_the_operator_token_is_created_on_the_admins_session_with_every_permission() -> None:
    recorder = SessionRecorder()
    created = OperatorTokenProvider(recorder.connect).create(dict(PROPS))
    assert recorder.sessions == [("https://ts.example:8086", "admin", "pw")]
    assert created.id == "auth0001" and (created.outs or {}).get("token") == "operator-token-value"
    request = recorder.auths.create_authorization.call_args.kwargs["authorization"]
    granted = {(p.action, p.resource.type, p.resource.org_id) for p in request.permissions}
    assert granted == {(a, t, None) for t in OPERATOR_RESOURCE_TYPES for a in ("read", "write")}
    assert request.org_id == "0123456789abcdef"


def test_an_unknown_organization_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="organization 'other' not found"):
        OperatorTokenProvider(SessionRecorder().connect).create({**PROPS, "organization": "other"})


def test_a_new_admin_password_keeps_the_token_and_another_server_replaces_it() -> None:
    provider = OperatorTokenProvider(SessionRecorder().connect)
    olds = {**PROPS, "token": "kept"}
    assert (provider.update("auth0001", olds, {**PROPS, "password": "new"}).outs or {}).get("token") == "kept"
    assert provider.diff("auth0001", olds, {**PROPS, "url": "https://other:8086"}).replaces == ["url"]
