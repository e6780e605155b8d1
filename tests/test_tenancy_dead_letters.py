"""Dead-letter and replay names: every renderer and service takes them from ``infra/tenancy.py``."""

from __future__ import annotations

import pytest

from infra.config import load_stack
from infra.tenancy import (
    REPLAY_FILTER,
    dead_letter_origin,
    dead_letter_subscription,
    dead_letter_topic,
    original_topic,
    replay_subscription,
    replay_topic,
    telemetry_topic,
)
from ingest.deadletters.settings import dead_letter_settings_for
from registry.access import access_rules

TOPIC = telemetry_topic("acme", "plant-1", "press-01")


def test_a_replay_topic_leads_back_to_the_original_and_nothing_else_does() -> None:
    assert replay_topic(TOPIC) == f"replay/{TOPIC}"
    assert original_topic(replay_topic(TOPIC)) == TOPIC
    assert dead_letter_origin(dead_letter_topic(TOPIC)) == TOPIC
    for other in (TOPIC, dead_letter_topic(TOPIC), "replay", "replay/", "replayed/x", "/replay/x", ""):
        assert original_topic(other) is None, other
    assert dead_letter_origin(replay_topic(TOPIC)) is None


def test_the_worker_subscribes_to_replayed_telemetry_only() -> None:
    assert REPLAY_FILTER == "replay/ironlink/+/+/+/telemetry"
    assert original_topic(REPLAY_FILTER) == "ironlink/+/+/+/telemetry"


@pytest.mark.parametrize(
    ("stack", "replay", "dead_letters"),
    [
        ("dev", "replay/ironlink/+/+/+/telemetry", "dlq/#"),
        ("mvp-eu", "$share/ingest/replay/ironlink/+/+/+/telemetry", "$share/deadletters/dlq/#"),
    ],
)
def test_subscriptions_are_shared_on_emqx_and_plain_on_mosquitto(
    stack: str, replay: str, dead_letters: str
) -> None:
    config = load_stack(stack)
    assert replay_subscription(config) == replay
    assert dead_letter_subscription(config) == dead_letters


def test_only_the_consumer_reads_dlq_and_writes_replay_and_the_worker_reads_replay() -> None:
    rules = {(rule.username, rule.action, rule.topic) for rule in access_rules(load_stack("dev"))}
    assert {user for user, action, topic in rules if topic == "replay/#" and action == "publish"} == {
        "svc.deadletters"
    }
    assert {user for user, action, topic in rules if topic == "replay/#" and action == "subscribe"} == {
        "svc.ingest"
    }
    assert {user for user, action, topic in rules if topic == "dlq/#"} == {"svc.deadletters", "svc.ingest"}
    assert ("svc.ingest", "publish", "dlq/#") in rules and ("svc.deadletters", "subscribe", "dlq/#") in rules


def test_each_tenant_keeps_dead_letters_as_long_as_its_tier_says() -> None:
    config = load_stack("dev")
    settings = dead_letter_settings_for(config, mqtt_host="broker", mqtt_port=8883)
    assert settings.retention_s == {"acme": 7 * 86_400, "globex": 30 * 86_400}  # basic, standard: raw
    assert "IRONLINK_DLQ_REGISTRY_DSN" not in settings.to_env()
    assert settings.to_env()["IRONLINK_DLQ_RETENTION_S"] == '{"acme":604800,"globex":2592000}'
