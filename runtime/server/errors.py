"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the status the `openai` client maps.

Everything the server refuses goes through `ApiError`, and every other exception is caught at the edge and turned into
one (FastAPI's 422 validation body, Starlette's HTML 404/405, an engine error, a bug): a client never sees a body it
cannot parse, and never a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.engine.base import ContextLengthExceeded, EngineError, EngineUnavailable, Overloaded
from runtime.engine.errors import InvalidRequest

log = logging.getLogger("sealbox.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_engine_error(error: EngineError) -> ApiError:
    """The seam's errors as HTTP: never truncate (400), come back later (429), not now (503)."""
    if isinstance(error, ContextLengthExceeded):
        return ApiError(400, str(error), code="context_length_exceeded", param="messages")
    if isinstance(error, Overloaded):
        return ApiError(
            429, str(error), code="server_overloaded", headers={"Retry-After": str(max(1, error.retry_after_s))}
        )
    if isinstance(error, InvalidRequest):
        return ApiError(400, str(error), code="invalid_request")
    if isinstance(error, EngineUnavailable):
        return ApiError(503, str(error), code="engine_unavailable")
    return ApiError(503, f"the engine failed: {error}", code="engine_error")


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    errors = error.errors()
    if not errors:
        return "the request body is not valid", None
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "the request body is not valid JSON", None
    if kind == "extra_forbidden":
        return f"unknown parameter: {param}", param
    if kind == "missing":
        return f"missing required parameter: {param}", param
    message = first.get("msg", "invalid value")
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return ApiError(400, message, code="invalid_request", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: "no such endpoint", 405: "method not allowed on this endpoint"}.get(
            exc.status_code, str(exc.detail)
        )
        return ApiError(exc.status_code, message, code=code, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(EngineError)
    async def engine_error(_request: Request, exc: EngineError) -> JSONResponse:
        return from_engine_error(exc).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return ApiError(500, "internal error; the server log has the details", code="internal_error").response()
