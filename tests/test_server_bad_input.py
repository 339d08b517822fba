"""Bad input to `sealbox serve`, sent raw with httpx: every one is a 4xx with the OpenAI error body
`{"error": {"message", "type", "param", "code"}}` — never a 5xx, never FastAPI's 422 `detail`, never a dead server.

One real server per module, with a small body limit so that the 413 cases stay cheap.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from server_support import ServerProcess
from server_support import api_key, root, server  # noqa: F401, F811  (module fixtures)

MAX_BODY = 64 * 1024
MAX_TOKENS = 64
POLICY = f"""
[server]
max_body_bytes = {MAX_BODY}

[limits]
context = 512
max_tokens = {MAX_TOKENS}
max_sequences = 2
queue_size = 8
"""
ANY = object()
"""The case names no `param` to check."""
JSON = {"content-type": "application/json"}
USER = {"role": "user", "content": "hello"}


@pytest.fixture(scope="module")
def http(server: ServerProcess, api_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60) as client:
        yield client


def chat(**fields: Any) -> dict[str, Any]:
    return {"json": {"model": "tiny", "messages": [USER], "max_tokens": 4, **fields}}


def raw(body: bytes, content_type: str | None = "application/json") -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": content_type} if content_type else {}}


def schema(json_schema: dict[str, Any]) -> dict[str, Any]:
    return chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": json_schema}})


def _chunks(total: int) -> Iterator[bytes]:
    yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
    for _ in range(total // 4096):
        yield b"a" * 4096
    yield b'"}]}'


CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
CASES = [
    # -- the body as a whole
    pytest.param(CHAT, raw(b'{"model": "tiny", "messages": ['), 400, None, id="malformed JSON"),
    pytest.param(CHAT, raw(b"[1, 2, 3]"), 400, None, id="a JSON array body"),
    pytest.param(CHAT, raw(b'"hello"'), 400, None, id="a JSON string body"),
    pytest.param(CHAT, raw(b"null"), 400, None, id="a JSON null body"),
    pytest.param(CHAT, raw(b""), 400, None, id="an empty body"),
    pytest.param(CHAT, raw(json.dumps(chat()["json"]).encode(), "text/plain"), 415, None, id="a text/plain body"),
    pytest.param(CHAT, {"data": {"model": "tiny"}}, 415, None, id="a form-encoded body"),
    pytest.param(CHAT, raw(json.dumps(chat()["json"]).encode(), None), 415, None, id="no content type"),
    pytest.param(CHAT, raw(b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}'), 400, None,
                 id="a body that is not UTF-8"),  # fmt: skip
    pytest.param(CHAT, raw(b'{"metadata": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"), 400, None,
                 id="JSON nested 20000 deep"),  # fmt: skip
    pytest.param(CHAT, raw(b'{"model": "tiny", "messages": [], "seed": ' + b"9" * 5000 + b"}"), 400, None,
                 id="an integer of 5000 digits"),  # fmt: skip
    pytest.param(CHAT, raw(b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'),
                 400, "temperature", id="NaN"),  # fmt: skip
    pytest.param(CHAT, raw(b'{"model": "tiny", "messages": [' + b"x" * (2 * MAX_BODY) + b"]}"), 413, None,
                 id="a body above max_body_bytes"),  # fmt: skip
    pytest.param(CHAT, {"content": _chunks(2 * MAX_BODY), "headers": JSON}, 413, None,
                 id="a chunked body above max_body_bytes"),  # fmt: skip
    # -- fields
    pytest.param(CHAT, {"json": {"messages": [USER]}}, 400, "model", id="no model"),
    pytest.param(CHAT, {"json": {"model": "tiny"}}, 400, "messages", id="no messages"),
    pytest.param(CHAT, chat(model=7), 400, "model", id="model is a number"),
    pytest.param(CHAT, chat(messages="hello"), 400, "messages", id="messages is a string"),
    pytest.param(CHAT, chat(messages=[]), 400, "messages", id="empty messages"),
    pytest.param(CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role", id="invalid role"),
    pytest.param(CHAT, chat(messages=[{"role": "user"}]), 400, "messages.0", id="a message without content"),
    pytest.param(CHAT, chat(messages=[{"role": "tool", "content": "x"}]), 400, "messages.0", id="tool without id"),
    pytest.param(CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
                 400, "messages.0.content.0.type", id="an image part"),  # fmt: skip
    pytest.param(CHAT, raw(b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'), 400,
                 "messages.0.content", id="a lone surrogate"),  # fmt: skip
    pytest.param(CHAT, raw(b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
                           b'"metadata": {"\\udc80": "x"}}'), 400, "metadata.\\udc80",
                 id="a lone surrogate in a key"),  # fmt: skip
    pytest.param(CHAT, raw(b'{"model": "\\ud83d", "messages": [{"role": "user", "content": "x"}]}'), 400, "model",
                 id="a lone surrogate in the model name"),  # fmt: skip
    pytest.param(CHAT, chat(max_tokens="ten"), 400, "max_tokens", id="max_tokens is a string"),
    pytest.param(CHAT, chat(max_tokens=-1), 400, "max_tokens", id="negative max_tokens"),
    pytest.param(CHAT, chat(max_tokens=10**30), 400, "max_tokens", id="huge max_tokens"),
    pytest.param(CHAT, chat(max_tokens=MAX_TOKENS + 1), 400, "max_tokens", id="max_tokens above the policy"),
    pytest.param(CHAT, chat(max_tokens=3, max_completion_tokens=4), 400, None, id="two max_tokens that disagree"),
    pytest.param(CHAT, chat(foo=1), 400, "foo", id="an unknown field"),
    pytest.param(CHAT, chat(max_token=5), 400, "max_token", id="a misspelt field"),
    pytest.param(CHAT, chat(Model="tiny"), 400, "Model", id="a field in the wrong case"),
    pytest.param(CHAT, chat(temperature="hot"), 400, "temperature", id="temperature is a string"),
    pytest.param(CHAT, chat(temperature=-1), 400, "temperature", id="negative temperature"),
    pytest.param(CHAT, chat(stream=[1]), 400, "stream", id="stream is a list"),
    pytest.param(CHAT, chat(n=17), 400, "n", id="n above 16"),
    pytest.param(CHAT, chat(n=0), 400, "n", id="n of 0"),
    pytest.param(CHAT, chat(top_logprobs=3), 400, None, id="top_logprobs without logprobs"),
    pytest.param(CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", id="top_logprobs above 20"),
    pytest.param(CHAT, chat(logit_bias={"five": 10}), 400, "logit_bias", id="a logit_bias key that is no token id"),
    pytest.param(CHAT, chat(logit_bias={"5": 101}), 400, "logit_bias", id="a logit_bias above 100"),
    pytest.param(CHAT, chat(logit_bias={"99999999": 5}), 400, None, id="a logit_bias on a token outside the vocabulary"),
    pytest.param(CHAT, chat(stop=[""]), 400, "stop", id="an empty stop sequence"),
    pytest.param(CHAT, chat(stop=list("abcde")), 400, "stop", id="five stop sequences"),
    pytest.param(CHAT, chat(seed=2**70), 400, "seed", id="seed above 64 bits"),
    pytest.param(CHAT, chat(top_k=2**40), 400, "top_k", id="top_k above a C int"),
    pytest.param(CHAT, chat(metadata={"a": 1}), 400, "metadata.a", id="metadata that is not text"),
    pytest.param(CHAT, chat(tool_choice="required"), 400, None, id="tool_choice without tools"),
    pytest.param(CHAT, chat(tools=[{"type": "custom", "custom": {"name": "f"}}]), 400, "tools.0.type",
                 id="a custom tool"),  # fmt: skip
    pytest.param(CHAT, chat(modalities=["text", "audio"]), 400, "modalities", id="audio output"),
    pytest.param(CHAT, chat(service_tier="priority"), 400, "service_tier", id="a service tier not offered"),
    pytest.param(CHAT, chat(store=True), 400, "store", id="store true"),
    pytest.param(CHAT, chat(web_search_options={}), 400, "web_search_options", id="web search"),
    pytest.param(CHAT, chat(messages=[{"role": "assistant", "content": "x", "audio": {"id": "a1"}}]), 400,
                 "messages.0.audio", id="replayed audio"),  # fmt: skip
    pytest.param(CHAT, chat(functions=[{"name": "f"}], tools=[{"type": "function", "function": {"name": "f"}}]),
                 400, None, id="functions and tools together"),  # fmt: skip
    pytest.param(CHAT, chat(response_format={"type": "json_schema"}), 400, "response_format",
                 id="json_schema without a schema"),  # fmt: skip
    pytest.param(CHAT, chat(response_format={"type": "yaml"}), 400, "response_format.type", id="unknown format"),
    pytest.param(CHAT, schema({"type": "wat"}), 400, "response_format.json_schema.schema", id="a schema of no type"),
    pytest.param(CHAT, schema({"$ref": "https://example.com/schema.json"}), 400, "response_format.json_schema.schema",
                 id="a remote $ref"),  # fmt: skip
    pytest.param(CHAT, schema({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}), 400,
                 "response_format.json_schema.schema", id="a $ref to itself"),  # fmt: skip
    pytest.param(CHAT, schema({"type": "string", "maxLength": 10**9}), 400, "response_format.json_schema.schema",
                 id="a schema that would expand into gigabytes of grammar"),  # fmt: skip
    pytest.param(CHAT, schema({"type": "string", "pattern": "^a{100000000}$"}), 400,
                 "response_format.json_schema.schema", id="a pattern that would expand into gigabytes"),  # fmt: skip
    pytest.param(CHAT, chat(messages=[{"role": "user", "content": "hello " * 600}]), 400, "messages",
                 id="a prompt longer than the context"),  # fmt: skip
    # -- text completions
    pytest.param(COMPLETIONS, {"json": {"model": "tiny", "prompt": ""}}, 400, "prompt", id="an empty prompt"),
    pytest.param(COMPLETIONS, {"json": {"model": "tiny", "prompt": ["a", ""]}}, 400, "prompt", id="an empty second prompt"),
    pytest.param(COMPLETIONS, {"json": {"model": "tiny", "prompt": ["a"] * 17}}, 400, None, id="17 prompts"),
    pytest.param(COMPLETIONS, {"json": {"model": "tiny", "prompt": [[1, 2], [10**9]]}}, 400, None,
                 id="a token id too large in the second prompt"),  # fmt: skip
    pytest.param(COMPLETIONS, {"json": {"model": "tiny", "prompt": [10**9]}}, 400, None, id="a token id too large"),
    pytest.param(COMPLETIONS, {"json": {"model": "tiny", "prompt": [-1]}}, 400, None, id="a negative token id"),
    pytest.param(COMPLETIONS, {"json": {"model": "tiny", "prompt": "x", "echo": True, "logprobs": 1}}, 400, None,
                 id="echo with logprobs"),  # fmt: skip
    pytest.param(COMPLETIONS, {"json": {"model": "tiny", "prompt": "x", "logprobs": 6}}, 400, "logprobs",
                 id="completion logprobs above 5"),  # fmt: skip
    pytest.param(COMPLETIONS, {"json": {"model": "tiny", "prompt": "x", "best_of": 2}}, 400, "best_of", id="best_of"),
    # -- embeddings (a token id outside the vocabulary used to abort the whole server inside llama.cpp)
    pytest.param(EMBEDDINGS, {"json": {"model": "embedder", "input": [-1]}}, 400, "input", id="embed token -1"),
    pytest.param(EMBEDDINGS, {"json": {"model": "embedder", "input": [10**9]}}, 400, "input", id="embed token 1e9"),
    pytest.param(EMBEDDINGS, {"json": {"model": "embedder", "input": [[1, 2], [-5]]}}, 400, "input",
                 id="embed a bad token in the second input"),  # fmt: skip
    pytest.param(EMBEDDINGS, {"json": {"model": "embedder", "input": []}}, 400, None, id="embed nothing"),
    pytest.param(EMBEDDINGS, {"json": {"model": "embedder", "input": [""]}}, 400, "input", id="embed an empty text"),
    pytest.param(EMBEDDINGS, {"json": {"model": "embedder", "input": ["x"] * 257}}, 400, "input",
                 id="embed too many inputs"),  # fmt: skip
    pytest.param(EMBEDDINGS, {"json": {"model": "embedder", "input": "x", "dimensions": 8}}, 400, None,
                 id="embed with dimensions"),  # fmt: skip
    pytest.param(EMBEDDINGS, {"json": {"model": "embedder", "input": "x", "encoding_format": "hex"}}, 400,
                 "encoding_format", id="embed as hex"),  # fmt: skip
    pytest.param(EMBEDDINGS, {"json": {"model": "tiny", "input": "x"}}, 400, "model", id="embed with a chat model"),
    pytest.param(EMBEDDINGS, {"json": {"model": "nope", "input": "x"}}, 404, "model", id="embed with no such model"),
    # -- paths, methods, headers
    pytest.param(CHAT, chat(model="gpt-4o"), 404, "model", id="an unknown model"),
    pytest.param("/v1/nope", {"json": {}}, 404, None, id="an unknown endpoint"),
    pytest.param("GET /v1/chat/completions", {}, 405, None, id="GET on a POST endpoint"),
    pytest.param("PUT /v1/models", {"json": {}}, 405, None, id="PUT on a GET endpoint"),
    pytest.param("GET /v1/models/nope", {}, 404, "model", id="retrieve an unknown model"),
    pytest.param(CHAT, {**chat(), "headers": {"x-sealbox-purpose": "\x01"}}, 400, "X-Sealbox-Purpose",
                 id="a purpose that is not printable"),  # fmt: skip
    pytest.param(CHAT, {**chat(), "headers": {"authorization": ""}}, 401, None, id="no API key"),
    pytest.param(CHAT, {**chat(), "headers": {"authorization": "Basic dXNlcjpwYXNz"}}, 401, None, id="basic auth"),
    pytest.param(CHAT, {**chat(), "headers": {"authorization": "Bearer sbx-wrong"}}, 401, None, id="a wrong key"),
    pytest.param("/v1/nope", {"headers": {"authorization": ""}}, 401, None, id="an unknown path, without a key"),
]


@pytest.mark.parametrize(("target", "request_options", "status", "param"), CASES)
def test_bad_input_is_a_4xx_with_an_openai_error_body(
    http: httpx.Client, server: ServerProcess, target: str, request_options: dict[str, Any], status: int, param: object
) -> None:
    method, _, path = target.rpartition(" ")
    response = http.request(method or "POST", path, **request_options)

    assert response.status_code == status, response.text
    assert server.alive, server.stderr
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in {"invalid_request_error", "authentication_error", "not_found_error"}
    if param is not ANY:
        assert error["param"] == param, error


def test_a_refusal_never_reaches_the_engine_and_the_server_keeps_answering(http: httpx.Client) -> None:
    for _ in range(3):
        assert http.post(CHAT, json={"model": "tiny", "messages": [], "max_tokens": 1}).status_code == 400
    answer = http.post(CHAT, json={"model": "tiny", "messages": [USER], "max_tokens": 2, "temperature": 0})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
    assert http.get("/ready").json()["status"] == "ready"


def test_the_openapi_document_advertises_the_openai_error_body_not_a_422(http: httpx.Client) -> None:
    document = http.get("/openapi.json").json()
    responses = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in responses
    assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_a_strangers_oversized_body_is_refused_401_before_it_is_read(server: ServerProcess) -> None:
    answer = httpx.post(f"{server.url}/v1/chat/completions", content=b"x" * (4 * MAX_BODY),
                        headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"


def test_random_paths_do_not_grow_the_metrics_one_series_per_path(server: ServerProcess) -> None:
    for i in range(20):
        assert httpx.get(f"{server.url}/v1/probe-{i}", timeout=30).status_code == 401
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert "probe-" not in metrics
    assert 'sealbox_http_responses_total{endpoint="other",status="401"}' in metrics
