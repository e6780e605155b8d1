"""The body a pushing source (local MQTT, HTTP) sends: ``{"ts"?, "status"?, "metrics": {...}}``."""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge.normalize import Reading
from ingest.contract import Status

MAX_BODY_BYTES = 16 * 1024  # the contract's payload limit


class PushedReading(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    ts: float | None = None  # the gateway's clock when absent
    status: Status = "running"
    metrics: dict[str, float] = Field(min_length=1, max_length=256)


def parse_pushed(body: bytes) -> Reading:
    """A reading, or ValueError naming the field and the value."""
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    try:
        pushed = PushedReading.model_validate(json.loads(body))
    except (ValueError, ValidationError) as error:
        if isinstance(error, ValidationError):
            first: dict[str, Any] = dict(error.errors(include_url=False)[0])
            where = ".".join(str(part) for part in first["loc"]) or "body"
            raise ValueError(f"{where}: {first['msg']} (got {first.get('input')!r:.80})") from None
        raise ValueError(f"body: not JSON ({error})") from None
    return Reading(pushed.ts if pushed.ts is not None else time.time(), pushed.status, dict(pushed.metrics))
