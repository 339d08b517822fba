"""One reading of generated text for both the answer and the stream: whatever way the text is cut into pieces, the
stream's chunks add up to the whole answer, tool calls included."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from sealbox.runtime.server.response_shape import CompletionShape
from sealbox.runtime.server.tool_calls import GenericParser, NativeParser, ToolCallParser

NAMES = frozenset({"get_weather", "get_time"})
WORDS = 'Hi "you" \\ 😀 é\n\tend \u2028'


def _parsers() -> dict[str, Callable[[], ToolCallParser]]:
    return {
        "generic": lambda: GenericParser(NAMES),
        "native": lambda: NativeParser(NAMES, forced=False, single=False),
    }


def _cuts(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


Make = Callable[[], ToolCallParser]


def _stream(make: Make, text: str, size: int, *, legacy: bool = False) -> tuple[str, list[dict], list[str]]:
    shape = CompletionShape(id="x", model="m", chat=True, parser=make(), legacy=legacy)
    chunks = shape.opening()
    for piece in _cuts(text, size):
        chunks += shape.text(piece)
    chunks += shape.closing("stop")
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for call in chunk["choices"][0]["delta"].get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"name": "", "arguments": ""})
            entry["name"] += call.get("function", {}).get("name", "")
            entry["arguments"] += call.get("function", {}).get("arguments", "")
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    return content, list(calls.values()), finishes


def _whole(make: Make, text: str, *, legacy: bool = False) -> dict:
    shape = CompletionShape(id="x", model="m", chat=True, parser=make(), legacy=legacy)
    return shape.whole(text, "stop", {})["choices"][0]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 1000])
def test_a_generic_answer_in_words_streams_its_decoded_string_however_the_text_is_cut(size: int) -> None:
    text = json.dumps({"response": WORDS})  # escapes every non-ASCII character, the emoji as a surrogate pair
    content, calls, finishes = _stream(_parsers()["generic"], text, size)
    assert content == WORDS and not calls and finishes == ["stop"]
    assert _whole(_parsers()["generic"], text)["message"]["content"] == WORDS


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_generic_tool_calls_stream_as_one_head_and_arguments_per_call_ending_in_tool_calls(size: int) -> None:
    calls = [{"name": "get_weather", "arguments": {"city": "Pune"}}, {"name": "get_time", "arguments": {}}]
    text = json.dumps({"tool_calls": calls})
    content, streamed, finishes = _stream(_parsers()["generic"], text, size)
    assert content == "" and finishes == ["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == [(c["name"], c["arguments"]) for c in calls]
    whole = _whole(_parsers()["generic"], text)
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] is None
    assert [c["function"]["name"] for c in whole["message"]["tool_calls"]] == ["get_weather", "get_time"]


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_generic_tool_calls_cut_short_by_max_tokens_keep_the_calls_written_in_full(size: int) -> None:
    # A model that goes on calling (a base model repeats its call) runs into max_tokens inside a later call: the calls
    # it closed before the cut are answered, in the stream and the whole answer alike; the one cut short is not.
    calls = [{"name": "get_weather", "arguments": {"city": "Pune"}}, {"name": "get_time", "arguments": {}}]
    text = json.dumps({"tool_calls": calls})
    cut = text[: text.index('"get_time"') + 4]
    shape = CompletionShape(id="x", model="m", chat=True, parser=GenericParser(NAMES))
    chunks = shape.opening()
    for piece in _cuts(cut, size):
        chunks += shape.text(piece)
    chunks += shape.closing("length")
    streamed = [call for c in chunks for call in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [c["function"]["name"] for c in streamed if "id" in c] == ["get_weather"]
    assert json.loads("".join(c["function"]["arguments"] for c in streamed)) == {"city": "Pune"}
    whole = CompletionShape(id="x", model="m", chat=True, parser=GenericParser(NAMES)).whole(cut, "length", {})
    message = whole["choices"][0]["message"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("get_weather", {"city": "Pune"})
    ]
    assert whole["choices"][0]["finish_reason"] == "tool_calls"


def test_generic_tool_calls_cut_short_inside_the_first_call_answer_nothing() -> None:
    text = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Pu'
    whole = CompletionShape(id="x", model="m", chat=True, parser=GenericParser(NAMES)).whole(text, "length", {})
    assert whole["choices"][0]["message"]["content"] == "" and "tool_calls" not in whole["choices"][0]["message"]
    assert whole["choices"][0]["finish_reason"] == "length"


def test_a_lone_surrogate_escape_becomes_a_replacement_character_not_an_unsendable_string() -> None:
    content, _, _ = _stream(_parsers()["generic"], '{"response": "a\\ud800b"}', 1)
    assert content == "a\ufffdb"
    content.encode("utf-8")


def test_a_call_to_a_tool_that_was_not_offered_is_words_not_a_call() -> None:
    text = '<tool_call>{"name": "launch", "arguments": {}}</tool_call>'
    content, calls, finishes = _stream(_parsers()["native"], text, 3)
    assert not calls and finishes == ["stop"] and content == text


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_native_words_stream_until_a_tagged_call_which_comes_whole_at_the_end(size: int) -> None:
    text = 'Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls, finishes = _stream(_parsers()["native"], text, size)
    assert content == "Let me look. " and finishes == ["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Oslo"})]


@pytest.mark.parametrize(
    "text",
    ['{"name": "get_weather", "parameters": {"city": "Rome"}}',
     '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]',
     '[{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}]'],
    ids=["llama3 bare object", "mistral", "arguments as a string"],
)
def test_native_call_syntaxes_are_read_as_calls(text: str) -> None:
    _, calls, finishes = _stream(_parsers()["native"], text, 2)
    assert finishes == ["tool_calls"] and [json.loads(c["arguments"]) for c in calls] == [{"city": "Rome"}]


def test_the_legacy_form_streams_one_function_call_and_finishes_with_function_call() -> None:
    text = json.dumps({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Pune"}},
                                      {"name": "get_time", "arguments": {}}]})  # fmt: skip
    shape = CompletionShape(id="x", model="m", chat=True, parser=GenericParser(NAMES), legacy=True)
    chunks = shape.text(text) + shape.closing("stop")
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert [d["function_call"] for d in deltas if "function_call" in d] == [
        {"name": "get_weather", "arguments": ""}, {"arguments": '{"city": "Pune"}'}]  # fmt: skip
    assert chunks[-1]["choices"][0]["finish_reason"] == "function_call"
    whole = _whole(lambda: GenericParser(NAMES), text, legacy=True)
    assert whole["message"]["function_call"]["name"] == "get_weather" and "tool_calls" not in whole["message"]


def test_a_text_completion_has_no_parser_and_streams_text_as_is() -> None:
    shape = CompletionShape(id="x", model="m", chat=False)
    chunks = shape.opening() + shape.text("abc") + shape.closing("length")
    assert [c["choices"][0]["text"] for c in chunks] == ["abc", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[0]["object"] == "text_completion"
