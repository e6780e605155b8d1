"""A region's EKS cluster: the control plane in the private subnets, managed node groups, the OIDC
provider for IAM roles for service accounts, and the kubeconfig the Kubernetes provider uses.

The API endpoint is private: nodes and anything in the VPC reach it, the internet does not. The
public endpoint is switched on only for the CIDRs ``aws.api_access_cidrs`` names (a runner
bootstrapping the region from outside, until ``pulumi up`` runs inside the VPC).

Node groups are auto-named (no ``node_group_name``): an instance type is force-new, and Pulumi
replaces create-before-delete by default (``ResourceOptions.delete_before_replace`` is ``None``,
i.e. off; Terraform's ``create_before_destroy`` is not a Pulumi option), so the new group's nodes
join before the old group drains. A fixed name would collide with the group being replaced.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypedDict

import pulumi
import pulumi_aws as aws

from components.aws.irsa import STS_AUDIENCE
from infra.config import AwsNodeGroup

MANAGED_POLICY = "arn:aws:iam::aws:policy/"
CONTROL_PLANE_POLICIES = ("AmazonEKSClusterPolicy",)
NODE_POLICIES = (
    "AmazonEKSWorkerNodePolicy",  # join the cluster, describe its own instance
    "AmazonEKS_CNI_Policy",  # the VPC CNI assigns pod addresses from the node's interfaces
    "AmazonEC2ContainerRegistryPullOnly",  # pull images (no listing, unlike ...ReadOnly)
)
"""What a managed node needs and nothing more; workloads get their own roles (:mod:`.irsa`)."""
CONTROL_PLANE_LOGS = ["api", "audit", "authenticator"]
NODE_GROUP_LABEL = "ironlink.io/node-group"


def assume_role_policy(service: str) -> str:
    """A trust policy letting one AWS service (``eks.amazonaws.com``) assume the role."""
    statement = {"Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"}
    return json.dumps({"Version": "2012-10-17", "Statement": [statement]}, sort_keys=True)


def kubeconfig(cluster_name: str, endpoint: str, certificate_authority: str, region: str) -> str:
    """A kubeconfig for the cluster that authenticates through ``aws eks get-token`` (the caller's
    AWS credentials, nothing stored): JSON, which is YAML."""
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": "aws",
            "args": [
                "eks",
                "get-token",
                "--cluster-name",
                cluster_name,
                "--region",
                region,
                "--output",
                "json",
            ],
            "interactiveMode": "Never",
        }
    }
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": cluster_name,
                    "cluster": {"server": endpoint, "certificate-authority-data": certificate_authority},
                }
            ],
            "users": [{"name": cluster_name, "user": user}],
            "contexts": [{"name": cluster_name, "context": {"cluster": cluster_name, "user": cluster_name}}],
            "current-context": cluster_name,
        },
        sort_keys=True,
    )


def endpoint_access(api_access_cidrs: Sequence[str]) -> dict[str, Any]:
    """The API endpoints: always private; public only for the CIDRs named (EKS's default is the
    whole internet, so an empty list must switch it off, not leave it open)."""
    public = list(api_access_cidrs)
    access: dict[str, Any] = {"endpoint_private_access": True, "endpoint_public_access": bool(public)}
    if public:
        access["public_access_cidrs"] = public
    return access


def _assigned(value: str | None, what: str) -> str:
    """An output EKS assigns once the cluster exists; its absence is a provider fault, said so."""
    if value is None:
        raise ValueError(f"EKS returned no {what}")
    return value


def _oidc_issuer(identities: Sequence[aws.eks.outputs.ClusterIdentity]) -> str:
    oidcs = identities[0].oidcs if identities else None
    return _assigned(oidcs[0].issuer if oidcs else None, "identities[0].oidcs[0].issuer")


class EksClusterArgs(TypedDict):
    region: str
    kubernetes_version: str
    """``major.minor`` (``cluster.kubernetes_version``): EKS applies the patch releases."""
    private_subnet_ids: Sequence[pulumi.Input[str]]
    node_groups: dict[str, AwsNodeGroup]
    api_access_cidrs: Sequence[str]
    protect: bool
    """Replacing a cluster loses every workload and volume in it."""
    provider: aws.Provider


class EksCluster(pulumi.ComponentResource):
    cluster_name: pulumi.Output[str]
    endpoint: pulumi.Output[str]
    oidc_issuer: pulumi.Output[str]
    """``https://oidc.eks.<region>.amazonaws.com/id/…``: IRSA trust policies name it (without scheme)."""
    oidc_provider_arn: pulumi.Output[str]
    cluster_security_group_id: pulumi.Output[str]
    """The security group EKS created for the control plane and managed nodes."""
    kubeconfig: pulumi.Output[str]

    def __init__(self, name: str, args: EksClusterArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("ironlink:aws:EksCluster", name, None, opts)
        here = pulumi.ResourceOptions(parent=self, provider=args["provider"])
        control_plane_role = self._role(
            f"{name}-control-plane", "eks.amazonaws.com", CONTROL_PLANE_POLICIES, here
        )
        cluster = aws.eks.Cluster(
            name,
            name=name,
            role_arn=control_plane_role.arn,
            version=args["kubernetes_version"],
            vpc_config=aws.eks.ClusterVpcConfigArgs(
                subnet_ids=list(args["private_subnet_ids"]), **endpoint_access(args["api_access_cidrs"])
            ),
            # Access entries (the API), not the aws-auth ConfigMap; whoever creates the cluster
            # (the runner of `pulumi up`) is its first administrator.
            access_config=aws.eks.ClusterAccessConfigArgs(
                authentication_mode="API", bootstrap_cluster_creator_admin_permissions=True
            ),
            enabled_cluster_log_types=CONTROL_PLANE_LOGS,
            opts=pulumi.ResourceOptions.merge(here, pulumi.ResourceOptions(protect=args["protect"])),
        )
        node_role = self._role(f"{name}-node", "ec2.amazonaws.com", NODE_POLICIES, here)
        for group, spec in args["node_groups"].items():
            aws.eks.NodeGroup(
                f"{name}-{group}",
                cluster_name=cluster.name,
                node_role_arn=node_role.arn,
                subnet_ids=list(args["private_subnet_ids"]),
                instance_types=spec.instance_types,
                disk_size=spec.disk_gib,
                scaling_config=aws.eks.NodeGroupScalingConfigArgs(
                    min_size=spec.min_size, max_size=spec.max_size, desired_size=spec.desired_size
                ),
                update_config=aws.eks.NodeGroupUpdateConfigArgs(max_unavailable=1),
                labels={NODE_GROUP_LABEL: group},
                opts=here,
            )
        self.oidc_issuer = cluster.identities.apply(_oidc_issuer)
        oidc = aws.iam.OpenIdConnectProvider(
            f"{name}-oidc", url=self.oidc_issuer, client_id_lists=[STS_AUDIENCE], opts=here
        )
        self.cluster_name = cluster.name
        self.endpoint = cluster.endpoint
        self.oidc_provider_arn = oidc.arn
        self.cluster_security_group_id = cluster.vpc_config.apply(
            lambda vpc: _assigned(vpc.cluster_security_group_id, "vpcConfig.clusterSecurityGroupId")
        )
        # Each output on its own: ``Output.all`` hands nested output types over as plain dicts.
        authority = cluster.certificate_authority.apply(
            lambda ca: _assigned(ca.data, "certificateAuthority.data")
        )
        self.kubeconfig = pulumi.Output.all(cluster.name, cluster.endpoint, authority).apply(
            lambda values: kubeconfig(values[0], values[1], values[2], args["region"])
        )
        self.register_outputs(
            {
                "cluster_name": self.cluster_name,
                "endpoint": self.endpoint,
                "oidc_issuer": self.oidc_issuer,
                "oidc_provider_arn": self.oidc_provider_arn,
                "cluster_security_group_id": self.cluster_security_group_id,
            }
        )

    def _role(
        self, name: str, service: str, policies: Sequence[str], opts: pulumi.ResourceOptions
    ) -> aws.iam.Role:
        role = aws.iam.Role(name, assume_role_policy=assume_role_policy(service), opts=opts)
        for policy in policies:
            aws.iam.RolePolicyAttachment(
                f"{name}-{policy}", role=role.id, policy_arn=MANAGED_POLICY + policy, opts=opts
            )
        return role
