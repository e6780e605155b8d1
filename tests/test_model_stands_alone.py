"""The worker and the provisioning service import the tenant model without Pulumi or the CLI
(issue 9 item 6): their images hold neither.

A fresh interpreter imports the worker's modules with an import hook that refuses the heavy
packages, as the image (which lacks them) would: a library's optional import (structlog tries
``rich``) falls back, while one from this project's code is recorded and fails the test. Then no
refused module may be loaded at all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = ("pulumi", "pulumi_*", "infra.cli", "typer", "rich", "components")
# The provisioning service drives Mosquitto's dynamic security with the same rule renderer the
# broker's files come from (``components.render``: pure functions, no Pulumi), so its image
# carries that one folder; the Pulumi components themselves stay out.
SERVICES = {
    "worker": (FORBIDDEN, ("ingest.worker", "ingest.fleet", "ingest.__main__")),
    "provisioning": (
        ("pulumi", "pulumi_*", "infra.cli", "typer", "rich", "components.provisioning", "components.kube"),
        ("provisioning.app", "provisioning.__main__"),
    ),
}

_PROBE = """
import fnmatch, importlib, json, sys, traceback
forbidden, modules, root = json.loads(sys.argv[1])

def refused(name):
    top = name.split(".")[0]
    return any(fnmatch.fnmatch(top, f) or name == f or name.startswith(f + ".") for f in forbidden)

attempts = []

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if refused(name):
            importer = [f for f in traceback.extract_stack() if not f.filename.startswith("<")][-1]
            if importer.filename.startswith(root) and "/.venv/" not in importer.filename:
                attempts.append({"module": name, "from": f"{importer.filename}:{importer.lineno}"})
            raise ModuleNotFoundError(f"refused by the test: {name}", name=name)
        return None

sys.meta_path.insert(0, Refuse())
for module in modules:
    importlib.import_module(module)
print(json.dumps({"attempts": attempts, "loaded": sorted(m for m in sys.modules if refused(m))}))
"""


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_the_service_imports_neither_pulumi_nor_the_cli(service: str) -> None:
    forbidden, modules = SERVICES[service]
    argument = json.dumps([forbidden, modules, str(ROOT)])
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, argument], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, f"the {service} does not import without them:\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["attempts"] == [], "this project's code imports what the image lacks"
    assert report["loaded"] == []
