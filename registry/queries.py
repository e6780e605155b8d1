"""The SQL EMQX's PostgreSQL authenticator and authorizer run against the device registry.

EMQX turns each ``${placeholder}`` into a bound parameter of a prepared statement (never string
interpolation), so a username cannot inject SQL. Both queries read views of the registry
(``mqtt_users``, ``mqtt_acl``) created by the migrations, never its tables directly, so the schema
can evolve behind them.

Authentication also binds the client id to the identity: a device must connect with its username
as client id, and a service with its username or ``<username>-<suffix>`` (worker replicas need
distinct ids). Nobody can thus take over, or knock off, another identity's session.
"""

from __future__ import annotations

from typing import Any

from registry.credentials import DIGEST_BYTES, ITERATIONS

EMQX_AUTHN_QUERY = (
    "SELECT password_hash, salt, is_superuser FROM mqtt_users"
    " WHERE username = ${username}"
    " AND (${clientid} = username OR (kind = 'service' AND starts_with(${clientid}, username || '-')))"
    " LIMIT 1"
)

EMQX_AUTHZ_QUERY = "SELECT permission, action, topic FROM mqtt_acl WHERE username = ${username}"

# EMQX's ``password_hash_algorithm`` matching the registry's ``$7$`` hashes: EMQX derives
# PBKDF2(mac_fun, password, salt, iterations, dk_length), lowercases it to hex and compares it
# with ``password_hash``; ``salt`` is the raw bytes (a ``bytea`` column).
EMQX_PASSWORD_HASH: dict[str, Any] = {
    "name": "pbkdf2",
    "mac_fun": "sha512",
    "iterations": ITERATIONS,
    "dk_length": DIGEST_BYTES,
}
