"""``python -m api``: the Ironlink API until SIGTERM.

Exit code 2 with every problem named when the settings are wrong (``api/settings.py``) or the
registry cannot be migrated.
"""

from __future__ import annotations

import sys

import psycopg
import uvicorn
from fastapi import FastAPI

from api.app import create_app
from api.live import MESSAGE_MAX_BYTES
from api.settings import ApiSettings
from ingest.logs import configure_logging
from ingest.settings import SettingsError
from registry.migrate import MigrationError, apply_migrations


def main() -> int:
    try:
        settings = ApiSettings.from_env()
        dsn = settings.dsn()
        settings.require_store()
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            apply_migrations(conn)
    except (psycopg.OperationalError, MigrationError) as error:
        print(f"error: IRONLINK_API_REGISTRY_DSN: the registry cannot be used: {error}", file=sys.stderr)
        return 2
    uvicorn.Server(server_config(settings, create_app(settings))).run()
    return 0


def server_config(settings: ApiSettings, app: FastAPI) -> uvicorn.Config:
    """How uvicorn serves the app. ``ws_max_size``: a live-feed message over its bound is refused
    by the WebSocket protocol before it is buffered (uvicorn's default takes 16 MiB whole, before
    the feed could look at its size, and before the key is known)."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_max_size=MESSAGE_MAX_BYTES,
    )


if __name__ == "__main__":
    sys.exit(main())
