"""Phase A on one EC2 instance (``aws.vm``): the region's processes under systemd, no cluster.

The instance boots Debian 12 from a pinned AMI and runs what ``ironlink dev`` runs, from the
cloud-init document :func:`components.render.cloud_init.render_cloud_init` renders: Mosquitto,
PostgreSQL (the registry), VictoriaMetrics (the store), the worker, the dead-letter consumer and
the provisioning API. Its security group admits MQTT over TLS (8883) from anywhere and SSH only
from ``aws.vm.ssh_cidr``; every other port listens on loopback or is closed to the outside.
Instance metadata answers IMDSv2 only (one hop: no container on the host reaches it), the root
volume is encrypted, and an Elastic IP keeps the devices' address across stops.

The user data carries the services' passwords and the broker's key: it is a Pulumi secret in
state, but EC2 shows user data to any principal allowed ``ec2:DescribeInstanceAttribute`` and to
processes on the instance through IMDS. The instance lives in the region's default VPC.
"""

from __future__ import annotations

from typing import TypedDict

import pulumi
import pulumi_aws as aws

from components.credentials import ServiceCredential, service_credential
from components.pki import CertificateAuthority, CertificateAuthorityArgs
from components.render.cloud_init import MQTT_PORT, VmSecrets, render_cloud_init
from components.render.mosquitto import DYNSEC_ADMIN
from infra.config import AwsVm, PlatformConfig
from infra.tenancy import DEAD_LETTER_SERVICE, INGEST_SERVICE

SSH_PORT = 22
ANYWHERE = "0.0.0.0/0"


class SingleVmArgs(TypedDict):
    config: PlatformConfig
    """The stack's validated config (phase A; its broker, registry and ingest sections)."""
    vm: AwsVm
    """``aws.vm``: AMI, instance type, disk, the project's package, who may reach SSH."""
    provider: aws.Provider
    """The region's AWS provider (``aws.region``)."""


def security_group_ingress(ssh_cidr: str | None) -> list[aws.ec2.SecurityGroupIngressArgs]:
    """MQTT over TLS from anywhere; SSH from ``ssh_cidr`` only, none without one."""
    rules = [
        aws.ec2.SecurityGroupIngressArgs(
            description="MQTT over TLS (devices)",
            protocol="tcp",
            from_port=MQTT_PORT,
            to_port=MQTT_PORT,
            cidr_blocks=[ANYWHERE],
        )
    ]
    if ssh_cidr is not None:
        rules.append(
            aws.ec2.SecurityGroupIngressArgs(
                description="SSH (operators)",
                protocol="tcp",
                from_port=SSH_PORT,
                to_port=SSH_PORT,
                cidr_blocks=[ssh_cidr],
            )
        )
    return rules


class SingleVm(pulumi.ComponentResource):
    public_host: str
    """The name devices connect to (``mqtt.<cluster.domain>``) and the broker's certificate names."""
    public_ip: pulumi.Output[str]
    """The Elastic IP ``public_host`` must resolve to."""
    ca: CertificateAuthority
    instance: aws.ec2.Instance

    def __init__(self, name: str, args: SingleVmArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("ironlink:aws:SingleVm", name, None, opts)
        config, vm = args["config"], args["vm"]
        here = pulumi.ResourceOptions(parent=self)
        on_aws = pulumi.ResourceOptions(parent=self, provider=args["provider"])
        self.public_host = f"mqtt.{config.cluster.domain}"
        self.ca = CertificateAuthority(f"{name}-ca", CertificateAuthorityArgs(config=config), here)
        broker_cert = self.ca.issue(
            f"{name}-broker", common_name=self.public_host, dns_names=[self.public_host], parent=self
        )
        provisioning_cert = self.ca.issue(
            f"{name}-provisioning", common_name="localhost", dns_names=["localhost"], parent=self
        )
        credentials: dict[str, ServiceCredential] = {
            INGEST_SERVICE: service_credential("svc-ingest", parent=self),
            DEAD_LETTER_SERVICE: service_credential("svc-deadletters", parent=self),
            DYNSEC_ADMIN: service_credential("dynsec-admin", parent=self),
        }
        users = list(credentials)

        def user_data(values: list[str]) -> str:
            ca, broker, broker_key, provisioning, provisioning_key = values[:5]
            passwords, hashes = values[5 : 5 + len(users)], values[5 + len(users) :]
            secrets = VmSecrets(
                ca,
                broker,
                broker_key,
                provisioning,
                provisioning_key,
                passwords=dict(zip(users, passwords, strict=True)),
                password_hashes=dict(zip(users, hashes, strict=True)),
            )
            return render_cloud_init(config, vm.package, secrets)

        document = pulumi.Output.all(
            self.ca.cert_pem,
            broker_cert.cert_pem,
            broker_cert.private_key_pem,
            provisioning_cert.cert_pem,
            provisioning_cert.private_key_pem,
            *(credential.password for credential in credentials.values()),
            *(credential.password_hash for credential in credentials.values()),
        ).apply(user_data)
        secret_document: pulumi.Output[str] = pulumi.Output.secret(document)

        tags = {"ironlink:region": config.region, "ironlink:phase": config.phase}
        group = aws.ec2.SecurityGroup(
            f"{name}-sg",
            description="Ironlink Phase A VM: MQTT over TLS, SSH from the operators' range only",
            ingress=security_group_ingress(vm.ssh_cidr),
            # Out: Debian's and the package index's mirrors, at first boot and for updates.
            egress=[
                aws.ec2.SecurityGroupEgressArgs(protocol="-1", from_port=0, to_port=0, cidr_blocks=[ANYWHERE])
            ],
            tags=tags,
            opts=on_aws,
        )
        self.instance = aws.ec2.Instance(
            name,
            ami=vm.ami,
            instance_type=vm.instance_type,
            vpc_security_group_ids=[group.id],
            user_data=secret_document,
            metadata_options=aws.ec2.InstanceMetadataOptionsArgs(
                http_endpoint="enabled", http_tokens="required", http_put_response_hop_limit=1
            ),
            root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(
                encrypted=True, volume_type="gp3", volume_size=vm.disk_gib
            ),
            tags={**tags, "Name": name},
            # The registry, the store and the broker's queue live on its disk.
            opts=pulumi.ResourceOptions.merge(
                on_aws, pulumi.ResourceOptions(protect=config.protect_stateful)
            ),
        )
        address = aws.ec2.Eip(f"{name}-ip", domain="vpc", instance=self.instance.id, tags=tags, opts=on_aws)
        self.public_ip = address.public_ip
        self.register_outputs(
            {"public_host": self.public_host, "public_ip": self.public_ip, "ca_cert_pem": self.ca.cert_pem}
        )
