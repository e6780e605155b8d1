"""A dump stream into S3 and back, checked end to end.

Upload: the stream is read part by part (never whole: s3transfer keeps at most
:func:`backup.layout.upload_memory_bytes` of it), hashed as it passes, uploaded under ``staging/``
with S3's own SHA-256 checksum per part, then copied server-side to its final key with the stream's
SHA-256 and byte count as metadata; the staging version is deleted. Download: the object goes to a
file, and its size and SHA-256 are checked against that metadata before anyone may use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from boto3.s3.transfer import TransferConfig

from backup.layout import (
    IN_MEMORY_PARTS,
    PART_SIZE_MAX,
    PART_SIZE_MIN,
    SHA256_KEY,
    SIZE_KEY,
    UPLOAD_THREADS,
    BackupKey,
)

READ_CHUNK = 1024 * 1024


class BackupError(RuntimeError):
    """A backup that cannot be taken or trusted; the message names the key and what is wrong."""


class ReadableStream(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class StoredBackup:
    key: str
    size: int
    sha256: str
    last_modified: datetime | None = None


class HashingReader:
    """Passes a stream through, counting its bytes and hashing them (what the upload reads)."""

    def __init__(self, raw: ReadableStream) -> None:
        self.raw, self.size, self.digest = raw, 0, hashlib.sha256()

    def read(self, size: int = -1, /) -> bytes:
        data = self.raw.read(size)
        self.size += len(data)
        self.digest.update(data)
        return data


def transfer_config(part_size: int) -> TransferConfig:
    if not PART_SIZE_MIN <= part_size <= PART_SIZE_MAX:
        raise ValueError(f"part size {part_size} is not between {PART_SIZE_MIN} and {PART_SIZE_MAX} bytes")
    config = TransferConfig(
        multipart_threshold=part_size, multipart_chunksize=part_size, max_concurrency=UPLOAD_THREADS
    )
    config.max_in_memory_upload_chunks = IN_MEMORY_PARTS  # s3transfer's bound, not a boto3 argument
    return config


def upload_stream(
    client: Any,
    stream: ReadableStream,
    bucket: str,
    key: BackupKey,
    part_size: int,
    *,
    source_ended: Callable[[], None] = lambda: None,
) -> StoredBackup:
    """Stream ``stream`` to ``key`` (staging first); returns what was stored.

    ``source_ended`` runs once the stream is read and before the backup is published: it raises
    :class:`BackupError` if the producer failed (a dump that stopped half-way is never published).
    """
    config = transfer_config(part_size)
    reader = HashingReader(stream)
    client.upload_fileobj(
        reader, bucket, key.staging_key, ExtraArgs={"ChecksumAlgorithm": "SHA256"}, Config=config
    )
    staged = client.head_object(Bucket=bucket, Key=key.staging_key)
    try:
        source_ended()
        if staged["ContentLength"] != reader.size:
            raise BackupError(
                f"backup {key.key!r}: staged {staged['ContentLength']} bytes, the dump had {reader.size}"
            )
        stored = StoredBackup(key.key, reader.size, reader.digest.hexdigest())
        source = {"Bucket": bucket, "Key": key.staging_key}
        if staged.get("VersionId"):
            source["VersionId"] = staged["VersionId"]
        client.copy(
            source,
            bucket,
            key.key,
            ExtraArgs={
                "Metadata": {SHA256_KEY: stored.sha256, SIZE_KEY: str(stored.size)},
                "MetadataDirective": "REPLACE",
                "ChecksumAlgorithm": "SHA256",
            },
            Config=config,
        )
    finally:
        discard_staged(client, bucket, key, staged.get("VersionId"))
    return stored


def discard_staged(client: Any, bucket: str, key: BackupKey, version_id: str | None) -> None:
    """Delete the staging version itself (not just hide it), so it costs nothing until lifecycle."""
    extra = {"VersionId": version_id} if version_id else {}
    client.delete_object(Bucket=bucket, Key=key.staging_key, **extra)


def list_backups(
    client: Any, bucket: str, *, region: str | None = None, database: str | None = None, limit: int
) -> list[StoredBackup]:
    """The newest ``limit`` backups (of a region, of a database), oldest first, with their metadata.

    Objects outside the key layout (``staging/``, stray uploads) are never offered for restore.
    """
    keys: list[str] = []
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=f"{region}/" if region else ""):
        for item in page.get("Contents", []):
            try:
                parsed = BackupKey.parse(item["Key"])
            except ValueError:
                continue
            if database is None or parsed.database == database:
                keys.append(item["Key"])
    keys.sort(key=lambda key: (BackupKey.parse(key).taken_at, key))
    found = []
    for key in keys[-limit:]:
        head = client.head_object(Bucket=bucket, Key=key)
        found.append(
            StoredBackup(
                key,
                head["ContentLength"],
                head.get("Metadata", {}).get(SHA256_KEY, ""),
                head.get("LastModified"),
            )
        )
    return found


def expected_of(head: dict[str, Any], key: str) -> tuple[int, str]:
    metadata = head.get("Metadata", {})
    size, sha256 = metadata.get(SIZE_KEY, ""), metadata.get(SHA256_KEY, "")
    if not size.isdigit() or len(sha256) != 64:
        raise BackupError(
            f"backup {key!r}: no {SIZE_KEY}/{SHA256_KEY} metadata (not written by ironlink backup); refused"
        )
    return int(size), sha256


def download_verified(client: Any, bucket: str, key: str, target: Path, part_size: int) -> StoredBackup:
    """Download ``key`` to ``target`` and prove it whole: size, then SHA-256, against its metadata.

    Raises :class:`BackupError` naming the key, what was expected and what was found.
    """
    head = client.head_object(Bucket=bucket, Key=key)
    size, sha256 = expected_of(head, key)
    extra = {"VersionId": head["VersionId"]} if head.get("VersionId") else {}
    client.download_file(bucket, key, str(target), ExtraArgs=extra, Config=transfer_config(part_size))
    found_size = target.stat().st_size
    if found_size != size:
        raise BackupError(
            f"backup {key!r} is truncated or corrupted: expected {size} bytes, found {found_size}"
        )
    found_sha256 = file_sha256(target)
    if found_sha256 != sha256:
        raise BackupError(f"backup {key!r} is corrupted: expected SHA-256 {sha256}, found {found_sha256}")
    return StoredBackup(key, size, sha256, head.get("LastModified"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
