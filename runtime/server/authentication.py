"""Bearer authentication for every `/v1/` path, before routing: an unknown path answers 401 to a stranger, not 404.

A refusal here marks the request's record (`refusal`): strangers are counted per address, not recorded one by one.
The principal and its purpose go into the request's audit record; `X-Sealbox-Purpose` may name the purpose of one
request (GDPR Art. 5(1)(b): purpose limitation is recorded per processing, not per key).
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from sealbox.runtime.api_keys import ApiKeyError, Authenticator
from sealbox.runtime.server.errors import ApiError
from sealbox.runtime.server.request_record import API_PREFIX, PURPOSE_HEADER, current_record

MAX_PURPOSE = 200


class Authentication:
    def __init__(self, app: ASGIApp, *, authenticator: Authenticator | None) -> None:
        """`authenticator` None: `--no-auth` on loopback; every caller is the principal `anonymous`."""
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        record = current_record(scope)
        headers = Headers(scope=scope)
        if self.authenticator is not None:
            error = None
            authorization = headers.get("authorization", "")
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                error = ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
            else:
                try:
                    principal = self.authenticator.authenticate(token.strip())
                except ApiKeyError as exc:
                    principal = None
                    error = ApiError(503, f"the API key store cannot be read: {exc}", code="auth_unavailable")
                if principal is None and error is None:
                    error = ApiError(401, "invalid API key", code="invalid_api_key")
                elif principal is not None and record is not None:
                    record.principal, record.purpose = principal.name, principal.purpose
            if error is not None:
                if record is not None:
                    record.refusal = error.code
                error.headers.setdefault("WWW-Authenticate", "Bearer")
                await error.response()(scope, receive, send)
                return
        # Checked once the caller is known: a stranger's malformed header is one more 401, counted, not recorded alone.
        purpose = headers.get(PURPOSE_HEADER)
        if purpose is not None and (len(purpose) > MAX_PURPOSE or not purpose.isprintable() or not purpose.strip()):
            error = ApiError(400, f"X-Sealbox-Purpose must be 1 to {MAX_PURPOSE} printable characters",
                             code="invalid_request", param="X-Sealbox-Purpose")  # fmt: skip
            await error.response()(scope, receive, send)
            return
        if record is not None and purpose is not None:
            record.purpose = purpose.strip()
        await self.app(scope, receive, send)
