"""Open WebUI's own requests, replayed through the official `openai` client: its first chat message with its built-in
tools (streamed, usage asked for), the same chat after a tool ran, and its title and tag tasks.

Every answer must come back the way Open WebUI reads it: a stream that names the role, ends with exactly one
`finish_reason` (`stop`, `length` or `tool_calls`) and then the usage; tool calls only as `delta.tool_calls` naming
an offered tool with JSON-object arguments; and no template marker or generic-format envelope in any text.

Two models: a generated one (ChatML, answers fast, every body exactly as sent) and the real Gemma 3 270M, a GGUF
without a chat template. On Gemma the title task's `max_completion_tokens` (1000) is lowered to the server's cap:
a base model writes to its limit, and 1000 tokens take minutes on a test machine's CPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

import openwebui_bodies as webui
from server_support import ServerProcess

MARKERS = ("<|im_end|>", "<|im_start|>", "<end_of_turn>", "<start_of_turn>", "<eos>", "<bos>", "<|eot_id|>",
           "<|start_header_id|>", "[INST]", '{"response"', '"tool_calls"')  # fmt: skip
TOOL_NAMES = {tool["function"]["name"] for tool in webui.BUILTIN_TOOLS}


@dataclass(frozen=True)
class Served:
    client: openai.OpenAI
    model: str
    title_tokens: int


@pytest.fixture(scope="module", params=["generated", "gemma"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Served]:
    if request.param == "gemma":
        model, policy, title_tokens = request.getfixturevalue("gemma_model"), "context = 2048\nmax_tokens = 96\n", 96
    else:
        model, policy, title_tokens = tiny_model, "context = 2048\nmax_tokens = 1000\n", 1000
    root = tmp_path_factory.mktemp(f"appliance-{request.param}")
    with ServerProcess(root, models=[model], policy_text=f"[limits]\n{policy}", no_auth=True, threads=2) as server:
        with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300) as client:
            yield Served(client, client.models.list().data[0].id, title_tokens)


def _no_markers(text: str) -> None:
    shown = [marker for marker in MARKERS if marker in text]
    assert not shown, f"the answer shows {shown}: {text!r}"


def _replay_stream(client: openai.OpenAI, body: dict[str, Any]) -> str:
    chunks = list(client.chat.completions.create(**body))
    assert chunks and chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length", "tool_calls"), finishes
    assert chunks[-1].choices == [] and chunks[-1].usage is not None, "usage comes last, as stream_options asked"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    _no_markers(text)
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
            entry["name"] += (call.function.name or "") if call.function else ""
            entry["arguments"] += (call.function.arguments or "") if call.function else ""
    if finishes[0] == "tool_calls":
        assert calls, "finish_reason tool_calls comes with calls"
        for call in calls.values():
            assert call["name"] in TOOL_NAMES
            assert isinstance(json.loads(call["arguments"]), dict)
    else:
        assert not calls, "calls only with finish_reason tool_calls"
        assert text or finishes[0] == "length", "an answer in words, streamed (empty only when cut short)"
    return finishes[0]


def test_open_webuis_first_chat_message_with_its_builtin_tools_streams_an_answer(served: Served) -> None:
    _replay_stream(served.client, webui.chat(served.model))


def test_open_webuis_chat_after_a_tool_ran_streams_an_answer(served: Served) -> None:
    _replay_stream(served.client, webui.chat_after_a_tool_call(served.model))


@pytest.mark.parametrize("task", ["title", "tags"])
def test_open_webuis_title_and_tag_tasks_are_answered_without_markers(served: Served, task: str) -> None:
    body = webui.title_task(served.model, served.title_tokens) if task == "title" else webui.tags_task(served.model)
    reply = served.client.chat.completions.create(**body)
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str) and choice.message.content
    _no_markers(choice.message.content)
