"""Tools on every model. A template with tool syntax renders the tools itself; one without (ChatML here, Gemma in
`test_real_model`) gets them in the generic format: described in a system message, the answer held by a grammar to
`{"tool_calls": […]}` or `{"response": "…"}`. Either way a forced `tool_choice` makes the model call the tool with
arguments that match its JSON schema, and the answer carries them as `tool_calls`, whole or streamed as
`delta.tool_calls` chunks, with `finish_reason: "tool_calls"`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema_rs
import openai
import pytest

from server_support import ServerProcess

TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}{{ '<|im_start|>system\nTools: ' + (tools | tojson) + '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather by city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


ALTERNATING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' and loop.first %}{% elif message['role'] not in ('user', 'assistant') %}"
    "{{ raise_exception('only user and assistant turns') }}"
    "{% elif (message['role'] == 'user') != ((loop.index0 - (1 if messages[0]['role'] == 'system' else 0)) % 2 == 0) %}"
    "{{ raise_exception('user and assistant turns must alternate') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Like Gemma's: user and assistant must alternate and there is no tool role."""


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, make_model) -> Iterator[openai.OpenAI]:
    models = [
        make_model("tooled.gguf", size="1MB", seed=3, chat_template=TOOLS_TEMPLATE),
        make_model("plain.gguf", size="1MB", seed=4),
        make_model("alternating.gguf", size="1MB", seed=5, chat_template=ALTERNATING_TEMPLATE),
    ]
    root = tmp_path_factory.mktemp("appliance")
    policy = "[limits]\ncontext = 1024\nmax_tokens = 200\n"
    with ServerProcess(root, models=models, policy_text=policy, no_auth=True) as server:
        with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60) as client:
            yield client


def test_a_named_tool_choice_yields_a_call_whose_arguments_match_the_tools_schema(client: openai.OpenAI) -> None:
    for seed in (1, 2, 3):
        reply = client.chat.completions.create(
            model="tooled", messages=[{"role": "user", "content": "weather in Pune?"}], tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=120, seed=seed,
        )  # fmt: skip
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        (call,) = choice.message.tool_calls or []
        assert call.type == "function" and call.function.name == "get_weather"
        jsonschema_rs.validate(WEATHER, json.loads(call.function.arguments))


def test_a_required_tool_choice_calls_one_of_the_offered_tools(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tooled", messages=[{"role": "user", "content": "what now?"}], tools=TOOLS, tool_choice="required",
        max_tokens=120, seed=5,
    )  # fmt: skip
    (call,) = reply.choices[0].message.tool_calls or []
    assert call.function.name in {"get_weather", "get_time"}
    assert isinstance(json.loads(call.function.arguments), dict)


def test_a_tool_choice_naming_an_unknown_tool_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="tooled", messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "launch"}}, max_tokens=10,
        )  # fmt: skip
    assert refused.value.body["param"] == "tool_choice"  # type: ignore[index]


def test_tool_results_can_be_sent_back_in_the_conversation(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tooled", tools=TOOLS, max_tokens=5,
        messages=[
            {"role": "user", "content": "weather in Pune?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Pune", "days": 1}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"forecast": "sun"}'},
        ],
    )  # fmt: skip
    assert reply.choices[0].finish_reason in ("stop", "length")


# -- the generic format, for templates without tool syntax ----------------------------------------------------------

WEATHER_CHOICE = {"type": "function", "function": {"name": "get_weather"}}
PUNE = [{"role": "user", "content": "weather in Pune?"}]


@dataclass
class Streamed:
    """What a client assembles from a chat stream, as the OpenAI SDKs do."""

    content: str = ""
    calls: dict[int, dict[str, str]] = field(default_factory=dict)
    finishes: list[str] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    legacy: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, chunks: Iterable) -> Streamed:
        seen = cls()
        for chunk in chunks:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            delta = choice.delta
            if delta.role:
                seen.roles.append(delta.role)
            seen.content += delta.content or ""
            for call in delta.tool_calls or []:
                entry = seen.calls.setdefault(call.index, {"id": "", "name": "", "arguments": "", "type": ""})
                if call.id:
                    assert not entry["id"], "a call's id comes once, in its first chunk"
                    entry["id"] = call.id
                    entry["type"] = call.type or ""
                if call.function and call.function.name:
                    entry["name"] += call.function.name
                if call.function and call.function.arguments:
                    assert entry["name"], "a call's name comes before its arguments"
                    entry["arguments"] += call.function.arguments
            if delta.function_call is not None:
                self_call = seen.legacy
                self_call["name"] = self_call.get("name", "") + (delta.function_call.name or "")
                self_call["arguments"] = self_call.get("arguments", "") + (delta.function_call.arguments or "")
            if choice.finish_reason:
                seen.finishes.append(choice.finish_reason)
        return seen


@pytest.mark.parametrize("model", ["plain", "tooled"])
def test_a_forced_tool_call_streams_as_delta_tool_calls_ending_in_finish_reason_tool_calls(
    client: openai.OpenAI, model: str
) -> None:
    options = dict(model=model, messages=PUNE, tools=TOOLS, tool_choice=WEATHER_CHOICE, parallel_tool_calls=False,
                   max_tokens=200, seed=7)  # fmt: skip
    whole = client.chat.completions.create(**options)  # type: ignore[call-overload]
    streamed = Streamed.read(client.chat.completions.create(stream=True, **options))  # type: ignore[call-overload]
    assert streamed.roles == ["assistant"]
    assert streamed.finishes == ["tool_calls"]
    assert list(streamed.calls) == [0]
    call = streamed.calls[0]
    assert call["type"] == "function" and call["id"].startswith("call_") and call["name"] == "get_weather"
    jsonschema_rs.validate(WEATHER, json.loads(call["arguments"]))
    (answered,) = whole.choices[0].message.tool_calls or []
    assert json.loads(answered.function.arguments) == json.loads(call["arguments"])
    assert streamed.content == ""


def test_a_model_without_tool_syntax_calls_a_named_tool_with_arguments_its_schema_allows(client: openai.OpenAI) -> None:
    for seed in (1, 2, 3):
        reply = client.chat.completions.create(
            model="plain", messages=PUNE, tools=TOOLS, tool_choice=WEATHER_CHOICE, max_tokens=200, seed=seed,
            parallel_tool_calls=False,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        (call,) = choice.message.tool_calls or []
        assert call.function.name == "get_weather"
        jsonschema_rs.validate(WEATHER, json.loads(call.function.arguments))


def test_a_required_choice_without_parallel_calls_makes_exactly_one_call(client: openai.OpenAI) -> None:
    for seed in (1, 2, 3, 4):
        reply = client.chat.completions.create(
            model="plain", messages=PUNE, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
            max_tokens=160, seed=seed,
        )  # fmt: skip
        assert reply.choices[0].finish_reason == "tool_calls"
        assert len(reply.choices[0].message.tool_calls or []) == 1


def test_an_auto_choice_answers_in_words_or_calls_and_the_stream_says_the_same(client: openai.OpenAI) -> None:
    for seed in range(1, 5):
        options = dict(model="plain", messages=PUNE, tools=TOOLS, max_tokens=80, seed=seed, temperature=1.0)
        whole = client.chat.completions.create(**options).choices[0]  # type: ignore[call-overload]
        streamed = Streamed.read(client.chat.completions.create(stream=True, **options))  # type: ignore[call-overload]
        if whole.message.tool_calls:
            assert whole.finish_reason == streamed.finishes[0] == "tool_calls"
            assert [c.function.name for c in whole.message.tool_calls] == [c["name"] for c in streamed.calls.values()]
        else:
            assert whole.finish_reason in ("stop", "length") and streamed.finishes == [whole.finish_reason]
            assert streamed.content == whole.message.content
            assert '"response"' not in (whole.message.content or ""), "the generic envelope is not the answer"


def test_the_generic_format_describes_the_tools_to_the_model(client: openai.OpenAI) -> None:
    bare = client.chat.completions.create(model="plain", messages=PUNE, max_tokens=1)
    offered = client.chat.completions.create(model="plain", messages=PUNE, tools=TOOLS, max_tokens=1)
    declined = client.chat.completions.create(model="plain", messages=PUNE, tools=TOOLS, tool_choice="none",
                                              max_tokens=1)  # fmt: skip
    assert offered.usage.prompt_tokens > bare.usage.prompt_tokens + 50
    assert declined.usage.prompt_tokens == bare.usage.prompt_tokens


def test_a_tool_result_reaches_a_template_that_knows_no_tool_role_as_alternating_turns(client: openai.OpenAI) -> None:
    conversation = [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "weather in Pune and Delhi?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Pune", "days": 1}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Delhi", "days": 1}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sun"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
    ]  # fmt: skip
    reply = client.chat.completions.create(model="alternating", messages=conversation, tools=TOOLS, max_tokens=20)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(openai.BadRequestError) as refused:  # without tools the template sees the tool role, and says no
        client.chat.completions.create(model="alternating", messages=conversation, max_tokens=5)
    assert refused.value.code == "chat_template_error"


def test_the_legacy_functions_form_is_answered_with_a_function_call(client: openai.OpenAI) -> None:
    functions = [tool["function"] for tool in TOOLS]
    reply = client.chat.completions.create(
        model="plain", messages=PUNE, functions=functions, function_call={"name": "get_weather"}, max_tokens=120, seed=2,
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "function_call"
    assert choice.message.tool_calls is None and choice.message.function_call is not None
    assert choice.message.function_call.name == "get_weather"
    jsonschema_rs.validate(WEATHER, json.loads(choice.message.function_call.arguments))
    streamed = Streamed.read(client.chat.completions.create(
        model="plain", messages=PUNE, functions=functions, function_call={"name": "get_weather"}, max_tokens=120,
        seed=2, stream=True,
    ))  # fmt: skip
    assert streamed.finishes == ["function_call"] and not streamed.calls
    assert streamed.legacy["name"] == "get_weather"
    assert json.loads(streamed.legacy["arguments"]) == json.loads(choice.message.function_call.arguments)


def test_a_tool_choice_of_none_answers_in_plain_words(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="plain", messages=PUNE, tools=TOOLS, tool_choice="none",
                                           max_tokens=12, seed=1)  # fmt: skip
    choice = reply.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
    assert not (choice.message.content or "").lstrip().startswith('{"')


def test_a_json_schema_answer_streams_as_content_that_validates(client: openai.OpenAI) -> None:
    format_ = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}}
    options = dict(model="plain", messages=PUNE, response_format=format_, max_tokens=150, seed=4)
    whole = client.chat.completions.create(**options)  # type: ignore[call-overload]
    streamed = Streamed.read(client.chat.completions.create(stream=True, **options))  # type: ignore[call-overload]
    assert streamed.finishes == ["stop"] and not streamed.calls
    assert streamed.content == whole.choices[0].message.content
    jsonschema_rs.validate(WEATHER, json.loads(streamed.content))


def test_allowed_tools_limit_the_calls_to_the_tools_they_name(client: openai.OpenAI) -> None:
    choice = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "get_time"}}]}}  # fmt: skip
    for seed in (1, 2, 3):
        reply = client.chat.completions.create(model="plain", messages=PUNE, tools=TOOLS, tool_choice=choice,
                                               max_tokens=120, seed=seed, parallel_tool_calls=False)  # fmt: skip
        assert reply.choices[0].finish_reason == "tool_calls"
        assert {call.function.name for call in reply.choices[0].message.tool_calls or []} == {"get_time"}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="plain", messages=PUNE, tools=TOOLS, max_tokens=5, tool_choice={
            "type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
                {"type": "function", "function": {"name": "launch"}}]}})  # fmt: skip
    assert "launch" in refused.value.body["message"]  # type: ignore[index]
