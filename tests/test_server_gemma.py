"""The real Gemma 3 270M, a GGUF without a chat template, served as a user would meet it.

It is prompted in Gemma's own turns (not ChatML), so its answers never carry a foreign marker; its own markers are
control tokens the client never sees; and tools work on it through the generic format, streamed as
`delta.tool_calls`. (A base model: what it says is not the point, how it is framed is.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from server_support import ServerProcess

MARKERS = ("<|im_end|>", "<|im_start|>", "<end_of_turn>", "<start_of_turn>", "<eos>", "<bos>")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                         "required": ["city"]}}}]  # fmt: skip


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, gemma_model: Path) -> Iterator[openai.OpenAI]:
    root = tmp_path_factory.mktemp("appliance")
    policy = "[limits]\ncontext = 1024\nmax_tokens = 64\nmax_sequences = 2\n"
    with ServerProcess(root, models=[gemma_model], policy_text=policy, no_auth=True, threads=2) as server:
        with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300) as client:
            yield client


def _model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_gemma_without_a_template_is_prompted_in_gemmas_own_turns(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=_model(client), messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=1)  # fmt: skip
    # <bos> <start_of_turn> user \n hi <end_of_turn> \n <start_of_turn> model \n: ten tokens, each marker one token.
    # ChatML would spell "<|im_start|>" and "<|im_end|>" out in pieces Gemma's vocabulary has for plain text.
    assert reply.usage.prompt_tokens == 10


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_gemmas_answers_never_show_a_turn_marker(client: openai.OpenAI, stream: bool) -> None:
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "Name three rivers."},
                {"role": "assistant", "content": "The Nile, the Rhine and the Ganges."},
                {"role": "user", "content": "And three mountains?"}]  # fmt: skip
    options = dict(model=_model(client), messages=messages, max_tokens=48, temperature=0)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **options))  # type: ignore[call-overload]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        reply = client.chat.completions.create(**options)  # type: ignore[call-overload]
        text, finish = reply.choices[0].message.content or "", [reply.choices[0].finish_reason]
    assert text and finish in (["stop"], ["length"])
    assert not [marker for marker in MARKERS if marker in text], text


def test_gemma_streams_a_required_tool_call_as_delta_tool_calls(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=_model(client), messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=TOOLS,
        tool_choice="required", parallel_tool_calls=False, stream=True, max_tokens=48, seed=1,
    ))  # fmt: skip
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    calls = [call for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or [])]
    assert finish == ["tool_calls"]
    assert calls[0].id and calls[0].function.name == "get_weather"
    arguments = json.loads("".join(call.function.arguments or "" for call in calls))
    assert isinstance(arguments.get("city"), str)
