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

from sealbox.runtime.engine import ContextLengthExceeded, EngineError, EngineUnavailable, InvalidRequest, Overloaded
from sealbox.runtime.server import schemas
from sealbox.runtime.server.schemas import UNENCODABLE_TEXT

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


def _model_names() -> frozenset[str]:
    names, stack = set(), [schemas._Body]
    while stack:
        cls = stack.pop()
        names.add(cls.__name__)
        stack.extend(cls.__subclasses__())
    return frozenset(names)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"}) | _model_names()
"""What pydantic puts in a location to say which member of a union it tried (besides `list[…]`, `literal[…]`)."""


def _clean_location(location: tuple[Any, ...]) -> list[str]:
    """The request's own path to a value: `body` and pydantic's union-member tags (`str`, `list[TextPart]`,
    `NamedToolChoice`, `literal[...]`) dropped, so that `param` names a field the client sent."""
    parts = []
    for part in location:
        if isinstance(part, int):
            parts.append(str(part))
            continue
        text = str(part)
        if text == "body" and not parts:
            continue
        if text in _UNION_TAGS or any(mark in text for mark in "[('"):
            continue
        parts.append(text)
    return parts


_NOT_AN_OBJECT = frozenset({"model_attributes_type", "model_type", "dict_type"})


def _validation_message(error: RequestValidationError) -> tuple[str, str | None, bool]:
    """(message, param, whether the body as a whole is missing or not an object)."""
    errors = error.errors()
    if not errors:
        return "the request body is not valid", None, False
    # Of a union's alternatives, the one that got furthest into the value says best what is wrong with it.
    first = max(errors, key=lambda e: len(_clean_location(tuple(e.get("loc", ())))))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "the request body is not valid JSON", None, False
    if kind == UNENCODABLE_TEXT:
        where = str((first.get("ctx") or {}).get("where", "")) or None
        return f"{where}: not valid Unicode text (a lone surrogate)", where, False
    location = _clean_location(tuple(first.get("loc", ())))
    param = ".".join(location) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if param is None:  # the body as a whole, or a rule across its fields
        if kind == "missing":
            return "the request body is empty: send a JSON object", None, True
        if kind in _NOT_AN_OBJECT:
            return "the request body must be a JSON object", None, True
        return message, None, False
    if kind == "extra_forbidden":
        return f"unknown parameter: {param}", param, False
    if kind == "missing":
        return f"missing required parameter: {param}", param, False
    return f"{param}: {message}", param, False


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
"""What every refusal looks like, for the OpenAPI document (FastAPI would advertise its 422 `detail` body)."""


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, whole_body = _validation_message(exc)
        content_type = request.headers.get("content-type")
        if whole_body and not _is_json(content_type):
            # FastAPI leaves a body it was not told is JSON unparsed; say why rather than "not an object".
            sent = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
            return ApiError(415, f"the request body must be JSON (Content-Type: application/json); {sent} was sent",
                            code="unsupported_media_type").response()  # fmt: skip
        return ApiError(400, message, code="invalid_request", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {
            # FastAPI's only 400: a body that claims to be JSON and cannot be decoded (not UTF-8, nested too deep).
            400: "the request body cannot be parsed: JSON text in UTF-8 expected",
            404: "no such endpoint",
            405: "method not allowed on this endpoint",
        }.get(exc.status_code, str(exc.detail))
        return ApiError(exc.status_code, message, code=code, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(EngineError)
    async def engine_error(_request: Request, exc: EngineError) -> JSONResponse:
        return from_engine_error(exc).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return ApiError(500, "internal error; the server log has the details", code="internal_error").response()
