"""Forwarding one OpenAI request to an engine host, and the rule that makes a failover safe.

A request may move to another engine only while its client has received nothing: until the first byte of a
stream, or the whole of a non-streamed answer, is in the gateway's hands. After that a failure ends the stream with
an error event; the request is never replayed (the client would see tokens twice, and the engine's work twice).
An engine that refuses with 429 or 503, or cannot be reached, is simply the wrong engine: the next one is tried.

The answer's bytes are handed on as they arrive, never parsed or re-encoded on the way (the audit record's token
counts come from the end of the answer, read once).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpcore

from sealbox.runtime.gateway.engine_hosts import UPSTREAM_ERRORS, EngineHost, EngineHostError
from sealbox.runtime.gateway.routing import Router

log = logging.getLogger("sealbox.gateway")

FORWARDED_HEADERS = ("content-type", "x-sealbox-purpose")
RETURNED_HEADERS = frozenset({b"content-type", b"retry-after"})
RETRY_STATUSES = frozenset({429, 502, 503, 504})


class NoEngine(Exception):
    """No engine could take the request: `full` when all were busy (429), `missing` when no engine in rotation has
    the model (404), else every engine failed (503)."""

    def __init__(self, message: str, *, full: bool, retry_after_s: int = 1, missing: bool = False) -> None:
        super().__init__(message)
        self.full = full
        self.missing = missing
        self.retry_after_s = retry_after_s


@dataclass
class Upstream:
    """An engine's answer whose first bytes are in hand; the rest (if streamed) is read by `relay`."""

    engine: EngineHost
    model: str
    response: httpcore.Response
    first: bytes
    chunks: AsyncIterator[bytes] | None = None
    """The stream's raw iterator, already past `first` (None for a whole answer); it raises one of
    UPSTREAM_ERRORS if the engine fails mid-way (the caller ends the stream)."""
    retried_from: list[str] = field(default_factory=list)
    finished: bool = False

    @property
    def status_code(self) -> int:
        return self.response.status

    def headers(self) -> list[tuple[bytes, bytes]]:
        kept = [(k.lower(), v) for k, v in self.response.headers if k.lower() in RETURNED_HEADERS]
        return [*kept, (b"x-sealbox-engine", self.engine.name.encode())]

    async def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.end(self.model)
            await self.response.aclose()


async def forward(router: Router, *, model: str, key: str | None, path: str, body: bytes,
                  headers: dict[str, str], stream: bool) -> Upstream:  # fmt: skip
    """Send the request to the best engine; on a refusal or failure before the first byte, to the next one.

    Raises:
        NoEngine: every engine was full, failed, or none serves `model`.
    """
    tried: set[str] = set()
    failed: list[str] = []
    full = 0
    retry_after = 1
    while True:
        candidates = router.candidates(model, key, exclude=tried)
        if not candidates:
            break
        engine = candidates[0]
        tried.add(engine.name)
        engine.begin(model)
        try:
            upstream = await _attempt(engine, model, path, body, headers, stream)
        except (*UPSTREAM_ERRORS, EngineHostError) as exc:
            engine.end(model)
            engine.fail(f"{type(exc).__name__}: {exc}")
            failed.append(engine.name)
            log.warning("engine %s failed before the first byte (%s); trying another", engine.name, exc)
            continue
        if upstream.status_code in RETRY_STATUSES:
            await upstream.close()
            if upstream.status_code == 429:
                full += 1
                retry_after = max(retry_after, _retry_after(upstream.response))
            else:
                engine.fail(f"answered {upstream.status_code}")
                failed.append(engine.name)
            continue
        upstream.retried_from = failed
        router.affinity.remember(key, engine.name)
        return upstream
    if not router.serves(model) and not full and not failed:
        if any(h.healthy for h in router.hosts):
            raise NoEngine(f"the model {model!r} does not exist on any engine host", full=False, missing=True)
        raise NoEngine("no engine host is in rotation", full=False)
    if failed and not full and not any(h.healthy for h in router.hosts):
        raise NoEngine(f"every engine host failed ({', '.join(failed)})", full=False)
    raise NoEngine("every engine host is at capacity; retry later", full=True, retry_after_s=retry_after)


async def _attempt(engine: EngineHost, model: str, path: str, body: bytes, headers: dict[str, str],
                   stream: bool) -> Upstream:  # fmt: skip
    sent = engine.forwarding_headers()
    sent += [(k.encode(), v.encode()) for k, v in headers.items() if k in FORWARDED_HEADERS]
    sent.append((b"content-length", str(len(body)).encode()))
    request = httpcore.Request("POST", engine.url + path, headers=sent, content=body,
                               extensions={"timeout": engine.timeouts()})  # fmt: skip
    response = await engine.pool.handle_async_request(request)
    try:
        engine.check_certificate(response)
        chunks = None
        if stream and response.status == 200:
            chunks = aiter(response.stream)  # type: ignore[arg-type]  # an async stream for an async pool
            # The first byte decides: until then, another engine may take the request.
            first = await anext(chunks, b"")
            if not first:
                raise EngineHostError(f"{engine.name}: the stream ended before its first byte")
        else:
            first = await response.aread()  # a non-streamed answer is whole before the client sees a byte of it
    except BaseException:
        await response.aclose()
        raise
    return Upstream(engine=engine, model=model, response=response, first=first, chunks=chunks)


def _retry_after(response: httpcore.Response) -> int:
    value = next((v for k, v in response.headers if k.lower() == b"retry-after"), b"1")
    try:
        return max(1, min(60, int(value)))
    except ValueError:
        return 1


USAGE_KEY = b'"usage":'


def usage_of(body: bytes) -> dict[str, int]:
    """Token counts from a non-streamed answer, for the gateway's audit record (zeros if absent).

    Only the `usage` object is decoded, found from the end: an embeddings answer is mostly numbers the gateway has
    no use for. `"usage":` cannot occur inside a JSON string (a quote there is escaped), so the match is the key.
    """
    at = body.rfind(USAGE_KEY)
    if at < 0:
        return {"prompt_tokens": 0, "completion_tokens": 0}
    try:
        usage, _ = json.JSONDecoder().raw_decode(body[at + len(USAGE_KEY):].decode("utf-8").lstrip())
        return {"prompt_tokens": int(usage.get("prompt_tokens", 0)),
                "completion_tokens": int(usage.get("completion_tokens", 0))}  # fmt: skip
    except (ValueError, AttributeError, TypeError):
        return {"prompt_tokens": 0, "completion_tokens": 0}
