"""``ironlink device add``: manual enrollment through the provisioning API (issue 9, method 1).

The command creates the machine if the tenant lacks it, then enrolls its device: the API either
generates a password (printed once here; the registry keeps only its ``$7$`` hash) or signs the CSR
the device made with its own key (the certificate goes to ``--cert-out``; the CLI never sees a
private key). The registry is never written directly: the API checks the admin token's scope,
audits the change and updates the brokers. Every flag is checked, all at once, before any request.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import TypeAdapter, ValidationError
from rich.panel import Panel
from rich.text import Text

from infra.cli import app
from infra.cli.common import console, fail
from infra.config import MachineId, MachineTypeName, SiteId, TenantId
from infra.tenancy import telemetry_topic
from provisioning.ca import CSR_MAX_BYTES

device_app = typer.Typer(help="Enroll devices (machines) through the provisioning API.", no_args_is_help=True)
app.add_typer(device_app, name="device")

EXIT_UNAVAILABLE = 1
API_TIMEOUT_S = 30
ANSWER_MAX_BYTES = 1 << 20
"""Bound on what the CLI reads of one API answer (a certificate is a few KiB)."""
_FIELDS: list[tuple[str, Any]] = [
    ("TENANT", TypeAdapter(TenantId)),
    ("SITE", TypeAdapter(SiteId)),
    ("MACHINE", TypeAdapter(MachineId)),
    ("--type", TypeAdapter(MachineTypeName)),
]


class ApiRefused(Exception):
    """The API's ``{"code", "detail"}`` answer to a request."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


class ProvisioningApi:
    """A small JSON client of the provisioning API: bearer token, optional private CA, bounded reads."""

    def __init__(self, url: str, token: str, ca_file: Path | None) -> None:
        self.url, self.token = url.rstrip("/"), token
        self.context = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
            method=method,
        )
        try:
            with urllib.request.urlopen(request, timeout=API_TIMEOUT_S, context=self.context) as answer:
                return json.loads(answer.read(ANSWER_MAX_BYTES))
        except urllib.error.HTTPError as error:
            raise _refusal(error.code, error.read(ANSWER_MAX_BYTES)) from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            fail(f"--api: cannot reach the provisioning API at {self.url}: {reason}", EXIT_UNAVAILABLE)


def _refusal(status: int, raw: bytes) -> ApiRefused:
    """The API's own code and detail; FastAPI's 422 lists the fields; anything else shows its status."""
    try:
        answer = json.loads(raw)
    except ValueError:
        return ApiRefused(f"http_{status}", raw[:200].decode(errors="replace").strip() or "no detail")
    if isinstance(answer, dict) and isinstance(answer.get("code"), str):
        return ApiRefused(answer["code"], str(answer.get("detail", ""))[:2000])
    if isinstance(answer, dict) and isinstance(answer.get("detail"), list):
        fields = [
            f"{'.'.join(str(part) for part in item.get('loc', []))}: {item.get('msg', '')}"
            for item in answer["detail"][:20]
            if isinstance(item, dict)
        ]
        return ApiRefused("invalid_request", "; ".join(fields))
    return ApiRefused(f"http_{status}", str(answer)[:200])


def _problems(
    values: list[str],
    api: str | None,
    token: str | None,
    ca_file: Path | None,
    csr: Path | None,
    password: bool,
    cert_out: Path | None,
) -> tuple[list[str], str | None]:
    """Everything wrong with the arguments (all at once) and the CSR's text."""
    problems = []
    for (name, adapter), value in zip(_FIELDS, values, strict=True):
        try:
            adapter.validate_python(value)
        except ValidationError as error:
            messages = [item.get("ctx", {}).get("error", item["msg"]) for item in error.errors()]
            problems += [f"{name}: {message}" for message in messages]
    if not api:
        problems.append("--api: required (or IRONLINK_PROVISIONING_URL): the provisioning API's URL")
    elif not api.startswith(("https://", "http://")) or len(api) > 2048:
        problems.append(f"--api: {api[:80]!r} is not an http(s) URL")
    if not token:
        problems.append("--token: required (or IRONLINK_ADMIN_TOKEN, which keeps it out of shell history)")
    if ca_file is not None and not ca_file.is_file():
        problems.append(f"--ca-file: {ca_file} is not a file")
    if csr is not None and password:
        problems.append("--password: cannot be combined with --csr (one credential per device)")
    if (csr is None) != (cert_out is None):
        problems.append("--cert-out: required with --csr, and only with it (where the certificate goes)")
    if cert_out is not None and (cert_out.is_dir() or not cert_out.parent.is_dir()):
        problems.append(f"--cert-out: {cert_out} is not a file in an existing folder")
    csr_text = None if csr is None else _read_csr(csr, problems)
    return problems, csr_text


def _read_csr(path: Path, problems: list[str]) -> str | None:
    try:
        size = path.stat().st_size
        if size > CSR_MAX_BYTES:
            problems.append(f"--csr: {path} is {size} bytes; a CSR has at most {CSR_MAX_BYTES}")
            return None
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        problems.append(f"--csr: cannot read {path}: {error}")
        return None
    if "PRIVATE KEY" in text:
        problems.append(f"--csr: {path} holds a private key; pass the device's CSR (its key stays on it)")
        return None
    return text


@device_app.command("add")
def device_add(
    tenant_id: Annotated[str, typer.Argument(metavar="TENANT", help="Tenant id.")],
    site_id: Annotated[str, typer.Argument(metavar="SITE", help="Site id.")],
    machine_id: Annotated[
        str, typer.Argument(metavar="MACHINE", help="Machine id (DNS label, e.g. 'press-03').")
    ],
    machine_type: Annotated[
        str, typer.Option("--type", help="Machine type from the catalog (e.g. conveyor).")
    ],
    api: Annotated[
        str | None,
        typer.Option("--api", envvar="IRONLINK_PROVISIONING_URL", help="Provisioning API URL."),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="IRONLINK_ADMIN_TOKEN", help="Admin token (platform or tenant)."),
    ] = None,
    ca_file: Annotated[
        Path | None, typer.Option("--ca-file", help="CA bundle that signed the API's TLS certificate.")
    ] = None,
    csr: Annotated[
        Path | None, typer.Option("--csr", help="The device's CSR (PEM): a certificate is issued.")
    ] = None,
    password: Annotated[
        bool, typer.Option("--password", help="Issue a password (the default without --csr).")
    ] = False,
    cert_out: Annotated[
        Path | None, typer.Option("--cert-out", help="Where the signed certificate is written (with --csr).")
    ] = None,
    new_site: Annotated[
        bool, typer.Option("--new-site", help="Create the site if the tenant lacks it.")
    ] = False,
) -> None:
    """Create the machine if missing and enroll its device: a password shown once, or a signed CSR."""
    problems, csr_text = _problems(
        [tenant_id, site_id, machine_id, machine_type], api, token, ca_file, csr, password, cert_out
    )
    if problems:
        fail("\n  ".join(problems))
    assert api is not None and token is not None
    client = ProvisioningApi(api, token, ca_file)
    tenant_path = f"/v1/tenants/{tenant_id}"
    try:
        created = _ensure_machine(client, tenant_path, site_id, machine_id, machine_type, new_site)
        body: dict[str, Any] = {"site_id": site_id, "machine_id": machine_id}
        if csr_text is not None:
            body["csr"] = csr_text
        try:
            credential = client.call("POST", f"{tenant_path}/devices", body)
        except ApiRefused:
            if created:  # a refused enrollment leaves the fleet as it was
                client.call("DELETE", f"{tenant_path}/machines/{site_id}/{machine_id}")
            raise
    except ApiRefused as refusal:
        fail(f"{refusal.code}: {refusal.detail}")
    verb = "Added machine" if created else "Machine"
    console.print(f"{verb} [bold]{machine_id}[/] ({machine_type}) of {tenant_id}/{site_id}", highlight=False)
    console.print(f"  username: {credential['username']}", highlight=False)
    console.print(f"  topic:    {telemetry_topic(tenant_id, site_id, machine_id)}", highlight=False)
    if cert_out is not None:
        try:
            cert_out.write_text(credential["certificate"])
            cert_out.chmod(0o644)
        except OSError as error:
            username = credential["username"]
            fail(f"--cert-out: {username} is enrolled but {cert_out} cannot be written: {error}")
        console.print(
            f"  certificate (CN {credential['username']}, until {credential['not_after']}): {cert_out}",
            highlight=False,
        )
        return
    warning = "Shown once: only its hash is stored. Put it on the device now."
    console.print(
        Panel(
            Text.assemble(credential["password"], "\n\n", (warning, "yellow")),
            title=f"password of {credential['username']}",
            expand=False,
        )
    )


def _ensure_machine(
    client: ProvisioningApi, tenant_path: str, site_id: str, machine_id: str, kind: str, new_site: bool
) -> bool:
    """Create the machine (and with ``new_site`` its site); True if it was created, False if it
    existed already with this type. A different type is refused: enrolling would mislabel it."""
    body = {"site_id": site_id, "id": machine_id, "type": kind}
    try:
        client.call("POST", f"{tenant_path}/machines", body)
        return True
    except ApiRefused as refusal:
        if refusal.code == "site_unknown" and new_site:
            client.call("POST", f"{tenant_path}/sites", {"id": site_id})
            client.call("POST", f"{tenant_path}/machines", body)
            return True
        if refusal.code != "machine_exists":
            raise
    existing = client.call("GET", f"{tenant_path}/machines?site={site_id}")
    current = next((m for m in existing if m["id"] == machine_id), None)
    if current is not None and current["type"] != kind:
        raise ApiRefused(
            "machine_type_mismatch",
            f"machine {site_id}/{machine_id} exists with type {current['type']!r}, not {kind!r}",
        )
    return False
