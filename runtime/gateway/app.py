"""The gateway's OpenAI API: the same front as `sealbox serve` (audit record, API keys, body limit), with routing to
engine hosts where a single host has its engine.

Layers, outermost first: `RequestRecorder` (one record per request in the gateway's own audit log, naming the engine
host and the model's sha256) → `Authentication` → `PrincipalFairness` → `BodyLimit` → `Relay` (the forwarded API
routes, plain ASGI) → FastAPI (status, models, probes).

The forwarded routes bypass FastAPI on purpose: its per-request machinery and the wrappers it puts around every
`send` cost more CPU than the forwarding itself, and on a host whose cores the engines share, that CPU is taken from
generation (measured by scripts/bench-gateway).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from sealbox.runtime.api_keys import Authenticator
from sealbox.runtime.audit.errors import AuditError
from sealbox.runtime.audit.log import AuditLog
from sealbox.runtime.gateway.engine_hosts import UPSTREAM_ERRORS, EngineHosts
from sealbox.runtime.gateway.fairness import InFlightLimit, PrincipalFairness
from sealbox.runtime.gateway.proxy import NoEngine, Upstream, forward, usage_of
from sealbox.runtime.gateway.routing import PrefixAffinity, Router, conversation_key
from sealbox.runtime.policy import Policy
from sealbox.runtime.server.authentication import Authentication
from sealbox.runtime.server.body_limit import BodyLimit
from sealbox.runtime.server.errors import ApiError, install_error_handlers
from sealbox.runtime.server.request_record import RequestRecord, RequestRecorder, current_record

RELAYED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
DONE_EVENT = b"data: [DONE]\n\n"
USAGE_CHUNK = b'"usage":{'
"""In a chunk only as the key of the usage object (a quote inside a JSON string is escaped)."""
FINISH_CHUNK = b'"finish_reason":"'
"""… and this only in a choice's closing chunk (a finish reason that is not null)."""

log = logging.getLogger("sealbox.gateway")


@dataclass(kw_only=True)
class GatewayConfig:
    policy: Policy
    engines: EngineHosts
    authenticator: Authenticator | None
    audit: AuditLog | None
    on_started: Callable[[EngineHosts], None] | None = None
    on_stopping: Callable[[], None] | None = None


def create_gateway_app(config: GatewayConfig) -> ASGIApp:
    engines = config.engines
    router = Router(engines.hosts, PrefixAffinity(config.policy.gateway.prefix_affinity_entries))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await engines.start()
        if config.on_started is not None:
            config.on_started(engines)
        try:
            yield
        finally:
            await engines.stop()
            if config.on_stopping is not None:
                config.on_stopping()

    app = FastAPI(title="sealbox gateway", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok = bool(engines.healthy)
        body = {"status": "ready" if ok else "not ready", "engines": [h.describe() for h in engines.hosts]}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/gateway/status")
    async def gateway_status() -> dict[str, Any]:
        return {"object": "gateway.status", "engines": [h.describe() for h in engines.hosts]}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        seen: dict[str, dict[str, Any]] = {}
        for host in engines.healthy:
            for name in host.status.models if host.status else {}:
                seen.setdefault(name, {"id": name, "object": "model", "created": 0, "owned_by": "sealbox"})
        return {"object": "list", "data": list(seen.values())}

    relay = Relay(app, router=router, engines=engines)
    limited = BodyLimit(relay, max_bytes=config.policy.server.max_body_bytes)
    fair = PrincipalFairness(limited, limit=InFlightLimit(config.policy.gateway.max_in_flight_per_principal))
    return RequestRecorder(Authentication(fair, authenticator=config.authenticator), audit=config.audit)


class Relay:
    """POST on the forwarded API routes goes to an engine; everything else to the framework app behind."""

    def __init__(self, app: ASGIApp, *, router: Router, engines: EngineHosts) -> None:
        self.app = app
        self.router = router
        self.engines = engines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in RELAYED_PATHS:
            await self.app(scope, receive, send)
            return
        record = current_record(scope)
        assert record is not None, "API routes run inside RequestRecorder"
        try:
            if scope["method"] != "POST":
                raise ApiError(405, "method not allowed on this endpoint", code="method_not_allowed",
                               headers={"Allow": "POST"})  # fmt: skip
            body = await _body(receive)
            if body is None:
                return  # the client left before its body arrived; the recorder notes it
            response = await self.forward(record, scope["path"], body)
        except ApiError as exc:
            await exc.response()(scope, receive, send)
            return
        except Exception:
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            error = ApiError(500, "internal error; the server log has the details", code="internal_error")
            await error.response()(scope, receive, send)
            return
        await response(scope, receive, send)

    async def forward(self, record: RequestRecord, path: str, body: bytes) -> RelayResponse:
        """Send the request on to an engine; raises ApiError for a bad body or when no engine can take it."""
        parsed = _parse(body)
        model = parsed["model"]
        record.model = model[:200]
        stream = parsed.get("stream") is True
        record.stream = stream
        try:
            upstream = await forward(self.router, model=model, key=conversation_key(model, parsed),
                                     path=path, body=body,
                                     headers={"content-type": "application/json", "x-sealbox-purpose": record.purpose},
                                     stream=stream)  # fmt: skip
        except NoEngine as exc:
            if exc.full:
                raise ApiError(429, str(exc), code="engines_full",
                               headers={"Retry-After": str(exc.retry_after_s)}) from exc  # fmt: skip
            if exc.missing:
                raise ApiError(404, str(exc), code="model_not_found", param="model") from exc
            raise ApiError(503, str(exc), code="engines_unavailable") from exc
        if upstream.retried_from:
            self.engines.poll_soon()
        status = upstream.engine.model(model)
        record.model_sha256 = status.sha256 if status is not None else None
        record.extra.update(engine_host=upstream.engine.name, retried_from=upstream.retried_from)
        if not stream or upstream.status_code != 200:
            usage = usage_of(upstream.first)
            record.prompt_tokens, record.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
        options = parsed.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        last = USAGE_CHUNK if usage or parsed.get("n", 1) != 1 else FINISH_CHUNK
        return RelayResponse(upstream, record, on_failure=self.engines.poll_soon, last_counts=last)


async def _body(receive: Receive) -> bytes | None:
    """The request body (BodyLimit has bounded it), or None when the client disconnected first."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def _parse(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except ValueError as exc:
        raise ApiError(400, f"the body is not JSON: {exc}", code="invalid_request") from exc
    if not isinstance(parsed, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_request")
    if not isinstance(parsed.get("model"), str) or not parsed["model"]:
        raise ApiError(400, "model: a model name is required", code="invalid_request", param="model")
    return parsed


class RelayResponse:
    """Sends the engine's answer on: its first bytes, then the rest, each chunk as it arrives and as it is. A failure
    after the first byte ends the stream with an error event (never a replay on another engine); the engine leaves
    rotation until it answers again.

    A client that leaves mid-stream ends the stream: the engine's connection is closed, so it stops generating
    for nobody (the client's disconnect is watched by one task per stream, not looked for per chunk).

    A stream's audit record is durable before its client has `data: [DONE]`, as a non-streamed answer's is before
    its last byte: the `[DONE]` chunk is held until the record is on disk. The record is written as soon as the
    usage chunk (or the closing chunk, when the client asked for no usage) passes, since the answer's counts are
    known then: its fsync runs while the engine syncs its own record before sending `[DONE]`, rather than after it.
    """

    def __init__(self, upstream: Upstream, record: RequestRecord, *, on_failure: Callable[[], None],
                 last_counts: bytes = USAGE_CHUNK) -> None:  # fmt: skip
        self.upstream = upstream
        self.record = record
        self.on_failure = on_failure
        self.last_counts = last_counts
        """What marks the chunk after which the record's counts are known: the usage chunk when the client asked for
        one (or with several choices, which close one by one), else the one choice's closing chunk."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        upstream = self.upstream
        commit: asyncio.Task[None] | None = None
        gone: asyncio.Future[object] | None = None
        try:
            await send({"type": "http.response.start", "status": upstream.status_code, "headers": upstream.headers()})
            chunks = upstream.chunks
            if chunks is None:
                await send({"type": "http.response.body", "body": upstream.first, "more_body": False})
                upstream.engine.served += 1
                return
            tail = StreamTail()
            counted = False
            gone = asyncio.ensure_future(_client_gone(receive))
            try:
                async for chunk in _after(upstream.first, chunks):
                    if gone.done():
                        return  # the recorder records the request as the client left it (499)
                    tail.feed(chunk)
                    if chunk.endswith(DONE_EVENT):
                        if len(chunk) > len(DONE_EVENT):
                            await send({"type": "http.response.body", "body": chunk[: -len(DONE_EVENT)],
                                        "more_body": True})  # fmt: skip
                        commit = commit or self._commit(tail)
                        if not await self._recorded(commit, send):
                            return
                        chunk = DONE_EVENT
                    elif commit is None:
                        counted = counted or self.last_counts in chunk
                        if counted and chunk.endswith(b"\n\n"):  # the event is whole
                            commit = self._commit(tail)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except UPSTREAM_ERRORS as exc:
                upstream.engine.fail(f"failed mid-stream: {type(exc).__name__}: {exc}")
                self.on_failure()
                if commit is None:
                    tail.read_into(self.record)
                    self.record.finish_reason = "engine_failed"
                elif not await self._recorded(commit, send):
                    return
                error = {"error": {"message": f"the engine host {upstream.engine.name} failed mid-answer; the request "
                                              "is not replayed (part of it was already sent)",
                                   "type": "service_unavailable", "param": None, "code": "engine_failed"}}  # fmt: skip
                await send({"type": "http.response.body", "body": f"data: {json.dumps(error)}\n\n".encode(),
                            "more_body": False})  # fmt: skip
                return
            upstream.engine.served += 1
            if commit is None:
                tail.read_into(self.record)  # the recorder commits it before the last message
            elif not await self._recorded(commit, send):
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if gone is not None:
                gone.cancel()
            if commit is not None and not commit.done():
                commit.cancel()  # the client left: its record, already queued, is written all the same
            await upstream.close()

    def _commit(self, tail: StreamTail) -> asyncio.Task[None]:
        tail.read_into(self.record)
        return asyncio.ensure_future(self.record.commit(200))

    async def _recorded(self, commit: asyncio.Task[None], send: Send) -> bool:
        """Wait for the record; when the log cannot write, end the stream with an error event instead of `[DONE]`."""
        try:
            await commit
            return True
        except AuditError as exc:
            log.error("request %s not recorded: %s", self.record.request_id, exc)
            failure = ApiError(503, "the audit log cannot write; the stream ends unrecorded", code="audit_unavailable")
            await send({"type": "http.response.body", "body": f"data: {json.dumps(failure.body())}\n\n".encode(),
                        "more_body": False})  # fmt: skip
            return False


async def _client_gone(receive: Receive) -> None:
    """Returns when the client has disconnected (the request's body was read before the answer began)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _after(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk


class StreamTail:
    """The last chunks of a stream, kept by reference as they pass, and read once at its end for what the audit
    record needs: the token counts of the usage chunk (when the client asked for one) and the last finish reason.

    Nothing is parsed, copied or searched while text flows; the end of an OpenAI stream is its closing chunk(s), the
    usage chunk and `data: [DONE]`, which arrive in the last few reads.
    """

    CHUNKS = 8
    BYTES = 1 << 16

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque(maxlen=self.CHUNKS)
        self.feed = self.chunks.append

    def read_into(self, record: RequestRecord) -> None:
        usage_seen = finish_seen = False
        for event in reversed(b"".join(self.chunks)[-self.BYTES:].split(b"\n\n")):
            if usage_seen and finish_seen:
                return
            if not event.startswith(b"data: {"):
                continue  # [DONE], a comment, or the cut-off start of the tail
            try:
                data = json.loads(event[6:])
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
            usage = data.get("usage")
            if not usage_seen and isinstance(usage, dict):
                usage_seen = True
                record.prompt_tokens = _count(usage.get("prompt_tokens"))
                record.completion_tokens = _count(usage.get("completion_tokens"))
            choices = data.get("choices")
            for choice in reversed(choices) if not finish_seen and isinstance(choices, list) else []:
                if isinstance(choice, dict) and choice.get("finish_reason"):
                    finish_seen = True
                    record.finish_reason = str(choice["finish_reason"])[:40]
                    break


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0
