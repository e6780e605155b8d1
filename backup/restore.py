"""Restore a chosen Postgres backup: verified whole first, then applied in one transaction.

The object is downloaded to a temporary file and its size and SHA-256 checked against its
metadata before the database is touched; a truncated or corrupted object is refused and the
database stays as it was. ``pg_restore --clean --if-exists --single-transaction`` then replaces the
dump's objects, and any error rolls the whole restore back.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any

from backup.s3 import BackupError, StoredBackup, download_verified

STDERR_SHOWN = 2000


def fetch_verified(
    client: Any, bucket: str, key: str, directory: Path, part_size: int
) -> tuple[Path, StoredBackup]:
    target = directory / Path(key).name
    return target, download_verified(client, bucket, key, target, part_size)


def restore_postgres(client: Any, bucket: str, key: str, dsn: str, part_size: int) -> StoredBackup:
    with tempfile.TemporaryDirectory(prefix="ironlink-restore-") as directory:
        path, stored = fetch_verified(client, bucket, key, Path(directory), part_size)
        result = subprocess.run(
            [
                "pg_restore",
                "--clean",
                "--if-exists",
                "--single-transaction",
                "--no-password",
                f"--dbname={dsn}",
                str(path),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        raise BackupError(
            f"restore of {key!r} failed and was rolled back (pg_restore exited {result.returncode}): "
            f"{result.stderr.strip()[-STDERR_SHOWN:]}"
        )
    return stored
