"""The registry's clients encrypt to RDS, which refuses them otherwise (PostgreSQL 15+ on RDS sets
``rds.force_ssl``), and stay as they were on the in-cluster PostgreSQL."""

from __future__ import annotations

import pytest
from pyhocon import ConfigFactory

from tests.pulumi_mocks import PLANS, STACKS, env_of, stack_config, stack_plan

pytestmark = PLANS


def on_rds(stack: str) -> bool:
    aws = stack_config(stack).aws
    return aws is not None and aws.registry == "rds"


@pytest.mark.parametrize("stack", [s for s in STACKS if stack_config(s).broker.engine == "emqx"])
def test_emqx_reads_the_registry_over_tls_exactly_where_it_is_rds(stack: str) -> None:
    conf = ConfigFactory.parse_string(
        stack_plan(stack).one("ConfigMap", "emqx-config").get("data")["emqx.conf"]
    )
    for section in ("authentication", "authorization.sources"):
        (postgres,) = [
            item
            for item in conf.get(section)
            if "postgresql" in (item.get("backend", None), item.get("type", None))
        ]
        assert postgres.get("ssl.enable") is on_rds(stack), f"{stack}: {section}"


@pytest.mark.parametrize("stack", [s for s in STACKS if stack_config(s).high_availability])
def test_ha_grafana_requires_tls_to_rds_only(stack: str) -> None:
    (grafana,) = [w for w in stack_plan(stack).find("Deployment") if w.name == "grafana"]
    assert env_of(grafana)["GF_DATABASE_SSL_MODE"] == ("require" if on_rds(stack) else "disable"), stack
    assert any(on_rds(s) for s in STACKS), "no stack runs its registry on RDS"
