"""``python -m provisioning.openapi``: write ``provisioning/openapi.json`` from the app
(``tests/test_provisioning.py`` checks the committed document is the app's)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest import mock

from provisioning.app import create_app

PATH = Path(__file__).resolve().parent / "openapi.json"


def document() -> dict[str, Any]:
    # The routes need no registry to be described: a stand-in service is never called.
    return create_app(mock.Mock()).openapi()


def main() -> None:
    PATH.write_text(json.dumps(document(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main()
