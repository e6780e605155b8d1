"""``ironlink device add`` against the real provisioning API: uvicorn on a free loopback port, the
registry on a real PostgreSQL, admin tokens minted by ``ironlink provisioning token create``."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import uvicorn
from cryptography import x509
from cryptography.x509.oid import NameOID
from rich.console import Console
from typer.testing import CliRunner, Result

from infra.cli import app, common
from infra.cli import device as device_cli
from localdev import servers
from provisioning.app import create_app, open_provisioner
from provisioning.brokers import RegistryOnly
from provisioning.ca import IssuingCA
from provisioning.settings import ProvisioningSettings
from registry.credentials import parse_hash, verify_password
from registry.queries import EMQX_AUTHN_QUERY
from tests.test_provisioning import _tenants, key_and_csr

pytestmark = pytest.mark.integration
runner = CliRunner()


@dataclass
class Platform:
    url: str
    dsn: str
    region_ca: IssuingCA

    def token(self, tenant: str | None = None) -> str:
        args = ["provisioning", "token", "create", "--registry", self.dsn, "--label", "test"]
        result = run(*args, *(["--tenant", tenant] if tenant else []))
        assert result.exit_code == 0, result.output
        return result.stdout.strip().splitlines()[-1]

    def fleet(self) -> tuple[set[tuple[str, str, str]], dict[str, str]]:
        """(machines as tenant, site/id, type) and (device username: stored credential)."""
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute("SELECT tenant_id, site_id || '/' || id, type FROM machines").fetchall()
            devices = conn.execute("SELECT username, coalesce(credential, '') FROM devices").fetchall()
        return {tuple(row) for row in rows}, dict(devices)


@pytest.fixture
def platform(postgres_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Platform]:
    """The provisioning service over HTTP (acme, globex, initech, each with site plant-1)."""
    settings = ProvisioningSettings.model_validate(
        {"registry_dsn": postgres_dsn, "ca_dir": tmp_path / "ca", "public_url": "https://prov.example.com"}
    )
    service = open_provisioner(settings, directory=RegistryOnly())
    _tenants(postgres_dsn)
    port = servers.free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    servers.wait_until(lambda: server.started, 15, "the provisioning service")
    monkeypatch.setenv("IRONLINK_PROVISIONING_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("IRONLINK_ADMIN_TOKEN", raising=False)
    monkeypatch.setattr(device_cli, "console", Console(width=250, no_color=True))
    monkeypatch.setattr(common, "errors", Console(width=250, no_color=True, stderr=True))
    yield Platform(f"http://127.0.0.1:{port}", postgres_dsn, service.authorities.region)
    server.should_exit = True
    thread.join(15)


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    result = runner.invoke(app, list(args), env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def add(*args: str, token: str) -> Result:
    return run("device", "add", *args, env={"IRONLINK_ADMIN_TOKEN": token})


def test_a_password_is_printed_once_and_only_its_hash_is_stored(platform: Platform) -> None:
    ironlink = Path(sys.executable).parent / "ironlink"
    done = subprocess.run(
        [ironlink, "device", "add", "acme", "plant-1", "press-03", "--type", "conveyor"],
        env={**os.environ, "IRONLINK_ADMIN_TOKEN": platform.token("acme"), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    password = re.search(r"│ (\S{16,}) +│", done.stdout)
    assert password is not None, done.stdout
    assert "Shown once: only its hash is stored" in done.stdout
    assert "username: acme.plant-1.press-03" in done.stdout
    assert "topic:    ironlink/acme/plant-1/press-03/telemetry" in done.stdout
    machines, devices = platform.fleet()
    assert ("acme", "plant-1/press-03", "conveyor") in machines
    stored = devices["acme.plant-1.press-03"]
    assert password.group(1) not in stored and verify_password(password.group(1), stored)
    with psycopg.connect(platform.dsn) as conn:
        sql = EMQX_AUTHN_QUERY.replace("${username}", "%(u)s").replace("${clientid}", "%(u)s")
        (row,) = conn.execute(sql, {"u": "acme.plant-1.press-03"}).fetchall()
        rules = conn.execute("SELECT action, topic FROM acl_rules WHERE username = 'acme.plant-1.press-03'")
        assert set(rules.fetchall()) == {
            ("publish", "ironlink/acme/plant-1/press-03/telemetry"),
            ("subscribe", "ironlink/acme/plant-1/press-03/receipts"),
        }
    assert row[0] == parse_hash(stored).hex_digest, "EMQX reads the hash the registry holds"


def test_a_csr_is_signed_by_the_region_ca_and_written_to_cert_out(platform: Platform, tmp_path: Path) -> None:
    _, csr = key_and_csr("acme.plant-1.press-04")
    (tmp_path / "device.csr").write_text(csr)
    cert_out = tmp_path / "device.pem"
    result = add(
        "acme", "plant-1", "press-04", "--type", "cnc_mill", "--csr", str(tmp_path / "device.csr"),
        "--cert-out", str(cert_out), token=platform.token(),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    cert = x509.load_pem_x509_certificate(cert_out.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "acme.plant-1.press-04"
    cert.verify_directly_issued_by(platform.region_ca.cert)
    assert stat.S_IMODE(cert_out.stat().st_mode) == 0o644
    assert "PRIVATE KEY" not in result.output and "password" not in result.output
    assert f"certificate (CN acme.plant-1.press-04, until {cert.not_valid_after_utc.date()}" in result.output
    assert platform.fleet()[1]["acme.plant-1.press-04"] == "", "a certificate device has no password"


def test_another_tenants_token_is_refused_and_nothing_changes(platform: Platform) -> None:
    before = platform.fleet()
    result = add("acme", "plant-1", "m1", "--type", "conveyor", token=platform.token("globex"))
    assert result.exit_code == 2
    assert re.search(r"^error: tenant_mismatch: \S", result.output, re.MULTILINE), result.output
    assert platform.fleet() == before


def test_a_bad_csr_is_refused_by_the_api_and_leaves_no_machine_behind(
    platform: Platform, tmp_path: Path
) -> None:
    pem = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    (tmp_path / "bad.csr").write_text(pem)
    before = platform.fleet()
    result = add(
        "acme", "plant-1", "m2", "--type", "conveyor", "--csr", str(tmp_path / "bad.csr"),
        "--cert-out", str(tmp_path / "m2.pem"), token=platform.token(),
    )  # fmt: skip
    assert result.exit_code == 2
    assert "error: csr_invalid: the CSR is not a PEM certificate signing request" in result.output
    assert platform.fleet() == before and not (tmp_path / "m2.pem").exists()


def test_an_existing_machine_is_enrolled_once_and_a_wrong_type_is_refused(platform: Platform) -> None:
    token = platform.token("initech")
    assert add("initech", "plant-1", "m3", "--type", "conveyor", token=token).exit_code == 0
    again = add("initech", "plant-1", "m3", "--type", "conveyor", token=token)
    assert again.exit_code == 2 and "error: device_exists: " in again.output, again.output
    other = add("initech", "plant-1", "m3", "--type", "cnc_mill", token=token)
    assert other.exit_code == 2
    assert "error: machine_type_mismatch: machine plant-1/m3 exists with type 'conveyor'" in other.output
    assert add("initech", "hq", "m4", "--type", "conveyor", token=token).output.startswith(
        "error: site_unknown: "
    )
    assert add("initech", "hq", "m4", "--type", "conveyor", "--new-site", token=token).exit_code == 0
    assert ("initech", "hq/m4", "conveyor") in platform.fleet()[0]


def test_bad_flags_exit_2_naming_each_flag_before_any_request(platform: Platform, tmp_path: Path) -> None:
    key = tmp_path / "device.key"
    key.write_text("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n")
    before = platform.fleet()
    result = add(
        "acme", "plant-1", "M 1", "--type", "laser", "--csr", str(key), "--password",
        "--ca-file", str(tmp_path / "missing.pem"), token=platform.token(),
    )  # fmt: skip
    assert result.exit_code == 2
    for complaint in (
        "MACHINE: 'M 1' is not a valid machine id",
        "--type: 'laser' is not a known machine type",
        f"--csr: {key} holds a private key",
        "--password: cannot be combined with --csr",
        "--cert-out: required with --csr",
        f"--ca-file: {tmp_path / 'missing.pem'} is not a file",
    ):
        assert complaint in result.output
    assert "AAAA" not in result.output
    missing = run("device", "add", "acme", "plant-1", "m1", "--type", "conveyor")
    assert missing.exit_code == 2 and "--token: required (or IRONLINK_ADMIN_TOKEN" in missing.output
    assert platform.fleet() == before


def test_an_unreachable_api_is_named_with_its_url(platform: Platform) -> None:
    url = f"http://127.0.0.1:{servers.free_port()}"
    result = add("acme", "plant-1", "m1", "--type", "conveyor", "--api", url, token="ilk-admin.x.y")
    assert result.exit_code == 1
    assert f"error: --api: cannot reach the provisioning API at {url}: " in result.output
