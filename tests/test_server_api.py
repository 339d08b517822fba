"""`sealbox serve` driven by the official `openai` client: what a client asks for is what it gets, and every refusal
arrives as the exception class the client maps its status to.

One real server process per module (loopback, a generated tiny GGUF and a generated embedding model), shared by the
tests; the admission test has its own server with one sequence and no queue.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema_rs
import openai
import pytest
from openai import omit

from server_support import ServerProcess, create_api_key, sealbox
from server_support import api_key, root, server  # noqa: F401, F811  (module fixtures)

CONTEXT = 512
MAX_TOKENS = 256
POLICY = f"""
[limits]
context = {CONTEXT}
max_tokens = {MAX_TOKENS}
max_sequences = 4
queue_size = 16
"""
HELLO = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def client(server: ServerProcess, api_key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key=api_key, max_retries=0, timeout=60) as client:
        yield client


def _greedy(client: openai.OpenAI, max_tokens: int, **options: object):
    return client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=max_tokens, temperature=0, **options)


# -- answers ---------------------------------------------------------------------------------------------------------


def test_models_list_names_every_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert sorted(model.id for model in models) == ["embedder", "tiny"]
    assert all(model.object == "model" and model.owned_by == "sealbox" for model in models)
    assert client.models.retrieve("tiny").id == "tiny"


def test_a_chat_completion_answers_with_text_and_counts_its_tokens(client: openai.OpenAI) -> None:
    answer = _greedy(client, 8)
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and answer.model == "tiny"
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    assert answer.usage.completion_tokens == 8
    assert answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_a_stream_delivers_the_same_text_as_the_answer_and_ends_with_usage(client: openai.OpenAI) -> None:
    whole = _greedy(client, 24)
    chunks = list(_greedy(client, 24, stream=True, stream_options={"include_usage": True}))

    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == ["length"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 24
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_a_text_completion_answers_the_prompt(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="tiny", prompt="the river", max_tokens=6, temperature=0)
    assert answer.object == "text_completion"
    assert answer.choices[0].text and answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 6


def test_a_stop_sequence_ends_the_answer_just_before_it(client: openai.OpenAI) -> None:
    free = _greedy(client, 40)
    text = free.choices[0].message.content
    assert free.choices[0].finish_reason == "length"
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    expected = text[: text.index(stop)]

    stopped = _greedy(client, 40, stop=[stop])
    assert stopped.choices[0].message.content == expected
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 40


def test_the_same_seed_gives_the_same_text_at_a_temperature_above_zero(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        answer = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=1.2, seed=seed)
        return answer.choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert sample(1235) != first  # the text is sampled, not greedy: the seed is what made the two the same


CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "capital": {"type": "boolean"},
        "districts": {"type": "array", "items": {"enum": ["north", "south", "east", "west"]}, "maxItems": 4},
        "founded": {"type": "integer"},
    },
    "required": ["city", "capital", "districts", "founded"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_json_schema_answer_parses_and_validates_against_the_schema(client: openai.OpenAI, seed: int) -> None:
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "a city as JSON"}], max_tokens=MAX_TOKENS, seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}},
    )  # fmt: skip
    assert answer.choices[0].finish_reason == "stop"
    document = json.loads(answer.choices[0].message.content)
    jsonschema_rs.validate(CITY, document)


def test_a_schema_grammar_keeps_raw_control_characters_out_of_strings() -> None:
    """JSON forbids U+0000-U+001F unescaped in a string; llama-cpp-python's converter alone would allow them."""
    from sealbox.runtime.server.structured_output import schema_grammar

    schema = {"type": "object", "properties": {"s": {"type": "string"}, "p": {"type": "string", "pattern": "^a.b$"}},
              "required": ["s", "p"]}  # fmt: skip
    grammar = schema_grammar(schema, param="response_format.json_schema.schema", strict=True)
    assert r'char ::= [^"\\\x7F\x00-\x1F]' in grammar and r'char ::= [^"\\]' not in grammar
    assert r'dot ::= [^"\\\x7F\x00-\x1F]' in grammar and r"dot ::= [^\x0A\x0D]" not in grammar


def test_a_strict_schema_using_a_keyword_the_grammar_cannot_enforce_is_refused(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}, "required": ["n"]}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=16,
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}},
        )  # fmt: skip
    assert refused.value.code == "invalid_schema"
    assert refused.value.param == "response_format.json_schema.schema"
    assert "properties.n: minimum" in refused.value.message


def test_embeddings_come_back_through_the_clients_base64_default_as_the_float_vectors(
    client: openai.OpenAI, server: ServerProcess, api_key: str
) -> None:
    texts = ["hello world", "the river"]
    result = client.embeddings.create(model="embedder", input=texts)  # the client asks for base64 and decodes it
    vectors = [item.embedding for item in result.data]
    assert [item.index for item in result.data] == [0, 1]
    assert len(vectors[0]) == len(vectors[1]) > 0
    assert all(math.isfinite(value) for vector in vectors for value in vector)
    assert vectors[0] != vectors[1]
    assert result.usage.prompt_tokens > 0

    floats = httpx.post(f"{server.base_url}/embeddings", headers={"Authorization": f"Bearer {api_key}"},
                        json={"model": "embedder", "input": texts, "encoding_format": "float"}).json()  # fmt: skip
    for decoded, plain in zip(vectors, (item["embedding"] for item in floats["data"]), strict=True):
        assert decoded == pytest.approx(plain, rel=1e-6, abs=1e-7)


def test_the_same_text_embeds_to_the_same_vector(client: openai.OpenAI) -> None:
    first = client.embeddings.create(model="embedder", input="patient record").data[0].embedding
    again = client.embeddings.create(model="embedder", input="patient record").data[0].embedding
    assert first == again


# -- refusals --------------------------------------------------------------------------------------------------------


def test_a_request_without_an_api_key_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        client.models.list(extra_headers={"Authorization": omit})
    assert refused.value.code == "invalid_api_key"
    assert refused.value.response.headers["www-authenticate"] == "Bearer"


def test_a_wrong_api_key_is_refused(server: ServerProcess) -> None:
    stranger = openai.OpenAI(base_url=server.base_url, api_key="sbx-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        stranger.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
    assert refused.value.code == "invalid_api_key"


def test_a_revoked_key_is_refused_from_the_next_request_on(server: ServerProcess, root: Path, api_key: str) -> None:
    bob = openai.OpenAI(base_url=server.base_url, api_key=create_api_key(root, "bob"), max_retries=0)
    assert bob.models.list().data

    sealbox("keys", "api", "revoke", "bob", root=root)

    with pytest.raises(openai.AuthenticationError):
        bob.models.list()
    alice = openai.OpenAI(base_url=server.base_url, api_key=api_key, max_retries=0)
    assert alice.models.list().data  # revoking one key leaves the others


def test_an_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=4)
    assert refused.value.code == "model_not_found" and refused.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_a_prompt_longer_than_the_context_is_refused_not_truncated(client: openai.OpenAI) -> None:
    long = [{"role": "user", "content": "hello " * CONTEXT}]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=long, max_tokens=4)
    assert refused.value.code == "context_length_exceeded"
    assert str(CONTEXT) in refused.value.message


def test_the_context_holds_exactly_prompt_plus_max_tokens(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hello " * 300}]
    prompt = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1).usage.prompt_tokens
    room = CONTEXT - prompt
    assert 0 < room < MAX_TOKENS

    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=room + 1)
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "max_tokens"

    fits = client.chat.completions.create(model="tiny", messages=messages, max_tokens=room, temperature=0)
    assert fits.usage.total_tokens <= CONTEXT


def test_max_tokens_above_the_policy_cap_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=MAX_TOKENS + 1)
    assert refused.value.code == "max_tokens_exceeded" and refused.value.param == "max_tokens"


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 17}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"seed": 2**70}, "seed"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"extra_body": {"max_token": 5}}, "max_token"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_bad_parameter_is_refused_naming_it(client: openai.OpenAI, options: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, **options)
    assert refused.value.param == param
    assert refused.value.type == "invalid_request_error"


def test_tools_are_served_when_the_chat_template_has_no_tool_syntax(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=60, tools=tools,
                                           tool_choice="required", seed=1)  # fmt: skip
    assert reply.choices[0].finish_reason == "tool_calls"
    assert [call.function.name for call in reply.choices[0].message.tool_calls or []][:1] == ["get_weather"]


# -- what the openai client and other apps send ------------------------------------------------------------------------

NULLS = ("temperature", "top_p", "n", "presence_penalty", "frequency_penalty", "stream", "stop", "max_tokens", "seed",
         "user", "tools", "tool_choice", "response_format", "stream_options", "logprobs", "top_logprobs", "logit_bias",
         "max_completion_tokens", "parallel_tool_calls", "functions", "function_call", "metadata", "store",
         "service_tier", "modalities", "reasoning_effort", "verbosity", "safety_identifier", "prompt_cache_key",
         "prediction", "audio", "web_search_options")  # fmt: skip


def test_null_means_the_default_for_every_optional_field(server: ServerProcess, api_key: str) -> None:
    body = {"model": "tiny", "messages": HELLO, **{name: None for name in NULLS}}
    headers = {"authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        answered = http.post("/v1/chat/completions", json=body)
        assert answered.status_code == 200, answered.text
        defaults = http.post("/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "max_tokens": None,
                                                           "temperature": 0, "seed": None})  # fmt: skip
        assert defaults.status_code == 200, defaults.text
        text = http.post("/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": None, "n": None,
                                                  "temperature": None, "echo": None, "suffix": None, "best_of": None})  # fmt: skip
        assert text.status_code == 200, text.text
        assert text.json()["usage"]["completion_tokens"] <= 16, "null max_tokens is the completions default, 16"
    message = answered.json()["choices"][0]
    assert message["finish_reason"] in ("stop", "length") and isinstance(message["message"]["content"], str)


def test_fields_openai_defines_are_accepted_at_values_that_can_be_honoured(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny", max_completion_tokens=4, safety_identifier="user-hash-1", prompt_cache_key="chat-42",
        service_tier="auto", modalities=["text"], reasoning_effort="low", verbosity="low", parallel_tool_calls=True,
        store=False, metadata={"app": "test"}, user="alice", stream_options=None,
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hello"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "hi"}], "refusal": None, "annotations": [],
             "audio": None},
            {"role": "assistant", "content": None, "refusal": "I cannot help with that."},
            {"role": "user", "content": "world"},
        ],
    )  # fmt: skip
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4


@pytest.mark.parametrize(
    ("options", "param", "named"),
    [
        ({"modalities": ["text", "audio"]}, "modalities", "audio"),
        ({"service_tier": "priority"}, "service_tier", "priority"),
        ({"store": True}, "store", "store"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "audio"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_value_that_cannot_be_honoured_is_refused_naming_it_and_why(
    client: openai.OpenAI, options: dict, param: str, named: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, **options)
    assert refused.value.param == param
    message = refused.value.body["message"]  # type: ignore[index]
    assert named in message and ("not offered" in message or "not supported" in message), message


def test_an_embedding_request_to_a_model_without_pooling_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="tiny", input="hello")
    assert refused.value.param == "model"


# -- admission ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_sequence_client(root: Path, api_key: str, tiny_model: Path) -> Iterator[openai.OpenAI]:
    """A server that runs one sequence and lets nothing wait: a second request while one runs is a 429."""
    policy = root / "one-sequence.toml"
    policy.write_text("[limits]\ncontext = 1024\nmax_tokens = 1000\nmax_sequences = 1\nqueue_size = 0\n")
    with ServerProcess(root, models=[tiny_model], policy=policy, threads=1) as process:
        with openai.OpenAI(base_url=process.base_url, api_key=api_key, max_retries=0, timeout=120) as client:
            yield client


def test_a_request_beyond_the_sequences_and_the_queue_is_told_to_retry_later(
    one_sequence_client: openai.OpenAI,
) -> None:
    client = one_sequence_client
    # Greedy, so that it runs its full length (a sampled one could draw the end token early): seconds of decoding,
    # against the one round trip the second request needs.
    holder = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=800, temperature=0, stream=True)
    first = next(iter(holder))  # the stream has started: its request holds the only sequence until it ends
    assert first.choices[0].delta.role == "assistant"

    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
    assert refused.value.code == "server_overloaded"
    assert int(refused.value.response.headers["retry-after"]) >= 1

    rest = list(holder)  # the running stream was not disturbed by the refusal
    assert [chunk.choices[0].finish_reason for chunk in rest if chunk.choices[0].finish_reason] == ["length"]
    # Its sequence is given back before its last event is sent: the next request is admitted.
    admitted = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, temperature=0)
    assert admitted.usage.completion_tokens == 4
