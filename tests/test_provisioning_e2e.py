"""Issue 9's "done when", end to end: real PostgreSQL, the provisioning API over HTTP, Mosquitto
with dynamic security and an mTLS listener, the worker reading its fleet from the registry, and
VictoriaMetrics (``tests/provisioning_platform.py``). One platform for the module, never
restarted: every device appears, publishes and is revoked while everything runs; each test uses
machines of its own. Waits are bounded by the issue's 10 s; the times are printed, not asserted.
"""

from __future__ import annotations

import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from infra.tenancy import device_username, telemetry_topic
from localdev import pki
from tests.conftest import PostgresCluster
from tests.provisioning_platform import SITE, ProvisioningPlatform, reading, running
from tests.test_provisioning import key_and_csr

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BOUND_S = 10.0  # the issue's bound: stored within 10 s of the claim; disconnected within 10 s


@pytest.fixture(scope="module")
def e2e(server_root: Path, postgres_cluster: PostgresCluster) -> Iterator[ProvisioningPlatform]:
    folder = server_root / f"prov-e2e-{uuid.uuid4().hex[:8]}"
    with running(folder, postgres_cluster.new_database()) as platform:
        worker = platform.worker.process
        yield platform
        assert platform.worker.alive() and platform.worker.process is worker, "the worker restarted"


def _common_name(pem: str) -> str:
    cert = x509.load_pem_x509_certificate(pem.encode())
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _manual_password_device(e2e: ProvisioningPlatform, tenant: str, machine_id: str) -> tuple[str, str]:
    """An operator adds a machine and enrolls its device by hand: ``(username, password)``."""
    added = e2e.post(
        f"/v1/tenants/{tenant}/machines", {"site_id": SITE, "id": machine_id, "type": "hydraulic_press"}
    )
    assert added.status_code == 201, added.text
    enrolled = e2e.post(f"/v1/tenants/{tenant}/devices", {"site_id": SITE, "machine_id": machine_id})
    assert enrolled.status_code == 201, enrolled.text
    assert enrolled.json()["method"] == "password"
    return str(enrolled.json()["username"]), str(enrolled.json()["password"])


def _claimed_certificate_device(
    e2e: ProvisioningPlatform, machine_id: str
) -> tuple[str, tuple[Path, Path], float]:
    """A device claims with a token and its own CSR: ``(username, its files, when it claimed)``."""
    token = e2e.claim_token("acme")
    claimed_at = time.monotonic()
    answer, files = e2e.claim(token["token"], machine_id)
    assert answer.status_code == 201, answer.text
    username = device_username("acme", SITE, machine_id)
    assert answer.json()["method"] == "certificate" and _common_name(answer.json()["certificate"]) == username
    return username, files, claimed_at


# ------------------------------------------------------------------------ 1, 2: claim to stored
def test_a_device_claimed_with_its_own_csr_connects_with_its_certificate_and_is_stored_within_10_s(
    e2e: ProvisioningPlatform,
) -> None:
    username, files, claimed_at = _claimed_certificate_device(e2e, "mill-claimed")
    device = e2e.connect(username, cert=files)
    assert device is not None, "the issued certificate was refused on the certificate listener"
    stored_at = e2e.publish_until_stored(
        device, ("acme", SITE, "mill-claimed"), "cnc_mill", claimed_at + BOUND_S
    )
    assert stored_at is not None, f"nothing stored within {BOUND_S} s of the claim"
    print(f"claim → first stored point: {stored_at - claimed_at:.2f} s")


def test_a_manually_added_password_device_is_stored_within_10_s(e2e: ProvisioningPlatform) -> None:
    added_at = time.monotonic()
    username, password = _manual_password_device(e2e, "acme", "press-manual")
    device = e2e.connect(username, password=password)
    assert device is not None, f"{username} refused on the password listener: {device}"
    stored_at = e2e.publish_until_stored(
        device, ("acme", SITE, "press-manual"), "hydraulic_press", added_at + BOUND_S
    )
    assert stored_at is not None, f"nothing stored within {BOUND_S} s of the enrollment"
    print(f"manual enrollment → first stored point: {stored_at - added_at:.2f} s")


# --------------------------------------------------------------------------------- 3: revocation
def test_a_revoked_device_is_disconnected_within_10_s_and_refused_on_its_next_connect(
    e2e: ProvisioningPlatform,
) -> None:
    """The password device is refused by the plugin; the certificate device at the TLS handshake
    (its CRL reached the broker's capath as a new file, nothing restarted), while a certificate of
    the same CA that is not revoked still connects."""
    username, password = _manual_password_device(e2e, "acme", "press-revoked")
    cert_user, files, _ = _claimed_certificate_device(e2e, "mill-revoked")
    kept_user, kept_files, _ = _claimed_certificate_device(e2e, "mill-kept")
    sessions = {
        username: e2e.connect(username, password=password),
        cert_user: e2e.connect(cert_user, cert=files),
    }
    for name, session in sessions.items():
        assert session is not None, f"{name} could not connect before its revocation"
    assert _handshake(e2e, files) is None, "the certificate device's handshake failed before revocation"
    revoked_at: dict[str, float] = {}
    for name, session in sessions.items():
        revoked_at[name] = time.monotonic()
        e2e.revoke("acme", name)
        assert session is not None and session.disconnected.wait(BOUND_S), f"{name} still connected"
        print(f"revoke → {name} disconnected: {time.monotonic() - revoked_at[name]:.3f} s")

    assert e2e.connect(username, password=password) is None, "a revoked password device reconnected"
    refused = None
    while refused is None and time.monotonic() < revoked_at[cert_user] + BOUND_S:
        refused = _handshake(e2e, files)
        time.sleep(0.1)
    assert refused is not None and "revoked" in refused, f"the revoked certificate passed TLS: {refused}"
    print(
        f"revoke → {cert_user} refused at the TLS handshake: {time.monotonic() - revoked_at[cert_user]:.2f} s"
    )
    assert e2e.connect(cert_user, cert=files) is None, "a revoked certificate device connected"
    assert _handshake(e2e, kept_files) is None, "a certificate of the same CA, not revoked, was refused"
    assert e2e.connect(kept_user, cert=kept_files) is not None, "a certificate device not revoked was refused"
    serial = x509.load_pem_x509_certificate(files[0].read_bytes()).serial_number
    assert format(serial, "x") in _revoked_serials(e2e), "the certificate is not on the CRL"


def _handshake(e2e: ProvisioningPlatform, files: tuple[Path, Path]) -> str | None:
    """A bare TLS handshake with the certificate listener: None, or why it failed. Capped at TLS 1.2,
    where the server's verdict on the client certificate is part of the handshake (in 1.3 it comes
    after the client's Finished, as an alert on the first read)."""
    context = ssl.create_default_context(cafile=str(e2e.ca_file))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(*files)
    try:
        with (
            socket.create_connection(("127.0.0.1", e2e.mtls_port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost"),
        ):
            return None
    except ssl.SSLError as error:
        return str(error)


def _revoked_serials(e2e: ProvisioningPlatform) -> set[str]:
    text = e2e.http.get("/v1/crl.pem").text
    end = "-----END X509 CRL-----"
    return {
        format(entry.serial_number, "x")
        for block in text.split(end)
        if block.strip()
        for entry in x509.load_pem_x509_crl((block + end + "\n").strip().encode())
    }


# ------------------------------------------------------------------------------ 4: bad tokens
def test_reused_expired_foreign_and_altered_tokens_are_refused_and_reach_no_broker(
    e2e: ProvisioningPlatform,
) -> None:
    used = e2e.claim_token("acme", count=1)
    first, _ = e2e.claim(used["token"], "mill-first")
    assert first.status_code == 201, first.text
    expired = e2e.claim_token("acme")
    with psycopg.connect(e2e.dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE claim_tokens SET expires_at = now() - interval '1 s' WHERE id = %s", (expired["id"],)
        )
    globex = e2e.claim_token("globex")
    fresh = e2e.claim_token("acme")
    secret = fresh["token"]
    altered = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    cases = {
        "claim_token_used": (used["token"], "mill-reused", {}),
        "claim_token_expired": (expired["token"], "mill-expired", {}),
        "tenant_mismatch": (globex["token"], "mill-foreign", {"tenant_id": "acme"}),
        "claim_token_unknown": (altered, "mill-altered", {}),
    }
    for code, (token, machine_id, extra) in cases.items():
        answer, _ = e2e.claim(token, machine_id, **extra)
        assert (answer.json().get("code"), set(answer.json())) == (code, {"code", "detail"}), answer.text
        for tenant in ("acme", "globex"):
            username = device_username(tenant, SITE, machine_id)
            assert not e2e.broker_knows(username), f"{code}: the broker was told of {username}"
            assert e2e.connect(username, password="guessed") is None, f"{code}: {username} connected"
    with psycopg.connect(e2e.dsn) as conn:
        refused = [f"mill-{name}" for name in ("reused", "expired", "foreign", "altered")]
        rows = conn.execute("SELECT count(*) FROM machines WHERE id = ANY(%s)", (refused,)).fetchone()
        left = conn.execute("SELECT uses_left FROM claim_tokens WHERE id = %s", (fresh["id"],)).fetchone()
    assert rows == (0,), "a refused claim registered a machine"
    assert left == (1,), "an altered token used its original's count"
    assert e2e.broker_knows(device_username("acme", SITE, "mill-first")), (
        "the control case reached the broker"
    )


# -------------------------------------------------------------------- 5: certificates and CAs
def test_the_certificate_listener_trusts_only_the_issuing_ca(e2e: ProvisioningPlatform) -> None:
    """A foreign CA's certificate, and one of the platform CA (which signs the broker and the
    services) naming a password device or another tenant's device, never get past TLS."""
    acme_user, _ = _manual_password_device(e2e, "acme", "press-target")
    globex_user, _ = _manual_password_device(e2e, "globex", "press-target")
    cert_user, files, _ = _claimed_certificate_device(e2e, "mill-owner")
    forgers = {
        "a foreign CA": pki.make_ca("rogue CA"),
        "the platform CA": e2e.platform_ca,
    }
    for what, ca in forgers.items():
        for name in (cert_user, acme_user, globex_user, "svc.ingest"):
            forged = pki.issue_client_cert(ca, name)
            paths = (e2e.folder / f"forged-{uuid.uuid4().hex[:8]}.pem", e2e.folder / "forged.key")
            paths[0].write_bytes(forged.cert_pem)
            paths[1].write_bytes(forged.key_pem)
            assert e2e.connect(name, cert=paths) is None, f"a certificate of {what} for {name} connected"
    genuine = e2e.connect(cert_user, cert=files)
    assert genuine is not None, "the control case: the issued certificate must connect"


def test_the_issuing_ca_signs_no_certificate_naming_another_tenants_or_a_password_device(
    e2e: ProvisioningPlatform,
) -> None:
    """What would get past TLS must come from the service, which names certificates itself."""
    globex_user, _ = _manual_password_device(e2e, "globex", "press-other")
    acme_user, _ = _manual_password_device(e2e, "acme", "press-pw")
    answers = {
        "tenant_mismatch": e2e.post(
            "/v1/tenants/acme/devices",
            {"site_id": SITE, "machine_id": "press-pw", "csr": key_and_csr(globex_user)[1]},
        ),
        "device_exists": e2e.post(
            "/v1/tenants/acme/devices", {"site_id": SITE, "machine_id": "press-pw", "csr": key_and_csr()[1]}
        ),
    }
    token = e2e.claim_token("acme")
    answers["machine_exists"] = e2e.claim(token["token"], "press-pw")[0]
    for code, answer in answers.items():
        assert answer.json().get("code") == code, (code, answer.text)
    assert e2e.broker_knows(acme_user) and e2e.broker_knows(globex_user)


def test_an_issued_certificate_acts_only_as_its_own_device(e2e: ProvisioningPlatform) -> None:
    cert_user, files, _ = _claimed_certificate_device(e2e, "mill-confined")
    device = e2e.connect("globex.plant-1.press-other", cert=files)  # the CN decides, not this name
    assert device is not None
    for tenant, machine in (("globex", "press-target"), ("acme", "press-target")):
        target = (tenant, SITE, machine)
        code = device.publish(telemetry_topic(*target), reading(target, "hydraulic_press", time.time()))
        assert code == "Not authorized", f"{cert_user} published as {target}"


# --------------------------------------------------------------- single use under parallel claims
def test_parallel_claims_of_one_token_register_exactly_its_count(e2e: ProvisioningPlatform) -> None:
    """Claims run side by side (the token's row is locked only for its decrement): 12 devices race
    for 3 uses; 3 are registered, on the broker too, and the 9 others are refused and leave nothing."""
    token = e2e.claim_token("acme", count=3)
    machines = [f"mill-race-{i}" for i in range(12)]
    with ThreadPoolExecutor(len(machines)) as pool:
        answers = dict(
            zip(machines, pool.map(lambda m: e2e.claim(token["token"], m)[0], machines), strict=True)
        )
    won = sorted(m for m, answer in answers.items() if answer.status_code == 201)
    codes = {answer.json().get("code") for m, answer in answers.items() if m not in won}
    assert len(won) == 3 and codes == {"claim_token_used"}, {m: a.text[:80] for m, a in answers.items()}
    with psycopg.connect(e2e.dsn) as conn:
        left = conn.execute("SELECT uses_left FROM claim_tokens WHERE id = %s", (token["id"],)).fetchone()
        registered = conn.execute(
            "SELECT id FROM machines WHERE id LIKE 'mill-race-%%' ORDER BY id"
        ).fetchall()
    assert left == (0,) and [row[0] for row in registered] == won
    assert [m for m in machines if e2e.broker_knows(device_username("acme", SITE, m))] == sorted(
        won, key=machines.index
    )
    again = e2e.claim(token["token"], won[0])[0]
    assert again.json().get("code") == "machine_exists", "a new key for a claimed machine"
