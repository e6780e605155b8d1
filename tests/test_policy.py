"""The policy pack (``infra/policy``): every rule holds on every real stack's plan, and each catches
a resource crafted to break it, through pulumi_policy's own argument classes."""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.config import load_stack, platform_stacks
from infra.plan import build_region
from infra.policy.rules import POLICIES, STACK_POLICIES, image_problem
from infra.policy.runner import Violation, run_policies, stack_config
from tests.pulumi_mocks import PLANS

pytestmark = PLANS
RULES = {policy.name for policy in [*POLICIES, *STACK_POLICIES]}


@functools.cache
def _documents() -> str:
    documents = {}
    for platform in platform_stacks():
        for plan in build_region(load_stack(platform), platform).plans:
            documents[plan.stack] = plan.to_json()
    return json.dumps(documents)


def documents() -> dict[str, dict[str, Any]]:
    return json.loads(_documents())


def test_the_pack_has_the_documented_rules_all_mandatory() -> None:
    assert len(POLICIES) + len(STACK_POLICIES) == len(RULES) >= 6
    assert all(
        policy.enforcement_level is not None and policy.enforcement_level.value == "mandatory"
        for policy in [*POLICIES, *STACK_POLICIES]
    )
    pack = yaml.safe_load((Path(__file__).parents[1] / "infra/policy/PulumiPolicy.yaml").read_text())
    assert pack["runtime"]["name"] == "python"
    main = (Path(__file__).parents[1] / "infra/policy/__main__.py").read_text()
    assert 'PolicyPack("ironlink", policies=policies)' in main


def test_every_stack_passes_every_rule() -> None:
    found = documents()
    assert {stack for stack in found if "." not in stack} == set(platform_stacks())
    assert any(document["kind"] == "tenant" for document in found.values())
    violations = [str(v) for document in found.values() for v in run_policies(document)]
    assert violations == []


def test_protection_is_demanded_exactly_where_the_stack_protects() -> None:
    found = documents()
    for stack in platform_stacks():
        assert stack_config(found[stack])["protect_stateful"] == load_stack(stack).protect_stateful, stack


# --------------------------------------------------------------------------- crafted breaches
def _find(document: dict[str, Any], type_token: str, name: str | None = None) -> dict[str, Any]:
    for resource in document["resources"]:
        if resource["type"] == type_token and (name is None or resource["name"] == name):
            return resource
    raise LookupError(f"{document['stack']}: no {type_token} {name or ''}")


def _pod(resource: dict[str, Any]) -> dict[str, Any]:
    return resource["inputs"]["spec"]["template"]["spec"]


STS = "kubernetes:apps/v1:StatefulSet"


def _no_limits(d: dict[str, Any]) -> str:
    del _pod(_find(d, STS, "emqx"))["containers"][0]["resources"]["limits"]["memory"]
    return "emqx"


def _root_container(d: dict[str, Any]) -> str:
    _pod(_find(d, STS, "postgres"))["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    return "postgres"


def _latest_image(d: dict[str, Any]) -> str:
    _pod(_find(d, STS, "ingest"))["containers"][0]["image"] = "ghcr.io/ironlink/ingest:latest"
    return "ingest"


def _other_namespace(d: dict[str, Any]) -> str:
    _find(d, "kubernetes:core/v1:ConfigMap")["inputs"]["metadata"]["namespace"] = "default"
    return _find(d, "kubernetes:core/v1:ConfigMap")["name"]


def _baseline_namespace(d: dict[str, Any]) -> str:
    namespace = _find(d, "kubernetes:core/v1:Namespace")
    namespace["inputs"]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] = "baseline"
    return namespace["name"]


def _open_ingress(d: dict[str, Any]) -> str:
    policy = _find(d, "kubernetes:networking.k8s.io/v1:NetworkPolicy", "postgres")
    policy["inputs"]["spec"]["ingress"].append({})
    return "postgres"


def _plaintext_public(d: dict[str, Any]) -> str:
    service = _find(d, "kubernetes:core/v1:Service", "emqx")
    service["inputs"]["spec"]["ports"].append({"name": "mqtt", "port": 1883, "protocol": "TCP"})
    return "emqx"


def _unprotected_claim(d: dict[str, Any]) -> str:
    claim = _find(d, "kubernetes:core/v1:PersistentVolumeClaim")
    claim["protect"] = False
    return claim["name"]


def _token_in_json_data(d: dict[str, Any]) -> str:
    source = _find(d, "grafana:oss/dataSource:DataSource")
    source["inputs"]["jsonDataEncoded"] = json.dumps({"version": "Flux", "token": "abc"})
    return source["name"]


def _wide_token(d: dict[str, Any]) -> str:
    token = _find(d, "pulumi-python:dynamic/influxdb:Token")
    action = token["inputs"]["permissions"][0]["action"]
    token["inputs"]["permissions"].append({"action": action, "bucket_id": None})
    return token["name"]


def _public_acl(d: dict[str, Any]) -> str:
    bucket = _find(d, "aws:s3/bucket:Bucket")
    bucket["inputs"]["acl"] = "public-read"
    return bucket["name"]


def _partial_public_access_block(d: dict[str, Any]) -> str:
    block = _find(d, "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock")
    block["inputs"]["restrictPublicBuckets"] = False
    return block["name"]


def _unblocked_bucket(d: dict[str, Any]) -> str:
    d["resources"].remove(_find(d, "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock"))
    return _find(d, "aws:s3/bucket:Bucket")["name"]


def _unencrypted_database(d: dict[str, Any]) -> str:
    database = _find(d, "aws:rds/instance:Instance")
    database["inputs"]["storageEncrypted"] = False
    return database["name"]


def _single_zone_store(d: dict[str, Any]) -> str:
    store = _find(d, "aws:timestreaminfluxdb/dbInstance:DbInstance")
    store["inputs"]["deploymentType"] = "SINGLE_AZ"
    return store["name"]


def _wildcard_policy(d: dict[str, Any]) -> str:
    policy = _find(d, "aws:iam/rolePolicy:RolePolicy")
    document = json.loads(policy["inputs"]["policy"])
    document["Statement"][0]["Resource"] = "*"
    policy["inputs"]["policy"] = json.dumps(document)
    return policy["name"]


BREACHES: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "aws-bucket-acl-private": ("mvp-eu", _public_acl),
    "aws-bucket-public-access-blocked": ("mvp-eu", _partial_public_access_block),
    "aws-every-bucket-blocks-public-access": ("mvp-eu", _unblocked_bucket),
    "aws-database-encrypted": ("scale-eu-west-1", _unencrypted_database),
    "aws-database-multi-az-in-phase-c": ("scale-eu-west-1.umbrella", _single_zone_store),
    "aws-iam-resources-named": ("scale-eu-west-1", _wildcard_policy),
    "container-resource-limits": ("mvp-eu", _no_limits),
    "container-hardened": ("mvp-eu", _root_container),
    "pinned-images": ("mvp-eu", _latest_image),
    "objects-in-stack-namespace": ("mvp-eu", _other_namespace),
    "namespace-restricted-pod-security": ("mvp-eu", _baseline_namespace),
    "no-open-ingress-rule": ("mvp-eu", _open_ingress),
    "public-services-tls-only": ("mvp-eu", _plaintext_public),
    "stateful-resources-protected": ("mvp-eu", _unprotected_claim),
    "grafana-datasource-secrets-secure": ("mvp-eu.acme", _token_in_json_data),
    "store-tokens-scoped": ("mvp-eu.acme", _wide_token),
}


def test_every_rule_has_a_breach_test() -> None:
    assert set(BREACHES) == RULES


@pytest.mark.parametrize("rule", sorted(BREACHES))
def test_each_rule_catches_its_breach_naming_stack_resource_and_rule(rule: str) -> None:
    stack, breach = BREACHES[rule]
    document = copy.deepcopy(documents()[stack])
    name = breach(document)
    violations: list[Violation] = run_policies(document)
    assert [(v.rule, v.name) for v in violations] == [(rule, name)], [str(v) for v in violations]
    (violation,) = violations
    assert violation.stack == stack and violation.urn.endswith(f"::{name}")
    assert rule in str(violation) and name in str(violation)


def test_an_unprotected_claim_passes_where_the_stack_protects_nothing() -> None:
    document = documents()["dev"]
    protected = {resource["type"] for resource in document["resources"] if resource["protect"]}
    assert protected <= {"random:index/randomPassword:RandomPassword"}, "only first-start passwords"
    assert run_policies(document, protect_stateful=False) == []
    claims = [
        v for v in run_policies(document, protect_stateful=True) if v.rule == "stateful-resources-protected"
    ]
    assert {v.type for v in claims} >= {
        "kubernetes:core/v1:PersistentVolumeClaim",
        "kubernetes:core/v1:Namespace",
    }


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        ("emqx/emqx:5.8.9", None),
        ("registry:5000/team/app:1.2", None),
        ("ghcr.io/ironlink/ingest@sha256:" + "a" * 64, None),
        ("emqx/emqx", "has no tag"),
        ("registry:5000/team/app", "has no tag"),
        ("postgres:latest", "tagged latest"),
    ],
)
def test_an_image_is_pinned_by_a_tag_other_than_latest_or_a_digest(image: str, problem: str | None) -> None:
    found = image_problem(image)
    assert (found is None) if problem is None else (found is not None and problem in found)
