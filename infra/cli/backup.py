"""``ironlink backup list|restore|download``: the region's database backups in its S3 bucket.

The backups are taken by the backup CronJobs (``python -m backup``, ``components/backup.py``).
``restore`` checks the object's size and SHA-256 against its metadata before the database is
touched, then applies it with ``pg_restore --single-transaction`` (an error rolls it back).
``download`` gives the same verified file for an InfluxDB backup (a tar of ``influx backup``'s
directory: untar it, then ``influx restore DIR``). AWS credentials come from the default chain;
``--endpoint-url`` (or ``AWS_ENDPOINT_URL``) points at another S3 endpoint. Every flag is checked
first, all problems at once (exit 2); a refused or failed backup exits 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from backup.layout import BUCKET_PATTERN, LABEL_PATTERN, PART_SIZE_DEFAULT, BackupKey
from infra.cli import app
from infra.cli.common import console, fail

if TYPE_CHECKING:
    from backup.s3 import StoredBackup

backup_app = typer.Typer(help="List, restore and download the database backups in S3.", no_args_is_help=True)
app.add_typer(backup_app, name="backup")

EXIT_FAILED = 1
LIST_LIMIT_MAX = 1_000
DSN_MAX = 4096

BucketOption = Annotated[
    str, typer.Option("--bucket", help="The region's backup bucket (stack output backup_bucket).")
]
EndpointOption = Annotated[
    str | None, typer.Option("--endpoint-url", envvar="AWS_ENDPOINT_URL", help="Another S3 endpoint.")
]


def s3_client(endpoint_url: str | None) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url)


def bucket_problems(bucket: str) -> list[str]:
    return [] if BUCKET_PATTERN.match(bucket) else [f"--bucket: {bucket[:80]!r} is not an S3 bucket name"]


def key_problems(key: str) -> list[str]:
    try:
        BackupKey.parse(key)
    except ValueError as error:
        return [f"KEY: {error}"]
    return []


def refuse(problems: list[str]) -> None:
    if problems:
        fail("; ".join(problems))


def aws_call(action: Any) -> Any:
    """Run an S3 action; a refused backup or an AWS error exits 1 with its message."""
    from botocore.exceptions import BotoCoreError, ClientError

    from backup.s3 import BackupError

    try:
        return action()
    except BackupError as error:
        fail(str(error), EXIT_FAILED)
    except (BotoCoreError, ClientError) as error:
        fail(f"S3: {error}", EXIT_FAILED)


@backup_app.command("list")
def list_command(
    bucket: BucketOption,
    region: Annotated[str | None, typer.Option("--region", help="Only this Ironlink region.")] = None,
    database: Annotated[
        str | None, typer.Option("--database", help="Only this database instance (postgres, influxdb...).")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help=f"The newest N (at most {LIST_LIMIT_MAX}).")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    endpoint_url: EndpointOption = None,
) -> None:
    """The backups in the bucket, oldest first, with their size and SHA-256."""
    from backup.s3 import list_backups

    problems = bucket_problems(bucket)
    for flag, value in (("--region", region), ("--database", database)):
        if value is not None and not LABEL_PATTERN.match(value):
            problems.append(f"{flag}: {value[:80]!r} is not a DNS label (a-z, 0-9, '-', at most 63)")
    if not 1 <= limit <= LIST_LIMIT_MAX:
        problems.append(f"--limit: {limit} is not between 1 and {LIST_LIMIT_MAX}")
    refuse(problems)
    client = s3_client(endpoint_url)
    found: list[StoredBackup] = aws_call(
        lambda: list_backups(client, bucket, region=region, database=database, limit=limit)
    )
    if as_json:
        rows = [{"key": b.key, "size": b.size, "sha256": b.sha256} for b in found]
        console.print_json(json.dumps(rows))
        return
    table = Table("key", "bytes", "sha256")
    for stored in found:
        table.add_row(stored.key, str(stored.size), stored.sha256 or "(none: not restorable)")
    console.print(table)


@backup_app.command("restore")
def restore_command(
    key: Annotated[str, typer.Argument(help="The backup's key (from ironlink backup list).")],
    bucket: BucketOption,
    dsn: Annotated[
        str, typer.Option("--dsn", envvar="IRONLINK_RESTORE_DSN", help="The PostgreSQL to restore into.")
    ],
    yes: Annotated[
        bool, typer.Option("--yes", help="Replace the database's objects without asking.")
    ] = False,
    endpoint_url: EndpointOption = None,
) -> None:
    """Verify a Postgres backup whole, then restore it in one transaction."""
    from backup.restore import restore_postgres

    problems = [*key_problems(key), *bucket_problems(bucket)]
    if not dsn.strip() or len(dsn) > DSN_MAX:
        problems.append(f"--dsn: must be a PostgreSQL connection string of 1 to {DSN_MAX} characters")
    if not problems and BackupKey.parse(key).database.startswith("influxdb"):
        problems.append(
            f"KEY: {key!r} is an InfluxDB backup: use 'ironlink backup download' and influx restore"
        )
    refuse(problems)
    if not yes and not typer.confirm(
        f"Replace the objects of the target database with {key}?", default=False
    ):
        fail("not confirmed (pass --yes to restore without asking)")
    client = s3_client(endpoint_url)
    stored: StoredBackup = aws_call(lambda: restore_postgres(client, bucket, key, dsn, PART_SIZE_DEFAULT))
    console.print(f"restored {stored.key} ({stored.size} bytes, sha256 {stored.sha256})")


@backup_app.command("download")
def download_command(
    key: Annotated[str, typer.Argument(help="The backup's key (from ironlink backup list).")],
    bucket: BucketOption,
    to: Annotated[Path, typer.Option("--to", help="Where to write the verified backup (a new file).")],
    endpoint_url: EndpointOption = None,
) -> None:
    """Download a backup and verify it whole (size and SHA-256); a refused one is deleted."""
    from backup.s3 import download_verified

    problems = [*key_problems(key), *bucket_problems(bucket)]
    if to.exists():
        problems.append(f"--to: {str(to)[:200]!r} exists already")
    elif not to.parent.is_dir():
        problems.append(f"--to: {str(to.parent)[:200]!r} is not a directory")
    refuse(problems)
    client = s3_client(endpoint_url)
    try:
        stored: StoredBackup = aws_call(lambda: download_verified(client, bucket, key, to, PART_SIZE_DEFAULT))
    except typer.Exit:
        to.unlink(missing_ok=True)
        raise
    console.print(f"{to}: {stored.size} bytes, sha256 {stored.sha256} (verified)")
