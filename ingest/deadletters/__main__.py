"""``python -m ingest.deadletters``: run the dead-letter consumer until SIGTERM.

Exit code 2 with every problem named when the settings are wrong (see ``settings.py``).
"""

from __future__ import annotations

import signal
import sys

from ingest.deadletters.consumer import DeadLetterConsumer
from ingest.deadletters.settings import DeadLetterSettings
from ingest.logs import configure_logging
from ingest.settings import SettingsError


def main() -> int:
    try:
        settings = DeadLetterSettings.from_env()
        settings.dsn()
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    consumer = DeadLetterConsumer(settings)
    signal.signal(signal.SIGTERM, lambda *_: consumer.stop())
    signal.signal(signal.SIGINT, lambda *_: consumer.stop())
    consumer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
