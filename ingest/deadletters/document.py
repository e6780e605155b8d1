"""One dead-letter document, as the worker publishes it (``ingest.pipeline.dead_letter_document``),
read into a registry row. Pure and total: whatever arrives on ``dlq/...`` becomes a row, a
document that cannot be read becomes one with reason ``malformed_dead_letter`` that keeps its
first bytes, so nothing that reached the dead-letter topic is dropped.

Every size is bounded: the document (``max_document_bytes``), the stored payload sample
(``max_sample_bytes``), the detail (:data:`registry.store.DEAD_LETTER_DETAIL_MAX` characters)
and the topic (1024 characters).
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from infra.tenancy import TOPIC_ROOT, dead_letter_origin
from registry.store import (
    DEAD_LETTER_DETAIL_MAX,
    MALFORMED_DEAD_LETTER,
    NewDeadLetter,
    dead_letter_fingerprint,
)

TOPIC_MAX = 1024
_REASON = re.compile(r"^[a-z_]{1,64}$")


class _Document(BaseModel):
    """The worker's document; extra keys are ignored so that a newer worker still lands."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    reason: StrictStr = Field(pattern=_REASON.pattern)
    detail: StrictStr
    topic: StrictStr = Field(min_length=1, max_length=TOPIC_MAX)
    payload: StrictStr
    payload_encoding: Literal["text", "base64"]
    payload_bytes: StrictInt = Field(ge=0)
    truncated: StrictBool
    received_at: StrictStr


class MalformedError(ValueError):
    """Why a document cannot be read (the detail of its ``malformed_dead_letter`` row)."""


def topic_tenant(topic: str) -> str | None:
    """The tenant a topic names (``ironlink/<tenant>/...``); the registry decides if it exists."""
    levels = topic.split("/", 2)
    return levels[1] if len(levels) > 1 and levels[0] == TOPIC_ROOT and levels[1] else None


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_dead_letter(
    dlq_topic: str, document: bytes, *, now: datetime, max_document_bytes: int, max_sample_bytes: int
) -> NewDeadLetter:
    """The row for ``document`` received on ``dlq_topic``; ``now`` dates a malformed one."""
    try:
        return _read(dlq_topic, document, max_document_bytes, max_sample_bytes)
    except MalformedError as error:
        topic = _cut(dead_letter_origin(dlq_topic) or dlq_topic, TOPIC_MAX)
        return NewDeadLetter(
            tenant_id=topic_tenant(topic),
            reason=MALFORMED_DEAD_LETTER,
            detail=_cut(str(error), DEAD_LETTER_DETAIL_MAX),
            topic=topic,
            received_at=now,
            payload=document[:max_sample_bytes],
            payload_bytes=len(document),
            truncated=len(document) > max_sample_bytes,
            # The same document redelivered on the same topic is the same row, whenever it came.
            fingerprint=dead_letter_fingerprint(MALFORMED_DEAD_LETTER.encode(), dlq_topic.encode(), document),
        )


def _read(dlq_topic: str, document: bytes, max_document_bytes: int, max_sample_bytes: int) -> NewDeadLetter:
    if len(document) > max_document_bytes:
        raise MalformedError(f"document: {len(document)} bytes, more than the {max_document_bytes} accepted")
    origin = dead_letter_origin(dlq_topic)
    if origin is None:
        raise MalformedError(f"topic: {_cut(dlq_topic, 200)!r} is not a dead-letter topic (dlq/<topic>)")
    try:
        parsed = _Document.model_validate_json(document)
    except ValidationError as error:
        problems = []
        for item in error.errors(include_url=False):
            where = ".".join(str(part) for part in item["loc"]) or "document"
            problems.append(f"{where}: {item['msg']}")
        raise MalformedError("; ".join(problems)) from None
    if parsed.topic != origin:
        raise MalformedError(
            f"topic: {_cut(parsed.topic, 200)!r} is not the topic it was dead-lettered from"
            f" ({_cut(origin, 200)!r})"
        )
    try:
        received_at = datetime.fromisoformat(parsed.received_at)
    except ValueError:
        raise MalformedError(
            f"received_at: {_cut(parsed.received_at, 80)!r} is not an ISO 8601 time"
        ) from None
    if received_at.tzinfo is None:
        raise MalformedError(f"received_at: {parsed.received_at!r} has no time zone")
    payload = _payload(parsed)
    if len(payload) > parsed.payload_bytes:
        raise MalformedError(
            f"payload_bytes: {parsed.payload_bytes} is less than the {len(payload)} bytes of the payload"
        )
    sample = payload[:max_sample_bytes]
    return NewDeadLetter(
        tenant_id=topic_tenant(origin),
        reason=parsed.reason,
        detail=_cut(parsed.detail, DEAD_LETTER_DETAIL_MAX),
        topic=origin,
        received_at=received_at,
        payload=sample,
        payload_bytes=parsed.payload_bytes,
        truncated=parsed.truncated or len(sample) < len(payload),
        fingerprint=dead_letter_fingerprint(origin.encode(), parsed.received_at.encode(), payload),
    )


def _payload(document: _Document) -> bytes:
    if document.payload_encoding == "text":
        return document.payload.encode()
    try:
        return base64.b64decode(document.payload, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedError("payload: is not valid base64 (payload_encoding is 'base64')") from None
