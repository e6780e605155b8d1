"""Where a managed store goes in a region's VPC, as one value the platform and tenant stacks pass on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws


@dataclass(frozen=True)
class PrivatePlacement:
    """The private side of a region's VPC, and who inside it may reach a store."""

    provider: aws.Provider
    """The region's AWS provider."""
    vpc_id: pulumi.Input[str]
    subnet_ids: pulumi.Input[Sequence[str]]
    """The private subnets, one per availability zone (Multi-AZ needs two at least)."""
    cluster_security_group_id: pulumi.Input[str]
    """The EKS cluster's security group: the only source a store admits."""

    def security_group(
        self, name: str, *, port: int, what: str, parent: pulumi.Resource, tags: dict[str, str] | None = None
    ) -> aws.ec2.SecurityGroup:
        """A group admitting ``port`` over TCP from the cluster's security group alone."""
        return aws.ec2.SecurityGroup(
            name,
            vpc_id=self.vpc_id,
            description=f"Ironlink {what}: port {port} from the EKS cluster only",
            ingress=[
                {
                    "protocol": "tcp",
                    "from_port": port,
                    "to_port": port,
                    "security_groups": [self.cluster_security_group_id],
                    "description": f"{what} from the cluster's nodes and pods",
                }
            ],
            tags=tags,
            opts=pulumi.ResourceOptions(parent=parent, provider=self.provider),
        )
