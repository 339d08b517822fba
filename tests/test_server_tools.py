"""Tools, for a model whose chat template offers them: a forced `tool_choice` makes the model call the tool with
arguments that match its JSON schema (a grammar allows nothing else), and the answer carries them as `tool_calls`."""

from __future__ import annotations

import json
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, make_model) -> Iterator[openai.OpenAI]:
    model = make_model("tooled.gguf", size="1MB", seed=3, chat_template=TOOLS_TEMPLATE)
    root = tmp_path_factory.mktemp("appliance")
    policy = "[limits]\ncontext = 1024\nmax_tokens = 200\n"
    with ServerProcess(root, models=[model], policy_text=policy, no_auth=True) as server:
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
