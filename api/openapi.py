"""``python -m api.openapi``: write ``api/openapi.json`` from the app
(``tests/test_api_openapi.py`` checks the committed document is the app's; rerun after changing
a route)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest import mock

from pydantic import SecretStr

from api.app import create_app
from api.settings import ApiSettings

PATH = Path(__file__).resolve().parent / "openapi.json"


def document() -> dict[str, Any]:
    # The routes need no registry or store to be described: stand-ins are never called.
    settings = ApiSettings(registry_dsn=SecretStr("host=unused"), store_url="http://unused")
    return create_app(settings, pool=mock.Mock(), store=mock.Mock()).openapi()


def main() -> None:
    PATH.write_text(json.dumps(document(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main()
