"""Phase C's regional substrate on AWS (VPC, EKS, IRSA) under the mock engine, with the scale
stacks' own config; and the pure functions it is built from."""

from __future__ import annotations

import ipaddress
import json
import logging
from typing import Any

import pulumi
import pulumi_aws as aws
import pytest
from pulumi.runtime import mocks, settings
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

from components.aws.cluster import NODE_GROUP_LABEL, NODE_POLICIES, endpoint_access, kubeconfig
from components.aws.irsa import service_account_role, trust_policy
from components.aws.network import ELB_ROLE_TAG, INTERNAL_ELB_ROLE_TAG, subnet_layout, zone_names
from components.replacements import STATEFUL_TYPES
from infra.config import StackConfigError, parse_platform_stack
from infra.plan import Plan, PlanMocks, PlannedResource, RecordingMonitor, build_plan, tree_order
from infra.plandiff import diff_plans
from tests.pulumi_mocks import PLANS, region_plan, stack_config, stack_plan, stacks_of

pytestmark = PLANS

PHASE_C = ["scale-eu-west-1", "scale-us-east-1"]
WEB_IDENTITY = "sts:AssumeRoleWithWebIdentity"


# ------------------------------------------------------------------------------ pure functions
def test_zone_names_are_the_regions_own_lettered_zones() -> None:
    assert zone_names("eu-west-1", 3) == ["eu-west-1a", "eu-west-1b", "eu-west-1c"]


@pytest.mark.parametrize("zones", [2, 3, 6])
@pytest.mark.parametrize("vpc_cidr", ["10.10.0.0/16", "10.20.0.0/16", "172.16.0.0/20", "10.0.0.0/22"])
def test_subnets_lie_inside_the_vpc_and_never_overlap(vpc_cidr: str, zones: int) -> None:
    vpc = ipaddress.IPv4Network(vpc_cidr)
    layout = subnet_layout(vpc_cidr, zone_names("eu-west-1", zones))
    subnets = [ipaddress.IPv4Network(c) for z in layout for c in (z.public_cidr, z.private_cidr)]
    assert len(subnets) == 2 * zones
    assert all(subnet.subnet_of(vpc) and subnet.prefixlen <= 28 for subnet in subnets), layout
    for index, subnet in enumerate(subnets):
        for other in subnets[index + 1 :]:
            assert not subnet.overlaps(other), f"{subnet} overlaps {other} in {vpc_cidr}"
    for zone in layout:  # pods take their addresses from the private subnets: they are the larger
        assert (
            ipaddress.IPv4Network(zone.private_cidr).num_addresses
            > 4 * ipaddress.IPv4Network(zone.public_cidr).num_addresses
        )


def test_a_16_gives_each_zone_a_19_private_and_a_22_public_subnet() -> None:
    layout = subnet_layout("10.10.0.0/16", zone_names("eu-west-1", 3))
    assert [(z.zone, z.private_cidr, z.public_cidr) for z in layout] == [
        ("eu-west-1a", "10.10.0.0/19", "10.10.224.0/22"),
        ("eu-west-1b", "10.10.32.0/19", "10.10.228.0/22"),
        ("eu-west-1c", "10.10.64.0/19", "10.10.232.0/22"),
    ]


@pytest.mark.parametrize("vpc_cidr", ["10.10.0.1/16", "10.10.0.0/24", "300.1.0.0/16"])
def test_a_vpc_cidr_that_cannot_be_laid_out_is_refused_by_name(vpc_cidr: str) -> None:
    with pytest.raises(ValueError, match="vpc_cidr"):
        subnet_layout(vpc_cidr, zone_names("eu-west-1", 3))


@pytest.mark.parametrize(
    ("vpc_cidr", "says"),
    [("10.10.0.1/16", "not an IPv4 network"), ("10.10.0.0/24", "/16 to /22"), ("8.8.0.0/16", "private")],
)
def test_the_stack_refuses_a_bad_vpc_cidr_before_anything_is_declared(vpc_cidr: str, says: str) -> None:
    settings_ = stack_config("scale-eu-west-1").model_dump(mode="json", exclude={"tenants"})
    settings_["aws"]["vpc_cidr"] = vpc_cidr
    with pytest.raises(StackConfigError) as refused:
        parse_platform_stack(settings_, "scale-eu-west-1")
    assert any(p.path == "ironlink:aws.vpc_cidr" and says in p.message for p in refused.value.problems), str(
        refused.value
    )


def test_the_kubeconfig_authenticates_through_aws_eks_get_token_for_that_cluster() -> None:
    config = json.loads(
        kubeconfig("ironlink-eu-west-1", "https://ABC.eks.amazonaws.com", "Q0E=", "eu-west-1")
    )
    (cluster,) = config["clusters"]
    assert cluster["cluster"] == {
        "server": "https://ABC.eks.amazonaws.com",
        "certificate-authority-data": "Q0E=",
    }
    (user,) = config["users"]
    assert "token" not in user["user"], "no credential is stored in the kubeconfig"
    exec_ = user["user"]["exec"]
    assert exec_["command"] == "aws"
    assert exec_["args"][:2] == ["eks", "get-token"]
    assert exec_["args"][exec_["args"].index("--cluster-name") + 1] == "ironlink-eu-west-1"
    assert exec_["args"][exec_["args"].index("--region") + 1] == "eu-west-1"
    assert config["current-context"] in {context["name"] for context in config["contexts"]}


def test_the_api_is_private_unless_the_stack_names_who_may_reach_it_publicly() -> None:
    assert endpoint_access([]) == {"endpoint_private_access": True, "endpoint_public_access": False}
    assert endpoint_access(["203.0.113.7/32"]) == {
        "endpoint_private_access": True,
        "endpoint_public_access": True,
        "public_access_cidrs": ["203.0.113.7/32"],
    }


def test_the_irsa_trust_policy_names_exactly_one_service_account_and_sts() -> None:
    issuer = "https://oidc.eks.eu-west-1.amazonaws.com/id/ABC"
    document = json.loads(trust_policy("arn:aws:iam::1:oidc-provider/x", issuer, "ironlink", "backup"))
    (statement,) = document["Statement"]
    assert statement["Action"] == WEB_IDENTITY
    assert statement["Principal"] == {"Federated": "arn:aws:iam::1:oidc-provider/x"}
    assert statement["Condition"] == {
        "StringEquals": {
            "oidc.eks.eu-west-1.amazonaws.com/id/ABC:sub": "system:serviceaccount:ironlink:backup",
            "oidc.eks.eu-west-1.amazonaws.com/id/ABC:aud": "sts.amazonaws.com",
        }
    }


def test_service_account_role_carries_only_the_policy_it_is_given() -> None:
    monitor = RecordingMonitor(PlanMocks())
    settings.ROOT.set(None)
    mocks.set_mocks(
        monitor.mocks, project="ironlink", stack="t", monitor=monitor, logger=logging.getLogger("t")
    )
    policy = json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:GetObject"}]}
    )

    async def program() -> None:
        provider = aws.Provider("aws", region="eu-west-1")
        parent = pulumi.ComponentResource("ironlink:test:Parent", "parent")
        service_account_role(
            "backup",
            oidc_provider_arn="arn:aws:iam::1:oidc-provider/oidc.example/id/X",
            oidc_issuer="https://oidc.example/id/X",
            namespace="ironlink",
            service_account="backup",
            policy_json=policy,
            provider=provider,
            parent=parent,
        )

    _sync_await(run_pulumi_func(program))
    plan = Plan("t", tree_order(monitor.recorded))
    role = plan.one("iam/role:Role", "backup")
    assert json.loads(role.get("assumeRolePolicy")) == json.loads(
        trust_policy(
            "arn:aws:iam::1:oidc-provider/oidc.example/id/X",
            "https://oidc.example/id/X",
            "ironlink",
            "backup",
        )
    )
    (inline,) = plan.find("iam/rolePolicy:RolePolicy")
    assert inline.get("role") == "backup-id" and inline.get("policy") == policy
    assert not plan.find("iam/rolePolicyAttachment:RolePolicyAttachment"), "no managed policy besides it"
    assert role.parent == plan.one("ironlink:test:Parent", "parent").urn


# ------------------------------------------------------------------------------ the scale stacks
def _tagged(resource: PlannedResource, tag: str) -> bool:
    """Tag keys hold dots and slashes, so not through ``PlannedResource.get``'s dotted paths."""
    return (resource.get("tags") or {}).get(tag) == "1"


def _aws(stack: str) -> Any:
    config = stack_config(stack).aws
    assert config is not None and config.substrate, f"{stack} must declare the substrate"
    return config


@pytest.mark.parametrize("stack", PHASE_C)
def test_each_phase_c_stack_declares_its_vpc_in_its_own_region_with_its_own_cidr(stack: str) -> None:
    plan, section = region_plan(stack).platform, _aws(stack)
    (vpc,) = plan.find("ec2/vpc:Vpc")
    assert vpc.get("cidrBlock") == section.vpc_cidr
    (provider,) = plan.find("pulumi:providers:aws")
    assert provider.get("region") == section.region, "one AWS provider, in the stack's own region"
    assert {s.get("availabilityZone") for s in plan.find("ec2/subnet:Subnet")} == {
        f"{section.region}{letter}" for letter in "abc"
    }


def test_the_two_regions_cidrs_do_not_overlap() -> None:
    first, second = (ipaddress.IPv4Network(_aws(stack).vpc_cidr) for stack in PHASE_C)
    assert not first.overlaps(second)


@pytest.mark.parametrize("stack", PHASE_C)
def test_each_zone_has_a_public_and_a_private_subnet_and_its_own_nat_gateway(stack: str) -> None:
    plan, section = region_plan(stack).platform, _aws(stack)
    (vpc,) = plan.find("ec2/vpc:Vpc")
    vpc_id = f"{vpc.name}-id"
    subnets = plan.find("ec2/subnet:Subnet")
    zones = sorted({subnet.get("availabilityZone") for subnet in subnets})
    assert len(zones) == section.zones == 3 and all(zone.startswith(section.region) for zone in zones)
    public_ids: dict[str, str] = {}
    for zone in zones:
        (public,) = [s for s in subnets if s.get("availabilityZone") == zone and _tagged(s, ELB_ROLE_TAG)]
        (private,) = [
            s for s in subnets if s.get("availabilityZone") == zone and _tagged(s, INTERNAL_ELB_ROLE_TAG)
        ]
        assert public.get("vpcId") == private.get("vpcId") == vpc_id
        public_ids[zone] = f"{public.name}-id"
    nats = plan.find("ec2/natGateway:NatGateway")
    assert sorted(nat.get("subnetId") for nat in nats) == sorted(public_ids.values())
    eips = {f"{eip.name}-id" for eip in plan.find("ec2/eip:Eip")}
    assert {nat.get("allocationId") for nat in nats} <= eips and len(eips) == len(nats)


@pytest.mark.parametrize("stack", PHASE_C)
def test_private_subnets_leave_through_their_own_zones_nat_and_public_ones_through_the_gateway(
    stack: str,
) -> None:
    plan = region_plan(stack).platform
    subnets = {f"{s.name}-id": s for s in plan.find("ec2/subnet:Subnet")}
    tables = {f"{t.name}-id": t for t in plan.find("ec2/routeTable:RouteTable")}
    nats = {f"{n.name}-id": n for n in plan.find("ec2/natGateway:NatGateway")}
    (gateway,) = plan.find("ec2/internetGateway:InternetGateway")
    associations = plan.find("ec2/routeTableAssociation:RouteTableAssociation")
    assert sorted(a.get("subnetId") for a in associations) == sorted(subnets), "every subnet has a table"
    for association in associations:
        subnet = subnets[association.get("subnetId")]
        (route,) = tables[association.get("routeTableId")].get("routes")
        assert route["cidrBlock"] == "0.0.0.0/0"
        if _tagged(subnet, INTERNAL_ELB_ROLE_TAG):
            nat_subnet = subnets[nats[route["natGatewayId"]].get("subnetId")]
            assert nat_subnet.get("availabilityZone") == subnet.get("availabilityZone"), subnet.urn
            assert "gatewayId" not in route, f"{subnet.urn} is private: no route to the internet gateway"
        else:
            assert route.get("gatewayId") == f"{gateway.name}-id", subnet.urn


def _private_subnet_ids(plan: Plan) -> list[str]:
    return sorted(f"{s.name}-id" for s in plan.find("ec2/subnet:Subnet") if _tagged(s, INTERNAL_ELB_ROLE_TAG))


@pytest.mark.parametrize("stack", PHASE_C)
def test_the_cluster_runs_in_the_private_subnets_with_a_private_api_and_is_protected(stack: str) -> None:
    plan, config = region_plan(stack).platform, stack_config(stack)
    (cluster,) = plan.find("eks/cluster:Cluster")
    assert sorted(cluster.get("vpcConfig.subnetIds")) == _private_subnet_ids(plan)
    assert cluster.get("vpcConfig.endpointPrivateAccess") is True
    assert cluster.get("vpcConfig.endpointPublicAccess") is False, "no stack names a public API range"
    assert cluster.get("version") == config.cluster.kubernetes_version
    assert cluster.protect and "aws:eks/cluster:Cluster" in STATEFUL_TYPES, cluster.urn


@pytest.mark.parametrize("stack", PHASE_C)
def test_node_groups_are_auto_named_with_the_configured_instance_types(stack: str) -> None:
    plan, section = region_plan(stack).platform, _aws(stack)
    groups = {g.get("labels", {}).get(NODE_GROUP_LABEL): g for g in plan.find("eks/nodeGroup:NodeGroup")}
    assert sorted(groups) == sorted(section.node_groups)
    for name, spec in section.node_groups.items():
        group = groups[name]
        assert group.get("nodeGroupName") is None and group.get("nodeGroupNamePrefix") is None, group.urn
        assert group.get("instanceTypes") == spec.instance_types
        assert group.get("scalingConfig") == {
            "minSize": spec.min_size,
            "maxSize": spec.max_size,
            "desiredSize": spec.desired_size,
        }
        assert sorted(group.get("subnetIds")) == _private_subnet_ids(plan)


@pytest.mark.parametrize("stack", PHASE_C)
def test_nodes_hold_only_the_managed_policies_a_node_needs(stack: str) -> None:
    plan = region_plan(stack).platform
    (cluster,) = plan.find("eks/cluster:Cluster")
    role = plan.one("iam/role:Role", f"{cluster.name}-node")
    (statement,) = json.loads(role.get("assumeRolePolicy"))["Statement"]
    assert statement["Principal"] == {"Service": "ec2.amazonaws.com"}
    for group in plan.find("eks/nodeGroup:NodeGroup"):
        assert group.get("nodeRoleArn", "").endswith(f"/{role.name}-role"), group.urn
    attachments = plan.find("iam/rolePolicyAttachment:RolePolicyAttachment")
    node_attached = [a.get("policyArn") for a in attachments if a.get("role") == f"{role.name}-id"]
    assert sorted(node_attached) == sorted(f"arn:aws:iam::aws:policy/{p}" for p in NODE_POLICIES)
    assert not [
        a.urn
        for a in attachments
        if "FullAccess" in a.get("policyArn") or "Administrator" in a.get("policyArn")
    ]
    assert not [p.urn for p in plan.find("iam/rolePolicy:RolePolicy") if p.get("role") == f"{role.name}-id"]


@pytest.mark.parametrize("stack", PHASE_C)
def test_every_irsa_role_trusts_exactly_one_service_account_of_this_clusters_oidc_provider(
    stack: str,
) -> None:
    plan = stack_plan(stack)
    (oidc,) = plan.find("iam/openIdConnectProvider:OpenIdConnectProvider")
    assert oidc.get("clientIdLists") == ["sts.amazonaws.com"]
    oidc_arn = region_plan(stack).platform.outputs["oidc_provider_arn"]
    issuer = region_plan(stack).platform.outputs["oidc_issuer"].removeprefix("https://")
    web_roles = [r for r in plan.find("iam/role:Role") if WEB_IDENTITY in r.get("assumeRolePolicy", "")]
    assert web_roles, "the region's backups reach S3 through an IRSA role"
    for role in web_roles:
        (statement,) = json.loads(role.get("assumeRolePolicy"))["Statement"]
        assert statement["Principal"] == {"Federated": oidc_arn}, role.urn
        conditions = statement["Condition"]
        assert list(conditions) == ["StringEquals"], f"{role.urn}: no StringLike, no wildcard"
        subject = conditions["StringEquals"][f"{issuer}:sub"]
        assert isinstance(subject, str) and "*" not in subject, role.urn
        assert subject.count(":") == 3 and subject.startswith("system:serviceaccount:"), role.urn


@pytest.mark.parametrize("stack", PHASE_C)
def test_the_kubernetes_providers_reach_the_eks_cluster_through_its_kubeconfig(stack: str) -> None:
    region = region_plan(stack)
    (cluster,) = region.platform.find("eks/cluster:Cluster")
    providers = [
        r
        for plan in (region.platform, *region.tenants.values())
        for r in plan.resources
        if r.type == "pulumi:providers:kubernetes"
    ]
    assert len(providers) == 1 + len(region.tenants)
    for provider in providers:
        assert provider.get("context") is None, f"{provider.urn} must not name a kubeconfig context"
        config = json.loads(provider.get("kubeconfig"))
        assert config["users"][0]["user"]["exec"]["args"][3] == cluster.get("name"), provider.urn


@pytest.mark.parametrize("stack", PHASE_C)
def test_the_platform_exports_and_holds_what_others_place_in_the_substrate(stack: str) -> None:
    plan = region_plan(stack).platform
    (cluster,) = plan.find("eks/cluster:Cluster")
    outputs = plan.outputs
    assert outputs["vpc_id"] == f"{plan.find('ec2/vpc:Vpc')[0].name}-id"
    assert sorted(outputs["private_subnet_ids"]) == _private_subnet_ids(plan)
    assert outputs["oidc_issuer"].startswith("https://oidc.eks.")
    assert outputs["oidc_provider_arn"].endswith(outputs["oidc_issuer"].removeprefix("https://"))
    assert outputs["cluster_security_group_id"].startswith("sg-")
    substrate = plan.platform.substrate
    assert substrate is not None and substrate.cluster is not None and len(substrate.private_subnet_ids) == 3
    assert cluster.get("name") == f"ironlink-{stack_config(stack).region}"


@pytest.mark.parametrize("stack", stacks_of("A", "B"))
def test_no_phase_a_or_b_stack_declares_the_substrate(stack: str) -> None:
    plan = stack_plan(stack)
    declared = [
        r.urn for r in plan.resources if r.type.startswith(("aws:eks/", "aws:ec2/vpc:", "aws:ec2/subnet:"))
    ]
    assert declared == [], f"{stack} declares Phase C's substrate: {declared}"
    assert region_plan(stack).platform.platform.substrate is None


def test_an_instance_type_change_replaces_the_node_group_as_the_force_new_table_says() -> None:
    stack = "scale-eu-west-1"
    config = stack_config(stack)
    section = _aws(stack)
    (group_name,) = section.node_groups
    changed_group = section.node_groups[group_name].model_copy(update={"instance_types": ["m7i.xlarge"]})
    changed = config.model_copy(
        update={"aws": section.model_copy(update={"node_groups": {group_name: changed_group}})}
    )
    diff = diff_plans(region_plan(stack).platform.to_json(), build_plan(changed, stack).to_json(), stack)
    changed_steps = list(diff.steps)
    assert [(step.op, step.type) for step in changed_steps] == [("replace", "aws:eks/nodeGroup:NodeGroup")]
    (step,) = changed_steps
    assert [path for path, _why in step.replace_reasons] == ["instanceTypes"], step.detail()
