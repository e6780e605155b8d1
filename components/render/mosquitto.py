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

import re
from collections.abc import Iterable
from dataclasses import dataclass

from infra.config import PlatformConfig
from infra.tenancy import device_username
from registry.access import access_rules

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


def render_mosquitto_conf(
    config: PlatformConfig,
    paths: MosquittoPaths,
    *,
    tls_port: int = 8883,
    plaintext_port: int = 1883,
    bind_address: str | None = None,
) -> str:
    broker = config.broker
    bind = f" {bind_address}" if bind_address else ""
    mtls = broker.tls == "mtls"
    lines = [
        f"# Rendered by Ironlink for a phase {config.phase} stack in region {config.region}: do not edit.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {paths.password_file}",
        f"acl_file {paths.acl_file}",
        f"max_packet_size {packet_size_bytes(broker.limits.max_packet_size)}",
        # Mosquitto silently drops past this per client (default 1000): see Broker.max_queued_messages.
        f"max_queued_messages {broker.max_queued_messages}",
        *persistence_settings(paths.persistence_dir),
        "log_dest stdout",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "",
        f"# MQTT over TLS{' with client certificates (CN = username)' if mtls else ''}",
        f"listener {tls_port}{bind}",
        "protocol mqtt",
        f"cafile {paths.cafile}",
        f"certfile {paths.certfile}",
        f"keyfile {paths.keyfile}",
        "tls_version tlsv1.2",
        f"require_certificate {str(mtls).lower()}",
    ]
    if mtls:
        lines.append("use_identity_as_username true")
    lines.append("use_username_as_clientid true")
    if broker.allow_plaintext:
        lines += [
            "",
            "# Plaintext MQTT: allowed by this stack (broker.allow_plaintext); passwords still required",
            f"listener {plaintext_port}{bind}",
            "protocol mqtt",
            "use_username_as_clientid true",
        ]
    return "\n".join(lines) + "\n"


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


def render_acl_file(config: PlatformConfig) -> str:
    """One ``user`` block per identity with the topics it may use; nothing for anyone else.

    No line precedes the first ``user`` line, so anonymous clients (refused anyway) get nothing.
    Mosquitto checks ``read`` per delivered message, not at SUBSCRIBE.
    """
    blocks: dict[str, list[str]] = {}
    for rule in access_rules(config):
        blocks.setdefault(rule.username, []).append(f"topic {_ACL_ACCESS[rule.action]} {rule.topic}")
    parts = ["# Rendered by Ironlink from registry/access.py: do not edit.\n"]
    parts += [
        f"\nuser {username}\n" + "".join(f"{line}\n" for line in lines) for username, lines in blocks.items()
    ]
    return "".join(parts)


def device_accounts(config: PlatformConfig) -> list[BrokerAccount]:
    """Accounts of every machine whose credential is in the stack file (``password_hash``)."""
    return [
        BrokerAccount(device_username(tenant.id, site.id, machine.id), machine.password_hash)
        for tenant in config.tenants
        for site, machine in tenant.machines
        if machine.password_hash is not None
    ]
