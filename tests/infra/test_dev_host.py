"""The running dev platform seen from the host (pytest-testinfra, local backend): what listens,
who runs what, and who owns which file.

Runs against the ``dev_platform`` session fixture (``ironlink dev up`` in a fresh state folder);
MQTT's port 8883 is fixed, hence the shared xdist group. The account checks apply when the
platform runs as root, where every server drops to its own unprivileged account.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from localdev.platform import ACCOUNTS, PROCESSES, DevPlatform
from tests.conftest import DevPlatformHandle

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("devplatform")]

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="servers keep the caller's account unless run as root")
# The three servers always drop privileges; the worker can only where it can run this Python
# (DevPlatform.warnings says why not; then it shows up as root in its pid record).
SERVERS = ("postgres", "victoria-metrics", "mosquitto")


@pytest.fixture(scope="module")
def platform(dev_platform: DevPlatformHandle) -> DevPlatform:
    dev_platform.ensure_up()
    return dev_platform.platform


def test_mqtt_is_served_over_tls_on_8883_only(host: Any, platform: DevPlatform) -> None:
    assert host.socket("tcp://127.0.0.1:8883").is_listening
    assert not host.socket("tcp://0.0.0.0:8883").is_listening, "the dev broker must bind loopback only"
    assert not host.socket("tcp://1883").is_listening, "no plaintext MQTT listener"
    handshake = host.run(
        "openssl s_client -connect 127.0.0.1:8883 -servername localhost -verify_return_error -CAfile %s",
        str(platform.ca_file),
        stdin="",
    )
    assert handshake.rc == 0 and "Verify return code: 0 (ok)" in handshake.stdout, handshake.stderr


def test_every_process_is_up_and_listens_on_its_port(host: Any, platform: DevPlatform) -> None:
    for name in PROCESSES:
        record = platform.pids.read(name)
        assert record is not None, f"{name} has no pid record"
        assert host.process.get(pid=record.pid).pid == record.pid
        assert host.socket(f"tcp://127.0.0.1:{record.port}").is_listening, name


@as_root
def test_servers_run_under_their_own_unprivileged_accounts(host: Any, platform: DevPlatform) -> None:
    for name in SERVERS:
        record = platform.pids.read(name)
        assert record is not None
        assert host.process.get(pid=record.pid).user == ACCOUNTS[name], name
    worker = platform.pids.read("ingest")
    assert worker is not None
    assert host.process.get(pid=worker.pid).user == worker.user


@as_root
def test_secret_files_are_0600_and_owned_by_their_reader(host: Any, platform: DevPlatform) -> None:
    layout, paths = platform.layout, platform.mosquitto_paths
    worker = platform.pids.read("ingest")
    assert worker is not None
    secrets = {
        layout.credentials_file: "root",  # the CLI and the simulator read it
        layout.ca_key: "root",  # only `ironlink dev up` signs with it
        Path(paths.keyfile): "mosquitto",
        layout.dynamic_security_file: "mosquitto",  # the plugin rewrites it
        layout.store_tokens_file: worker.user,
    }
    for path, owner in secrets.items():
        secret = host.file(str(path))
        assert secret.exists, path
        assert (secret.mode, secret.user) == (0o600, owner), path
    assert host.file(str(layout.secrets)).mode == 0o700


@as_root
def test_data_belongs_to_the_service_accounts(host: Any, platform: DevPlatform) -> None:
    data = {
        platform.layout.postgres_data: "postgres",
        platform.layout.victoria_metrics: "_victoria-metrics",
        Path(platform.mosquitto_paths.persistence_dir): "mosquitto",
        platform.layout.dynamic_security: "mosquitto",
    }
    for folder, owner in data.items():
        assert (host.file(str(folder)).user, host.file(str(folder)).mode) == (owner, 0o700), folder
        strangers = host.check_output("find %s ! -user %s", str(folder), owner)
        assert strangers == "", f"files in {folder} not owned by {owner}:\n{strangers}"


def test_the_provisioning_api_is_served_over_https_on_loopback_only(host: Any, platform: DevPlatform) -> None:
    record = platform.pids.read("provisioning")
    assert record is not None
    assert host.process.get(pid=record.pid).pid == record.pid
    assert host.socket(f"tcp://127.0.0.1:{record.port}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{record.port}").is_listening, "the API must bind loopback only"
    ready = host.run(
        "curl --silent --show-error --fail --cacert %s https://localhost:%s/readyz",
        str(platform.ca_file),
        str(record.port),
    )
    assert ready.rc == 0, ready.stderr


@as_root
def test_the_provisioning_keys_are_0600_and_owned_by_its_account(host: Any, platform: DevPlatform) -> None:
    record = platform.pids.read("provisioning")
    assert record is not None and record.user is not None
    assert host.process.get(pid=record.pid).user == record.user
    layout = platform.layout
    region_ca_key = layout.provisioning_ca_dir / f"region-{platform.config.region}" / "ca.key"
    for path in (layout.provisioning_key, region_ca_key):
        key = host.file(str(path))
        assert key.exists, path
        assert (key.mode, key.user) == (0o600, record.user), path
    folder = host.file(str(layout.provisioning))
    assert (folder.mode, folder.user) == (0o700, record.user)
