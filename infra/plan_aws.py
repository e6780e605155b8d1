"""What the mock engine answers for the AWS resources whose outputs the program reads.

A real engine returns, beside the inputs, what AWS assigned: an endpoint, an ARN, a DNS name.
Each function here gives a plausible, deterministic stand-in, registered by type token with
:func:`infra.plan.engine_outputs`; the planner imports this module, so every plan has them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from infra.plan import engine_outputs

ACCOUNT = "123456789012"


def arn(service: str, region: str, resource: str) -> str:
    return f"arn:aws:{service}:{region}:{ACCOUNT}:{resource}"


@engine_outputs("aws:s3/bucket:Bucket")
def _bucket(name: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    bucket = str(inputs.get("bucket") or f"{name}-bucket")
    return {"bucket": bucket, "arn": f"arn:aws:s3:::{bucket}"}
