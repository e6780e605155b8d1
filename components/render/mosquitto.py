"""Mosquitto 2.0 configuration, password file and ACL file, rendered from the stack config.

Pure functions: the ``MqttBroker`` component mounts their output, ``ironlink dev`` writes it to
disk, and the attack suite (``tests/test_broker_isolation.py``) runs a real Mosquitto with it.

Hardening decisions:

- ``per_listener_settings false``: one password file and one ACL for every listener, so a second
  listener cannot quietly open a weaker door; ``allow_anonymous false``.
- TLS on ``tls_port`` always; a plaintext listener only where the stack sets
  ``broker.allow_plaintext`` (Phase A on a trusted network; the config refuses it in B and C).
- ``use_username_as_clientid true`` on every listener: the client id is the authenticated
  identity, so nobody can take over, or knock off, another client's session. (One consequence:
  two connections of one identity displace each other, so Mosquitto runs one ingest replica.)
- With ``broker.tls: mtls`` the TLS listener requires a certificate from the platform CA and
  ``use_identity_as_username true`` makes the certificate's CN the identity: the CN *is* the device
  username (``localdev/pki.py`` issues them so), the password is not asked for, and the same ACL
  applies. A certificate is harder to leak than a password and cannot be replayed without the key.
- ``max_packet_size`` from ``broker.limits``; persistence on, so queued QoS 1 messages survive a
  restart, saved every :data:`AUTOSAVE_CHANGES` changes rather than every 30 seconds (see
  :func:`persistence_settings`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from infra.config import PlatformConfig
from infra.fleet import Fleet
from infra.tenancy import device_username
from registry.access import AccessRule, access_rules, platform_rules, tenant_service_rules
from registry.credentials import SALT_BYTES, parse_hash

_SIZE = re.compile(r"^(\d+)(KB|MB)?$")
_SIZE_FACTOR = {None: 1, "KB": 1024, "MB": 1024 * 1024}
# Mosquitto's ACL verbs for the registry's actions.
_ACL_ACCESS = {"publish": "write", "subscribe": "read"}
_USERNAME = re.compile(r"^[A-Za-z0-9._-]+$")
# Mosquitto's persistence is a snapshot of its whole database (every queued message), written and
# fsynced every this many changes (messages queued for an offline session, subscriptions, connects,
# retained messages). A SIGKILL loses the changes since the last save: at most this many PUBACKed
# messages (tests/test_durability.py). Each save rewrites the whole backlog, so the cost grows with
# it: filling a 5,000-message backlog ran at 86 % of the no-autosave rate with 100, 30 % with 10,
# 3 % with 1; a 20,000 one at 45 % with 100 (bench/durability.py).
AUTOSAVE_CHANGES = 100


@dataclass(frozen=True)
class MosquittoPaths:
    """Where the broker finds its files (paths inside the container, or local paths in dev)."""

    cafile: str
    certfile: str
    keyfile: str
    password_file: str
    acl_file: str
    persistence_dir: str


@dataclass(frozen=True)
class BrokerAccount:
    """One password-file line: an identity and its ``$7$`` hash."""

    username: str
    password_hash: str


def packet_size_bytes(size: str) -> int:
    """``256KB`` → 262144 (the config's ``broker.limits.max_packet_size`` format)."""
    match = _SIZE.match(size)
    if not match:
        raise ValueError(f"broker.limits.max_packet_size: {size!r} is not a size such as '256KB'")
    return int(match.group(1)) * _SIZE_FACTOR[match.group(2)]


def persistence_settings(persistence_dir: str, autosave_changes: int = AUTOSAVE_CHANGES) -> list[str]:
    """Persistence lines: save every ``autosave_changes`` changes (0: only at a clean shutdown).

    ``autosave_on_changes`` turns ``autosave_interval`` from seconds into a count of changes; the
    default 30-second timer lost every message queued in those seconds on a SIGKILL.
    """
    return [
        "persistence true",
        f"persistence_location {persistence_dir}",
        "autosave_on_changes true",
        f"autosave_interval {autosave_changes}",
    ]


@dataclass(frozen=True)
class DynamicSecurity:
    """Dynamic-security mode: identities and ACLs live in the plugin, changed at runtime over
    ``$CONTROL/dynamic-security/v1`` (:mod:`provisioning.brokers`), instead of the static files."""

    plugin: str
    """``mosquitto_dynamic_security.so`` (Debian: ``/usr/lib/x86_64-linux-gnu/``)."""
    config_file: str
    """The plugin's JSON state (seeded by :func:`render_dynamic_security_config`, rewritten by the
    plugin after every change: the broker's account must be able to write it)."""
    mtls_port: int = 8884
    """The certificate listener (CN = identity) beside the password listener on ``tls_port``."""
    device_cafile: str | None = None
    """What the certificate listener trusts: the provisioning service's issuing CAs (``/v1/ca.pem``)
    only, never the platform CA (``MosquittoPaths.cafile``) that signs servers and services. Mosquitto
    does not ask the plugin who a certificate is, so any certificate this file vouches for connects
    as its CN; the issuing CAs sign only certificate devices' own CSRs. None: ``cafile``."""
    device_capath: str | None = None
    """Instead of ``device_cafile``: a directory of those CAs named by subject hash
    (``openssl x509 -hash``, ``<hash>.0``). OpenSSL reads it at each handshake, so a CA added later is
    trusted without a restart, and the broker starts while the directory is still empty (a missing
    ``cafile`` stops it)."""
    device_crlfile: str | None = None
    """The certificate listener's ``crlfile``: the CRL of every issuing CA. Naming it turns on CRL
    checking (Mosquitto reads this file once, at start, and refuses to start unless it holds a CRL);
    later CRLs come as new ``<hash>.r<N>`` files in ``device_capath``, read at each handshake
    (:mod:`provisioning.trust_sync`), so a revoked certificate is refused at TLS without a restart."""

    def __post_init__(self) -> None:
        if self.device_cafile is not None and self.device_capath is not None:
            raise ValueError("DynamicSecurity: device_cafile and device_capath exclude each other")


def render_mosquitto_conf(
    config: PlatformConfig,
    paths: MosquittoPaths,
    *,
    tls_port: int = 8883,
    plaintext_port: int = 1883,
    bind_address: str | None = None,
    dynamic_security: DynamicSecurity | None = None,
    log_file: str | None = None,
) -> str:
    """The broker config; with ``dynamic_security`` the plugin replaces the password and ACL files
    and an mTLS listener joins the password one (see :func:`_dynamic_security_listeners`).
    ``log_file``: the log also goes there, beside stdout, for ``provisioning.broker_log`` (whose
    parser needs the ``error`` and ``notice`` lines, timestamped, that are always rendered)."""
    broker = config.broker
    bind = f" {bind_address}" if bind_address else ""
    if dynamic_security is None:
        security = [f"password_file {paths.password_file}", f"acl_file {paths.acl_file}"]
    else:
        security = [
            f"plugin {dynamic_security.plugin}",
            f"plugin_opt_config_file {dynamic_security.config_file}",
        ]
    lines = [
        f"# Rendered by Ironlink for a phase {config.phase} stack in region {config.region}: do not edit.",
        "per_listener_settings false",
        "allow_anonymous false",
        *security,
        f"max_packet_size {packet_size_bytes(broker.limits.max_packet_size)}",
        # Mosquitto silently drops past this per client (default 1000): see Broker.max_queued_messages.
        f"max_queued_messages {broker.max_queued_messages}",
        *persistence_settings(paths.persistence_dir),
        "log_dest stdout",
        *([f"log_dest file {log_file}"] if log_file else []),
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
    ]
    if dynamic_security is None:
        lines += _tls_listener(paths, f"{tls_port}{bind}", mtls=broker.tls == "mtls")
    else:
        lines += _dynamic_security_listeners(config, paths, tls_port, dynamic_security, bind)
    if broker.allow_plaintext:
        lines += [
            "",
            "# Plaintext MQTT: allowed by this stack (broker.allow_plaintext); passwords still required",
            f"listener {plaintext_port}{bind}",
            "protocol mqtt",
            "use_username_as_clientid true",
        ]
    return "\n".join(lines) + "\n"


def _tls_listener(
    paths: MosquittoPaths,
    address: str,
    *,
    mtls: bool,
    cafile: str | None = None,
    capath: str | None = None,
    crlfile: str | None = None,
) -> list[str]:
    lines = [
        "",
        f"# MQTT over TLS{' with client certificates (CN = username)' if mtls else ''}",
        f"listener {address}",
        "protocol mqtt",
        f"capath {capath}" if capath else f"cafile {cafile or paths.cafile}",
        f"certfile {paths.certfile}",
        f"keyfile {paths.keyfile}",
        "tls_version tlsv1.2",
        f"require_certificate {str(mtls).lower()}",
        *([f"crlfile {crlfile}"] if crlfile else []),
    ]
    if mtls:
        lines.append("use_identity_as_username true")
    return [*lines, "use_username_as_clientid true"]


def _dynamic_security_listeners(
    config: PlatformConfig, paths: MosquittoPaths, tls_port: int, dynamic: DynamicSecurity, bind: str
) -> list[str]:
    """A password listener (unless the stack demands certificates) and a certificate listener.

    ``per_listener_settings`` stays ``false``: ``require_certificate`` and
    ``use_identity_as_username`` are listener options either way, and one plugin instance means one
    client list and one ``$CONTROL`` topic for both listeners (Mosquitto 2.0.11 loads a plugin
    named on two listeners into shared state; later 2.0.x refuse it, mosquitto#2601). Mosquitto
    skips password authentication on an identity listener ("Authentication assumed to be cleared",
    ``src/handle_connect.c``): any certificate of ``cafile`` connects, and the plugin's ACLs alone
    decide what its CN may do, so :class:`provisioning.brokers.MosquittoDynamicSecurity` strips a
    disabled client of its role and this listener must trust a CA that signs only devices
    (:attr:`DynamicSecurity.device_cafile`).
    """
    lines = [] if config.broker.tls == "mtls" else _tls_listener(paths, f"{tls_port}{bind}", mtls=False)
    certificates = _tls_listener(
        paths,
        f"{dynamic.mtls_port}{bind}",
        mtls=True,
        cafile=dynamic.device_cafile,
        capath=dynamic.device_capath,
        crlfile=dynamic.device_crlfile,
    )
    return lines + certificates


def render_password_file(accounts: Iterable[BrokerAccount]) -> str:
    """``username:$7$...`` lines, sorted; refuses duplicate or unsafe usernames."""
    seen: set[str] = set()
    lines = []
    for account in sorted(accounts, key=lambda a: a.username):
        if not _USERNAME.match(account.username):
            raise ValueError(f"username: {account.username!r} cannot appear in a Mosquitto password file")
        if account.username in seen:
            raise ValueError(f"username: {account.username!r} has two password entries")
        if not account.password_hash.startswith("$7$"):
            raise ValueError(f"{account.username}.password_hash: is not a '$7$' PBKDF2-SHA512 hash")
        seen.add(account.username)
        lines.append(f"{account.username}:{account.password_hash}")
    return "".join(f"{line}\n" for line in lines)


def render_acl_file(config: PlatformConfig, fleet: Fleet | None = None) -> str:
    """One ``user`` block per identity with the topics it may use; nothing for anyone else.

    No line precedes the first ``user`` line, so anonymous clients (refused anyway) get nothing.
    Mosquitto checks ``read`` per delivered message, not at SUBSCRIBE. Devices appear only when
    ``fleet`` is given (static mode: tests, the dev platform); a cluster's come through dynamic security.
    """
    blocks: dict[str, list[str]] = {}
    for rule in access_rules(config, fleet):
        blocks.setdefault(rule.username, []).append(f"topic {_ACL_ACCESS[rule.action]} {rule.topic}")
    parts = ["# Rendered by Ironlink from registry/access.py: do not edit.\n"]
    parts += [
        f"\nuser {username}\n" + "".join(f"{line}\n" for line in lines) for username, lines in blocks.items()
    ]
    return "".join(parts)


def device_accounts(fleet: Fleet) -> list[BrokerAccount]:
    """Static-mode accounts of a fleet's machines that carry a ``password_hash``."""
    return [
        BrokerAccount(device_username(tenant_id, site.id, machine.id), machine.password_hash)
        for tenant_id, site, machine in fleet.machines()
        if machine.password_hash is not None
    ]


# --------------------------------------------------------------------------- dynamic security
DYNSEC_ADMIN = "admin.dynsec"
"""The identity that drives the plugin over ``$CONTROL`` (two labels: no device or ``svc.`` name)."""
DYNSEC_CONTROL = "$CONTROL/dynamic-security/v1"
# Everything not granted is denied; unsubscribing is harmless and stays allowed.
DYNSEC_DEFAULT_ACCESS = {
    "publishClientSend": False,
    "publishClientReceive": False,
    "subscribe": False,
    "unsubscribe": True,
}


def _acl(acltype: str, topic: str) -> dict[str, object]:
    return {"acltype": acltype, "topic": topic, "priority": 0, "allow": True}


def dynsec_acls(rules: Iterable[AccessRule]) -> list[dict[str, object]]:
    """The plugin's ACLs for one identity's rules: the same rule set as the ACL file, in dynsec terms.

    A publish rule is ``publishClientSend``. A subscribe rule allows the SUBSCRIBE itself
    (``subscribeLiteral``, or ``subscribePattern`` for a filter: a subscription within it), the
    same filter shared (``$share/<any group>/<filter>``: the plugin sees the whole ``$share`` filter,
    and both brokers authorize a shared subscription by its topic filter), and the delivery
    (``publishClientReceive``). Unlike the ACL file, a SUBSCRIBE outside these is refused.
    """
    acls: list[dict[str, object]] = []
    for rule in rules:
        if rule.action == "publish":
            acls.append(_acl("publishClientSend", rule.topic))
            continue
        wildcard = "+" in rule.topic.split("/") or rule.topic.endswith("#")
        acls += [
            _acl("subscribePattern" if wildcard else "subscribeLiteral", rule.topic),
            _acl("subscribePattern", f"$share/+/{rule.topic}"),
            _acl("publishClientReceive", rule.topic),
        ]
    return acls


def dynsec_role(rolename: str, rules: Iterable[AccessRule]) -> dict[str, object]:
    return {"rolename": rolename, "acls": dynsec_acls(rules)}


def dynsec_admin_role(rolename: str = DYNSEC_ADMIN) -> dict[str, object]:
    """An admin may use the plugin's control topic and nothing else. The plugin of Mosquitto 2.0
    grants its commands by that topic alone, so an admin has all of them or none."""
    control = "$CONTROL/dynamic-security/#"
    return {
        "rolename": rolename,
        "acls": [
            _acl("publishClientSend", control),
            _acl("subscribePattern", control),
            _acl("publishClientReceive", control),
        ],
    }


def dynsec_password(password_hash: str, field: str) -> dict[str, object]:
    """A ``$7$`` hash as the plugin stores it: base64 ``password`` and ``salt``, ``iterations``."""
    try:
        parsed = parse_hash(password_hash)
    except ValueError as error:
        raise ValueError(f"{field}: {error}") from error
    if len(parsed.salt) != SALT_BYTES:
        raise ValueError(f"{field}: the plugin needs a {SALT_BYTES}-byte salt, got {len(parsed.salt)} bytes")
    salt, digest = str(parsed).split("$")[3:5]
    return {"password": digest, "salt": salt, "iterations": parsed.iterations}


def seed_if_absent_command(seed: str, state: str) -> list[str]:
    """An initContainer command that copies the plugin's first state ``seed`` to ``state`` only
    when ``state`` does not exist: the plugin rewrites that file after every change, so a restart
    must keep it (and the devices in it). Written beside it and renamed, so a crash mid-copy never
    leaves a half file that would then count as present."""
    script = (
        'set -eu; if [ ! -e "$2" ]; then cp "$1" "$2.seed"; mv "$2.seed" "$2"; '
        'echo "seeded $2"; else echo "kept $2"; fi'
    )
    return ["sh", "-c", script, "seed", seed, state]


def render_dynamic_security_config(
    config: PlatformConfig,
    admin: BrokerAccount,
    services: Iterable[BrokerAccount],
    *,
    other_admins: Iterable[BrokerAccount] = (),
) -> str:
    """The plugin's first state: the admin and the platform's services, each with its own role.

    Devices are not in it: provisioning adds them at runtime. ``services`` must be exactly the
    stack's service identities (:func:`registry.access.service_usernames`); each gets the rules of
    :func:`registry.access.platform_rules` or :func:`registry.access.tenant_service_rules`.
    ``other_admins``: more admins (the dev platform's device sync), each its own client and role:
    with ``use_username_as_clientid`` one username is one session, and a second login would take
    the first one's over.
    """
    admins = [admin, *other_admins]
    rules: dict[str, list[AccessRule]] = {}
    for rule in [*platform_rules(), *(r for tenant in config.tenants for r in tenant_service_rules(tenant))]:
        rules.setdefault(rule.username, []).append(rule)
    accounts = {account.username: account for account in services}
    problems = [f"services: {name!r} has no credential" for name in rules if name not in accounts]
    problems += [
        f"services: {name!r} is not a service of this stack" for name in accounts if name not in rules
    ]
    problems += [
        f"admin.username: {a.username!r} is a service identity" for a in admins if a.username in rules
    ]
    if len({a.username for a in admins}) != len(admins):
        problems.append(f"admins: {[a.username for a in admins]} name one identity twice")
    if problems:
        raise ValueError("; ".join(problems))
    clients = [
        {
            "username": account.username,
            "roles": [{"rolename": account.username}],
            **dynsec_password(account.password_hash, f"{account.username}.password_hash"),
        }
        for account in [*admins, *(accounts[name] for name in rules)]
    ]
    document = {
        "defaultACLAccess": DYNSEC_DEFAULT_ACCESS,
        "clients": clients,
        "groups": [],
        "roles": [
            *(dynsec_admin_role(a.username) for a in admins),
            *(dynsec_role(name, own) for name, own in rules.items()),
        ],
    }
    return json.dumps(document, indent=2) + "\n"
