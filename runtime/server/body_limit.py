"""The request body limit: a body larger than the policy allows is refused with 413 before anything parses it.

The body is read here in full (up to the limit) and handed on as one message. A declared `Content-Length` above the
limit is refused without reading a byte; a chunked body is counted as it arrives, so neither way lets a client make
the server hold more than the limit.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sealbox.runtime.server.errors import ApiError


class BodyLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than {self.max_bytes} bytes", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for value in Headers(scope=scope).getlist("content-length"):
            try:
                declared = int(value)
            except ValueError:
                await ApiError(400, "Content-Length is not a number", code="invalid_request").response()(
                    scope, receive, send
                )
                return
            if declared > self.max_bytes:
                await self._too_large().response()(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._too_large().response()(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
