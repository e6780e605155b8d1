"""How the caller's key confines a request beyond its tenant: the site a site key is bound to, and
the name its changes are audited under."""

from __future__ import annotations

from api.auth import Caller
from api.errors import ApiError


def actor_of(caller: Caller) -> str:
    """Who acted, for the audit trail: the key (its id; the key's row says whose it is)."""
    return f"api-key:{caller.key_id}"


def site_filter(caller: Caller, site_id: str | None) -> str | None:
    """The site a request reads: the one asked for, or a site key's own. A site key asking for
    another site is told it does not exist (404), like a site of another tenant."""
    if caller.site_id is not None and site_id not in (None, caller.site_id):
        raise ApiError(404, "site_unknown", f"site {site_id!r} is not a site of this key's scope")
    return site_id if site_id is not None else caller.site_id


def require_tenant_key(caller: Caller, what: str) -> None:
    """Refuse a site key for what is the whole tenant's (403)."""
    if caller.site_id is not None:
        raise ApiError(
            403,
            "tenant_key_required",
            f"{what} covers the whole tenant: a site key ({caller.site_id}) cannot read it",
        )
