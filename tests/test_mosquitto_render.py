"""The rendered Mosquitto files say what the hardening promises (the attack suite proves it live)."""

from __future__ import annotations

import pytest

from components.render.mosquitto import (
    BrokerAccount,
    MosquittoPaths,
    device_accounts,
    packet_size_bytes,
    render_acl_file,
    render_mosquitto_conf,
    render_password_file,
)
from registry.credentials import hash_password, verify_password
from tests.fixtures.registry import platform

PATHS = MosquittoPaths(
    cafile="/tls/ca.pem",
    certfile="/tls/server.pem",
    keyfile="/tls/server.key",
    password_file="/etc/mosquitto/passwd",
    acl_file="/etc/mosquitto/acl",
    persistence_dir="/var/lib/mosquitto",
)


def _listeners(conf: str) -> dict[str, list[str]]:
    """Settings per listener, keyed by the ``listener`` line; global settings under ``""``."""
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in conf.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("listener "):
            current = line
            sections[current] = []
        else:
            sections[current].append(line)
    return sections


def _acl_blocks(acl: str) -> dict[str, set[str]]:
    blocks: dict[str, set[str]] = {}
    user = None
    for line in acl.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("user "):
            user = line.split(" ", 1)[1]
            blocks[user] = set()
        else:
            assert user is not None, f"ACL line {line!r} precedes every user block: it would apply to anyone"
            blocks[user].add(line)
    return blocks


def test_default_phase_a_broker_is_tls_only_without_anonymous_access() -> None:
    conf = render_mosquitto_conf(platform().config, PATHS, tls_port=8883, bind_address="0.0.0.0")
    sections = _listeners(conf)
    assert list(sections) == ["", "listener 8883 0.0.0.0"], "only the TLS listener may exist"
    assert {
        "per_listener_settings false",
        "allow_anonymous false",
        "password_file /etc/mosquitto/passwd",
        "acl_file /etc/mosquitto/acl",
        "persistence true",
        "persistence_location /var/lib/mosquitto",
        "max_packet_size 262144",
    } <= set(sections[""])
    assert "sys_interval 0" not in conf
    tls = sections["listener 8883 0.0.0.0"]
    assert {"cafile /tls/ca.pem", "certfile /tls/server.pem", "keyfile /tls/server.key"} <= set(tls)
    assert {"require_certificate false", "use_username_as_clientid true", "tls_version tlsv1.2"} <= set(tls)
    assert "use_identity_as_username true" not in conf


def test_plaintext_listener_only_where_the_stack_allows_it() -> None:
    conf = render_mosquitto_conf(
        platform({"broker": {"allow_plaintext": True}}).config, PATHS, tls_port=18883, plaintext_port=11883
    )
    sections = _listeners(conf)
    assert list(sections) == ["", "listener 18883", "listener 11883"]
    plain = sections["listener 11883"]
    assert "use_username_as_clientid true" in plain
    assert not any(line.startswith(("cafile", "certfile")) for line in plain)
    assert "allow_anonymous false" in sections[""], "plaintext still needs a password"


def test_mtls_requires_a_certificate_and_takes_the_cn_as_identity() -> None:
    conf = render_mosquitto_conf(platform({"broker": {"tls": "mtls"}}).config, PATHS)
    tls = _listeners(conf)["listener 8883"]
    assert {
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
    } <= set(tls)


def test_broker_saves_its_queue_every_hundred_changes_not_every_thirty_seconds() -> None:
    """A SIGKILL loses what changed since the last save: bounded in messages, not in seconds
    (tests/test_durability.py kills a real broker to measure it)."""
    settings = _listeners(render_mosquitto_conf(platform().config, PATHS))[""]
    assert {"autosave_on_changes true", "autosave_interval 100"} <= set(settings)
    assert settings.index("autosave_on_changes true") < settings.index("autosave_interval 100")


def test_session_queue_is_sized_for_a_store_outage_not_the_default_1000() -> None:
    assert "max_queued_messages 200000" in render_mosquitto_conf(platform().config, PATHS).splitlines()
    conf = render_mosquitto_conf(platform({"broker": {"max_queued_messages": 5000}}).config, PATHS)
    assert "max_queued_messages 5000" in conf.splitlines()


def test_packet_size_comes_from_the_config_limits() -> None:
    conf = render_mosquitto_conf(platform({"broker": {"limits": {"max_packet_size": "1MB"}}}).config, PATHS)
    assert "max_packet_size 1048576" in conf.splitlines()
    assert packet_size_bytes("512") == 512
    with pytest.raises(ValueError, match=r"max_packet_size: '12GB'"):
        packet_size_bytes("12GB")


def test_acl_gives_each_identity_only_its_own_topics() -> None:
    blocks = _acl_blocks(render_acl_file(platform().config, platform().fleet))
    assert blocks == {
        "svc.ingest": {
            "topic read ironlink/+/+/+/telemetry",
            "topic read replay/#",
            "topic write dlq/#",
            "topic write ironlink/+/+/+/receipts",
            "topic write drain/#",
            "topic read drain/#",
        },
        "svc.deadletters": {"topic read dlq/#", "topic write replay/#"},
        "acme.plant-1.press-01": {
            "topic write ironlink/acme/plant-1/press-01/telemetry",
            "topic read ironlink/acme/plant-1/press-01/receipts",
        },
        "acme.plant-1.press-02": {
            "topic write ironlink/acme/plant-1/press-02/telemetry",
            "topic read ironlink/acme/plant-1/press-02/receipts",
        },
        "svc.acme": {"topic read ironlink/acme/#", "topic read dlq/ironlink/acme/#"},
        "globex.line-a.molder-01": {
            "topic write ironlink/globex/line-a/molder-01/telemetry",
            "topic read ironlink/globex/line-a/molder-01/receipts",
        },
        "svc.globex": {"topic read ironlink/globex/#", "topic read dlq/ironlink/globex/#"},
    }
    assert "$SYS" not in render_acl_file(platform().config)


def test_password_file_holds_every_device_credential_of_the_stack() -> None:
    fixture = platform()
    text = render_password_file(device_accounts(fixture.fleet))
    entries = dict(line.split(":", 1) for line in text.splitlines())
    assert set(entries) == {"acme.plant-1.press-01", "acme.plant-1.press-02", "globex.line-a.molder-01"}
    for username, hashed in entries.items():
        assert verify_password(fixture.passwords[username], hashed)


def test_password_file_refuses_duplicates_and_unusable_entries() -> None:
    hashed = hash_password("pw")
    with pytest.raises(ValueError, match=r"'svc\.acme' has two password entries"):
        render_password_file([BrokerAccount("svc.acme", hashed), BrokerAccount("svc.acme", hashed)])
    with pytest.raises(ValueError, match="'evil:user'"):
        render_password_file([BrokerAccount("evil:user", hashed)])
    with pytest.raises(ValueError, match=r"svc.acme.password_hash"):
        render_password_file([BrokerAccount("svc.acme", "plaintext")])
