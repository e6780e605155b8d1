"""Who is calling: an API key (``Authorization: Bearer ilk-api.<id>.<secret>``) resolved to its
tenant and, for a site key, its site. Every data route takes :data:`CallerDep`; nothing a caller
sends (path, query, body) can widen that scope, routes filter by ``caller.tenant_id`` and
:meth:`Caller.sees_site` themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import ConnectionPool

from api.deps import PoolDep
from api.errors import ApiError
from registry import api_keys


@dataclass(frozen=True)
class Caller:
    key_id: str
    tenant_id: str
    site_id: str | None
    """None: the whole tenant; otherwise the only site this key sees."""

    def sees_site(self, site_id: str) -> bool:
        return self.site_id is None or self.site_id == site_id


_bearer = HTTPBearer(auto_error=False, description="An API key: ilk-api.<id>.<secret>")
_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


def require_caller(
    pool: PoolDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Caller:
    """The key's scope, or 401 saying why (missing, unknown, expired, revoked)."""
    if credentials is None:
        raise ApiError(
            401, "unauthorized", "an API key is required: Authorization: Bearer <key>", headers=_UNAUTHORIZED
        )
    outcome = authenticate(pool, credentials.credentials)
    if isinstance(outcome, api_keys.Refusal):
        raise ApiError(401, outcome.code, outcome.detail, headers=_UNAUTHORIZED)
    return outcome


def authenticate(pool: ConnectionPool, presented: str) -> Caller | api_keys.Refusal:
    """The scope of the key ``presented``, or why it is refused (also the live feed's check)."""
    with pool.connection() as conn:
        outcome = api_keys.authenticate(conn, presented)
    if isinstance(outcome, api_keys.Refusal):
        return outcome
    return Caller(key_id=outcome.id, tenant_id=outcome.tenant_id, site_id=outcome.site_id)


CallerDep = Annotated[Caller, Depends(require_caller)]
