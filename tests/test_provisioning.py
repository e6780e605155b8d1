"""The provisioning API against a real PostgreSQL (FastAPI's TestClient, in process).

The broker directory is :class:`RegistryOnly` (EMQX's: the registry is what it reads), wrapped to
record which calls the service made; Mosquitto's dynamic security is tested with its own module.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient

from provisioning.app import create_app, open_provisioner
from provisioning.brokers import RegistryOnly
from provisioning.settings import ProvisioningSettings
from registry import provisioning as reg
from registry.credentials import verify_password
from registry.store import audit_events

pytestmark = pytest.mark.integration


class RecordingDirectory(RegistryOnly):
    """EMQX's directory (it does nothing), remembering each call the service made."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def add_device(self, username: str, password: str | None, **_: str) -> None:
        self.calls.append(("add_device", username))

    def disable(self, username: str) -> None:
        self.calls.append(("disable", username))

    def enable(self, username: str) -> None:
        self.calls.append(("enable", username))

    def remove(self, username: str) -> None:
        self.calls.append(("remove", username))


class Api:
    def __init__(self, client: TestClient, dsn: str, directory: RecordingDirectory, ca_dir: Path) -> None:
        self.client, self.dsn, self.directory, self.ca_dir = client, dsn, directory, ca_dir
        self.platform = self.token(None)

    def token(self, tenant: str | None) -> dict[str, str]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            minted = reg.create_admin_token(
                conn,
                tenant_id=tenant,
                label="test",
                expires_at=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1),
                actor="test",
            )
        return {"Authorization": f"Bearer {minted.plaintext}"}

    def post(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        return self.client.post(path, json=body, headers=self.platform if headers is None else headers)

    def audit(self, tenant: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return [(e.action, e.subject, e.details) for e in audit_events(conn, tenant_id=tenant)]


def _tenants(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for tenant, isolation in (("acme", 1), ("globex", 1), ("initech", 3)):
            conn.execute(
                "INSERT INTO tenants (id, name, tier, isolation) VALUES (%s, %s, 'standard', %s)",
                (tenant, tenant.title(), isolation),
            )
            conn.execute("INSERT INTO sites (tenant_id, id) VALUES (%s, 'plant-1')", (tenant,))


def make_api(dsn: str, ca_dir: Path, **settings: Any) -> Iterator[Api]:
    values = {"registry_dsn": dsn, "ca_dir": ca_dir, "public_url": "https://prov.example.com", **settings}
    directory = RecordingDirectory()
    service = open_provisioner(ProvisioningSettings.model_validate(values), directory=directory)
    _tenants(dsn)
    with TestClient(create_app(service)) as client:
        yield Api(client, dsn, directory, ca_dir)


@pytest.fixture
def api(postgres_dsn: str, tmp_path: Path) -> Iterator[Api]:
    yield from make_api(postgres_dsn, tmp_path / "ca")


def key_and_csr(common_name: str | None = None) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else [])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def claim_token(api: Api, tenant: str = "acme", **body: Any) -> dict[str, Any]:
    answer = api.post(
        f"/v1/tenants/{tenant}/claim-tokens",
        {"site_id": "plant-1", "machine_type": "cnc_mill", "count": 2, "expires_in_hours": 1, **body},
    )
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


# --------------------------------------------------------------------------------- admin scopes
def test_a_tenant_token_reaches_only_its_own_tenant(api: Api) -> None:
    acme = api.token("acme")
    assert api.client.get("/v1/tenants/acme/machines", headers=acme).status_code == 200
    refused = api.client.get("/v1/tenants/globex/machines", headers=acme)
    assert refused.status_code == 403 and refused.json()["code"] == "tenant_mismatch"
    minted = api.post("/v1/admin-tokens", {"label": "x", "expires_in_days": 1}, headers=acme)
    assert minted.status_code == 403 and minted.json()["code"] == "tenant_mismatch"
    for headers in ({}, {"Authorization": "Bearer ilk-admin.0123456789abcdef.nope"}):
        answer = api.client.get("/v1/tenants/acme/machines", headers=headers)
        assert answer.status_code == 401 and answer.json()["code"] == "unauthorized"


def test_a_revoked_admin_token_is_refused_and_both_steps_are_audited(api: Api) -> None:
    created = api.post("/v1/admin-tokens", {"label": "ops", "tenant_id": "acme", "expires_in_days": 30})
    assert created.status_code == 201
    token = {"Authorization": f"Bearer {created.json()['token']}"}
    assert api.client.get("/v1/tenants/acme/sites", headers=token).status_code == 200
    revoked = api.client.post(f"/v1/admin-tokens/{created.json()['id']}/revoke", headers=api.platform)
    assert revoked.status_code == 204
    assert api.client.get("/v1/tenants/acme/sites", headers=token).json()["code"] == "unauthorized"
    actions = [action for action, subject, _ in api.audit("acme") if subject == created.json()["id"]]
    assert actions == ["admin_token.created", "admin_token.revoked"]
    with psycopg.connect(api.dsn) as conn:
        (stored,) = conn.execute(
            "SELECT secret_sha256 FROM admin_tokens WHERE id = %s", (created.json()["id"],)
        ).fetchone()  # type: ignore[misc]
    assert created.json()["token"].encode() not in bytes(stored)


# ------------------------------------------------------------------------------- fleet at runtime
def test_machines_are_added_moved_disabled_and_removed_at_runtime_with_an_audit_trail(api: Api) -> None:
    assert api.post("/v1/tenants/acme/sites", {"id": "plant-2", "name": "Plant 2"}).status_code == 201
    assert (
        api.post(
            "/v1/tenants/acme/machines", {"site_id": "plant-1", "id": "press-01", "type": "hydraulic_press"}
        ).status_code
        == 201
    )
    again = api.post(
        "/v1/tenants/acme/machines", {"site_id": "plant-1", "id": "press-01", "type": "hydraulic_press"}
    )
    assert again.status_code == 409 and again.json()["code"] == "machine_exists"
    enrolled = api.post("/v1/tenants/acme/devices", {"site_id": "plant-1", "machine_id": "press-01"})
    assert enrolled.status_code == 201
    path = "/v1/tenants/acme/machines/plant-1/press-01"
    disabled = api.client.patch(path, json={"disabled": True}, headers=api.platform)
    assert disabled.json()["machine"]["disabled"] is True
    moved = api.client.patch(path, json={"site_id": "plant-2"}, headers=api.platform)
    assert moved.json()["device_removed"] == "acme.plant-1.press-01"
    assert moved.json()["machine"]["site_id"] == "plant-2"
    removed = api.client.delete("/v1/tenants/acme/machines/plant-2/press-01", headers=api.platform)
    assert removed.status_code == 200
    assert api.client.get("/v1/tenants/acme/machines", headers=api.platform).json() == []
    assert api.directory.calls == [
        ("add_device", "acme.plant-1.press-01"),
        ("disable", "acme.plant-1.press-01"),
        ("remove", "acme.plant-1.press-01"),
    ]
    actions = [action for action, _, _ in api.audit("acme")]
    for action in (
        "site.added",
        "machine.added",
        "device.enrolled",
        "machine.disabled",
        "machine.moved",
        "machine.removed",
    ):
        assert action in actions


def test_bad_ids_are_refused_with_422_naming_the_field(api: Api) -> None:
    answer = api.post("/v1/tenants/acme/machines", {"site_id": "Plant 1", "id": "x" * 49, "type": "toaster"})
    assert answer.status_code == 422
    fields = {tuple(error["loc"]) for error in answer.json()["detail"]}
    assert fields == {("body", "site_id"), ("body", "id"), ("body", "type")}
    too_big = api.post("/v1/claim", {"token": "t", "machine_id": "m-1", "csr": "A" * 9000})
    assert too_big.status_code == 422 and too_big.json()["detail"][0]["loc"] == ["body", "csr"]


# ---------------------------------------------------------------------------- manual enrollment
def test_manual_password_enrollment_stores_only_the_hash(api: Api) -> None:
    api.post("/v1/tenants/acme/machines", {"site_id": "plant-1", "id": "mill-01", "type": "cnc_mill"})
    answer = api.post("/v1/tenants/acme/devices", {"site_id": "plant-1", "machine_id": "mill-01"})
    assert answer.status_code == 201
    password = answer.json()["password"]
    with psycopg.connect(api.dsn) as conn:
        (credential,) = conn.execute(
            "SELECT credential FROM devices WHERE username = 'acme.plant-1.mill-01'"
        ).fetchone()  # type: ignore[misc]
    assert credential.startswith("$7$101$") and password not in credential
    assert verify_password(password, credential)
    twice = api.post("/v1/tenants/acme/devices", {"site_id": "plant-1", "machine_id": "mill-01"})
    assert twice.status_code == 409 and twice.json()["code"] == "device_exists"


def test_manual_csr_enrollment_signs_a_client_certificate_named_after_the_device(api: Api) -> None:
    api.post("/v1/tenants/acme/machines", {"site_id": "plant-1", "id": "mill-02", "type": "cnc_mill"})
    key, csr = key_and_csr()
    answer = api.post("/v1/tenants/acme/devices", {"site_id": "plant-1", "machine_id": "mill-02", "csr": csr})
    assert answer.status_code == 201, answer.text
    cert = x509.load_pem_x509_certificate(answer.json()["certificate"].encode())
    ca = x509.load_pem_x509_certificate(answer.json()["ca_certificate"].encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "acme.plant-1.mill-02"
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(ca)
    assert 89 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 90
    assert answer.json()["password"] is None


def test_level_3_tenants_get_their_own_issuing_ca(api: Api) -> None:
    certs = {}
    for tenant in ("acme", "initech"):
        api.post(f"/v1/tenants/{tenant}/machines", {"site_id": "plant-1", "id": "m-1", "type": "cnc_mill"})
        answer = api.post(
            f"/v1/tenants/{tenant}/devices",
            {"site_id": "plant-1", "machine_id": "m-1", "csr": key_and_csr()[1]},
        )
        certs[tenant] = answer.json()["ca_certificate"]
    assert certs["acme"] != certs["initech"]
    assert (api.ca_dir / "tenant-initech" / "ca.key").stat().st_mode & 0o777 == 0o600


def test_a_csr_naming_another_tenants_device_is_refused(api: Api) -> None:
    api.post("/v1/tenants/acme/machines", {"site_id": "plant-1", "id": "m-1", "type": "cnc_mill"})
    for common_name, code in (("globex.plant-1.m-1", "tenant_mismatch"), ("acme.plant-1.m-2", "csr_invalid")):
        body = {"site_id": "plant-1", "machine_id": "m-1", "csr": key_and_csr(common_name)[1]}
        answer = api.post("/v1/tenants/acme/devices", body)
        assert (answer.status_code, answer.json()["code"]) == (
            403 if code == "tenant_mismatch" else 400,
            code,
        )
    garbage = api.post(
        "/v1/tenants/acme/devices",
        {
            "site_id": "plant-1",
            "machine_id": "m-1",
            "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        },
    )
    assert garbage.json()["code"] == "csr_invalid"


# ------------------------------------------------------------------------------------ revocation
def test_revocation_sets_the_flag_lists_the_certificate_on_the_crl_and_tells_the_directory(api: Api) -> None:
    api.post("/v1/tenants/acme/machines", {"site_id": "plant-1", "id": "m-1", "type": "cnc_mill"})
    answer = api.post(
        "/v1/tenants/acme/devices", {"site_id": "plant-1", "machine_id": "m-1", "csr": key_and_csr()[1]}
    )
    serial = x509.load_pem_x509_certificate(answer.json()["certificate"].encode()).serial_number
    other = api.client.post("/v1/tenants/acme/devices/acme.plant-1.m-1/revoke", headers=api.token("globex"))
    assert other.json()["code"] == "tenant_mismatch"
    assert (
        api.client.post("/v1/tenants/acme/devices/acme.plant-1.m-1/revoke", headers=api.platform).status_code
        == 204
    )
    with psycopg.connect(api.dsn) as conn:
        row = conn.execute("SELECT revoked_at FROM devices WHERE username = 'acme.plant-1.m-1'").fetchone()
        users = conn.execute("SELECT count(*) FROM mqtt_users WHERE username = 'acme.plant-1.m-1'").fetchone()
    assert row is not None and row[0] is not None and users == (0,)
    assert api.directory.calls[-1] == ("disable", "acme.plant-1.m-1")
    crls = api.client.get("/v1/crl.pem").text
    revoked = {
        entry.serial_number
        for block in crls.split("-----END X509 CRL-----")
        if block.strip()
        for entry in x509.load_pem_x509_crl((block + "-----END X509 CRL-----\n").strip().encode())
    }
    assert serial in revoked
    assert "device.revoked" in [action for action, _, _ in api.audit("acme")]


# ------------------------------------------------------------------------------------------ claims
def test_a_device_claims_with_its_own_csr_and_resumes_with_the_same_key(api: Api) -> None:
    token = claim_token(api)
    payload = json.loads(token["qr_payload"])
    assert payload == {"v": 1, "endpoint": "https://prov.example.com/v1/claim", "token": token["token"]}
    _, csr = key_and_csr()
    first = api.client.post("/v1/claim", json={"token": token["token"], "machine_id": "mill-07", "csr": csr})
    assert first.status_code == 201, first.text
    again = api.client.post("/v1/claim", json={"token": token["token"], "machine_id": "mill-07", "csr": csr})
    assert again.status_code == 200 and again.json()["certificate"] == first.json()["certificate"]
    stolen = api.client.post(
        "/v1/claim", json={"token": token["token"], "machine_id": "mill-07", "csr": key_and_csr()[1]}
    )
    assert stolen.json()["code"] == "machine_exists"
    listed = api.client.get("/v1/tenants/acme/claim-tokens", headers=api.platform).json()
    assert [(t["id"], t["remaining"]) for t in listed] == [(token["id"], 1)]
    machines = api.client.get("/v1/tenants/acme/machines", headers=api.platform).json()
    assert machines == [
        {
            "site_id": "plant-1",
            "id": "mill-07",
            "type": "cnc_mill",
            "disabled": False,
            "device": "acme.plant-1.mill-07",
        }
    ]
    assert api.directory.calls == [("add_device", "acme.plant-1.mill-07")] * 2
    actions = [(action, details.get("code")) for action, _, details in api.audit("acme")]
    assert ("device.claimed", "ok") in actions and ("device.claim_resumed", "ok") in actions
    assert ("claim.refused", "machine_exists") in actions
    metrics = api.client.get("/metrics").text
    assert 'ironlink_provisioning_claims_total{outcome="ok"} 1.0' in metrics
    assert 'ironlink_provisioning_devices_provisioned_total{method="claim_certificate"} 1.0' in metrics


def test_a_device_without_tls_client_auth_claims_a_password(api: Api) -> None:
    token = claim_token(api, machine_type=None)
    answer = api.client.post(
        "/v1/claim", json={"token": token["token"], "machine_id": "rpi-1", "machine_type": "cnc_mill"}
    )
    assert answer.status_code == 201 and answer.json()["method"] == "password"


def test_each_bad_claim_is_refused_with_its_code_and_audited(api: Api) -> None:
    token = claim_token(api, count=1)
    api.client.post("/v1/claim", json={"token": token["token"], "machine_id": "m-1", "csr": key_and_csr()[1]})
    expired = claim_token(api)
    with psycopg.connect(api.dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE claim_tokens SET expires_at = now() - interval '1 second' WHERE id = %s", (expired["id"],)
        )
    altered = token["token"][:-2] + ("AA" if not token["token"].endswith("AA") else "BB")
    globex = claim_token(api, tenant="globex")
    cases = {
        "claim_token_used": {"token": token["token"], "machine_id": "m-2"},
        "claim_token_expired": {"token": expired["token"], "machine_id": "m-3"},
        "claim_token_unknown": {"token": altered, "machine_id": "m-4"},
        "tenant_mismatch": {"token": globex["token"], "machine_id": "m-5", "tenant_id": "acme"},
        "machine_type_mismatch": {
            "token": globex["token"],
            "machine_id": "m-6",
            "machine_type": "hydraulic_press",
        },
    }
    for code, body in cases.items():
        answer = api.client.post("/v1/claim", json={**body, "csr": key_and_csr()[1]})
        assert answer.json()["code"] == code, (code, answer.text)
        assert set(answer.json()) == {"code", "detail"}
    refused = [details["code"] for action, _, details in api.audit() if action == "claim.refused"]
    assert sorted(refused) == sorted(cases)


def test_claims_beyond_the_rate_are_answered_429(postgres_dsn: str, tmp_path: Path) -> None:
    for api in make_api(postgres_dsn, tmp_path / "ca", claim_rate_per_source=0.001, claim_burst_per_source=2):
        token = claim_token(api)
        codes = [
            api.client.post("/v1/claim", json={"token": token["token"], "machine_id": f"m-{i}"}).status_code
            for i in range(4)
        ]
        assert codes == [201, 201, 429, 429]
        last = api.client.post("/v1/claim", json={"token": token["token"], "machine_id": "m-9"})
        assert last.json()["code"] == "rate_limited" and int(last.headers["Retry-After"]) >= 1
        audited = [d["code"] for action, _, d in api.audit() if action == "claim.refused"]
        assert audited == ["rate_limited"]  # the first refusal of the flood, not each one


def test_the_qr_code_needs_the_token_itself(api: Api) -> None:
    token = claim_token(api)
    path = f"/v1/tenants/acme/claim-tokens/{token['id']}/qr.png"
    png = api.client.get(path, headers={**api.platform, "Ironlink-Claim-Token": token["token"]})
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert api.client.get(path, headers=api.platform).json()["code"] == "claim_token_unknown"


# ------------------------------------------------------------------------------------ the CA key
def test_the_ca_key_is_in_no_answer_and_not_in_the_registry(api: Api) -> None:
    api.post("/v1/tenants/acme/machines", {"site_id": "plant-1", "id": "m-1", "type": "cnc_mill"})
    answers = [
        api.post(
            "/v1/tenants/acme/devices", {"site_id": "plant-1", "machine_id": "m-1", "csr": key_and_csr()[1]}
        ).text,
        api.client.get("/v1/crl.pem").text,
        api.client.get("/v1/ca.pem").text,
        api.client.get("/openapi.json").text,
    ]
    key = (api.ca_dir / "region-local" / "ca.key").read_text()
    body = "".join(key.splitlines()[1:-1])
    assert (api.ca_dir / "region-local" / "ca.key").stat().st_mode & 0o777 == 0o600
    for text in answers:
        assert "PRIVATE KEY" not in text and body[:40] not in text
    with psycopg.connect(api.dsn) as conn:
        dump = " ".join(str(row) for row in conn.execute("SELECT * FROM device_certificates"))
    assert "PRIVATE KEY" not in dump and body[:40] not in dump
    assert repr(api.client.app.state.provisioner.authorities.region) == "IssuingCA('region-local')"  # type: ignore[attr-defined]


def test_readyz_reports_the_registry(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    assert api.client.get("/readyz").status_code == 200


# ------------------------------------------------------------------------------------- openapi
def test_the_committed_openapi_document_is_the_apps() -> None:
    from provisioning.openapi import document

    committed = (Path(__file__).resolve().parent.parent / "provisioning" / "openapi.json").read_text()
    assert json.loads(committed) == document(), "run: python -m provisioning.openapi"


# ------------------------------------------------------------------------------------------- CLI
def test_the_cli_mints_the_first_platform_token_and_refuses_bad_flags(api: Api) -> None:
    from typer.testing import CliRunner

    from infra.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["provisioning", "token", "create", "--registry", api.dsn, "--expires", "99y"])
    assert bad.exit_code == 2 and "--expires" in bad.output
    made = runner.invoke(app, ["provisioning", "token", "create", "--registry", api.dsn, "--expires", "30d"])
    assert made.exit_code == 0, made.output
    token = made.output.strip().splitlines()[-1]
    answer = api.client.get("/v1/tenants/acme/sites", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200
