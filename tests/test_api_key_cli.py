"""``ironlink api-key create|list|revoke`` against the real PostgreSQL: the key works on the API
once, is listed without its secret, and is refused once revoked; bad input exits 2 naming each
option."""

from __future__ import annotations

import json

import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from infra.cli import api_key as api_key_cli
from infra.cli import app, common
from tests.api_harness import api_client, bearer, seed_registry

pytestmark = pytest.mark.integration
runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IRONLINK_REGISTRY_DSN", raising=False)
    monkeypatch.setattr(api_key_cli, "console", Console(width=250, no_color=True))
    monkeypatch.setattr(common, "errors", Console(width=250, no_color=True, stderr=True))


def run(*args: str) -> Result:
    return runner.invoke(app, ["api-key", *args])


def test_create_list_revoke_round_trip(postgres_dsn: str, victoria_metrics: str) -> None:
    seed_registry(postgres_dsn, {"acme": {"s1": {"m1": "cnc_mill"}}})
    created = run("create", "--tenant", "acme", "--site", "s1", "--days", "7", "--label", "grafana",
                  "--registry", postgres_dsn, "--json")  # fmt: skip
    assert created.exit_code == 0, created.output
    document = json.loads(created.output)
    key, key_id = document["key"], document["id"]
    assert document["site_id"] == "s1" and key.startswith(f"ilk-api.{key_id}.")

    listed = run("list", "--tenant", "acme", "--registry", postgres_dsn, "--json")
    (row,) = json.loads(listed.output)
    assert row["id"] == key_id and row["label"] == "grafana" and row["revoked_at"] is None
    assert key.split(".")[2] not in listed.output
    table = run("list", "--tenant", "acme", "--registry", postgres_dsn)
    assert key_id in table.output and "grafana" in table.output

    with api_client(postgres_dsn, victoria_metrics) as client:
        assert client.get("/v1/sites", headers=bearer(key)).json()["sites"] == [{"id": "s1", "name": "s1"}]
        revoked = run("revoke", key_id, "--tenant", "acme", "--registry", postgres_dsn)
        assert revoked.exit_code == 0 and "revoked" in revoked.output
        assert client.get("/v1/sites", headers=bearer(key)).json()["code"] == "api_key_revoked"
    again = run("revoke", key_id, "--tenant", "acme", "--registry", postgres_dsn)
    assert again.exit_code == 0 and "already" in again.output
    other = run("revoke", key_id, "--tenant", "globex", "--registry", postgres_dsn)
    assert other.exit_code == 2 and "no API key" in other.output


def test_bad_input_exits_2_naming_every_option(postgres_dsn: str) -> None:
    seed_registry(postgres_dsn, {"acme": {"s1": {}}})
    result = run("create", "--tenant", "Acme!", "--site", "S 1", "--days", "999", "--registry", postgres_dsn)
    assert result.exit_code == 2
    for option in ("--tenant", "--site", "--days", "3 problems"):
        assert option in result.output
    unknown = run("create", "--tenant", "acme", "--site", "s9", "--registry", postgres_dsn)
    assert unknown.exit_code == 2 and "--site" in unknown.output and "s9" in unknown.output
    assert run("list", "--tenant", "acme").exit_code == 2
    assert "KEY_ID" in run("revoke", "xyz", "--tenant", "acme", "--registry", postgres_dsn).output
