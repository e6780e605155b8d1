"""The engines' own dump tools, streamed: what the backup job runs for each engine.

Postgres: ``pg_dump --format=custom`` to stdout (it reads ``PGHOST``, ``PGUSER``, ``PGDATABASE``,
``PGPASSWORD`` from the environment, so no password is in a command line). InfluxDB 2.x:
``influx backup`` can only write a directory, so it fills a scratch directory first (``INFLUX_HOST``
and ``INFLUX_TOKEN`` from the environment), and ``tar`` streams that directory.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from backup.layout import BackupKey
from backup.s3 import BackupError, StoredBackup, upload_stream

Engine = Literal["postgres", "influxdb"]
ENGINES: tuple[Engine, ...] = ("postgres", "influxdb")


@dataclass(frozen=True)
class DumpPlan:
    stream: list[str]
    """The command whose stdout is the backup."""
    prepare: list[list[str]] = field(default_factory=list)
    """Commands run to completion first (InfluxDB's backup into the scratch directory)."""
    scratch: Path | None = None
    """A directory the plan fills, removed once the backup is stored or has failed."""


def dump_plan(engine: Engine, scratch: Path) -> DumpPlan:
    if engine == "postgres":
        return DumpPlan(stream=["pg_dump", "--format=custom", "--no-password"])
    directory = scratch / "influx-backup"
    return DumpPlan(
        prepare=[["influx", "backup", str(directory)]],
        stream=["tar", "--create", "--file=-", f"--directory={directory}", "."],
        scratch=directory,
    )


def run_backup(client: Any, bucket: str, key: BackupKey, plan: DumpPlan, part_size: int) -> StoredBackup:
    """Run ``plan`` and stream its output to ``key``; nothing is published if a command fails."""
    try:
        return _stream(client, bucket, key, plan, part_size)
    finally:
        if plan.scratch is not None:
            shutil.rmtree(plan.scratch, ignore_errors=True)


def _stream(client: Any, bucket: str, key: BackupKey, plan: DumpPlan, part_size: int) -> StoredBackup:
    for command in plan.prepare:
        code = subprocess.run(command, check=False).returncode
        if code != 0:
            raise BackupError(f"backup {key.key!r}: {command[0]} {command[1]} exited with {code}")
    with subprocess.Popen(plan.stream, stdout=subprocess.PIPE) as process:
        assert process.stdout is not None

        def ended() -> None:
            code = process.wait()
            if code != 0:
                raise BackupError(f"backup {key.key!r}: {plan.stream[0]} exited with {code}; not published")

        try:
            return upload_stream(client, process.stdout, bucket, key, part_size, source_ended=ended)
        except BaseException:
            process.kill()
            raise
