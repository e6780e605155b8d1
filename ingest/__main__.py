"""``python -m ingest``: run the worker until SIGTERM (flush, acknowledge, exit 0).

Exit code 2 with every problem named when the settings are wrong (see ``ingest/settings.py``) or
the spool folder cannot be opened.
"""

from __future__ import annotations

import signal
import sys

from ingest.logs import configure_logging
from ingest.settings import SettingsError, WorkerSettings
from ingest.spool import SpoolError
from ingest.worker import Worker


def main() -> int:
    try:
        settings = WorkerSettings.from_env()
        tokens = settings.store_tokens()
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        worker = Worker(settings, tokens=tokens)
    except SpoolError as error:
        print(f"error: IRONLINK_SPOOL_DIR: {error}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
