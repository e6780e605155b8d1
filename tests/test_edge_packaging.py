"""The agent's packaging: its image (pinned, non-root, holding exactly what the agent imports and the
``edge`` extra) and its systemd unit (restarted forever, its own user, a read-only system with one
writable state directory), checked by reading them and, where this machine has it, by systemd's
own ``systemd-analyze verify`` and ``security``. No image is built here (no Docker daemon)."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge.config import parse_config
from tests import image_closure as image

DOCKERFILE = image.ROOT / "edge" / "Dockerfile"
INSTRUCTIONS = image.instructions(DOCKERFILE)
UNIT_FILE = image.ROOT / "edge" / "systemd" / "ironlink-agent.service"


# ------------------------------------------------------------------------------------ the image
def test_the_base_image_is_a_pinned_slim_python_and_the_agent_runs_as_a_numeric_non_root_user() -> None:
    uid = str(image.non_root_uid(INSTRUCTIONS))
    assert "--uid " + uid in " ".join(INSTRUCTIONS["RUN"]), "the user is created with that uid"
    assert INSTRUCTIONS["ENTRYPOINT"] == ['["python", "-m", "edge"]']
    assert INSTRUCTIONS["CMD"] == ['["run", "/etc/ironlink-agent/gateway.yaml"]']
    (healthcheck,) = INSTRUCTIONS["HEALTHCHECK"]
    assert '"-m", "edge", "status", "/etc/ironlink-agent/gateway.yaml"' in healthcheck
    assert INSTRUCTIONS["VOLUME"] == ['["/var/lib/ironlink-agent"]']
    assert "--owner " + uid in " ".join(INSTRUCTIONS["RUN"]), (
        "the state directory belongs to the agent's user"
    )


def test_the_image_pins_every_distribution_the_agent_imports_and_the_edge_extra_at_the_tested_versions() -> (
    None
):
    _, imported = image.closure("edge", skip=set())
    assert imported, "the closure found no third-party import: the walk is broken"
    extra = tomllib.loads((image.ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "edge"
    ]
    extra_names = {
        image.normalised(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]) for requirement in extra
    }
    pinned = {image.normalised(name) for name in image.pins(INSTRUCTIONS)}
    assert extra_names <= pinned, f"the edge extra is not installed whole: {extra_names - pinned}"
    assert pinned == imported | extra_names, (
        f"missing: {(imported | extra_names) - pinned}, not imported: {pinned - imported - extra_names}"
    )
    assert image.version_drift(image.pins(INSTRUCTIONS)) == []


def test_the_image_copies_every_project_module_the_agent_imports_and_the_context_holds_only_those() -> None:
    files, _ = image.closure("edge", skip=set())
    assert image.left_out(files, DOCKERFILE) == []
    copied = [source for line in INSTRUCTIONS["COPY"] for source in line.split()[:-1]]  # not the target
    assert "ingest/" not in copied and "infra/" not in copied, "the worker and the Pulumi program stay out"


# -------------------------------------------------------------------------------- the unit
def unit() -> configparser.ConfigParser:
    """The unit as sections of keys; a key given twice keeps every value, joined by newlines."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, dict_type=_MultiDict)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(UNIT_FILE.read_text())
    return parser


class _MultiDict(dict[str, Any]):
    """configparser keeps an option's lines in a list while it reads: a repeated key extends it."""

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self and isinstance(value, list) and isinstance(self[key], list):
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def test_the_unit_runs_the_agent_on_its_config_and_restarts_it_forever() -> None:
    service, install = unit()["Service"], unit()["Install"]
    assert service["ExecStart"].split() == [
        "/opt/ironlink-agent/bin/ironlink-agent",
        "run",
        "/etc/ironlink-agent/gateway.yaml",
    ]
    assert service["ExecStartPre"].split()[1:] == ["check", "/etc/ironlink-agent/gateway.yaml"]
    assert service["Restart"] == "always" and unit()["Unit"]["StartLimitIntervalSec"] == "0"
    assert service["KillSignal"] == "SIGTERM", "the agent commits its store on SIGTERM"
    assert install["WantedBy"] == "multi-user.target"


def test_the_unit_gives_the_agent_its_own_user_and_one_writable_state_directory() -> None:
    service = unit()["Service"]
    assert service["DynamicUser"] == "yes"
    assert service["StateDirectory"] == "ironlink-agent" and service["StateDirectoryMode"] == "0700"
    assert service["ProtectSystem"] == "strict", "everything else is read-only"
    assert service["ReadWritePaths"].split() == ["/var/lib/ironlink-agent"]
    assert service["LoadCredential"] == "claim-token:/etc/ironlink-agent/claim-token"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "RestrictSUIDSGID"):
        assert service[key] == "yes", key
    assert service["CapabilityBoundingSet"] == "", "no capabilities at all"
    assert service["RestrictAddressFamilies"].split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert service["SystemCallFilter"].splitlines()[0] == "@system-service"


@pytest.fixture
def runnable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's agent (verify checks the binary exists)."""
    agent = Path(sys.executable).parent / "ironlink-agent"
    text = UNIT_FILE.read_text().replace("/opt/ironlink-agent/bin/ironlink-agent", str(agent))
    path = tmp_path / "ironlink-agent.service"
    path.write_text(text)
    return path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not on this machine")
def test_systemd_accepts_every_line_of_the_unit_and_rates_its_exposure_low(runnable_unit: Path) -> None:
    verified = subprocess.run(
        ["systemd-analyze", "verify", str(runnable_unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 even for an unknown key or a bad value: it only warns, so any warning fails.
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr
    rated = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(runnable_unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", rated.stdout + rated.stderr)
    assert exposure is not None, rated.stdout[-500:] + rated.stderr[-500:]
    print(f"systemd-analyze security: exposure {exposure.group(1)} (0 best, 10 worst)")
    assert float(exposure.group(1)) <= 2.0, rated.stdout


def test_the_readmes_gateway_config_is_a_valid_config() -> None:
    """The README opens with the config an operator copies: it must load as it stands."""
    text = (image.ROOT / "edge" / "README.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.DOTALL)
    assert block is not None, "edge/README.md has no yaml config"
    config = parse_config(yaml.safe_load(block.group(1)))
    assert config.health is not None and config.uplink.claim is not None
    assert str(config.uplink.claim.token_file).startswith("/run/credentials/ironlink-agent.service/")


def test_the_files_the_image_copies_run_the_agent_on_their_own(tmp_path: Path) -> None:
    """The image's /app without Docker: only what COPY takes, laid out as it copies it. Every project
    module the agent loads comes from there (none from the repository), and ``check`` loads the
    README's config with the register maps the copy holds."""
    app = tmp_path / "app"
    for line in INSTRUCTIONS["COPY"]:
        *sources, target = line.split()
        for source in sources:
            origin, destination = image.ROOT / source, app / target
            if origin.is_dir():  # a folder's contents go into the target, as COPY does
                shutil.copytree(origin, destination, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                destination.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, destination / origin.name)
    block = re.search(r"```yaml\n(.*?)```", (image.ROOT / "edge" / "README.md").read_text(), re.DOTALL)
    assert block is not None
    (tmp_path / "gateway.yaml").write_text(block.group(1))
    probe = (
        "import sys, runpy\n"
        "import edge.agent, edge.cli, edge.adapters.modbus, edge.adapters.opcua, edge.adapters.http_push\n"
        "import edge.adapters.local_mqtt\n"
        f"project = {image.PROJECT!r}\n"
        "outside = sorted(n for n, m in list(sys.modules.items()) if n.split('.')[0] in project\n"
        f"                 and getattr(m, '__file__', None) and not m.__file__.startswith({str(app)!r}))\n"
        "print('outside:', outside)\n"
        "sys.exit(1 if outside else 0)\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=app, capture_output=True, text=True, timeout=120, check=False
    )
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    checked = subprocess.run(
        [sys.executable, "-m", "edge", "check", str(tmp_path / "gateway.yaml")],
        cwd=app,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert checked.returncode == 0 and checked.stdout.startswith("ok: gateway gw-7"), checked.stderr
