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
