"""The gateway's OpenAI API: the same front as `sealbox serve` (audit record, API keys, body limit), with routing to
engine hosts where a single host has its engine.

Layers, outermost first: `RequestRecorder` (one record per request in the gateway's own audit log, naming the engine
host and the model's sha256) → `Authentication` → `PrincipalFairness` → `BodyLimit` → the routes (forwarding, relaying).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from sealbox.runtime.api_keys import Authenticator
from sealbox.runtime.audit.log import AuditLog
from sealbox.runtime.gateway.engine_hosts import EngineHosts
from sealbox.runtime.gateway.fairness import InFlightLimit, PrincipalFairness
from sealbox.runtime.gateway.proxy import NoEngine, Upstream, forward, usage_of
from sealbox.runtime.gateway.routing import PrefixAffinity, Router, conversation_key
from sealbox.runtime.policy import Policy
from sealbox.runtime.server.authentication import Authentication
from sealbox.runtime.server.body_limit import BodyLimit
from sealbox.runtime.server.errors import ApiError, install_error_handlers
from sealbox.runtime.server.request_record import RequestRecord, RequestRecorder, current_record

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

    async def relay(request: Request) -> Any:
        record = _record(request)
        body = await request.body()
        parsed = _parse(body)
        model = parsed["model"]
        record.model = model[:200]
        stream = parsed.get("stream") is True
        record.stream = stream
        try:
            upstream = await forward(router, model=model, key=conversation_key(model, parsed), path=request.url.path,
                                     body=body, headers={"content-type": "application/json",
                                                         "x-sealbox-purpose": record.purpose}, stream=stream)  # fmt: skip
        except NoEngine as exc:
            if exc.full:
                raise ApiError(429, str(exc), code="engines_full",
                               headers={"Retry-After": str(exc.retry_after_s)}) from exc  # fmt: skip
            if exc.missing:
                raise ApiError(404, str(exc), code="model_not_found", param="model") from exc
            raise ApiError(503, str(exc), code="engines_unavailable") from exc
        if upstream.retried_from:
            engines.poll_soon()
        status = upstream.engine.model(model)
        record.model_sha256 = status.sha256 if status is not None else None
        record.extra.update(engine_host=upstream.engine.name, retried_from=upstream.retried_from)
        if not stream or upstream.status_code != 200:
            usage = usage_of(upstream.first)
            record.prompt_tokens, record.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
        return RelayResponse(upstream, record, on_failure=engines.poll_soon)

    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        app.add_api_route(path, relay, methods=["POST"], response_model=None)

    limited = BodyLimit(app, max_bytes=config.policy.server.max_body_bytes)
    fair = PrincipalFairness(limited, limit=InFlightLimit(config.policy.gateway.max_in_flight_per_principal))
    return RequestRecorder(Authentication(fair, authenticator=config.authenticator), audit=config.audit)


def _record(request: Request) -> RequestRecord:
    record = current_record(request.scope)
    assert record is not None, "API routes run inside RequestRecorder"
    return record


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


class RelayResponse(Response):
    """Sends the engine's answer on: its first bytes, then the rest. A failure after the first byte ends the stream
    with an error event (never a replay on another engine); the engine leaves rotation until it answers again."""

    def __init__(self, upstream: Upstream, record: RequestRecord, *, on_failure: Callable[[], None]) -> None:
        self.background = None
        self.upstream = upstream
        self.record = record
        self.on_failure = on_failure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        upstream = self.upstream
        try:
            await send({"type": "http.response.start", "status": upstream.status_code, "headers": upstream.headers()})
            streamed = upstream.chunks is not None
            await send({"type": "http.response.body", "body": upstream.first, "more_body": streamed})
            if not streamed:
                upstream.engine.served += 1
                return
            usage = StreamUsage(self.record)
            usage.feed(upstream.first)
            try:
                async for chunk in upstream.rest():
                    usage.feed(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError as exc:
                upstream.engine.fail(f"failed mid-stream: {type(exc).__name__}: {exc}")
                self.on_failure()
                self.record.finish_reason = "engine_failed"
                error = {"error": {"message": f"the engine host {upstream.engine.name} failed mid-answer; the request "
                                              "is not replayed (part of it was already sent)",
                                   "type": "service_unavailable", "param": None, "code": "engine_failed"}}  # fmt: skip
                await send({"type": "http.response.body", "body": f"data: {json.dumps(error)}\n\n".encode(),
                            "more_body": False})  # fmt: skip
                return
            upstream.engine.served += 1
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await upstream.close()


class StreamUsage:
    """Reads the token counts and finish reason a stream reports (its usage chunk, when the client asked for one) into
    the audit record, without parsing the chunks that carry only text."""

    def __init__(self, record: RequestRecord) -> None:
        self.record = record
        self.pending = b""

    def feed(self, chunk: bytes) -> None:
        self.pending += chunk
        *events, self.pending = self.pending.split(b"\n\n")
        if len(self.pending) > 1 << 16:  # not SSE as expected: stop looking rather than hold it
            self.pending = b""
        for event in events:
            if b'"usage":{' not in event and b'"finish_reason":"' not in event:
                continue
            try:
                data = json.loads(event.removeprefix(b"data: "))
            except ValueError:
                continue
            usage = data.get("usage") if isinstance(data, dict) else None
            if isinstance(usage, dict):
                self.record.prompt_tokens = int(usage.get("prompt_tokens", 0))
                self.record.completion_tokens = int(usage.get("completion_tokens", 0))
            for choice in data.get("choices") or [] if isinstance(data, dict) else []:
                if isinstance(choice, dict) and choice.get("finish_reason"):
                    self.record.finish_reason = str(choice["finish_reason"])
