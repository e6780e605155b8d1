"""Phase C's regional ingestion endpoint under the mock engine: an NLB passing MQTT over TLS on
8883 through to EMQX with proxy protocol v2, which EMQX's listener reads; its Route 53 names;
and the config rules around it (EMQX's licence from 5.9, keepalive below the NLB idle timeout)."""

from __future__ import annotations

from typing import Any

import pytest

from components.aws.ingress import TARGET_GROUP_BINDING_API, regional_name
from components.aws.network import ELB_ROLE_TAG
from infra.config import (
    NLB_TCP_IDLE_TIMEOUT_S,
    PlatformConfig,
    StackConfigError,
    image_version,
    parse_platform_stack,
    regional_ingress,
)
from infra.plan import Plan, PlannedResource, build_region
from infra.plan_aws import _load_balancer, _target_group
from tests.pulumi_mocks import PLANS, STACKS, broker, env_of, region_plan, stack_config, stacks_of

pytestmark = PLANS

PHASE_C = stacks_of("C")
OTHERS = [stack for stack in STACKS if stack not in PHASE_C]
AWS_INGRESS_TYPES = (
    "lb/loadBalancer:LoadBalancer",
    "lb/targetGroup:TargetGroup",
    "lb/listener:Listener",
    "route53/record:Record",
    "route53/healthCheck:HealthCheck",
)


# ----------------------------------------------------------------------------------- helpers
def hocon_tree(text: str) -> dict[str, Any]:
    """The object structure of the rendered ``emqx.conf`` (``components.render.emqx`` writes one
    ``key {`` per object and one ``key = value`` per scalar), values as written."""
    root: dict[str, Any] = {}
    stack = [root]
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("{") and "=" not in line:
            child: dict[str, Any] = {}
            stack[-1][line[:-1].strip().strip('"')] = child
            stack.append(child)
        elif line == "}":
            stack.pop()
        elif " = " in line:
            key, value = line.split(" = ", 1)
            stack[-1][key.strip('"')] = value
    return root


def emqx_conf(plan: Plan) -> dict[str, Any]:
    config_map = plan.one("ConfigMap", "emqx-config")
    return hocon_tree(config_map.inputs["data"]["emqx.conf"])


def load_balancer(plan: Plan) -> PlannedResource:
    (found,) = plan.find("lb/loadBalancer:LoadBalancer")
    return found


def nlb_dns_name(plan: Plan) -> str:
    """The NLB's DNS name as the engine answers it (``infra.plan_aws``)."""
    found = load_balancer(plan)
    return str(_load_balancer(found.name, found.inputs)["dnsName"])


def settings_of(stack: str) -> dict[str, Any]:
    return stack_config(stack).model_dump(mode="json", exclude={"tenants"})


def refusal(settings: dict[str, Any], stack: str) -> list[tuple[str, str]]:
    with pytest.raises(StackConfigError) as refused:
        parse_platform_stack(settings, stack)
    return [(problem.path, problem.message) for problem in refused.value.problems]


def test_phase_c_stacks_are_behind_the_regional_ingress_and_no_other_is() -> None:
    assert PHASE_C == ["scale-eu-west-1", "scale-us-east-1"]
    assert all(regional_ingress(stack_config(stack)) for stack in PHASE_C)
    assert not any(regional_ingress(stack_config(stack)) for stack in OTHERS)


# ------------------------------------------------------------------------------------ the NLB
@pytest.mark.parametrize("stack", PHASE_C)
def test_the_nlb_is_internet_facing_in_the_public_subnets_and_passes_8883_through_as_tcp(stack: str) -> None:
    plan = region_plan(stack).platform
    balancer = load_balancer(plan)
    assert balancer.get("loadBalancerType") == "network" and balancer.get("internal") is False
    public = [s for s in plan.find("ec2/subnet:Subnet") if (s.get("tags") or {}).get(ELB_ROLE_TAG) == "1"]
    assert len(public) == stack_config(stack).aws.zones  # type: ignore[union-attr]
    assert sorted(balancer.get("subnets")) == sorted(f"{subnet.name}-id" for subnet in public)
    (listener,) = plan.find("lb/listener:Listener")
    target_group = plan.one("lb/targetGroup:TargetGroup", listener.name)
    assert (listener.get("port"), listener.get("protocol")) == (8883, "TCP"), "TLS passthrough, not TLS"
    assert listener.get("loadBalancerArn") == _load_balancer(balancer.name, balancer.inputs)["arn"]
    assert listener.get("defaultActions") == [
        {"type": "forward", "targetGroupArn": _target_group(target_group.name, target_group.inputs)["arn"]}
    ]
    assert listener.get("tcpIdleTimeoutSeconds") == NLB_TCP_IDLE_TIMEOUT_S == 350


@pytest.mark.parametrize("stack", PHASE_C)
def test_the_target_group_sends_proxy_protocol_v2_to_the_pods_and_checks_them_over_tcp(stack: str) -> None:
    (target_group,) = region_plan(stack).platform.find("lb/targetGroup:TargetGroup")
    assert target_group.get("proxyProtocolV2") is True
    assert (target_group.get("port"), target_group.get("protocol"), target_group.get("targetType")) == (
        8883,
        "TCP",
        "ip",
    )
    assert target_group.get("healthCheck.protocol") == "TCP"
    assert target_group.get("healthCheck.port") == "traffic-port"


@pytest.mark.parametrize("stack", PHASE_C)
def test_emqx_listener_reads_the_proxy_header_and_tells_devices_a_keepalive_below_the_idle_timeout(
    stack: str,
) -> None:
    conf = emqx_conf(region_plan(stack).platform)
    assert conf["listeners"]["ssl"]["default"]["proxy_protocol"] == "true"
    keepalive = int(conf["mqtt"]["server_keepalive"])
    assert keepalive == stack_config(stack).broker.keepalive_s < NLB_TCP_IDLE_TIMEOUT_S


@pytest.mark.parametrize("stack", [stack for stack in OTHERS if stack_config(stack).broker.engine == "emqx"])
def test_an_emqx_listener_without_the_nlb_does_not_expect_a_proxy_header(stack: str) -> None:
    assert emqx_conf(region_plan(stack).platform)["listeners"]["ssl"]["default"]["proxy_protocol"] == "false"


@pytest.mark.parametrize("stack", PHASE_C)
def test_the_broker_pods_are_bound_to_the_target_group_through_their_service(stack: str) -> None:
    plan = region_plan(stack).platform
    (binding,) = plan.find("TargetGroupBinding")
    (target_group,) = plan.find("lb/targetGroup:TargetGroup")
    (service,) = [s for s in plan.find("core/v1:Service") if s.name == broker(plan).name]
    assert binding.get("apiVersion") == TARGET_GROUP_BINDING_API
    assert binding.get("metadata.namespace") == stack_config(stack).cluster.namespace
    assert binding.get("spec.serviceRef") == {"name": service.name, "port": 8883}
    assert binding.get("spec.targetGroupARN") == _target_group(target_group.name, target_group.inputs)["arn"]
    assert binding.get("spec.targetType") == "ip"
    assert 8883 in [port["port"] for port in service.get("spec.ports")]
    # Only the NLB reaches the pods: the cluster must not make a second, proxy-less load balancer.
    assert service.get("spec.type") == "ClusterIP"
    (group,) = binding.get("spec.networking.ingress")
    nlb_group = plan.one("ec2/securityGroup:SecurityGroup", load_balancer(plan).name)
    assert group["from"] == [{"securityGroup": {"groupID": f"{nlb_group.name}-id"}}]
    assert load_balancer(plan).get("securityGroups") == [f"{nlb_group.name}-id"]
    assert [(rule["fromPort"], rule["toPort"]) for rule in nlb_group.get("ingress")] == [(8883, 8883)]


# ------------------------------------------------------------------------------------ Route 53
@pytest.mark.parametrize("stack", PHASE_C)
def test_the_region_has_its_own_record_and_a_latency_routed_global_one_with_a_tcp_health_check(
    stack: str,
) -> None:
    plan, section = region_plan(stack).platform, stack_config(stack).aws
    assert section is not None and section.dns is not None and section.dns.global_name is not None
    records = {record.get("name"): record for record in plan.find("route53/record:Record")}
    regional = records[regional_name(section.region, section.dns.zone_name)]
    assert regional.get("name") == f"mqtt.{section.region}.ironlink.example.com"
    global_ = records[section.dns.global_name]
    alias = [
        {"name": nlb_dns_name(plan), "zoneId": _load_balancer("", {})["zoneId"], "evaluateTargetHealth": True}
    ]
    for record in (regional, global_):
        assert record.get("zoneId") == section.dns.zone_id and record.get("type") == "A"
        assert record.get("aliases") == alias
    assert global_.get("setIdentifier") == section.region
    assert global_.get("latencyRoutingPolicies") == [{"region": section.region}]
    (check,) = plan.find("route53/healthCheck:HealthCheck")
    assert (check.get("type"), check.get("port"), check.get("fqdn")) == ("TCP", 8883, nlb_dns_name(plan))
    assert global_.get("healthCheckId") == f"{check.name}-id"


def test_the_regions_share_the_global_name_under_their_own_set_identifiers() -> None:
    globals_ = [
        record
        for stack in PHASE_C
        for record in region_plan(stack).platform.find("route53/record:Record")
        if record.get("setIdentifier") is not None
    ]
    assert {record.get("name") for record in globals_} == {"mqtt.ironlink.example.com"}
    assert sorted(record.get("setIdentifier") for record in globals_) == ["eu-west-1", "us-east-1"]


@pytest.mark.parametrize("stack", PHASE_C)
def test_the_broker_certificate_names_both_route_53_names(stack: str) -> None:
    """TLS ends at the broker, so a device dialling the global name must find it in the certificate."""
    plan, section = region_plan(stack).platform, stack_config(stack).aws
    assert section is not None and section.dns is not None
    request = plan.one("tls:index/certRequest:CertRequest", f"{broker(plan).name}-server-csr")
    names = request.get("dnsNames")
    assert regional_name(section.region, section.dns.zone_name) in names
    assert section.dns.global_name in names


@pytest.mark.parametrize("stack", OTHERS)
def test_no_phase_a_or_b_stack_declares_an_nlb_or_route_53(stack: str) -> None:
    plan = region_plan(stack).platform
    assert plan.find("lb/loadBalancer:LoadBalancer") == []
    for type_token in (*AWS_INGRESS_TYPES, "TargetGroupBinding"):
        assert plan.find(type_token) == [], f"{stack} declares a {type_token}"


# ------------------------------------------------------------------------------- config rules
def test_the_version_comes_from_the_image_tag() -> None:
    assert image_version("emqx/emqx:5.9.1") == (5, 9, 1)
    assert image_version("registry.example.com:5000/emqx/emqx:5.8.9") == (5, 8, 9)
    assert image_version("emqx/emqx:6.0") == (6, 0, 0)
    assert image_version("emqx/emqx:latest") is None
    assert image_version("emqx/emqx@sha256:" + "0" * 64) is None


def test_a_three_node_emqx_5_9_without_a_licence_is_refused_naming_the_field_and_version() -> None:
    settings = settings_of("scale-eu-west-1")
    settings["broker"]["image"] = "emqx/emqx:5.9.1"
    problems = refusal(settings, "scale-eu-west-1")
    (message,) = [message for path, message in problems if path == "ironlink:broker.license"]
    assert "5.9.1" in message and "3 nodes" in message and "licence" in message


def test_a_three_node_emqx_5_8_9_needs_no_licence() -> None:
    settings = settings_of("scale-eu-west-1")
    settings["broker"]["image"] = "emqx/emqx:5.8.9"
    assert parse_platform_stack(settings, "scale-eu-west-1").broker.license is None


def test_a_cluster_whose_image_names_no_version_is_refused_by_its_image() -> None:
    settings = settings_of("scale-eu-west-1")
    settings["broker"]["image"] = "emqx/emqx:latest"
    assert [path for path, _ in refusal(settings, "scale-eu-west-1")] == ["ironlink:broker.image"]


def test_the_file_form_of_a_secret_licence_is_accepted_as_a_licence() -> None:
    """The offline planner and tenant stacks read the stack file, where a secret is ciphertext."""
    settings = settings_of("scale-eu-west-1")
    settings["broker"] |= {"image": "emqx/emqx:5.9.1", "license": {"secure": "v1:c2VjcmV0"}}
    assert parse_platform_stack(settings, "scale-eu-west-1").broker.license is not None


def test_a_licensed_cluster_gets_its_licence_from_a_secret_never_from_the_file() -> None:
    settings = settings_of("scale-eu-west-1")
    settings["broker"] |= {"image": "emqx/emqx:5.9.1", "license": "LICENCE-KEY-TEXT"}
    config: PlatformConfig = parse_platform_stack(settings, "scale-eu-west-1")
    plan = build_region(config, "scale-eu-west-1").platform
    statefulset = broker(plan)
    assert env_of(statefulset)["EMQX_LICENSE__KEY"] == {
        "secretKeyRef": {"name": f"{statefulset.name}-secrets", "key": "license"}
    }
    assert "LICENCE-KEY-TEXT" not in plan.one("ConfigMap", "emqx-config").inputs["data"]["emqx.conf"]
    secret = plan.one("core/v1:Secret", f"{statefulset.name}-secrets")
    assert "license" in secret.get("stringData") and "LICENCE-KEY-TEXT" not in str(secret.inputs)


def test_mosquitto_takes_no_licence() -> None:
    settings = settings_of("dev")
    settings["broker"]["license"] = "LICENCE-KEY-TEXT"
    assert ("ironlink:broker.license", "is EMQX's licence; Mosquitto takes none") in refusal(settings, "dev")


@pytest.mark.parametrize("keepalive", [NLB_TCP_IDLE_TIMEOUT_S, 600])
def test_a_keepalive_the_nlb_would_cut_is_refused(keepalive: int) -> None:
    settings = settings_of("scale-eu-west-1")
    settings["broker"]["keepalive_s"] = keepalive
    (message,) = [
        m for path, m in refusal(settings, "scale-eu-west-1") if path == "ironlink:broker.keepalive_s"
    ]
    assert str(keepalive) in message and "350" in message


def test_a_keepalive_just_below_the_idle_timeout_is_accepted() -> None:
    settings = settings_of("scale-eu-west-1")
    settings["broker"]["keepalive_s"] = NLB_TCP_IDLE_TIMEOUT_S - 1
    assert parse_platform_stack(settings, "scale-eu-west-1").broker.keepalive_s == 349


def test_dns_without_the_regional_nlb_and_a_global_name_outside_its_zone_are_refused() -> None:
    settings = settings_of("mvp-eu")
    settings["aws"]["dns"] = {"zone_name": "ironlink.example.com", "zone_id": "Z0123456789IRONLINKEX"}
    assert "ironlink:aws.dns" in [path for path, _ in refusal(settings, "mvp-eu")]
    settings = settings_of("scale-eu-west-1")
    settings["aws"]["dns"]["global_name"] = "mqtt.example.org"
    assert [path for path, _ in refusal(settings, "scale-eu-west-1")] == ["ironlink:aws.dns.global_name"]
