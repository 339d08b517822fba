"""One audit record for every API request the server answers, durable before the client has the whole answer.

`RequestRecorder` wraps the API as the outermost ASGI layer, so a 401, a 413 or a 429 is recorded like a 200. The
record is appended before the response's last body message goes out (a non-streamed answer is held until then; a
stream's handler commits it just before `data: [DONE]`), so a client that has its answer can rely on the record being
on disk. When the log cannot write, the server fails closed: every API request is answered 503 and nothing is served
unrecorded. Probes (`/health`, `/ready`, `/metrics`) carry no personal data and are not recorded. A request refused
before authentication (`refusal` set) is not recorded on its own: it is counted in the `RefusalTally`, which records
one summary per client address and reason per interval, so strangers cannot fill the disk.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sealbox.runtime.audit.errors import AuditError
from sealbox.runtime.audit.log import AuditLog
from sealbox.runtime.metrics import HTTP_RESPONSES
from sealbox.runtime.server.errors import ApiError
from sealbox.runtime.server.refusal_tally import RefusalTally

log = logging.getLogger("sealbox.audit")

RECORD_KEY = "sealbox_record"
API_PREFIX = "/v1/"
PURPOSE_HEADER = "x-sealbox-purpose"

_EVENTS = {401: "auth.failure", 403: "auth.failure", 429: "api.rate_limited"}


@dataclass(eq=False)
class RequestRecord:
    """What one request did; the handlers fill it in, the recorder writes it once."""

    audit: AuditLog | None
    request_id: str
    method: str
    endpoint: str
    client: str
    client_host: str = "unknown"
    tally: RefusalTally | None = None
    refusal: str | None = None
    """The reason (an error code) when the request was refused before authentication: counted, not recorded alone."""
    started: float = field(default_factory=time.monotonic)
    principal: str = "anonymous"
    purpose: str = "unspecified"
    model: str | None = None
    model_sha256: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    stream: bool = False
    content: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields a front adds to the record (the gateway: the engine host that served the request)."""
    committed: bool = False

    async def commit(self, status: int) -> None:
        """Append the record (once). Raises AuditError when the log cannot write: the caller must not answer as if
        the request had been recorded."""
        if self.committed:
            return
        self.committed = True
        HTTP_RESPONSES.labels(endpoint_label(self.endpoint), str(status)).inc()
        if self.refusal is not None and self.tally is not None:
            self.tally.add(client=self.client_host, reason=self.refusal, status=status, endpoint=self.endpoint)
            return
        if self.audit is None:
            return
        fields: dict[str, Any] = {
            "request_id": self.request_id,
            "method": self.method,
            "endpoint": self.endpoint,
            "status": status,
            "principal": self.principal,
            "client": self.client,
            "purpose": self.purpose,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "stream": self.stream,
            "latency_ms": round((time.monotonic() - self.started) * 1000, 3),
        }
        fields.update(self.extra)
        if self.content is not None:
            fields["content"] = self.content
        await self.audit.append_async(_EVENTS.get(status, "api.request"), **fields)


ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"})


def endpoint_label(path: str) -> str:
    """A bounded metric label: a client sending random paths must not grow the server's memory, one series a path."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


def current_record(scope: Scope) -> RequestRecord | None:
    return scope.get("state", {}).get(RECORD_KEY)


class RequestRecorder:
    def __init__(self, app: ASGIApp, *, audit: AuditLog | None, tally: RefusalTally | None = None) -> None:
        self.app = app
        self.audit = audit
        self.tally = tally

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        request_id = f"req-{uuid.uuid4().hex}"
        if self.audit is not None and (failure := self.audit.refusal()) is not None:
            error = ApiError(503, f"the audit log cannot write, so nothing is served: {failure}",
                             code="audit_unavailable", headers={"x-request-id": request_id})  # fmt: skip
            await error.response()(scope, receive, send)
            return
        client = scope.get("client")
        record = RequestRecord(
            audit=self.audit,
            request_id=request_id,
            method=scope["method"],
            endpoint=scope["path"][:200],
            client=f"{client[0]}:{client[1]}" if client else "unknown",
            client_host=str(client[0]) if client else "unknown",
            tally=self.tally,
        )
        scope.setdefault("state", {})[RECORD_KEY] = record
        held_start: Message | None = None
        status = 500

        async def send_recorded(message: Message) -> None:
            nonlocal held_start, status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", record.request_id.encode()))
                held_start = {**message, "headers": headers}
                return
            if message["type"] == "http.response.body" and held_start is not None:
                if not message.get("more_body", False) and not record.committed:
                    try:
                        await record.commit(status)
                    except AuditError as exc:
                        log.error("request %s not recorded: %s", record.request_id, exc)
                        failure = ApiError(503, "the audit log cannot write; the answer is withheld",
                                           code="audit_unavailable", headers={"x-request-id": request_id})  # fmt: skip
                        await failure.response()(scope, receive, send)
                        held_start = None
                        return
                await send(held_start)
                held_start = None
            await send(message)

        try:
            await self.app(scope, receive, send_recorded)
        finally:
            if not record.committed:  # the client went away mid-answer, or the app failed: record what happened
                try:
                    await record.commit(499 if status < 400 else status)
                except AuditError as exc:
                    log.error("request %s not recorded: %s", record.request_id, exc)
