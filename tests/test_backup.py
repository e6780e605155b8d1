"""Backups to S3 and their verified restore.

The round trip runs against a real PostgreSQL (``pg_dump``/``pg_restore`` from Debian's
postgresql package) with S3 served by moto's S3 server (a mock of AWS) on a free loopback port: the
real boto3 multipart upload, copy and download over HTTP, not a real S3.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from typer.testing import CliRunner

from backup.dump import DumpPlan, dump_plan, run_backup
from backup.layout import MIB, PART_SIZE_MIN, SHA256_KEY, SIZE_KEY, BackupKey, new_key, part_size_for
from backup.s3 import BackupError, list_backups
from components.backup import quantity_bytes
from infra.cli import app
from infra.config import Aws
from infra.plan import Plan, PlannedResource, build_plan
from localdev import servers
from tests.pulumi_mocks import PLANS, STACKS, pod_spec, stack_config, stack_plan

runner = CliRunner()
BUCKET = "ironlink-backups-test"
REGION = "eu-test-1"
PAYLOAD_BYTES = 12 * MIB
"""Random bytes compress to themselves: a dump of about 12 MiB, three parts of 5 MiB."""

NO_AWS = Aws(region="eu-west-1")
needs_pg_tools = pytest.mark.skipif(
    shutil.which("pg_dump") is None or shutil.which("pg_restore") is None,
    reason="pg_dump/pg_restore (Debian's postgresql-client) are not installed",
)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server (a mock of AWS) on a free port, with a versioned bucket."""
    from moto.server import ThreadedMotoServer

    port = servers.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3")
    existing = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
    if BUCKET not in existing:
        client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    return client


@pytest.fixture
def database(postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A database with rows worth restoring; ``pg_dump`` finds it through ``PG*`` as in the pod."""
    parts = conninfo_to_dict(postgres_dsn)
    for variable, key in (
        ("PGHOST", "host"),
        ("PGPORT", "port"),
        ("PGUSER", "user"),
        ("PGDATABASE", "dbname"),
    ):
        monkeypatch.setenv(variable, str(parts[key]))
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE machines (id text PRIMARY KEY, firmware text NOT NULL)")
        conn.execute("INSERT INTO machines VALUES ('press-01', '1.0'), ('press-02', '1.0')")
        conn.execute("CREATE TABLE blobs (payload bytea NOT NULL)")
        conn.execute("INSERT INTO blobs VALUES (%s)", (os.urandom(PAYLOAD_BYTES),))
    return postgres_dsn


def firmware(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT id, firmware FROM machines ORDER BY id").fetchall())


def take_backup(s3: Any, database: str) -> str:
    key = new_key(REGION, "postgres")
    stored = run_backup(s3, BUCKET, key, dump_plan("postgres", Path("/tmp")), PART_SIZE_MIN)
    return stored.key


def tamper(s3: Any, key: str, change: Any) -> None:
    """Rewrite the object's bytes and keep its metadata: what bit rot or a cut-off copy looks like."""
    current = s3.get_object(Bucket=BUCKET, Key=key)
    body = change(bytearray(current["Body"].read()))
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(body), Metadata=current["Metadata"])


def restore(key: str, dsn: str) -> Any:
    return runner.invoke(app, ["backup", "restore", key, "--bucket", BUCKET, "--dsn", dsn, "--yes"])


@pytest.mark.integration
@needs_pg_tools
def test_a_postgres_backup_round_trips_through_s3_in_parts(s3: Any, database: str) -> None:
    key = take_backup(s3, database)

    head = s3.head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
    size = int(head["Metadata"][SIZE_KEY])
    assert size > PAYLOAD_BYTES and head["ContentLength"] == size
    assert len(head["Metadata"][SHA256_KEY]) == 64
    assert head["ETag"].strip('"').endswith(f"-{-(-size // PART_SIZE_MIN)}")  # a multipart object
    assert head.get("ChecksumSHA256")  # S3's own checksum, beside ours
    staged = s3.list_objects_v2(Bucket=BUCKET, Prefix="staging/").get("KeyCount", 0)
    assert staged == 0

    listed = runner.invoke(app, ["backup", "list", "--bucket", BUCKET, "--database", "postgres", "--json"])
    assert listed.exit_code == 0, listed.output
    assert key in listed.output

    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("UPDATE machines SET firmware = '2.0-bad'")
        conn.execute("DELETE FROM blobs")
    result = restore(key, database)
    assert result.exit_code == 0, result.output
    assert firmware(database) == {"press-01": "1.0", "press-02": "1.0"}
    with psycopg.connect(database) as conn:
        (payload,) = conn.execute("SELECT length(payload) FROM blobs").fetchone() or (0,)
    assert payload == PAYLOAD_BYTES


@pytest.mark.integration
@needs_pg_tools
@pytest.mark.parametrize(
    ("damage", "found"),
    [
        (lambda body: body[: len(body) - 1000], "found"),
        (lambda body: body[:100] + bytes([body[100] ^ 0x01]) + body[101:], "SHA-256"),
    ],
    ids=["truncated", "one-byte-flipped"],
)
def test_a_damaged_backup_is_refused_and_the_database_left_as_it_was(
    s3: Any, database: str, damage: Any, found: str
) -> None:
    key = take_backup(s3, database)
    expected = s3.head_object(Bucket=BUCKET, Key=key)["Metadata"]
    tamper(s3, key, damage)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("UPDATE machines SET firmware = '2.0' WHERE id = 'press-01'")

    result = restore(key, database)

    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert key in message and found in message
    assert expected[SIZE_KEY] in message or expected[SHA256_KEY] in message
    assert firmware(database) == {"press-01": "2.0", "press-02": "1.0"}


@pytest.mark.integration
def test_a_dump_that_fails_half_way_publishes_nothing(s3: Any) -> None:
    key = new_key(REGION, "failing")
    plan = DumpPlan(stream=["sh", "-c", "head -c 1000 /dev/urandom; exit 3"])
    with pytest.raises(BackupError, match="exited with 3; not published"):
        run_backup(s3, BUCKET, key, plan, PART_SIZE_MIN)
    assert list_backups(s3, BUCKET, region=REGION, database="failing", limit=10) == []
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=key.staging_key).get("KeyCount", 0) == 0


@pytest.mark.integration
def test_an_influxdb_backup_directory_is_streamed_as_a_tar(s3: Any, tmp_path: Path) -> None:
    """``influx`` is not installed here: the directory it would write is made by hand, and the
    real ``tar`` stream of the plan is uploaded, downloaded verified and unpacked."""
    plan = dump_plan("influxdb", tmp_path)
    assert plan.prepare == [["influx", "backup", str(tmp_path / "influx-backup")]]
    backup_dir = tmp_path / "influx-backup"
    backup_dir.mkdir()
    (backup_dir / "20260101T000000Z.manifest").write_text('{"files": []}')
    (backup_dir / "20260101T000000Z.s1.tar.gz").write_bytes(os.urandom(4096))
    shard = (backup_dir / "20260101T000000Z.s1.tar.gz").read_bytes()
    key = new_key(REGION, "influxdb")
    run_backup(s3, BUCKET, key, DumpPlan(stream=plan.stream, scratch=plan.scratch), PART_SIZE_MIN)
    assert not backup_dir.exists()  # the scratch directory is emptied once the backup is stored

    target = tmp_path / "downloaded.tar"
    result = runner.invoke(app, ["backup", "download", key.key, "--bucket", BUCKET, "--to", str(target)])
    assert result.exit_code == 0, result.output
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "-xf", str(target), "-C", str(unpacked)], check=True)
    assert (unpacked / "20260101T000000Z.s1.tar.gz").read_bytes() == shard


def test_bad_flags_exit_2_naming_each_field() -> None:
    result = runner.invoke(
        app, ["backup", "restore", "../etc/passwd", "--bucket", "No_Such", "--dsn", " ", "--yes"]
    )
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    for field in ("KEY: '../etc/passwd'", "--bucket: 'No_Such'", "--dsn:"):
        assert field in message
    listed = runner.invoke(app, ["backup", "list", "--bucket", "b" * 64, "--limit", "0", "--database", "X"])
    assert listed.exit_code == 2
    message = " ".join(listed.output.split())
    assert "--bucket" in message and "--limit: 0" in message and "--database: 'X'" in message


def test_the_job_refuses_bad_arguments_before_running_anything(capsys: pytest.CaptureFixture[str]) -> None:
    from backup.__main__ import main

    code = main(
        ["postgres", "--bucket", "B!", "--region", "eu", "--database", "Post gres", "--part-size-mib", "4"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "--bucket: 'B!'" in err and "--database: 'Post gres'" in err and "--part-size-mib: 4" in err


def test_keys_and_part_sizes() -> None:
    key = BackupKey.parse("eu-west-1/postgres/20260102T030405Z.dump")
    assert (key.region, key.database, key.taken_at.isoformat()) == (
        "eu-west-1",
        "postgres",
        "2026-01-02T03:04:05+00:00",
    )
    assert key.staging_key == "staging/eu-west-1/postgres/20260102T030405Z.dump"
    assert part_size_for(20 * 1024**3) == 16 * MIB  # the default fits 156 GiB
    assert part_size_for(500 * 1024**3) == 52 * MIB  # 500 GiB in at most 10,000 parts
    assert part_size_for(10 * 1024**4) == 512 * MIB  # bounded


# ------------------------------------------------------------------------------------ plans
def bucket_stacks() -> list[str]:
    return [stack for stack in STACKS if (stack_config(stack).aws or NO_AWS).backup_bucket]


def one_of(plan: Plan, type: str) -> PlannedResource:
    (found,) = plan.find(type)
    return found


@PLANS
@pytest.mark.parametrize("stack", bucket_stacks())
def test_the_backup_bucket_is_private_encrypted_versioned_expiring_and_protected(stack: str) -> None:
    plan, config = stack_plan(stack), stack_config(stack)
    assert config.aws is not None
    retention = config.aws.backup_retention_days
    bucket = one_of(plan, "aws:s3/bucket:Bucket")
    settings = [r for r in plan.resources if r.parent == bucket.parent and r.type.startswith("aws:s3/")]
    assert all(resource.protect for resource in settings) and len(settings) == 6
    assert one_of(plan, "BucketVersioning").get("versioningConfiguration.status") == "Enabled"
    encryption = one_of(plan, "BucketServerSideEncryptionConfiguration")
    assert encryption.get("rules.0.applyServerSideEncryptionByDefault.sseAlgorithm") == "AES256"
    blocks = one_of(plan, "BucketPublicAccessBlock").inputs
    for flag in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets"):
        assert blocks[flag] is True, flag
    assert one_of(plan, "BucketOwnershipControls").get("rule.objectOwnership") == "BucketOwnerEnforced"
    rules = {rule["id"]: rule for rule in one_of(plan, "BucketLifecycleConfiguration").get("rules")}
    everything = rules["retention"]
    assert everything["filter"]["prefix"] == "" and everything["status"] == "Enabled"
    assert everything["expiration"]["days"] == retention
    assert everything["noncurrentVersionExpiration"]["noncurrentDays"] == retention
    assert everything["abortIncompleteMultipartUpload"]["daysAfterInitiation"] == 1
    assert rules["staging"]["filter"]["prefix"] == "staging/" and rules["staging"]["expiration"]["days"] == 1


def statements(policy_json: str) -> list[dict[str, Any]]:
    return list(json.loads(policy_json)["Statement"])


@PLANS
@pytest.mark.parametrize("stack", bucket_stacks())
def test_the_backup_policy_names_only_its_bucket_and_the_actions_a_backup_needs(stack: str) -> None:
    plan = stack_plan(stack)
    arn = "arn:aws:s3:::" + str(plan.outputs["backup_bucket"])
    policy = statements(str(plan.outputs["backup_policy_json"]))
    resources = {statement["Resource"] for statement in policy}
    assert resources == {arn, f"{arn}/*", f"{arn}/staging/*"}
    actions = {action for statement in policy for action in statement["Action"]}
    assert actions == {
        "s3:ListBucket",
        "s3:PutObject",
        "s3:GetObject",
        "s3:GetObjectVersion",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
        "s3:DeleteObject",
        "s3:DeleteObjectVersion",
    }
    deleting = [statement for statement in policy if "s3:DeleteObjectVersion" in statement["Action"]]
    assert [statement["Resource"] for statement in deleting] == [f"{arn}/staging/*"]
    assert all(statement["Effect"] == "Allow" and "Condition" not in statement for statement in policy)
    assert not plan.find("aws:iam/user:User") and not plan.find("aws:iam/accessKey:AccessKey")


@PLANS
@pytest.mark.parametrize("stack", bucket_stacks())
def test_backup_credentials_are_an_irsa_role_on_the_stacks_own_cluster_and_the_clusters_elsewhere(
    stack: str,
) -> None:
    plan, config = stack_plan(stack), stack_config(stack)
    assert config.aws is not None
    account = plan.one("ServiceAccount", "backup")
    annotations = account.get("metadata.annotations") or {}
    roles = [role for role in plan.find("aws:iam/role:Role") if "backups" in role.name]
    if config.aws.substrate and config.aws.cluster == "eks":
        (role,) = roles
        trust = statements(str(role.get("assumeRolePolicy")))
        (condition,) = [statement["Condition"]["StringEquals"] for statement in trust]
        assert f"system:serviceaccount:{config.cluster.namespace}:backup" in condition.values()
        (attached,) = [p for p in plan.find("aws:iam/rolePolicy:RolePolicy") if p.name.startswith(role.name)]
        assert attached.get("policy") == plan.outputs["backup_policy_json"]
        assert "eks.amazonaws.com/role-arn" in annotations
    else:  # an existing cluster: it must give the ServiceAccount credentials (output: the policy)
        assert roles == [] and "eks.amazonaws.com/role-arn" not in annotations


def cpu_millis(quantity: str) -> float:
    return float(quantity[:-1]) if quantity.endswith("m") else float(quantity) * 1000


@PLANS
@pytest.mark.parametrize("stack", bucket_stacks())
def test_backup_pods_request_what_a_streamed_upload_needs_not_what_the_database_needs(stack: str) -> None:
    plan, config = stack_plan(stack), stack_config(stack)
    assert config.aws is not None
    jobs = {job.name: job for job in plan.find("CronJob") if job.name.endswith("-backup")}
    # Every in-cluster database is backed up (RDS and Timestream have their own backups).
    databases = [
        s.name for s in plan.find("StatefulSet") if s.name == "postgres" or s.name.startswith("influxdb")
    ]
    assert set(jobs) == {f"{database}-backup" for database in databases}
    for name, job in jobs.items():
        spec = pod_spec(job)
        (container,) = spec["containers"]
        assert spec["serviceAccountName"] == "backup" and container["image"] == config.aws.backup_image
        assert container["command"][:3] == ["python", "-m", "backup"]
        requests = container["resources"]["requests"]
        assert cpu_millis(requests["cpu"]) <= 100, name
        assert quantity_bytes(requests["memory"]) <= 512 * MIB, name
        database = config.postgres if name.startswith("postgres") else config.influxdb
        assert quantity_bytes(requests["memory"]) < quantity_bytes(database.resources.requests.memory)
    claims = [claim.name for claim in plan.find("PersistentVolumeClaim") if claim.name.endswith("-backup")]
    assert claims == []  # S3 replaces the same-zone backup volume


@PLANS
@pytest.mark.parametrize("stack", [stack for stack in STACKS if stack not in bucket_stacks()])
def test_a_stack_without_a_backup_bucket_declares_no_bucket(stack: str) -> None:
    plan = stack_plan(stack)
    assert plan.find("aws:s3/bucket:Bucket") == []
    assert "backup_bucket" not in plan.outputs


@PLANS
def test_without_a_bucket_backups_go_to_protected_volumes_of_their_own() -> None:
    config = stack_config("mvp-eu").model_copy(update={"aws": None})
    plan = build_plan(config, "mvp-eu")
    claims = {
        claim.name: claim for claim in plan.find("PersistentVolumeClaim") if claim.name.endswith("-backup")
    }
    assert set(claims) == {"postgres-backup", "influxdb-backup"}
    assert all(claim.protect for claim in claims.values())
    job = plan.one("CronJob", "postgres-backup")
    (container,) = pod_spec(job)["containers"]
    assert container["image"] == config.postgres.image and "pg_dump -Fc" in container["command"][-1]
    assert plan.find("aws:s3/bucket:Bucket") == []
