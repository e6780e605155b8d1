"""The committed JSON Schema of each payload version, generated from the pydantic models.

Integrators validate against ``ingest/schemas/telemetry-v<N>.json`` (a reading of version N) and
``ingest/schemas/telemetry-gap-v4.json`` (a gap record) without reading Python;
``tests/test_contract_schemas.py`` fails when a model changes and the files were not regenerated::

    python -m ingest.jsonschema
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from ingest.contract import DOCUMENT_KINDS, MODELS

SCHEMA_DIR = Path(__file__).parent / "schemas"
SCHEMA_ID = "https://schemas.ironlink.example.com/telemetry/{name}.json"


def render_schemas() -> dict[str, str]:
    """File name → JSON text: one per reading version, one per other document kind."""
    models: dict[str, type[BaseModel]] = {f"v{version}": model for version, model in MODELS.items()}
    models.update(DOCUMENT_KINDS)
    files = {}
    for name, model in models.items():
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": SCHEMA_ID.format(name=name),
            **model.model_json_schema(),
        }
        files[f"telemetry-{name}.json"] = json.dumps(schema, indent=2) + "\n"
    return files


def main() -> None:
    SCHEMA_DIR.mkdir(exist_ok=True)
    for name, text in render_schemas().items():
        (SCHEMA_DIR / name).write_text(text)
        print(f"wrote {SCHEMA_DIR / name}")


if __name__ == "__main__":
    main()
