"""Phase C's regional substrate on AWS: the network, and the EKS cluster unless the region runs on
an existing cluster (``aws.cluster: existing``, reached through ``cluster.context``).

What other components need in-process (RDS and Timestream in the private subnets, IRSA roles for
the backup job) is on this object; the platform stack also exports it.
"""

from __future__ import annotations

from typing import TypedDict

import pulumi
import pulumi_aws as aws

from components.aws.cluster import EksCluster, EksClusterArgs
from components.aws.network import RegionalNetwork, RegionalNetworkArgs
from infra.config import Aws, PlatformConfig


def runs_on_eks(config: PlatformConfig) -> bool:
    """Whether the region's cluster is the EKS cluster its own substrate declares."""
    return config.aws is not None and config.aws.substrate and config.aws.cluster == "eks"


class RegionalSubstrateArgs(TypedDict):
    aws: Aws
    """The stack's ``aws`` section (``substrate: true``)."""
    kubernetes_version: str
    protect: bool
    provider: aws.Provider


class RegionalSubstrate(pulumi.ComponentResource):
    provider: aws.Provider
    network: RegionalNetwork
    cluster: EksCluster | None
    """None on an existing cluster: no OIDC provider or cluster security group of ours then."""

    def __init__(
        self, name: str, args: RegionalSubstrateArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("ironlink:aws:RegionalSubstrate", name, None, opts)
        section, self.provider = args["aws"], args["provider"]
        here = pulumi.ResourceOptions(parent=self)
        self.network = RegionalNetwork(
            name,
            RegionalNetworkArgs(
                region=section.region, vpc_cidr=section.vpc_cidr, zones=section.zones, provider=self.provider
            ),
            here,
        )
        self.cluster = (
            EksCluster(
                name,
                EksClusterArgs(
                    region=section.region,
                    kubernetes_version=args["kubernetes_version"],
                    private_subnet_ids=self.network.private_subnet_ids,
                    node_groups=section.node_groups,
                    api_access_cidrs=section.api_access_cidrs,
                    protect=args["protect"],
                    provider=self.provider,
                ),
                here,
            )
            if section.cluster == "eks"
            else None
        )
        self.register_outputs({"vpc_id": self.vpc_id, "private_subnet_ids": self.private_subnet_ids})

    @property
    def vpc_id(self) -> pulumi.Output[str]:
        return self.network.vpc_id

    @property
    def private_subnet_ids(self) -> list[pulumi.Output[str]]:
        return self.network.private_subnet_ids

    @property
    def oidc_provider_arn(self) -> pulumi.Output[str] | None:
        return self.cluster.oidc_provider_arn if self.cluster else None

    @property
    def oidc_issuer(self) -> pulumi.Output[str] | None:
        return self.cluster.oidc_issuer if self.cluster else None

    @property
    def cluster_security_group_id(self) -> pulumi.Output[str] | None:
        return self.cluster.cluster_security_group_id if self.cluster else None

    @property
    def kubeconfig(self) -> pulumi.Output[str] | None:
        return self.cluster.kubeconfig if self.cluster else None
