"""The committed ``api/openapi.json`` is the app's own document (``python -m api.openapi``)."""

from __future__ import annotations

import json
from pathlib import Path

from api.openapi import document

COMMITTED = Path(__file__).resolve().parent.parent / "api" / "openapi.json"


def test_the_committed_openapi_document_is_the_apps() -> None:
    assert json.loads(COMMITTED.read_text()) == document(), "run: python -m api.openapi"


def test_every_data_route_requires_an_api_key_and_states_its_refusals() -> None:
    spec = document()
    for path, operations in spec["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in operations.items():
            assert operation.get("security"), f"{method.upper()} {path} takes no API key"
            assert {"401", "422", "429"} <= set(operation["responses"]), f"{method.upper()} {path}"
