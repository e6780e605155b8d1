"""What the mock engine answers for the AWS resources whose outputs the program reads.

A real engine returns, beside the inputs, what AWS assigned: an endpoint, an ARN, a DNS name.
Each function here gives a plausible, deterministic stand-in, registered by type token with
:func:`infra.plan.engine_outputs`; the planner imports this module, so every plan has them.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from typing import Any

from infra.plan import _SECRET_SIG, _SIG_KEY, engine_outputs

ACCOUNT = "123456789012"


def arn(service: str, region: str, resource: str) -> str:
    return f"arn:aws:{service}:{region}:{ACCOUNT}:{resource}"


@engine_outputs("aws:s3/bucket:Bucket")
def _bucket(name: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    bucket = str(inputs.get("bucket") or f"{name}-bucket")
    return {"bucket": bucket, "arn": f"arn:aws:s3:::{bucket}"}


@engine_outputs("aws:rds/instance:Instance")
def _rds_instance(name: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    identifier = str(inputs.get("identifier") or f"{name}-db")
    port = int(inputs.get("port") or 5432)
    address = f"{identifier}.c0mock0rds.rds.amazonaws.com"
    return {
        "address": address,
        "endpoint": f"{address}:{port}",
        "port": port,
        "arn": f"arn:aws:rds:mock:{ACCOUNT}:db:{identifier}",
        "resourceId": f"db-{identifier.upper().replace('-', '')[:26]}",
    }


@engine_outputs("aws:timestreaminfluxdb/dbInstance:DbInstance")
def _timestream_instance(name: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    instance = str(inputs.get("name") or name)
    return {
        "endpoint": f"{instance}-mock0ts.timestream-influxdb.amazonaws.com",
        "arn": f"arn:aws:timestream-influxdb:mock:{ACCOUNT}:db-instance/{instance}",
        "influxAuthParametersSecretArn": (
            f"arn:aws:secretsmanager:mock:{ACCOUNT}:secret:READONLY-InfluxDB-auth-parameters-{instance}"
        ),
    }


@engine_outputs("pulumi-python:dynamic/influxdb:OperatorToken")
def _influx_operator_token(name: str, _inputs: Mapping[str, Any]) -> dict[str, Any]:
    # A secret, as the provider marks it; masked in the plan.
    return {"token": {_SIG_KEY: _SECRET_SIG, "value": f"token-of-{name}"}}


@engine_outputs("aws:eks/cluster:Cluster")
def _eks_cluster(name: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    cluster = str(inputs.get("name") or name)
    region = "mock"  # the mock engine is not told the provider's region
    oidc_id = hashlib.sha256(cluster.encode()).hexdigest()[:32].upper()
    # The engine's vpcConfig replaces the input's whole, so the subnets go back in beside the group.
    vpc_config = {
        **dict(inputs.get("vpcConfig") or {}),
        "clusterSecurityGroupId": f"sg-{oidc_id[:17].lower()}",
    }
    return {
        "arn": arn("eks", region, f"cluster/{cluster}"),
        "endpoint": f"https://{oidc_id}.gr7.{region}.eks.amazonaws.com",
        "certificateAuthority": {"data": base64.b64encode(f"mock CA of {cluster}".encode()).decode()},
        "identities": [{"oidcs": [{"issuer": f"https://oidc.eks.{region}.amazonaws.com/id/{oidc_id}"}]}],
        "vpcConfig": vpc_config,
    }


@engine_outputs("aws:iam/openIdConnectProvider:OpenIdConnectProvider")
def _oidc_provider(name: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    issuer = str(inputs.get("url") or name).removeprefix("https://")
    return {"arn": f"arn:aws:iam::{ACCOUNT}:oidc-provider/{issuer}"}


@engine_outputs("aws:iam/role:Role")
def _iam_role(name: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    role = str(inputs.get("name") or f"{name}-role")
    return {"arn": f"arn:aws:iam::{ACCOUNT}:role/{role}", "name": role}


@engine_outputs("aws:ec2/eip:Eip")
def _elastic_ip(name: str, _inputs: Mapping[str, Any]) -> dict[str, Any]:
    # An address of TEST-NET-3 (RFC 5737), derived from the name: never a real host.
    return {"publicIp": f"203.0.113.{int(hashlib.sha256(name.encode()).hexdigest(), 16) % 254 + 1}"}


NLB_HOSTED_ZONE = "Z2IFOLAFXWLO4F"
"""Stand-in for the canonical hosted zone AWS gives a region's NLBs (what an alias record names)."""


@engine_outputs("aws:lb/loadBalancer:LoadBalancer")
def _load_balancer(name: str, _inputs: Mapping[str, Any]) -> dict[str, Any]:
    suffix = hashlib.sha256(name.encode()).hexdigest()[:16]
    return {
        "arn": arn("elasticloadbalancing", "mock", f"loadbalancer/net/{name[:24]}/{suffix}"),
        "dnsName": f"{name[:24]}-{suffix}.elb.mock.amazonaws.com",
        "zoneId": NLB_HOSTED_ZONE,
    }


@engine_outputs("aws:lb/targetGroup:TargetGroup")
def _target_group(name: str, _inputs: Mapping[str, Any]) -> dict[str, Any]:
    suffix = hashlib.sha256(name.encode()).hexdigest()[:16]
    return {"arn": arn("elasticloadbalancing", "mock", f"targetgroup/{name[:24]}/{suffix}")}
