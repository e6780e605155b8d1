"""Where a backup lives in its bucket and how big its upload parts are: pure, no AWS client.

Keys are ``<region>/<database>/<UTC timestamp>.dump``, so a listing sorts by time within a
database. A dump is first uploaded under ``staging/`` (its SHA-256 is known only once the stream
has ended, and S3 fixes an object's metadata when its upload starts), then copied server-side to
its final key with that metadata; the bucket's lifecycle expires whatever staging leaves behind.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime

MIB = 1024 * 1024
PART_SIZE_MIN = 5 * MIB
"""S3's smallest part (except the last)."""
PART_SIZE_MAX = 512 * MIB
PART_SIZE_DEFAULT = 16 * MIB
MAX_PARTS = 10_000
"""S3's most parts in one multipart upload: the largest dump is ``MAX_PARTS`` times the part size."""
UPLOAD_THREADS = 2
IN_MEMORY_PARTS = 2
"""Parts read from the dump and not yet handed to an upload thread (s3transfer's
``max_in_memory_upload_chunks``): with ``UPLOAD_THREADS`` they bound the memory an upload holds."""
STAGING = "staging"
SHA256_KEY = "sha256"
SIZE_KEY = "size"
"""The object-metadata keys (S3 sends them as ``x-amz-meta-sha256`` / ``x-amz-meta-size``)."""
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
SUFFIX = ".dump"
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
KEY_PATTERN = re.compile(rf"^(?P<region>{_LABEL})/(?P<database>{_LABEL})/(?P<stamp>\d{{8}}T\d{{6}}Z)\.dump$")
LABEL_PATTERN = re.compile(rf"^{_LABEL}$")
BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class BackupKey:
    region: str
    database: str
    taken_at: datetime

    @property
    def key(self) -> str:
        return f"{self.region}/{self.database}/{self.taken_at.strftime(TIMESTAMP_FORMAT)}{SUFFIX}"

    @property
    def staging_key(self) -> str:
        return f"{STAGING}/{self.key}"

    @classmethod
    def parse(cls, key: str) -> BackupKey:
        """Raises ``ValueError`` naming the layout when ``key`` is not a backup's key."""
        match = KEY_PATTERN.match(key) if len(key) <= 1024 else None
        if match is None:
            raise ValueError(
                f"{key[:200]!r} is not a backup key (<region>/<database>/<YYYYMMDDTHHMMSSZ>.dump)"
            )
        stamp = datetime.strptime(match["stamp"], TIMESTAMP_FORMAT).replace(tzinfo=UTC)
        return cls(match["region"], match["database"], stamp)


def new_key(region: str, database: str, now: datetime | None = None) -> BackupKey:
    taken_at = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    return BackupKey(region, database, taken_at)


def part_size_for(capacity_bytes: int) -> int:
    """The smallest whole-MiB part (at least the default) that lets a dump as large as the
    database's volume fit in ``MAX_PARTS`` parts, at most ``PART_SIZE_MAX``."""
    needed = math.ceil(capacity_bytes / MAX_PARTS / MIB) * MIB
    return min(PART_SIZE_MAX, max(PART_SIZE_DEFAULT, needed))


def upload_memory_bytes(part_size: int) -> int:
    """What the parts of one upload may hold in memory at once (s3transfer's own bound)."""
    return (IN_MEMORY_PARTS + UPLOAD_THREADS) * part_size
