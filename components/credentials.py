"""Generated credentials: pulumi-random values that only ever leave as Pulumi secrets."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import pulumi
import pulumi_random as random

from registry.credentials import SALT_BYTES, hash_password

PASSWORD_LENGTH = 32


def generated_password(
    name: str, *, parent: pulumi.Resource, protect: bool, length: int = PASSWORD_LENGTH
) -> pulumi.Output[str]:
    """A random alphanumeric password (~190 bits), secret.

    No special characters: the value is used in DSNs, HOCON environment overrides and shell scripts
    without quoting. ``protect`` for passwords baked into data at first start (a database's owner),
    where a new value would lock the platform out of its own data.
    """
    password = random.RandomPassword(
        name, length=length, special=False, opts=pulumi.ResourceOptions(parent=parent, protect=protect)
    )
    return pulumi.Output.secret(password.result)


def first_start_password(
    name: str, *, parent: pulumi.Resource, length: int = PASSWORD_LENGTH
) -> pulumi.Output[str]:
    """A password a server takes only at its first start (Grafana's admin, EMQX's dashboard admin,
    InfluxDB's setup user and operator token, PostgreSQL's roles), protected in every phase.

    The server keeps the first value in its data and ignores a new one, so a replaced password
    (a new length, a renamed component, a lost state) locks the providers and operators out for
    good while the data lives on. That holds in phase A too: ``protect_stateful: false`` lets
    ``pulumi destroy`` drop the data, but an update replacing only the password leaves the volume
    in place. Protecting a random value costs nothing at ``pulumi up``; tearing a phase A stack down
    takes ``pulumi state unprotect --all`` first, a deliberate step rather than a silent lockout.
    """
    return generated_password(name, parent=parent, protect=True, length=length)


@dataclass(frozen=True)
class ServiceCredential:
    """A service's broker password and its ``$7$`` hash (what a password file or the registry holds)."""

    password: pulumi.Output[str]
    password_hash: pulumi.Output[str]


def service_credential(name: str, *, parent: pulumi.Resource) -> ServiceCredential:
    """A generated password hashed with a generated salt, both kept in state.

    The salt is a resource rather than fresh randomness so that the hash, and with it the broker's
    password file, stays the same from one ``pulumi up`` to the next.
    """
    password = generated_password(f"{name}-password", parent=parent, protect=False)
    salt = random.RandomBytes(f"{name}-salt", length=SALT_BYTES, opts=pulumi.ResourceOptions(parent=parent))
    hashed = pulumi.Output.all(password, salt.base64).apply(
        lambda values: hash_password(values[0], base64.b64decode(values[1]))
    )
    return ServiceCredential(password, pulumi.Output.secret(hashed))
