"""A region's network: one VPC over several availability zones, a public and a private subnet per
zone, and one NAT gateway per zone so that losing a zone never cuts the others off the internet.

Nodes, databases and the EKS control plane's interfaces live in the private subnets; the public
ones hold only the NAT gateways and the internet-facing load balancers (the MQTT NLB).
"""

from __future__ import annotations

import ipaddress
import string
from dataclasses import dataclass
from typing import TypedDict

import pulumi
import pulumi_aws as aws

ANYWHERE = "0.0.0.0/0"
MAX_ZONES = 6
PRIVATE_SLOTS = 8
"""The VPC splits into 8 equal blocks: one private subnet per zone (up to ``MAX_ZONES``), and the
last block, split 8 ways again, holds the public subnets. Private subnets get the most addresses
because the VPC CNI gives every pod an address from its node's subnet."""
SMALLEST_SUBNET_PREFIX = 28
"""AWS refuses subnets smaller than /28."""
ELB_ROLE_TAG = "kubernetes.io/role/elb"
INTERNAL_ELB_ROLE_TAG = "kubernetes.io/role/internal-elb"
"""The tags the AWS Load Balancer Controller discovers subnets by: internet-facing load balancers
go to the public subnets, internal ones to the private subnets."""


@dataclass(frozen=True)
class ZoneSubnets:
    zone: str
    public_cidr: str
    private_cidr: str


def zone_names(region: str, zones: int) -> list[str]:
    """``<region>a``, ``<region>b``…: explicit names rather than ``aws.get_availability_zones``,
    because the mock engine answers no invoke (``PlanMocks.call`` returns nothing). Every region this
    project runs in has zones ``a`` to ``c``; a region lacking a letter fails at ``pulumi up``, loudly."""
    if not 1 <= zones <= MAX_ZONES:
        raise ValueError(f"zones: {zones} is not between 1 and {MAX_ZONES}")
    return [f"{region}{letter}" for letter in string.ascii_lowercase[:zones]]


def subnet_layout(vpc_cidr: str, zones: list[str]) -> list[ZoneSubnets]:
    """The public and private CIDR of each zone, carved from ``vpc_cidr`` without overlap
    (a /16 gives /19 private and /22 public subnets)."""
    try:
        vpc = ipaddress.IPv4Network(vpc_cidr)
    except ValueError as error:
        raise ValueError(f"vpc_cidr: {vpc_cidr!r} is not an IPv4 network ({error})") from None
    if len(zones) > MAX_ZONES:
        raise ValueError(f"zones: {len(zones)} is more than {MAX_ZONES}")
    blocks = list(vpc.subnets(prefixlen_diff=3))
    public = list(blocks[-1].subnets(prefixlen_diff=3))
    if public[0].prefixlen > SMALLEST_SUBNET_PREFIX:
        raise ValueError(
            f"vpc_cidr: {vpc_cidr!r} is too small: its public subnets would be /{public[0].prefixlen}, "
            f"AWS allows /{SMALLEST_SUBNET_PREFIX} at most (use /{SMALLEST_SUBNET_PREFIX - 6} or larger)"
        )
    return [
        ZoneSubnets(zone=zone, public_cidr=str(public[index]), private_cidr=str(blocks[index]))
        for index, zone in enumerate(zones)
    ]


class RegionalNetworkArgs(TypedDict):
    region: str
    """The AWS region (zone names derive from it)."""
    vpc_cidr: str
    zones: int
    provider: aws.Provider
    """The region's AWS provider."""


class RegionalNetwork(pulumi.ComponentResource):
    vpc_id: pulumi.Output[str]
    public_subnet_ids: list[pulumi.Output[str]]
    private_subnet_ids: list[pulumi.Output[str]]
    """In zone order, as :attr:`zones`."""
    zones: list[str]

    def __init__(
        self, name: str, args: RegionalNetworkArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("ironlink:aws:RegionalNetwork", name, None, opts)
        here = pulumi.ResourceOptions(parent=self, provider=args["provider"])
        layout = subnet_layout(args["vpc_cidr"], zone_names(args["region"], args["zones"]))
        self.zones = [subnets.zone for subnets in layout]

        vpc = aws.ec2.Vpc(
            name,
            cidr_block=args["vpc_cidr"],
            enable_dns_support=True,
            enable_dns_hostnames=True,  # EKS nodes and private endpoints need DNS names
            tags={"Name": name},
            opts=here,
        )
        gateway = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=vpc.id, tags={"Name": name}, opts=here)
        public_routes = aws.ec2.RouteTable(
            f"{name}-public",
            vpc_id=vpc.id,
            routes=[aws.ec2.RouteTableRouteArgs(cidr_block=ANYWHERE, gateway_id=gateway.id)],
            tags={"Name": f"{name}-public"},
            opts=here,
        )
        self.public_subnet_ids, self.private_subnet_ids = [], []
        for subnets in layout:
            zone = subnets.zone
            public = aws.ec2.Subnet(
                f"{name}-public-{zone}",
                vpc_id=vpc.id,
                cidr_block=subnets.public_cidr,
                availability_zone=zone,
                tags={"Name": f"{name}-public-{zone}", ELB_ROLE_TAG: "1"},
                opts=here,
            )
            aws.ec2.RouteTableAssociation(
                f"{name}-public-{zone}", subnet_id=public.id, route_table_id=public_routes.id, opts=here
            )
            address = aws.ec2.Eip(
                f"{name}-nat-{zone}", domain="vpc", tags={"Name": f"{name}-nat-{zone}"}, opts=here
            )
            nat = aws.ec2.NatGateway(
                f"{name}-nat-{zone}",
                allocation_id=address.id,
                subnet_id=public.id,
                tags={"Name": f"{name}-nat-{zone}"},
                opts=pulumi.ResourceOptions.merge(here, pulumi.ResourceOptions(depends_on=[gateway])),
            )
            private = aws.ec2.Subnet(
                f"{name}-private-{zone}",
                vpc_id=vpc.id,
                cidr_block=subnets.private_cidr,
                availability_zone=zone,
                tags={"Name": f"{name}-private-{zone}", INTERNAL_ELB_ROLE_TAG: "1"},
                opts=here,
            )
            # Each zone leaves through its own NAT gateway: a zone's outage stays in that zone.
            private_routes = aws.ec2.RouteTable(
                f"{name}-private-{zone}",
                vpc_id=vpc.id,
                routes=[aws.ec2.RouteTableRouteArgs(cidr_block=ANYWHERE, nat_gateway_id=nat.id)],
                tags={"Name": f"{name}-private-{zone}"},
                opts=here,
            )
            aws.ec2.RouteTableAssociation(
                f"{name}-private-{zone}", subnet_id=private.id, route_table_id=private_routes.id, opts=here
            )
            self.public_subnet_ids.append(public.id)
            self.private_subnet_ids.append(private.id)
        self.vpc_id = vpc.id
        self.register_outputs(
            {
                "vpc_id": self.vpc_id,
                "public_subnet_ids": self.public_subnet_ids,
                "private_subnet_ids": self.private_subnet_ids,
            }
        )
