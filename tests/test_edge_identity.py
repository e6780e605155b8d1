"""The running agent enrolls its machines itself, against the real provisioning service and the
real broker (``tests/fixtures/edge/gateway.py``): it claims at start with a key it generated, its
sessions connect on the certificate listener with what it got, and their readings are stored; it
renews before expiry while running and reconnects with the new certificate; a refused claim is
reported in one line and in ``status``, the readings wait on disk, and a replaced token is picked
up without a restart. One platform for the module; each test has a gateway of its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from edge.config import parse_config
from edge.identity import Enrollment, finish_renewal, identities
from infra.tenancy import telemetry_topic
from localdev import servers
from tests.fixtures.edge.gateway import TENANT, WAIT, EnrollingPlatform, Gateway, platform_fixture, wait_for
from tests.provisioning_platform import SITE

pytestmark = [pytest.mark.integration, pytest.mark.slow]


platform = platform_fixture("edge-identity")


@pytest.fixture
def new_gateway(platform: EnrollingPlatform) -> Iterator[Callable[[str, list[str]], Gateway]]:
    made: list[Gateway] = []

    def make(gateway_id: str, machines: list[str]) -> Gateway:
        gateway = Gateway(platform, platform.platform.folder / gateway_id, gateway_id, machines)
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        gateway.stop()


def _identity(gateway: Gateway, machine: str) -> dict[str, object]:
    return dict(gateway.health().get("identity", {}).get(machine, {}))


def _certificate(gateway: Gateway, machine: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((gateway.identity_dir / f"{machine}.pem").read_bytes())


def _stored_after_push(gateway: Gateway, machine: str, what: str) -> None:
    ts = time.time()
    assert gateway.push(machine, ts) == 202
    wait_for(lambda: round(ts * 1000) in gateway.stored(machine), WAIT, what)


def test_the_agent_claims_at_start_connects_with_its_certificates_and_its_readings_are_stored(
    platform: EnrollingPlatform, new_gateway: Callable[[str, list[str]], Gateway]
) -> None:
    gateway = new_gateway("gw-claim", ["press-c1", "press-c2"])
    gateway.token_file.write_text(platform.claim_token(count=2))
    started = time.monotonic()
    gateway.start()
    for machine in ("press-c1", "press-c2"):
        wait_for(lambda m=machine: _identity(gateway, m).get("state") == "valid", WAIT, f"{machine} claimed")
        cert = _certificate(gateway, machine)
        common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert common_name == gateway.username(machine)
        key_file = gateway.identity_dir / f"{machine}.key"
        assert key_file.stat().st_mode & 0o077 == 0, "the key is readable by others"
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        assert cert.public_key() == key.public_key(), "the certificate is not for the gateway's own key"
    # The certificate listener admits nobody without a certificate its issuing CA signed.
    wait_for(
        lambda: all(gateway.health()["uplink"][m]["state"] == "connected" for m in ("press-c1", "press-c2")),
        WAIT,
        "both sessions connected with their certificates",
    )
    for machine in ("press-c1", "press-c2"):
        _stored_after_push(gateway, machine, f"{machine}'s reading stored")
    print(
        f"agent start → claimed, connected, each machine's reading stored: {time.monotonic() - started:.2f} s"
    )
    # Receipts come on each machine's own receipts topic, which only its identity may read.
    wait_for(lambda: gateway.health()["backlog"]["messages"] <= 2, WAIT, "receipts: the readings forgotten")
    health = gateway.health()
    assert health["confirmed"] >= 2 and not health["drops"], health
    assert all(state["claimed"] == 1 for state in health["identity"].values())

    gateway.stop()
    # What the agent was given publishes to its machine's topic only: the broker refuses the rest.
    # (One session per identity: the broker takes the client id from it, so the agent is stopped.)
    own = gateway.identity_dir / "press-c1.pem", gateway.identity_dir / "press-c1.key"
    session = platform.platform.connect(gateway.username("press-c1"), cert=own)
    assert session is not None
    assert session.publish(telemetry_topic(TENANT, SITE, "press-c2"), b"{}") == "Not authorized"
    session.close()

    gateway.start()  # a restart finds its identities on disk: no claim (the token's uses are spent)
    wait_for(lambda: _identity(gateway, "press-c1").get("state") == "valid", WAIT, "identity found again")
    assert _identity(gateway, "press-c1")["claimed"] == 0
    _stored_after_push(gateway, "press-c1", "a reading after the restart stored")


def test_the_running_agent_renews_before_expiry_and_reconnects_with_the_new_certificate(
    platform: EnrollingPlatform, new_gateway: Callable[[str, list[str]], Gateway]
) -> None:
    gateway = new_gateway("gw-renew", ["press-r1"])
    gateway.token_file.write_text(platform.claim_token(count=1))
    # Its window opens long before the service's (90-day certificates, renewal 30 days ahead):
    # the service answers renew_too_early until the certificate is close to its end.
    gateway.config["uplink"]["claim"] |= {"renew_before_days": 365, "check_interval_s": 1}
    gateway.start()
    wait_for(
        lambda: _identity(gateway, "press-r1").get("state") == "renew_pending", WAIT, "renewal refused early"
    )
    assert "renew_too_early" in str(_identity(gateway, "press-r1")["last_error"])
    first = _certificate(gateway, "press-r1")
    _stored_after_push(gateway, "press-r1", "a reading with the first certificate stored")
    reconnects = gateway.health()["uplink"]["press-r1"]["reconnects"]

    with psycopg.connect(platform.platform.dsn, autocommit=True) as conn:  # five days left
        conn.execute(
            "UPDATE device_certificates SET not_after = now() + interval '5 days' WHERE serial = %s",
            (format(first.serial_number, "x"),),
        )
    wait_for(lambda: _identity(gateway, "press-r1").get("renewed") == 1, WAIT, "renewed")
    renewed = _certificate(gateway, "press-r1")
    assert renewed.serial_number != first.serial_number
    assert renewed.public_key() != first.public_key(), "a renewal is a new key"
    key = serialization.load_pem_private_key(
        (gateway.identity_dir / "press-r1.key").read_bytes(), password=None
    )
    assert renewed.public_key() == key.public_key()
    wait_for(
        lambda: (
            (link := gateway.health()["uplink"]["press-r1"])["reconnects"] > reconnects
            and link["state"] == "connected"
        ),
        WAIT,
        "the session reconnected with the new certificate",
    )
    _stored_after_push(gateway, "press-r1", "a reading with the renewed certificate stored")


def test_a_refused_claim_is_reported_in_one_line_the_readings_wait_and_a_new_token_is_picked_up(
    platform: EnrollingPlatform, new_gateway: Callable[[str, list[str]], Gateway]
) -> None:
    gateway = new_gateway("gw-refused", ["press-x1"])
    good = platform.claim_token(count=1)
    token_id, _, secret = good.rpartition(".")
    gateway.token_file.write_text(
        f"{token_id}.{'0' * len(secret)}"
    )  # altered: the service knows no such token
    gateway.config["uplink"]["claim"] |= {"check_interval_s": 1}
    gateway.start()
    wait_for(lambda: _identity(gateway, "press-x1").get("state") == "refused", WAIT, "the claim refused")
    assert str(_identity(gateway, "press-x1")["last_error"]).startswith("claim_token_unknown: ")
    ts = time.time()
    assert gateway.push("press-x1", ts) == 202, "a machine without identity yet still has its readings taken"
    wait_for(lambda: gateway.health()["backlog"]["messages"] >= 1, WAIT, "the reading waiting on disk")

    log = gateway.log.read_text()
    assert "error: press-x1: enrollment refused: claim_token_unknown: " in log
    assert log.count("enrollment refused") == 1, "the same refusal is reported once, not at every retry"
    assert "Traceback" not in log
    listed = gateway.cli("status")
    assert "refused" in listed.stdout and "claim_token_unknown" in listed.stdout, listed.stdout
    enrolled = gateway.cli("enroll")
    assert enrolled.returncode == 2 and "error: press-x1: claim_token_unknown: " in enrolled.stderr
    assert "Traceback" not in enrolled.stderr

    gateway.token_file.write_text(good)  # the operator replaces the token; no restart
    wait_for(
        lambda: _identity(gateway, "press-x1").get("state") == "valid", WAIT, "claimed with the new token"
    )
    wait_for(lambda: round(ts * 1000) in gateway.stored("press-x1"), WAIT, "the waiting reading stored")


def test_a_certificate_for_another_site_is_reported_and_never_used(
    platform: EnrollingPlatform, new_gateway: Callable[[str, list[str]], Gateway]
) -> None:
    """A token of another site gives a certificate the broker would never let publish here."""
    added = platform.platform.post("/v1/tenants/acme/sites", {"id": "plant-9"})
    assert added.status_code == 201, added.text
    gateway = new_gateway("gw-elsewhere", ["press-e1"])
    elsewhere = platform.platform.claim_token("acme", site_id="plant-9", machine_type=None, count=1)
    gateway.token_file.write_text(str(elsewhere["token"]))
    gateway.start()
    wait_for(lambda: _identity(gateway, "press-e1").get("state") == "refused", WAIT, "the claim reported")
    error = str(_identity(gateway, "press-e1")["last_error"])
    assert error.startswith("identity_mismatch: the certificate is for 'acme.plant-9.press-e1'"), error
    assert not (gateway.identity_dir / "press-e1.pem").exists(), "a certificate of another site was kept"


def test_an_unreachable_service_is_retried_with_backoff_and_reported(tmp_path: Path) -> None:
    """Nothing listens on the claim API's port (a real refused connection): retried soon, not refused."""
    (tmp_path / "token").write_text("ilk-claim.0123456789abcdef.secret")
    config = parse_config(
        {
            "gateway": {"id": "gw-1", "tenant": "acme", "site": "plant-1"},
            "uplink": {
                "host": "127.0.0.1",
                "identity_dir": str(tmp_path / "identity"),
                "claim": {
                    "api": f"http://127.0.0.1:{servers.free_port()}",
                    "token_file": str(tmp_path / "token"),
                },
            },
            "store": {"path": str(tmp_path / "store.db")},
            "machines": [
                {"id": "press-01", "type": "hydraulic_press", "adapter": {"kind": "http", "port": 8080}}
            ],
        }
    )
    reconnected: list[str] = []
    enrollment = Enrollment(config, reconnected.append)
    delays = [asyncio.run(enrollment.maintain(identities(config)[0])) for _ in range(3)]
    state = enrollment.health()["identity"]["press-01"]
    assert state["state"] == "retrying" and state["last_error"].startswith("unreachable: "), state
    assert config.uplink.claim is not None
    assert all(0 < delay <= 60 < config.uplink.claim.check_interval_s for delay in delays), delays
    assert not reconnected
    assert (tmp_path / "identity" / "press-01.key").stat().st_mode & 0o777 == 0o600, (
        "the key kept for the retry"
    )


@pytest.mark.parametrize(
    ("left", "expected"),
    [
        ({"key.new": b"new key", "pem.new": b"new cert"}, {"key": b"new key", "pem": b"new cert"}),
        ({"pem.new": b"new cert"}, {"key": b"new key", "pem": b"new cert"}),  # the key was renamed already
        ({"key.new": b"new key"}, {"key": b"old key", "pem": b"old cert"}),  # the answer was never kept
    ],
)
def test_a_renewal_cut_short_by_a_crash_leaves_a_matching_pair(
    tmp_path: Path, left: dict[str, bytes], expected: dict[str, bytes]
) -> None:
    (tmp_path / "m.key").write_bytes(b"new key" if "key.new" not in left else b"old key")
    (tmp_path / "m.pem").write_bytes(b"old cert")
    for suffix, data in left.items():
        (tmp_path / f"m.{suffix}").write_bytes(data)
    finish_renewal(tmp_path, "m")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {f"m.{k}": v for k, v in expected.items()}
