"""One shape for every refusal: ``{"code": ..., "detail": ...}`` with the HTTP status it implies.

Malformed input is FastAPI's 422, rewritten here to the same shape naming each parameter and the
value it refused (all problems at once).
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

log = structlog.get_logger("api")


class Problem(BaseModel):
    code: str
    detail: str
    errors: list[dict[str, Any]] | None = None


class ApiError(Exception):
    """A request refused: ``code`` for machines, ``detail`` for people."""

    def __init__(self, status: int, code: str, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


def bad_parameter(name: str, value: object, why: str) -> ApiError:
    """A 422 naming a query parameter the handler itself checked (a relation between two)."""
    return ApiError(422, "invalid_parameter", f"{name}: {value!r} {why}")


def store_unavailable(error: Exception) -> ApiError:
    """502 for a store that did not answer as expected. What went wrong (the store's URL, its
    error text) is the platform's: logged here, never told to the caller."""
    log.warning("store_unavailable", error=str(error))
    return ApiError(502, "store_unavailable", STORE_UNAVAILABLE)


STORE_UNAVAILABLE = "the telemetry store did not answer as expected; retry later"


def api_error_handler(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return JSONResponse(
        {"code": error.code, "detail": error.detail}, status_code=error.status, headers=error.headers
    )


def validation_handler(_request: Request, error: Exception) -> JSONResponse:
    """422 naming every refused parameter (``from``, ``metrics``, a body field...) and its value."""
    assert isinstance(error, RequestValidationError)
    problems = []
    for item in error.errors():
        loc = tuple(item.get("loc", ()))
        where = ".".join(str(part) for part in (loc[1:] if loc[:1] and loc[0] in _LOCATIONS else loc))
        value = item.get("input")
        problems.append(
            {"parameter": where, "value": None if isinstance(value, dict) else value, "problem": item["msg"]}
        )
    detail = "; ".join(
        f"{p['parameter']}: {p['problem']}" + ("" if p["value"] is None else f" (got {p['value']!r})")
        for p in problems
    )
    return JSONResponse({"code": "invalid_parameter", "detail": detail, "errors": problems}, status_code=422)


_LOCATIONS = {"query", "path", "body", "header"}
RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem} for status in (401, 403, 404, 409, 422, 429, 502)
}
