"""`response_format` and tool calls as llama.cpp grammars: the sampler can only emit text the schema allows.

The schema is compiled by llama-cpp-python's own JSON-schema-to-GBNF converter with remote `$ref`s disabled (an
appliance fetches nothing). A schema the converter cannot handle is the client's 400, not our 500.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from runtime.server.errors import ApiError
from runtime.server.schemas import ChatCompletionRequest, ResponseFormat, ToolDefinition

MAX_SCHEMA_BYTES = 64 * 1024


def schema_grammar(schema: dict[str, Any], *, param: str) -> str:
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise ApiError(400, f"the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes", param=param)
    try:
        return json_schema_to_gbnf(text)
    except Exception as exc:  # the converter raises whatever it meets (KeyError, ValueError, RecursionError…)
        raise ApiError(400, f"the JSON schema cannot be enforced: {exc!r}", code="invalid_schema", param=param) from exc


def response_format_grammar(response_format: ResponseFormat | None) -> str | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return JSON_GBNF
    assert response_format.json_schema is not None
    schema = response_format.json_schema.schema_ or {"type": "object"}
    return schema_grammar(schema, param="response_format.json_schema.schema")


def _call_schema(tool: ToolDefinition) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.function.name},
            "arguments": tool.function.parameters or {"type": "object"},
        },
        "required": ["name", "arguments"],
    }


@dataclass(frozen=True)
class ToolPlan:
    """How a request with tools is generated: a forced grammar (required / named choice) or free text parsed after."""

    grammar: str | None
    forced: bool


def tool_plan(request: ChatCompletionRequest) -> ToolPlan | None:
    if not request.tools or request.tool_choice == "none":
        return None
    choice = request.tool_choice
    if choice is None or choice == "auto":
        return ToolPlan(grammar=None, forced=False)
    tools = request.tools
    if not isinstance(choice, str):
        wanted = choice.function.get("name")
        tools = [tool for tool in request.tools if tool.function.name == wanted]
        if not tools:
            raise ApiError(400, f"tool_choice names {wanted!r}, which is not among tools", param="tool_choice")
    schema = _call_schema(tools[0]) if len(tools) == 1 else {"anyOf": [_call_schema(tool) for tool in tools]}
    return ToolPlan(grammar=schema_grammar(schema, param="tools"), forced=True)


_TAGGED_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str, tools: list[ToolDefinition], *, forced: bool) -> list[dict[str, Any]]:
    """Tool calls in generated text: the whole text as one call (forced), or `<tool_call>{…}</tool_call>` blocks."""
    names = {tool.function.name for tool in tools}
    candidates = [text] if forced else _TAGGED_CALL.findall(text)
    if not forced and not candidates and text.strip().startswith("{"):
        candidates = [text]
    calls = []
    for candidate in candidates:
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        if not isinstance(data, dict) or data.get("name") not in names:
            continue
        arguments = data.get("arguments", data.get("parameters", {}))
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": data["name"], "arguments": json.dumps(arguments)},
            }
        )
    return calls
