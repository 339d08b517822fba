"""The OpenAI-compatible API of `sealbox serve`, assembled: routes, then auth, body limit and the audit record around.

Layers, outermost first: CORS (only for the policy's `cors_origins`; answers a browser's preflight) →
`RequestRecorder` (one audit record per API request, 503 when the log cannot write; a stranger's refusals counted per
address in the `RefusalTally`) → `HostCheck` (`--no-auth` only: 403 for a `Host` that is not this loopback address) →
`Authentication` (401: a stranger's body is never read) → `BodyLimit` (413, recorded with the caller's principal) →
FastAPI (validation 400, routes, OpenAI-shaped errors).
"""

from __future__ import annotations

import base64
import logging
import struct
import time
from pathlib import Path
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from sealbox.runtime.api_keys import ApiKeyError, Authenticator
from sealbox.runtime.audit.log import AuditLog
from sealbox.runtime.engine import EngineError, InvalidRequest
from sealbox.runtime.metrics import render_latest
from sealbox.runtime.policy import Policy
from sealbox.runtime.server import generation
from sealbox.runtime.server.authentication import Authentication
from sealbox.runtime.server.body_limit import BodyLimit
from sealbox.runtime.server.errors import ERROR_SCHEMA, ApiError, from_engine_error, install_error_handlers
from sealbox.runtime.server.host_check import HostCheck, loopback_hosts
from sealbox.runtime.server.model_registry import FailedModel, ModelRegistry, ModelSource, ServedModel
from sealbox.runtime.server.refusal_tally import RefusalTally
from sealbox.runtime.server.request_record import RequestRecord, RequestRecorder, current_record
from sealbox.runtime.server.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

log = logging.getLogger("sealbox.server")

MAX_EMBEDDING_INPUTS = 256


@dataclass(kw_only=True)
class ServerConfig:
    policy: Policy
    sources: list[ModelSource]
    authenticator: Authenticator | None
    audit: AuditLog | None
    threads: int | None = None
    on_started: Callable[[ModelRegistry], None] | None = None
    """Called once the models are up (the CLI writes the start record and prints the address)."""
    on_stopping: Callable[[], None] | None = None
    """Called after the engines stopped (uvicorn re-raises SIGTERM after shutdown: code after `run` may never run)."""
    listen: tuple[str, int] = ("127.0.0.1", 8080)
    """The address served: `--no-auth` accepts only `Host` headers naming it."""
    registry: ModelRegistry = field(default_factory=ModelRegistry)
    started_at: float = field(default_factory=time.time)
    calibration_dir: Path | None = None
    """Where each model's measured KV cache and attention choice is remembered (None: measured at every start)."""


def _record(request: Request) -> RequestRecord:
    record = current_record(request.scope)
    assert record is not None, "API routes run inside RequestRecorder"
    return record


def _model(config: ServerConfig, name: str, record: RequestRecord, *, embeddings: bool = False) -> ServedModel:
    record.model = name[:200]
    model = config.registry.get(name)
    if model is None:
        raise ApiError(404, f"the model {name!r} does not exist", code="model_not_found", param="model")
    record.model_sha256 = model.sha256 or None
    if isinstance(model, FailedModel):
        raise ApiError(503, f"the model {name!r} is not available: {model.problem}", code="model_unavailable")
    if embeddings and not model.embeddings:
        raise ApiError(400, f"the model {name!r} is not an embedding model", code="invalid_model", param="model")
    return model


def create_app(config: ServerConfig) -> ASGIApp:
    tally = RefusalTally(config.audit, interval_s=config.policy.server.refusal_summary_seconds)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await config.registry.start(config.sources, config.policy, threads=config.threads,
                                    calibration_dir=config.calibration_dir)  # fmt: skip
        if config.on_started is not None:
            config.on_started(config.registry)
        tally.start()
        try:
            yield
        finally:
            await tally.stop()  # the refusals counted since the last interval, before `server.stop`
            await config.registry.stop()
            if config.on_stopping is not None:
                config.on_stopping()

    app = FastAPI(title="sealbox", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    limits = config.policy.limits
    log_content = config.policy.audit.log_content

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """A load balancer's answer for anyone (ready or not, and counts); the details (paths, digests, problems)
        only for a caller with a valid API key, or on a `--no-auth` loopback server."""
        models = config.registry.models.values()
        audit_ok = config.audit is None or config.audit.failure is None
        ready_models = sum(1 for m in models if m.ready)
        ok = audit_ok and ready_models > 0
        body: dict[str, Any] = {"status": "ready" if ok else "not ready",
                                "models": {"ready": ready_models, "total": len(models)}}  # fmt: skip
        if _may_see_details(request):
            body["models"] = [_model_details(m) for m in models]
            body["audit"] = "ok" if audit_ok else str(config.audit.failure if config.audit else "")
        return JSONResponse(body, status_code=200 if ok else 503)

    def _may_see_details(request: Request) -> bool:
        if config.authenticator is None:
            return True  # `--no-auth`: loopback only, and HostCheck has refused other names
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        try:
            principal = config.authenticator.authenticate(token.strip())
        except ApiKeyError:
            return False
        if principal is None:  # a wrong key is counted like one sent to the API: guessing stays visible
            client = request.client
            tally.add(client=client.host if client else "unknown", reason="invalid_api_key", status=200,
                      endpoint="/ready")  # fmt: skip
        return principal is not None

    @app.get("/metrics")
    async def metrics() -> Response:
        content, media_type = render_latest()
        return Response(content, media_type=media_type)

    @app.get("/v1/engine/status")
    async def engine_status() -> dict[str, Any]:
        """What a gateway routes by: each model's free sequences, free KV cells and queue depth (authenticated)."""
        models = []
        for m in config.registry.ready:
            assert m.engine is not None
            stats = m.engine.stats()
            models.append({"id": m.name, "sha256": m.sha256, "sequences_total": stats.sequences_total,
                           "free_sequences": max(0, stats.sequences_total - stats.running), "queued": stats.queued,
                           "kv_cells_total": stats.kv_cells_total,
                           "kv_cells_free": max(0, stats.kv_cells_total - stats.kv_cells_used)})  # fmt: skip
        return {"object": "engine.status", "models": models, "queue_size": limits.queue_size}

    def model_entry(model: ServedModel) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": model.name, "object": "model", "created": int(config.started_at), "owned_by": "sealbox"}
        # Extra fields (OpenAI clients keep unknown ones): the license and origin the signed release states.
        if model.source.license:
            entry["license"] = model.source.license
        if model.source.origin:
            entry["origin"] = model.source.origin
        if model.source.sha256:
            entry["sha256"] = model.source.sha256
        return entry

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_entry(m) for m in config.registry.ready]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str, request: Request) -> dict[str, Any]:
        return model_entry(_model(config, name, _record(request)))

    async def generate(body: ChatCompletionRequest | CompletionRequest, request: Request) -> Response:
        record = _record(request)
        model = _model(config, body.model, record)
        if isinstance(body, ChatCompletionRequest):
            prepared = await generation.prepare_chat(body, model, cap=limits.max_tokens, principal=record.principal)
        else:
            prepared = generation.prepare_completion(body, model, cap=limits.max_tokens, principal=record.principal)
        record.prompt_tokens = prepared.prompt_tokens
        events = generation.start(model, prepared)
        if body.stream:
            return generation.stream(model, prepared, events, record, include_usage=body.include_usage,
                                     log_content=log_content)  # fmt: skip
        return await generation.answer(model, prepared, events, record, log_content=log_content,
                                       receive=request.receive)  # fmt: skip

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await generate(body, request)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await generate(body, request)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
        record = _record(request)
        model = _model(config, body.model, record, embeddings=True)
        engine = model.engine
        texts = _embedding_texts(body, engine)
        try:
            embedded = await engine.embed(texts)
        except EngineError as exc:
            raise from_engine_error(exc) from exc
        record.prompt_tokens = embedded.prompt_tokens
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(vector, body.encoding_format)}
            for i, vector in enumerate(embedded.vectors)
        ]
        usage = {"prompt_tokens": record.prompt_tokens, "total_tokens": record.prompt_tokens}
        return {"object": "list", "data": data, "model": model.name, "usage": usage}

    limited = BodyLimit(app, max_bytes=config.policy.server.max_body_bytes)
    checked: ASGIApp = Authentication(limited, authenticator=config.authenticator)
    if config.authenticator is None:
        checked = HostCheck(checked, allowed=loopback_hosts(*config.listen))
    recorded = RequestRecorder(checked, audit=config.audit, tally=tally)
    origins = config.policy.server.cors_origins
    if not origins:
        return recorded
    # Outermost: a browser's preflight carries no key and is answered here; answers (401s too) get the CORS headers.
    return CORSMiddleware(recorded, allow_origins=origins, allow_methods=["GET", "POST"], allow_headers=["*"],
                          expose_headers=["Retry-After"], max_age=600)  # fmt: skip


def _model_details(model: ServedModel | FailedModel) -> dict[str, Any]:
    details: dict[str, Any] = {"id": model.name, "ready": model.ready, "path": str(model.source.path),
                               "sha256": model.sha256 or None, "problem": model.problem, "context": model.context,
                               "sequences": model.sequences, "gpu_layers": model.gpu_layers}  # fmt: skip
    if isinstance(model, FailedModel):
        return details
    template = model.template
    if template is not None or model.template_problem is not None:
        refusals = template.refusals if template is not None else None
        details["chat_template"] = {
            "problem": model.template_problem,
            "limit_refusals": refusals.count if refusals else 0,
            "last_limit_refusal": refusals.last if refusals else None,
            "last_limit_refusal_at": refusals.last_at if refusals else None,
        }
    return details


def _embedding_texts(body: EmbeddingRequest, engine: Any) -> list[str]:
    value = body.input
    if isinstance(value, str):
        texts = [value]
    elif value and isinstance(value[0], str):
        texts = list(value)  # type: ignore[arg-type]
    else:
        inputs = [value] if isinstance(value[0], int) else value  # one list of token ids, or several
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise ApiError(400, f"at most {MAX_EMBEDDING_INPUTS} inputs per request", param="input")
        texts = []
        for i, tokens in enumerate(inputs):
            try:  # the engine refuses a token id outside the vocabulary (llama.cpp would abort the process)
                texts.append(engine.detokenize(list(tokens)))  # type: ignore[arg-type]
            except InvalidRequest as exc:
                raise ApiError(400, f"input {i}: {exc}", code="invalid_request", param="input") from exc
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f"at most {MAX_EMBEDDING_INPUTS} inputs per request", param="input")
    for i, text in enumerate(texts):
        if not text:
            raise ApiError(400, f"input {i} is empty", param="input")
    return texts


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document, with the refusals this server really sends: 400 with the OpenAI error body where
    FastAPI would advertise its 422 `detail` body (which `install_error_handlers` never lets out)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        refused = {"description": "Refused: the request is not valid",
                   "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}  # fmt: skip
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None:
                    responses["400"] = refused
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        components["Error"] = ERROR_SCHEMA
        app.openapi_schema = schema
    return app.openapi_schema


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
