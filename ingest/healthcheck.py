"""``python -m ingest.healthcheck``: the image's HEALTHCHECK (a slim image has no curl).

Exit 0 when the worker's ``/healthz`` answers 200 on ``IRONLINK_HTTP_PORT``, 1 otherwise.
"""

from __future__ import annotations

import os
import sys
import urllib.request

from ingest.settings import ENV_PREFIX, WorkerSettings


def main() -> int:
    port = os.environ.get(f"{ENV_PREFIX}HTTP_PORT") or WorkerSettings.model_fields["http_port"].default
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as response:
            return 0 if response.status == 200 else 1
    except OSError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
