"""A region's ingestion endpoint: an internet-facing NLB passing MQTT over TLS (8883) straight to
the EMQX pods, and its names in Route 53.

- **TLS passthrough.** The listener is TCP, not TLS: the brokers terminate TLS themselves, so a
  device's client certificate reaches EMQX (mutual TLS, CN as username). An NLB TLS listener
  would end the handshake at AWS and EMQX would never see the certificate.
- **Proxy protocol v2.** The target group prepends each connection with a PROXY v2 header that
  carries the device's address, which EMQX's listener reads (``proxy_protocol = true``, rendered by
  :mod:`components.render.emqx` exactly when :func:`infra.config.regional_ingress`); without it
  every device would seem to come from the NLB's own addresses. Health check connections carry
  the header too. Mosquitto 2.0 cannot read proxy protocol at all: Phase C runs EMQX only.
- **Idle timeout.** The listener's TCP idle timeout is AWS's 350 s default, stated explicitly
  (:data:`infra.config.NLB_TCP_IDLE_TIMEOUT_S`); config validation keeps ``broker.keepalive_s``
  below it, and EMQX tells MQTT 5 devices that keepalive in its CONNACK.
- **Targets.** An ``ip`` target group bound to the broker's Service through the AWS Load Balancer
  Controller's ``TargetGroupBinding`` (the controller must run on the cluster): it registers the
  pods' addresses as they come and go, and opens the pods' security group to the NLB's own group,
  which in turn admits 8883 from anywhere and reaches only the VPC on 8883. The broker's Service is
  then ``ClusterIP``, so the cluster makes no second, proxy-less load balancer.
- **Names.** ``mqtt.<aws region>.<zone>`` aliases this NLB; the stack's ``global_name`` is one
  latency-routed record per region (set identifier: the region), each with a Route 53 TCP health
  check on 8883 of this NLB, so a region whose endpoint stops answering leaves the global name.
  The hosted zone exists already and is taken by id (``aws.dns.zone_id``): no stack owns it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from components.render.emqx import MQTTS_PORT
from infra.config import NLB_TCP_IDLE_TIMEOUT_S, AwsDns

TARGET_GROUP_BINDING_API = "elbv2.k8s.aws/v1beta1"
ANYWHERE = "0.0.0.0/0"
HEALTH_CHECK_INTERVAL_S = 10
"""Route 53 checks every 10 s ("fast"), and both it and the target group call a target failed after
3 misses: a dead region leaves the global name within about half a minute."""
HEALTH_CHECK_FAILURES = 3


def regional_name(aws_region: str, zone_name: str) -> str:
    """The region's own MQTT name: ``mqtt.eu-west-1.ironlink.example.com``."""
    return f"mqtt.{aws_region}.{zone_name}"


def endpoint_names(aws_region: str, dns: AwsDns | None) -> list[str]:
    """Every name devices may dial for this region: its broker certificate must carry them all,
    since TLS ends at the broker, not at the NLB."""
    if dns is None:
        return []
    return [regional_name(aws_region, dns.zone_name), *([dns.global_name] if dns.global_name else [])]


def target_group_binding_spec(
    service: str, port: int, target_group_arn: pulumi.Input[str], load_balancer_group: pulumi.Input[str]
) -> dict[str, Any]:
    """The controller registers the Service's pod addresses in the target group, and admits the
    NLB's security group to their port."""
    return {
        "serviceRef": {"name": service, "port": port},
        "targetGroupARN": target_group_arn,
        "targetType": "ip",
        "networking": {
            "ingress": [
                {
                    "from": [{"securityGroup": {"groupID": load_balancer_group}}],
                    "ports": [{"protocol": "TCP", "port": port}],
                }
            ]
        },
    }


class RegionalIngressArgs(TypedDict):
    aws_region: str
    """The region the NLB and its records serve (``aws.region``)."""
    vpc_id: pulumi.Input[str]
    vpc_cidr: str
    """The VPC's range: where the NLB may send traffic (the pods' addresses)."""
    public_subnet_ids: Sequence[pulumi.Input[str]]
    """One public subnet per availability zone: the NLB gets an address in each."""
    dns: AwsDns | None
    """The region's names in Route 53 (None: the NLB's own DNS name only)."""
    namespace: str
    service: str
    """The broker's Service (``ClusterIP``) whose pods the NLB targets."""
    service_port: int
    labels: dict[str, str]
    aws_provider: aws.Provider
    k8s_provider: k8s.Provider


class RegionalIngress(pulumi.ComponentResource):
    dns_name: pulumi.Output[str]
    """The NLB's own DNS name (what the records alias and the health checks dial)."""
    zone_id: pulumi.Output[str]
    """The NLB's canonical hosted zone (for alias records)."""
    target_group_arn: pulumi.Output[str]
    names: list[str]
    """The Route 53 names of this region's endpoint (regional first, then the global one)."""

    def __init__(
        self, name: str, args: RegionalIngressArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("ironlink:aws:RegionalIngress", name, None, opts)
        on_aws = pulumi.ResourceOptions(parent=self, provider=args["aws_provider"])
        port = args["service_port"]
        group = aws.ec2.SecurityGroup(
            f"{name}-nlb",
            vpc_id=args["vpc_id"],
            description=f"Ironlink MQTT NLB: {MQTTS_PORT} from anywhere, to the VPC's brokers only",
            ingress=[
                {
                    "protocol": "tcp",
                    "from_port": MQTTS_PORT,
                    "to_port": MQTTS_PORT,
                    "cidr_blocks": [ANYWHERE],
                    "description": "devices and Route 53 health checkers",
                }
            ],
            egress=[
                {
                    "protocol": "tcp",
                    "from_port": port,
                    "to_port": port,
                    "cidr_blocks": [args["vpc_cidr"]],
                    "description": "the broker pods and their health checks",
                }
            ],
            opts=on_aws,
        )
        balancer = aws.lb.LoadBalancer(
            f"{name}-nlb",
            load_balancer_type="network",
            internal=False,
            ip_address_type="ipv4",
            subnets=list(args["public_subnet_ids"]),
            security_groups=[group.id],
            # Each zone's address reaches the brokers of every zone, so a zone with fewer pods
            # is not overloaded by the devices DNS happened to send there.
            enable_cross_zone_load_balancing=True,
            opts=on_aws,
        )
        target_group = aws.lb.TargetGroup(
            f"{name}-mqtts",
            port=port,
            protocol="TCP",
            target_type="ip",
            vpc_id=args["vpc_id"],
            proxy_protocol_v2=True,
            # The device's address travels in the PROXY header; the pods see the NLB, which their
            # security group admits (TargetGroupBinding networking).
            preserve_client_ip="false",
            deregistration_delay=60,
            health_check={
                "protocol": "TCP",
                "port": "traffic-port",
                "interval": HEALTH_CHECK_INTERVAL_S,
                "healthy_threshold": HEALTH_CHECK_FAILURES,
                "unhealthy_threshold": HEALTH_CHECK_FAILURES,
            },
            opts=on_aws,
        )
        aws.lb.Listener(
            f"{name}-mqtts",
            load_balancer_arn=balancer.arn,
            port=MQTTS_PORT,
            protocol="TCP",  # TLS passthrough: the brokers terminate TLS
            tcp_idle_timeout_seconds=NLB_TCP_IDLE_TIMEOUT_S,
            default_actions=[{"type": "forward", "target_group_arn": target_group.arn}],
            opts=on_aws,
        )
        metadata: Any = {"name": args["service"], "namespace": args["namespace"], "labels": args["labels"]}
        k8s.apiextensions.CustomResource(
            f"{name}-binding",
            api_version=TARGET_GROUP_BINDING_API,
            kind="TargetGroupBinding",
            metadata=metadata,
            spec=target_group_binding_spec(args["service"], port, target_group.arn, group.id),
            opts=pulumi.ResourceOptions(parent=self, provider=args["k8s_provider"]),
        )
        self.dns_name, self.zone_id = balancer.dns_name, balancer.zone_id
        self.target_group_arn = target_group.arn
        self.names = endpoint_names(args["aws_region"], args["dns"])
        if args["dns"] is not None:
            self._records(name, args["aws_region"], args["dns"], on_aws)
        self.register_outputs(
            {
                "dns_name": self.dns_name,
                "zone_id": self.zone_id,
                "target_group_arn": self.target_group_arn,
                "names": self.names,
            }
        )

    def _records(self, name: str, aws_region: str, dns: AwsDns, opts: pulumi.ResourceOptions) -> None:
        alias = [
            aws.route53.RecordAliasArgs(name=self.dns_name, zone_id=self.zone_id, evaluate_target_health=True)
        ]
        aws.route53.Record(
            f"{name}-regional",
            zone_id=dns.zone_id,
            name=regional_name(aws_region, dns.zone_name),
            type="A",
            aliases=alias,
            opts=opts,
        )
        if dns.global_name is None:
            return
        check = aws.route53.HealthCheck(
            f"{name}-mqtts",
            type="TCP",
            fqdn=self.dns_name,
            port=MQTTS_PORT,
            request_interval=HEALTH_CHECK_INTERVAL_S,
            failure_threshold=HEALTH_CHECK_FAILURES,
            tags={"Name": f"ironlink-mqtt-{aws_region}"},
            opts=opts,
        )
        aws.route53.Record(
            f"{name}-global",
            zone_id=dns.zone_id,
            name=dns.global_name,
            type="A",
            set_identifier=aws_region,
            latency_routing_policies=[{"region": aws_region}],
            health_check_id=check.id,
            aliases=alias,
            opts=opts,
        )
