"""The clients users already run, each against `sealbox serve`: chat, stream, structured output, a tool call, a
streamed tool call. Run by scripts/check-clients with the throwaway venv's Python; prints one row per client and check.

Settings come from the environment the script sets: CHECK_BASE_URL (loopback), CHECK_API_KEY, CHECK_MODEL,
CHECK_RESULTS (a JSON file the rows are also written to). Exit status 1 when any check fails.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

BASE_URL = os.environ["CHECK_BASE_URL"]
API_KEY = os.environ["CHECK_API_KEY"]
MODEL = os.environ["CHECK_MODEL"]
MAX_TOKENS = int(os.environ.get("CHECK_MAX_TOKENS", "48"))
TOOL_MAX_TOKENS = 128
"""A base model may call the tool several times over (parallel calls): room for a few."""
TIMEOUT_S = 600.0
MARKERS = ("<|im_end|>", "<|im_start|>", "<end_of_turn>", "<start_of_turn>", "<eos>", "<bos>", "<|eot_id|>")
PROMPT = "Say hello in five words."
WEATHER_PROMPT = "What is the weather in Paris? Use the tool."
JSON_PROMPT = "The weather in Paris as JSON."


class Weather(BaseModel):
    """The structured answer every client asks for (bounded strings, so a small model's answer ends)."""

    city: str = Field(max_length=20)
    temperature_c: int


WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                       "required": ["city"], "additionalProperties": False},
    },
}  # fmt: skip


class CheckFailed(Exception):
    """What the client got, said plainly."""


@dataclass
class Row:
    client: str
    check: str
    passed: bool
    detail: str
    seconds: float


def clean_text(text: str | None, what: str) -> str:
    if not text:
        raise CheckFailed(f"{what}: empty text")
    for marker in MARKERS:
        if marker in text:
            raise CheckFailed(f"{what}: the text shows the template marker {marker!r}")
    return text


def expect_finish(finish: Any, allowed: tuple[str, ...]) -> None:
    if finish not in allowed:
        raise CheckFailed(f"finish_reason {finish!r}, expected one of {allowed}")


def parsed_arguments(arguments: str | dict[str, Any]) -> dict[str, Any]:
    value = json.loads(arguments) if isinstance(arguments, str) else arguments
    if not isinstance(value, dict) or not isinstance(value.get("city"), str):
        raise CheckFailed(f"tool arguments {arguments!r} are not {{'city': <string>}}")
    return value


def short(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


# --- the official openai SDK ------------------------------------------------------------------------------------


def openai_checks() -> dict[str, Callable[[], str]]:
    import openai

    client = openai.OpenAI(base_url=BASE_URL, api_key=API_KEY, max_retries=0, timeout=TIMEOUT_S)
    messages: list[Any] = [{"role": "user", "content": PROMPT}]
    weather: list[Any] = [{"role": "user", "content": WEATHER_PROMPT}]

    def chat() -> str:
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS)
        expect_finish(reply.choices[0].finish_reason, ("stop", "length"))
        return short(clean_text(reply.choices[0].message.content, "answer"))

    def stream() -> str:
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS,
                                                     stream=True, stream_options={"include_usage": True}))  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        if len(finishes) != 1:
            raise CheckFailed(f"{len(finishes)} chunks carried a finish_reason, expected exactly one")
        expect_finish(finishes[0], ("stop", "length"))
        if chunks[-1].usage is None:
            raise CheckFailed("include_usage asked for a usage chunk; none came")
        return f"{len(chunks)} chunks: " + short(clean_text(text, "streamed answer"))

    def structured() -> str:
        reply = client.chat.completions.parse(model=MODEL, max_tokens=200, response_format=Weather,
                                              messages=[{"role": "user", "content": JSON_PROMPT}])
        parsed = reply.choices[0].message.parsed
        if parsed is None:
            raise CheckFailed(f"nothing parsed from {reply.choices[0].message.content!r}")
        return short(parsed.model_dump_json())

    def tool_call() -> str:
        reply = client.chat.completions.create(model=MODEL, max_tokens=TOOL_MAX_TOKENS, tools=[WEATHER_TOOL],
                                               tool_choice="required", messages=weather)
        expect_finish(reply.choices[0].finish_reason, ("tool_calls",))
        calls = reply.choices[0].message.tool_calls or []
        if not calls or calls[0].function.name != "get_weather":
            raise CheckFailed(f"no get_weather call in {reply.choices[0].message!r}")
        return f"get_weather({calls[0].function.arguments}) [{parsed_arguments(calls[0].function.arguments)['city']}]"

    def streamed_tool_call() -> str:
        chunks = list(client.chat.completions.create(model=MODEL, max_tokens=TOOL_MAX_TOKENS, tools=[WEATHER_TOOL],
                                                     tool_choice="required", stream=True, messages=weather))
        deltas = [call for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or [])]
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        if not deltas:
            raise CheckFailed(f"no delta.tool_calls chunk in the stream (finish_reason {finishes})")
        expect_finish(finishes[-1] if finishes else None, ("tool_calls",))
        first = [d for d in deltas if d.index == deltas[0].index]  # the first call's chunks; others may follow
        name = "".join(d.function.name or "" for d in first if d.function)
        arguments = "".join(d.function.arguments or "" for d in first if d.function)
        if name != "get_weather" or not first[0].id:
            raise CheckFailed(f"streamed call {name!r} (id {first[0].id!r}), expected get_weather with an id")
        parsed_arguments(arguments)
        calls = len({d.index for d in deltas})
        return f"{len(deltas)} delta.tool_calls, {calls} call(s): {name}({arguments})"

    return {"chat": chat, "stream": stream, "structured output": structured, "tool call": tool_call,
            "streamed tool call": streamed_tool_call}  # fmt: skip


# --- LangChain's ChatOpenAI -------------------------------------------------------------------------------------


def langchain_checks() -> dict[str, Callable[[], str]]:
    from langchain_core.messages import AIMessageChunk
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=BASE_URL, api_key=API_KEY, max_retries=0, timeout=TIMEOUT_S,
                     max_completion_tokens=MAX_TOKENS)  # fmt: skip

    @tool
    def get_weather(city: str) -> str:
        """The current weather for a city."""
        return f"sunny in {city}"

    tools_llm = ChatOpenAI(model=MODEL, base_url=BASE_URL, api_key=API_KEY, max_retries=0, timeout=TIMEOUT_S,
                           max_completion_tokens=TOOL_MAX_TOKENS).bind_tools([get_weather], tool_choice="any")

    def chat() -> str:
        message = llm.invoke(PROMPT)
        expect_finish(message.response_metadata.get("finish_reason"), ("stop", "length"))
        return short(clean_text(str(message.content), "answer"))

    def stream() -> str:
        chunks = list(llm.stream(PROMPT))
        text = "".join(str(chunk.content) for chunk in chunks)
        return f"{len(chunks)} chunks: " + short(clean_text(text, "streamed answer"))

    def structured() -> str:
        structured_llm = ChatOpenAI(model=MODEL, base_url=BASE_URL, api_key=API_KEY, max_retries=0,
                                    timeout=TIMEOUT_S, max_completion_tokens=200
                                    ).with_structured_output(Weather, method="json_schema")  # fmt: skip
        answer = structured_llm.invoke(JSON_PROMPT)
        if not isinstance(answer, Weather):
            raise CheckFailed(f"with_structured_output returned {answer!r}")
        return short(answer.model_dump_json())

    def tool_call() -> str:
        message = tools_llm.invoke(WEATHER_PROMPT)
        if not message.tool_calls or message.tool_calls[0]["name"] != "get_weather":
            raise CheckFailed(f"no get_weather call: tool_calls={message.tool_calls!r} "
                              f"invalid={message.invalid_tool_calls!r}")  # fmt: skip
        parsed_arguments(message.tool_calls[0]["args"])
        return f"get_weather({json.dumps(message.tool_calls[0]['args'])})"

    def streamed_tool_call() -> str:
        total: AIMessageChunk | None = None
        count = 0
        for chunk in tools_llm.stream(WEATHER_PROMPT):
            total = chunk if total is None else total + chunk  # type: ignore[assignment]
            count += 1
        if total is None or not total.tool_calls or total.tool_calls[0]["name"] != "get_weather":
            raise CheckFailed(f"no get_weather call assembled from {count} chunks: "
                              f"{getattr(total, 'tool_call_chunks', None)!r}")  # fmt: skip
        parsed_arguments(total.tool_calls[0]["args"])
        return f"{count} chunks: get_weather({json.dumps(total.tool_calls[0]['args'])})"

    return {"chat": chat, "stream": stream, "structured output": structured, "tool call": tool_call,
            "streamed tool call": streamed_tool_call}  # fmt: skip


# --- LiteLLM ----------------------------------------------------------------------------------------------------


def litellm_checks() -> dict[str, Callable[[], str]]:
    import litellm

    litellm.suppress_debug_info = True  # else it prints a "Provider List" banner into the table for a local model
    options: dict[str, Any] = {"model": f"openai/{MODEL}", "api_base": BASE_URL, "api_key": API_KEY,
                               "timeout": TIMEOUT_S, "num_retries": 0}  # fmt: skip
    messages = [{"role": "user", "content": PROMPT}]
    weather = [{"role": "user", "content": WEATHER_PROMPT}]

    def chat() -> str:
        reply = litellm.completion(messages=messages, max_tokens=MAX_TOKENS, **options)
        expect_finish(reply.choices[0].finish_reason, ("stop", "length"))
        return short(clean_text(reply.choices[0].message.content, "answer"))

    def stream() -> str:
        chunks = list(litellm.completion(messages=messages, max_tokens=MAX_TOKENS, stream=True, **options))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        expect_finish(finishes[-1] if finishes else None, ("stop", "length"))
        return f"{len(chunks)} chunks: " + short(clean_text(text, "streamed answer"))

    def structured() -> str:
        reply = litellm.completion(messages=[{"role": "user", "content": JSON_PROMPT}],
                                   max_tokens=200, response_format=Weather, **options)  # fmt: skip
        content = reply.choices[0].message.content
        return short(Weather.model_validate_json(content or "").model_dump_json())

    def tool_call() -> str:
        reply = litellm.completion(messages=weather, max_tokens=TOOL_MAX_TOKENS,
                                   tools=[WEATHER_TOOL], tool_choice="required", **options)  # fmt: skip
        expect_finish(reply.choices[0].finish_reason, ("tool_calls",))
        calls = reply.choices[0].message.tool_calls or []
        if not calls or calls[0].function.name != "get_weather":
            raise CheckFailed(f"no get_weather call in {reply.choices[0].message!r}")
        parsed_arguments(calls[0].function.arguments)
        return f"get_weather({calls[0].function.arguments})"

    def streamed_tool_call() -> str:
        chunks = list(litellm.completion(messages=weather, max_tokens=TOOL_MAX_TOKENS, tools=[WEATHER_TOOL],
                                         tool_choice="required", stream=True, **options))
        reply = litellm.stream_chunk_builder(chunks, messages=weather)
        calls = reply.choices[0].message.tool_calls or []  # type: ignore[union-attr]
        if not calls or calls[0].function.name != "get_weather":
            raise CheckFailed(f"no get_weather call assembled from {len(chunks)} chunks")
        expect_finish(reply.choices[0].finish_reason, ("tool_calls",))  # type: ignore[union-attr]
        parsed_arguments(calls[0].function.arguments)
        return f"{len(chunks)} chunks: get_weather({calls[0].function.arguments})"

    return {"chat": chat, "stream": stream, "structured output": structured, "tool call": tool_call,
            "streamed tool call": streamed_tool_call}  # fmt: skip


CLIENTS: dict[str, Callable[[], dict[str, Callable[[], str]]]] = {
    "openai": openai_checks,
    "langchain-openai": langchain_checks,
    "litellm": litellm_checks,
}


def run_check(client: str, name: str, check: Callable[[], str]) -> Row:
    started = time.monotonic()
    try:
        detail, passed = check(), True
    except CheckFailed as failure:
        detail, passed = str(failure), False
    except Exception as error:  # a client's own exception is the result being reported
        detail, passed = f"{type(error).__name__}: {short(str(error), 300)}", False
        traceback.print_exc(file=sys.stderr)
    return Row(client, name, passed, detail, round(time.monotonic() - started, 1))


def table(rows: list[Row]) -> str:
    header = ("client", "check", "result", "seconds", "detail")
    cells = [(r.client, r.check, "pass" if r.passed else "FAIL", f"{r.seconds:.1f}", r.detail) for r in rows]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(4)]
    lines = ["  ".join(value.ljust(width) for value, width in zip(line[:4], widths)) + "  " + line[4]
             for line in [header, *cells]]  # fmt: skip
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def main() -> int:
    rows: list[Row] = []
    for client, make in CLIENTS.items():
        try:
            checks = make()
        except Exception as error:  # the client cannot even be imported or built: every check fails with why
            rows += [Row(client, "import", False, f"{type(error).__name__}: {error}", 0.0)]
            continue
        for name, check in checks.items():
            rows.append(run_check(client, name, check))
            print(f"{client} {name}: {'pass' if rows[-1].passed else 'FAIL'} ({rows[-1].seconds}s)", file=sys.stderr)
    print(table(rows))
    if os.environ.get("CHECK_RESULTS"):
        Path(os.environ["CHECK_RESULTS"]).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
