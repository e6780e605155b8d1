"""The dev platform's state folder and process supervision, without servers."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from infra.config import load_stack
from infra.fleet import parse_fleet
from infra.tenancy import device_username
from localdev import servers, supervisor
from localdev.state import (
    DEMO_FLEET,
    Credentials,
    Layout,
    Ports,
    StateError,
    generated_devices,
    with_device_credentials,
    write_secret,
)
from registry.credentials import hash_password, verify_password

Spawned = list[subprocess.Popen[bytes]]


@pytest.fixture
def spawned() -> Iterator[Spawned]:
    """Processes a test starts in their own session; whatever is left is killed afterwards."""
    started: Spawned = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _start(spawned: Spawned, script: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    spawned.append(process)
    return process


def _record(pid: int, pgid: int | None = None) -> supervisor.ProcessRecord:
    return supervisor.ProcessRecord.of("probe", pid, pgid or pid, 1, "f", None)


# ------------------------------------------------------------------------------------ credentials
def test_the_fleet_file_password_hash_wins_and_only_other_machines_get_generated_credentials(
    tmp_path: Path,
) -> None:
    raw = yaml.safe_load(DEMO_FLEET.read_text())["tenants"]
    stack_hash = hash_password("from-the-fleet-file")
    raw[0]["sites"][0]["machines"][0]["password_hash"] = stack_hash
    fleet = parse_fleet(raw)
    pinned = device_username("acme", "plant-1", "press-01")

    generated = generated_devices(fleet)
    assert pinned not in generated
    assert set(generated) == {
        "acme.plant-1.mill-01",
        "globex.line-a.molder-01",
        "globex.line-a.compressor-01",
    }

    credentials = Credentials()
    credentials.ensure(generated)
    effective = with_device_credentials(fleet, credentials)
    hashes = {
        device_username(tenant_id, site.id, machine.id): machine.password_hash
        for tenant_id, site, machine in effective.machines()
    }
    assert hashes[pinned] == stack_hash
    for username in generated:
        assert verify_password(credentials.accounts[username].password, hashes[username] or "")


def test_credentials_are_written_0600_and_kept_across_loads(tmp_path: Path) -> None:
    layout = Layout.at(tmp_path / "dev")
    first = Credentials()
    assert first.ensure(["acme.plant-1.press-01", "svc.ingest"])
    first.save(layout)
    assert stat.S_IMODE(layout.credentials_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(layout.secrets.stat().st_mode) == 0o700

    again = Credentials.load(layout)
    assert not again.ensure(["svc.ingest"]), "an existing credential must not be regenerated"
    assert again.accounts == first.accounts


def test_write_secret_replaces_a_file_without_ever_widening_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "token"
    target.write_text("old")
    os.chmod(target, 0o644)
    write_secret(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_ports_are_chosen_once_and_a_corrupt_state_file_is_named(tmp_path: Path) -> None:
    layout = Layout.at(tmp_path)
    ports = Ports.load_or_choose(layout)
    assert ports.mqtt == 8883
    assert len({ports.postgres, ports.victoria_metrics, ports.worker}) == 3
    assert Ports.load_or_choose(layout) == ports

    layout.state_file.write_text('{"mqtt": "eighty"}')
    with pytest.raises(StateError, match=r"state\.json: mqtt: .*postgres: Field required"):
        Ports.load(layout)


def test_the_dev_stack_is_what_ironlink_dev_runs() -> None:
    config = load_stack("dev")
    assert config.phase == "A" and config.broker.engine == "mosquitto" and not config.broker.allow_plaintext
    assert {tenant.id for tenant in config.tenants} == {"acme", "globex"}


# ------------------------------------------------------------------------------------ supervision
def test_a_killed_process_is_dead_while_it_lingers_as_a_zombie(
    spawned: Spawned,
) -> None:
    # The shell becomes `sleep 60`, which never reaps its child: the killed child stays a zombie.
    parent = _start(spawned, "sleep 30 & exec sleep 60")
    servers.wait_until(lambda: bool(supervisor.children(parent.pid)), 5, "the child")
    record = _record(supervisor.children(parent.pid)[0], parent.pid)
    assert record.alive
    os.kill(record.pid, signal.SIGKILL)
    servers.wait_until(
        lambda: Path(f"/proc/{record.pid}/stat").read_text().split()[2] == "Z", 5, "the zombie"
    )
    assert not record.alive


def test_a_recycled_pid_is_not_taken_for_the_recorded_process(spawned: Spawned) -> None:
    process = _start(spawned, "sleep 30")
    record = _record(process.pid).model_copy(update={"start_ticks": 1})
    assert not record.alive


def test_stop_clears_the_whole_process_group(spawned: Spawned) -> None:
    # The shell leaves a child that ignores SIGTERM: stop() must not leave it behind.
    process = _start(spawned, "trap '' TERM; sleep 60 & wait")
    servers.wait_until(lambda: len(supervisor.group_members(process.pid)) == 2, 5, "the shell's child")
    supervisor.stop(_record(process.pid), timeout=1)
    assert supervisor.group_members(process.pid) == []


def test_a_record_survives_a_round_trip_and_a_corrupt_one_is_named(tmp_path: Path) -> None:
    pids = supervisor.PidFiles(tmp_path)
    record = _record(os.getpid())
    pids.write(record)
    assert pids.read("probe") == record
    pids.path("probe").write_text("{}")
    with pytest.raises(supervisor.CorruptRecordError, match=r"probe\.pid"):
        pids.read("probe")
    assert pids.read("missing") is None


def test_the_fingerprint_follows_config_file_contents(tmp_path: Path) -> None:
    config = tmp_path / "server.conf"
    config.write_text("listener 8883\n")
    before = supervisor.fingerprint(["server", "-c", str(config)], {"A": "1"}, [config])
    assert supervisor.fingerprint(["server", "-c", str(config)], {"A": "1"}, [config]) == before
    assert supervisor.fingerprint(["server", "-c", str(config)], {"A": "2"}, [config]) != before
    config.write_text("listener 8884\n")
    assert supervisor.fingerprint(["server", "-c", str(config)], {"A": "1"}, [config]) != before


def test_listening_reads_the_kernel_table_without_connecting() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        assert not supervisor.listening(port), "bound is not listening"
        server.listen()
        assert supervisor.listening(port)
    assert not supervisor.listening(port)


def test_stop_also_clears_the_servers_program_that_left_the_group_but_not_others_in_its_folder(
    spawned: Spawned, tmp_path: Path
) -> None:
    # Like PostgreSQL's children: `setsid` takes the leftover out of the group; another program
    # working in the same folder is a bystander.
    server = subprocess.Popen(["sleep", "60"], cwd=tmp_path, start_new_session=True)
    escaped = subprocess.Popen(["setsid", "sleep", "61"], cwd=tmp_path)
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(62)"], cwd=tmp_path, start_new_session=True
    )
    spawned += [server, escaped, bystander]
    record = supervisor.ProcessRecord.of("probe", server.pid, server.pid, 1, "f", None, tmp_path)
    servers.wait_until(lambda: escaped.pid in supervisor.leftovers(record), 5, "the escaped child")
    assert bystander.pid not in supervisor.leftovers(record)
    supervisor.stop(record, timeout=1)
    assert escaped.wait(5) == -signal.SIGKILL
    assert bystander.poll() is None
