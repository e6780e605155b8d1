"""Phase A on one EC2 instance (``stacks/Pulumi.poc-vm.yaml``): under the mock engine the stack
declares one instance and nothing of Kubernetes, reachable on 8883 and on SSH from the allowed
range only; its cloud-init document installs the servers' packages and writes the files the
dev platform's renderers produce, with a systemd unit per process."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.aws.vm import security_group_ingress
from components.render import cloud_init
from components.render.mosquitto import DYNSEC_ADMIN
from infra.config import platform_stacks
from infra.tenancy import DEAD_LETTER_SERVICE, INGEST_SERVICE
from registry.credentials import SALT_BYTES, hash_password
from tests.pulumi_mocks import PLANS, VM_STACKS, stack_config, stack_plan

pytestmark = PLANS
VM_STACK = "poc-vm"
INSTANCE = "aws:ec2/instance:Instance"
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
ROOT = Path(__file__).parents[1]


# ------------------------------------------------------------------------------- the stack
def test_the_vm_stack_declares_one_instance_and_nothing_of_kubernetes() -> None:
    plan = stack_plan(VM_STACK)
    assert [r.name for r in plan.find(INSTANCE)] == ["ironlink-eu-central-1"]
    kubernetes = [r.urn for r in plan.resources if r.type.startswith("kubernetes:")]
    assert kubernetes == [], f"a VM stack declares Kubernetes objects: {kubernetes}"
    assert plan.outputs["mqtt_endpoint"] == "mqtts://mqtt.poc-vm.ironlink.example.com:8883"


def test_the_instance_requires_imdsv2_and_an_encrypted_volume() -> None:
    (instance,) = stack_plan(VM_STACK).find(INSTANCE)
    assert instance.get("metadataOptions.httpTokens") == "required", instance.urn
    assert instance.get("metadataOptions.httpPutResponseHopLimit") == 1, instance.urn
    assert instance.get("rootBlockDevice.encrypted") is True, instance.urn
    assert instance.get("ami") == stack_config(VM_STACK).aws.vm.ami  # type: ignore[union-attr]
    assert instance.get("userData") == "[secret]", "the user data holds passwords and keys: a secret"


def test_only_mqtt_over_tls_and_ssh_from_the_allowed_range_are_reachable() -> None:
    plan = stack_plan(VM_STACK)
    (group,) = plan.find(SECURITY_GROUP)
    (instance,) = plan.find(INSTANCE)
    assert instance.get("vpcSecurityGroupIds") == [f"{group.name}-id"]
    rules = {(r["fromPort"], r["toPort"], tuple(r["cidrBlocks"])) for r in group.get("ingress")}
    ssh_cidr = stack_config(VM_STACK).aws.vm.ssh_cidr  # type: ignore[union-attr]
    assert ssh_cidr is not None and ssh_cidr != "0.0.0.0/0"
    assert rules == {(8883, 8883, ("0.0.0.0/0",)), (22, 22, (ssh_cidr,))}
    assert all(not r.get("ipv6CidrBlocks") for r in group.get("ingress"))


def test_without_an_ssh_range_only_8883_is_admitted() -> None:
    rules = security_group_ingress(None)
    assert [(r.from_port, r.to_port, r.cidr_blocks) for r in rules] == [(8883, 8883, ["0.0.0.0/0"])]


def test_no_other_stack_declares_an_instance() -> None:
    assert VM_STACKS == [VM_STACK]
    others = {stack: stack_plan(stack).find(INSTANCE) for stack in platform_stacks() if stack != VM_STACK}
    assert len(others) >= 5
    assert {stack: [r.urn for r in found] for stack, found in others.items() if found} == {}


# ---------------------------------------------------------------------------- cloud-init
def _secrets() -> cloud_init.VmSecrets:
    passwords = {DYNSEC_ADMIN: "admin-pw", INGEST_SERVICE: "ingest-pw", DEAD_LETTER_SERVICE: "dlq-pw"}
    salt = bytes(range(SALT_BYTES))
    return cloud_init.VmSecrets(
        ca_cert_pem="-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n",
        broker_cert_pem="-----BEGIN CERTIFICATE-----\nBROKER\n-----END CERTIFICATE-----\n",
        broker_key_pem="-----BEGIN PRIVATE KEY-----\nBROKER\n-----END PRIVATE KEY-----\n",
        provisioning_cert_pem="-----BEGIN CERTIFICATE-----\nPROV\n-----END CERTIFICATE-----\n",
        provisioning_key_pem="-----BEGIN PRIVATE KEY-----\nPROV\n-----END PRIVATE KEY-----\n",
        passwords=passwords,
        password_hashes={user: hash_password(password, salt) for user, password in passwords.items()},
    )


def _document() -> tuple[str, dict[str, Any]]:
    config = stack_config(VM_STACK)
    text = cloud_init.render_cloud_init(config, config.aws.vm.package, _secrets())  # type: ignore[union-attr]
    return text, yaml.safe_load(text)


def _written() -> dict[str, dict[str, str]]:
    _, document = _document()
    return {entry["path"]: entry for entry in document["write_files"]}


def test_the_document_is_cloud_config_yaml() -> None:
    text, document = _document()
    assert text.startswith("#cloud-config\n")
    assert isinstance(document, dict) and {"packages", "write_files", "runcmd"} <= set(document)


def test_it_installs_the_servers_packages_of_the_makefile() -> None:
    makefile = (ROOT / "Makefile").read_text()
    listed = {
        word
        for line in re.findall(r"^DEBIAN_PACKAGES \+?:?= (.*)$", makefile, re.MULTILINE)
        for word in line.split()
    }
    _, document = _document()
    packages = set(document["packages"])
    assert {"mosquitto", "postgresql", "victoria-metrics"} <= packages
    assert packages <= listed, f"not in the Makefile's DEBIAN_PACKAGES: {packages - listed}"


def test_the_files_are_what_the_dev_platforms_renderers_produce() -> None:
    config, secrets, written = stack_config(VM_STACK), _secrets(), _written()
    conf = written[cloud_init.MOSQUITTO_CONF]["content"]
    assert conf == cloud_init.mosquitto_conf(config)
    assert "listener 8883 0.0.0.0" in conf and "allow_anonymous false" in conf
    assert "listener 1883" not in conf
    seed = written[cloud_init.DYNSEC_SEED]
    assert seed["content"] == cloud_init.dynamic_security_seed(config, secrets)
    assert "admin-pw" not in seed["content"], "the plugin's seed holds hashes, not passwords"
    assert (seed["owner"], seed["permissions"]) == ("mosquitto:mosquitto", "0600")
    env = written[f"{cloud_init.ETC}/ingest.env"]
    assert env["content"] == cloud_init.environment_file(cloud_init.worker_env(config, secrets))
    assert 'IRONLINK_MQTT_PASSWORD="ingest-pw"' in env["content"]
    assert f'IRONLINK_MQTT_PORT="{cloud_init.MQTT_PORT}"' in env["content"]
    assert env["permissions"] == "0600"
    assert written[cloud_init.MOSQUITTO_PATHS.keyfile]["permissions"] == "0600"


def test_packaged_services_do_not_start_and_every_unit_is_enabled() -> None:
    _, document = _document()
    commands = [" ".join(command) for command in document["runcmd"]]
    assert any(c.startswith("systemctl disable --now mosquitto.service") for c in commands)
    enabled = next(c for c in commands if c.startswith("systemctl enable --now"))
    assert enabled.split()[3:] == [f"ironlink-{name}.service" for name in cloud_init.UNITS]
    written = _written()
    assert written["/usr/sbin/policy-rc.d"].get("defer") is None, "must exist before the packages"
    assert all(entry.get("defer") for path, entry in written.items() if path != "/usr/sbin/policy-rc.d")


def _unit_files(tmp_path: Path) -> list[Path]:
    written = _written()
    paths = []
    for name in cloud_init.UNITS:
        path = tmp_path / f"ironlink-{name}.service"
        path.write_text(written[f"/etc/systemd/system/{path.name}"]["content"])
        paths.append(path)
    return paths


def test_every_unit_parses_with_a_service_command(tmp_path: Path) -> None:
    for path in _unit_files(tmp_path):
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string(path.read_text())
        assert {"Unit", "Service", "Install"} <= set(parser.sections()), path.name
        assert parser["Service"]["ExecStart"].startswith("/"), path.name
        assert parser["Service"]["User"] != "root", path.name


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_every_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    units = _unit_files(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True, check=False
    )
    # The project's venv is what cloud-init creates on the VM; every other complaint counts.
    absent_venv = f"Command {cloud_init.PYTHON} is not executable: No such file or directory"
    problems = [line for line in result.stderr.splitlines() if line.strip() and absent_venv not in line]
    assert problems == [], result.stderr
