"""Worker settings: derived from the stack config, carried as environment, refused with names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from infra.tenancy import TELEMETRY_FILTER, shared_subscription, store_routes
from ingest.settings import SettingsError, WorkerSettings, worker_settings_for
from registry.tenant_routes import tenant_route_for
from tests.fixtures.ingest import fleet_machines, platform

URLS = {"influxdb": "http://influxdb.ironlink.svc:8086"}


def settings(**overrides: Any) -> WorkerSettings:
    return worker_settings_for(
        platform(),
        mqtt_host="broker",
        mqtt_port=8883,
        store_urls=URLS,
        machines=fleet_machines(),
        **overrides,
    )


def test_settings_follow_the_stack_routes_quotas_and_machines() -> None:
    config = platform()
    subject = settings()
    routes = store_routes(config)
    for tenant in config.tenants:
        route = subject.tenants[tenant.id]
        assert (route.instance, route.org, route.bucket) == (
            routes[tenant.id].instance,
            routes[tenant.id].org,
            routes[tenant.id].bucket,
        )
        assert route.messages_per_second == config.quota_of(tenant).messages_per_second
    assert subject.machine_types()[("acme", "plant-1", "mill-01")] == "cnc_mill"
    # The stack holds no machines: without an explicit fleet the routes carry none.
    bare = worker_settings_for(config, mqtt_host="broker", mqtt_port=8883, store_urls=URLS)
    assert bare.machine_types() == {}
    assert (subject.batch_size, subject.flush_interval_ms) == (
        config.ingest.batch_size,
        config.ingest.flush_interval_ms,
    )
    assert subject.receive_maximum == 4 * config.ingest.batch_size


def test_mosquitto_stacks_subscribe_plainly_and_emqx_stacks_share_the_subscription() -> None:
    assert settings().mqtt_subscription == TELEMETRY_FILTER
    phase_b = platform(phase="B")
    emqx = worker_settings_for(phase_b, mqtt_host="b", mqtt_port=8883, store_urls=URLS)
    assert emqx.mqtt_subscription == shared_subscription(phase_b.ingest.share_group)


def test_the_environment_round_trips_and_carries_no_secret() -> None:
    subject = settings(mqtt_password="s3cret", mqtt_ca_file=Path("/etc/ironlink/ca.pem"))
    env = subject.to_env()
    assert all(name.startswith("IRONLINK_") for name in env)
    assert "s3cret" not in json.dumps(env) and "IRONLINK_MQTT_PASSWORD" not in env
    assert env["IRONLINK_MQTT_CA_FILE"] == "/etc/ironlink/ca.pem"
    restored = WorkerSettings.from_env({**env, "IRONLINK_MQTT_PASSWORD": "s3cret"})
    assert restored == subject


def test_bad_variables_are_named_with_their_values() -> None:
    env = settings().to_env()
    env.update(IRONLINK_MQTT_PORT="eighty", IRONLINK_BATCH_SIZE="0", IRONLINK_LOG_LEVEL="loud")
    with pytest.raises(SettingsError) as caught:
        WorkerSettings.from_env(env)
    text = str(caught.value)
    assert "IRONLINK_MQTT_PORT: 'eighty' is invalid" in text
    assert "IRONLINK_BATCH_SIZE: '0' is invalid" in text
    assert "IRONLINK_LOG_LEVEL: 'loud' is invalid" in text
    assert len(caught.value.problems) == 3


def test_a_tenant_without_a_store_url_and_bad_json_are_refused() -> None:
    env = settings().to_env()
    with pytest.raises(SettingsError, match=r"IRONLINK_TENANTS: tenant 'acme' writes to instance 'influxdb'"):
        WorkerSettings.from_env({**env, "IRONLINK_STORE_URLS": '{"influxdb-acme": "http://x"}'})
    with pytest.raises(SettingsError, match=r"IRONLINK_STORE_URLS: '\{oops' is not valid JSON"):
        WorkerSettings.from_env({**env, "IRONLINK_STORE_URLS": "{oops"})
    with pytest.raises(SettingsError, match=r"IRONLINK_MQTT_HOST: is required"):
        WorkerSettings.from_env({k: v for k, v in env.items() if k != "IRONLINK_MQTT_HOST"})


def test_a_settings_file_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    env = settings().to_env()
    file = tmp_path / "ingest.yaml"
    file.write_text(f"mqtt_host: from-file\nhttp_port: 9999\nstore_urls: {env['IRONLINK_STORE_URLS']}\n")
    rest = {
        k: v
        for k, v in env.items()
        if k not in ("IRONLINK_MQTT_HOST", "IRONLINK_HTTP_PORT", "IRONLINK_STORE_URLS")
    }
    loaded = WorkerSettings.from_env(
        {**rest, "IRONLINK_SETTINGS_FILE": str(file), "IRONLINK_HTTP_PORT": "9100"}
    )
    assert (loaded.mqtt_host, loaded.http_port) == ("from-file", 9100)
    file.write_text("http_port: [")
    with pytest.raises(SettingsError, match=r"IRONLINK_SETTINGS_FILE: .* is not valid JSON or YAML"):
        WorkerSettings.from_env({**env, "IRONLINK_SETTINGS_FILE": str(file)})


def test_store_tokens_come_from_the_tokens_file_for_every_tenant(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"acme": "token-a", "globex": "token-g", "other": "x"}))
    assert settings(store_tokens_file=tokens).store_tokens() == {"acme": "token-a", "globex": "token-g"}
    tokens.write_text(json.dumps({"acme": "token-a"}))
    with pytest.raises(SettingsError, match="no token for tenant 'globex'"):
        settings(store_tokens_file=tokens).store_tokens()
    with pytest.raises(SettingsError, match="cannot be read"):
        settings(store_tokens_file=tmp_path / "missing.json").store_tokens()
    assert settings().store_tokens() == {}, "no file: no tokens (VictoriaMetrics needs none)"


def test_the_ts_bounds_come_from_the_stack_and_the_quota_share_from_the_deployment() -> None:
    config = platform(
        ingest={"max_clock_skew_s": 60},
        influxdb={"retention_tiers": {"basic": {"raw": "7d", "downsampled": "180d", "max_age": "2d"}}},
    )
    subject = worker_settings_for(config, mqtt_host="b", mqtt_port=8883, store_urls=URLS)
    assert subject.max_clock_skew_s == 60
    assert {tenant: route.max_age_s for tenant, route in subject.tenants.items()} == {
        "acme": 2 * 86_400,
        "globex": 2 * 86_400,
    }
    assert settings().tenants["acme"].max_age_s == 7 * 86_400, "default: the tier's raw retention"
    assert settings().quota_share_replicas == 1, "one replica unless the deployment says how many share"
    shared = settings(quota_share_replicas=3)
    assert WorkerSettings.from_env(shared.to_env()).quota_share_replicas == 3


def test_bad_bounds_and_shares_are_named() -> None:
    env = settings().to_env()
    env.update(IRONLINK_QUOTA_SHARE_REPLICAS="0", IRONLINK_MAX_CLOCK_SKEW_S="-1", IRONLINK_QUOTA_BURST_S="x")
    with pytest.raises(SettingsError) as caught:
        WorkerSettings.from_env(env)
    text = str(caught.value)
    assert "IRONLINK_QUOTA_SHARE_REPLICAS: '0' is invalid" in text
    assert "IRONLINK_MAX_CLOCK_SKEW_S: '-1' is invalid" in text
    assert "IRONLINK_QUOTA_BURST_S: 'x' is invalid" in text


def test_a_worker_that_reads_the_registry_needs_no_tenant_and_one_without_it_needs_them() -> None:
    deployed = worker_settings_for(platform(), mqtt_host="broker", mqtt_port=8883, from_registry=True)
    env = deployed.to_env()
    assert not {"IRONLINK_TENANTS", "IRONLINK_STORE_URLS"} & set(env), "a platform stack lists no tenant"
    running = WorkerSettings.from_env({**env, "IRONLINK_REGISTRY_DSN": "host=registry"})
    assert running.tenants == {} and running.store_tokens() == {}
    with pytest.raises(SettingsError) as refused:
        WorkerSettings.from_env(env)
    assert refused.value.problems == [
        "IRONLINK_TENANTS: is required (unless IRONLINK_REGISTRY_DSN is set: tenants then come from it)"
    ]
    with pytest.raises(SettingsError, match=r"store_urls: instance 'influxdb' has no URL"):
        worker_settings_for(platform(), mqtt_host="broker", mqtt_port=8883, store_urls={})


def test_the_static_tenant_directory_is_what_a_registry_route_would_say() -> None:
    """One derivation: the environment's routes and the registry's rows agree field by field."""
    config = platform()
    tokens = {"acme": "token-a", "globex": "token-g"}
    directory = settings().store_routes(tokens)
    for tenant in config.tenants:
        written = tenant_route_for(config, tenant, URLS["influxdb"], tokens[tenant.id])
        # Neither the dead-letter consumer's retention nor the monthly quota (usage metering needs
        # the registry) is the static worker's business.
        unused = {"dead_letter_retention_s": None, "messages_per_month": None}
        assert directory[tenant.id] == written.model_copy(update=unused)
