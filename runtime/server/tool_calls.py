"""Tool calls on every model: in the template's own syntax where it has one, in a generic JSON format otherwise.

A template that mentions `tools` renders them itself, and the model answers in the syntax it was trained on (Hermes
and Qwen `<tool_call>…</tool_call>` blocks, Llama 3's bare `{"name", "parameters"}` object, Mistral's `[TOOL_CALLS]`
array); a forced choice (`required` or a named tool) is held to one call object by a grammar.

A template without tool syntax (Gemma, ChatML, Llama 2…) still gets the tools: they are described in a system
message, and a grammar holds the answer to one JSON object, `{"tool_calls": [{"name", "arguments"}…]}` to call
tools or `{"response": "…"}` to answer in words (the generic format llama.cpp's server uses for such templates).
The conversation's earlier tool calls and results are written back in the same format, so the model sees one
convention throughout. The `response` string is streamed as it is generated, so a chat with tools offered still
streams its words.

`ToolCallParser` reads the generated text incrementally and yields what the client is told: content pieces and tool
calls. The non-streamed answer and the stream read it the same way (see `response_shape`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from sealbox.runtime.server.errors import ApiError
from sealbox.runtime.server.schemas import ChatCompletionRequest, ChatMessage, ToolDefinition
from sealbox.runtime.server.structured_output import schema_grammar

Mode = Literal["auto", "required", "named"]


@dataclass(frozen=True)
class Content:
    """Words for the client (`delta.content`)."""

    text: str


@dataclass(frozen=True)
class Call:
    """One complete tool call: its arguments are the JSON text of an object."""

    id: str
    name: str
    arguments: str


Piece = Content | Call


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolPlan:
    """How a request with tools is prompted, constrained and read back."""

    tools: tuple[ToolDefinition, ...]
    mode: Mode
    native: bool
    """The chat template renders the tools itself (else the generic format)."""
    parallel: bool
    legacy: bool
    """The request used `functions`: one call at most, answered as `function_call`."""
    grammar: str | None

    @property
    def names(self) -> frozenset[str]:
        return frozenset(tool.function.name for tool in self.tools)

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template receives them (native syntax only)."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.native else None

    def parser(self) -> ToolCallParser:
        if not self.native:
            return GenericParser(self.names)
        return NativeParser(self.names, forced=self.mode != "auto", single=self.legacy or not self.parallel)


def plan_tools(request: ChatCompletionRequest, *, native_syntax: bool) -> ToolPlan | None:
    """The plan for `request`'s tools, or None when it offers none or forbids their use.

    Raises:
        ApiError: 400 for a named tool that is not offered, or a tool schema the grammar cannot enforce.
    """
    tools = request.offered_tools()
    mode, name = request.tool_choice_mode()
    if not tools or mode == "none":
        return None
    if mode == "named":
        chosen = [tool for tool in tools if tool.function.name == name]
        if not chosen:
            choice_param = "function_call" if request.legacy_functions else "tool_choice"
            raise ApiError(400, f"{choice_param} names {name!r}, which is not among the offered tools",
                           param=choice_param)  # fmt: skip
        constrained = chosen
    else:
        constrained = tools
    parallel = request.parallel_tool_calls is not False and not request.legacy_functions
    strict = any(tool.function.strict for tool in constrained)
    param = "functions" if request.legacy_functions else "tools"
    if native_syntax:
        grammar = None
        if mode != "auto":
            grammar = schema_grammar(_one_of(constrained), param=param, strict=strict)
        return ToolPlan(tuple(tools), mode, True, parallel, request.legacy_functions, grammar)  # type: ignore[arg-type]
    schema = _generic_schema(constrained, answer_in_words=mode == "auto", parallel=parallel)
    grammar = schema_grammar(schema, param=param, strict=strict)
    return ToolPlan(tuple(tools), mode, False, parallel, request.legacy_functions, grammar)  # type: ignore[arg-type]


def _call_schema(tool: ToolDefinition) -> dict[str, Any]:
    parameters = dict(tool.function.parameters or {"type": "object", "properties": {}})
    parameters.pop("$defs", None)
    parameters.pop("definitions", None)
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": parameters},
        "required": ["name", "arguments"],
    }


def _one_of(tools: list[ToolDefinition]) -> dict[str, Any]:
    calls = [_call_schema(tool) for tool in tools]
    schema: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return _with_definitions(schema, tools)


def _with_definitions(schema: dict[str, Any], tools: list[ToolDefinition]) -> dict[str, Any]:
    """A tool's `$ref: #/$defs/…` points at its own root; the wrapped schema carries those definitions at its root."""
    definitions: dict[str, Any] = {}
    for tool in tools:
        for key in ("$defs", "definitions"):
            found = (tool.function.parameters or {}).get(key)
            if isinstance(found, dict):
                definitions.setdefault(key, {}).update(found)
    return {**schema, **definitions} if definitions else schema


def _generic_schema(tools: list[ToolDefinition], *, answer_in_words: bool, parallel: bool) -> dict[str, Any]:
    calls = [_call_schema(tool) for tool in tools]
    items: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    array: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if not parallel:
        array["maxItems"] = 1
    calling = {"type": "object", "properties": {"tool_calls": array}, "required": ["tool_calls"]}
    if not answer_in_words:
        return _with_definitions(calling, tools)
    words = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"]}
    return _with_definitions({"anyOf": [calling, words]}, tools)


# -- the prompt -------------------------------------------------------------------------------------------------------


def generic_instructions(plan: ToolPlan) -> str:
    """The system text that offers the tools to a model whose template has no tool syntax."""
    described = [
        {"name": tool.function.name, "description": tool.function.description or "",
         "parameters": tool.function.parameters or {"type": "object", "properties": {}}}
        for tool in plan.tools
    ]  # fmt: skip
    lines = ["You can call these tools:", json.dumps(described, ensure_ascii=False), ""]
    several = "one or more calls" if plan.parallel else "one call"
    call_form = '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments as the tool\'s parameters say>}}]}'
    if plan.mode == "auto":
        lines.append("Answer with one JSON object and nothing else: either " + call_form + f" to make {several}, "
                     'or {"response": "<your answer>"} to answer the user directly.')  # fmt: skip
    else:
        lines.append(f"Answer with one JSON object and nothing else, {call_form}, to make {several}.")
    return "\n".join(lines)


def generic_messages(messages: list[ChatMessage], plan: ToolPlan) -> list[dict[str, Any]]:
    """The conversation for a template without tool syntax: the tools offered in the system message, earlier calls
    and answers written in the generic format, tool results as user turns, same-role turns merged (many templates
    insist that user and assistant alternate)."""
    names: dict[str, str] = {}
    converted: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "assistant":
            calls = list(message.tool_calls or [])
            if calls or message.function_call is not None:
                listed = [{"name": c.function.name, "arguments": _arguments(c.function.arguments)} for c in calls]
                for call in calls:
                    names[call.id] = call.function.name
                if message.function_call is not None:
                    listed.append({"name": message.function_call.name,
                                   "arguments": _arguments(message.function_call.arguments)})  # fmt: skip
                text = json.dumps({"tool_calls": listed}, ensure_ascii=False)
            else:
                text = json.dumps({"response": message.text() or message.refusal or ""}, ensure_ascii=False)
            converted.append({"role": "assistant", "content": text})
        elif message.role in ("tool", "function"):
            name = message.name if message.role == "function" else names.get(message.tool_call_id or "", "")
            result = {"tool_response": {"name": name, "content": message.text()}}
            converted.append({"role": "user", "content": json.dumps(result, ensure_ascii=False)})
        else:
            role = "system" if message.role == "developer" else message.role
            converted.append({"role": role, "content": message.text()})
    instructions = generic_instructions(plan)
    if converted and converted[0]["role"] == "system":
        converted[0] = {"role": "system", "content": converted[0]["content"] + "\n\n" + instructions}
    else:
        converted.insert(0, {"role": "system", "content": instructions})
    merged: list[dict[str, Any]] = []
    for message in converted:
        if merged and merged[-1]["role"] == message["role"]:
            merged[-1] = {"role": message["role"], "content": merged[-1]["content"] + "\n\n" + message["content"]}
        else:
            merged.append(message)
    return merged


def native_message(message: ChatMessage) -> dict[str, Any]:
    """A message as a template with tool syntax reads it (the legacy function forms as today's tool forms)."""
    role = {"developer": "system", "function": "tool"}.get(message.role, message.role)
    data: dict[str, Any] = {"role": role, "content": message.text()}
    if message.name:
        data["name"] = message.name
    calls = [
        {"id": call.id, "type": "function",
         "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)}}
        for call in message.tool_calls or []
    ]  # fmt: skip
    if message.function_call is not None:
        calls.append({"id": message.function_call.name, "type": "function",
                      "function": {"name": message.function_call.name,
                                   "arguments": _arguments(message.function_call.arguments)}})  # fmt: skip
    if calls:
        data["tool_calls"] = calls
    if message.tool_call_id or message.role == "function":
        data["tool_call_id"] = message.tool_call_id or message.name
    return data


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


# -- reading the answer -----------------------------------------------------------------------------------------------


def _as_call(data: Any, names: frozenset[str]) -> Call | None:
    if not isinstance(data, dict) or data.get("name") not in names:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as the API carries them
        arguments = _arguments(arguments)
    if not isinstance(arguments, dict):
        return None
    return Call(new_call_id(), str(data["name"]), json.dumps(arguments, ensure_ascii=False))


class ToolCallParser:
    """Generated text in, what the client is told out: `feed` as text arrives, `finish` once it has ended."""

    def feed(self, text: str) -> list[Piece]:
        raise NotImplementedError

    def finish(self) -> list[Piece]:
        raise NotImplementedError


_GENERIC_START = re.compile(r'\s*\{\s*"(response|tool_calls)"\s*:\s*')
_ESCAPE = re.compile(r'\\(?:u[0-9a-fA-F]{4}|["\\/bfnrt])')
_CALLS_OPEN = re.compile(r'\s*\{\s*"tool_calls"\s*:\s*\[')
_SPACE = re.compile(r"\s*")


@dataclass
class GenericParser(ToolCallParser):
    """Reads `{"response": "…"}` (streaming the string as it comes) or `{"tool_calls": […]}` (calls at the end)."""

    names: frozenset[str]
    _text: str = ""
    _kind: str | None = None
    _start: int = 0
    """Where the response string's characters begin in `_text`."""
    _read: int = 0
    """How far into `_text` the response string has been decoded."""
    _closed: bool = False
    _said: list[str] = field(default_factory=list)

    def feed(self, text: str) -> list[Piece]:
        self._text += text
        if self._kind is None:
            match = _GENERIC_START.match(self._text)
            if match is None:
                return []
            self._kind = match.group(1)
            if self._kind == "response":
                if len(self._text) <= match.end():
                    self._kind = None  # the opening quote has not come yet
                    return []
                if self._text[match.end()] != '"':
                    return []
                self._start = self._read = match.end() + 1
        if self._kind != "response" or self._closed:
            return []
        return self._decode()

    def _decode(self) -> list[Piece]:
        out: list[str] = []
        text, i = self._text, self._read
        while i < len(text):
            char = text[i]
            if char == '"':
                self._closed = True
                break
            if char != "\\":
                out.append(char)
                i += 1
                continue
            match = _ESCAPE.match(text, i)
            if match is None:
                if len(text) - i < 6:
                    break  # an escape still arriving
                out.append(char)  # not an escape JSON knows: shown as written
                i += 1
                continue
            escape, end = match.group(0), match.end()
            if _is_surrogate(escape, 0xD800, 0xDBFF):
                low = _ESCAPE.match(text, end)
                if low is None and len(text) - end < 6:
                    break  # the low half of a surrogate pair still arriving
                if low is not None and _is_surrogate(low.group(0), 0xDC00, 0xDFFF):
                    escape, end = escape + low.group(0), low.end()
            out.append(_clean(json.loads(f'"{escape}"')))
            i = end
        self._read = i if not self._closed else i + 1
        said = "".join(out)
        if not said:
            return []
        self._said.append(said)
        return [Content(said)]

    def finish(self) -> list[Piece]:
        try:
            data = json.loads(self._text)
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("tool_calls"), list):
            calls = [_as_call(item, self.names) for item in data["tool_calls"]]
            if calls and all(call is not None for call in calls):
                return list(calls)  # type: ignore[arg-type]
        if isinstance(data, dict) and isinstance(data.get("response"), str):
            said = "".join(self._said)
            full = _clean(data["response"])
            rest = full[len(said):] if full.startswith(said) else ""
            return [Content(rest)] if rest else []
        if self._kind == "tool_calls":
            return list(self._calls_written_in_full())
        if self._kind is not None or self._text.lstrip().startswith("{"):
            return []  # the object was cut short (max_tokens): what was said stands, the rest is no one's words
        return [Content(self._text)] if self._text else []

    def _calls_written_in_full(self) -> list[Call]:
        """The calls of a `tool_calls` array cut short (max_tokens) whose objects were closed before the cut: a model
        that goes on calling must not lose the calls it finished. All or none, as for a whole array."""
        opening = _CALLS_OPEN.match(self._text)
        if opening is None:
            return []
        decoder, text, at, items = json.JSONDecoder(), self._text, opening.end(), []
        while True:
            at = _SPACE.match(text, at).end()  # type: ignore[union-attr]  # \s* always matches
            if items and text.startswith(",", at):
                at = _SPACE.match(text, at + 1).end()  # type: ignore[union-attr]
            try:
                item, at = decoder.raw_decode(text, at)
            except ValueError:
                break  # the call being written when the text ended, or the array's end
            items.append(item)
        calls = [_as_call(item, self.names) for item in items]
        return calls if calls and all(call is not None for call in calls) else []  # type: ignore[return-value]


def _is_surrogate(escape: str, low: int, high: int) -> bool:
    return escape.startswith("\\u") and low <= int(escape[2:], 16) <= high


def _clean(text: str) -> str:
    """`text` with any lone surrogate (a `\\ud800` escape without its pair) as U+FFFD: it could not be sent."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


_OPENERS = ("<tool_call>", "[TOOL_CALLS]")
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass
class NativeParser(ToolCallParser):
    """Reads a template's own syntax: words stream until a call begins (`<tool_call>`, `[TOOL_CALLS]`, or an answer
    that opens with `{` or `[`); from there the text is held and read as calls when the answer ends."""

    names: frozenset[str]
    forced: bool
    single: bool
    _held: str = ""
    _calling: bool = False
    _started: bool = False

    def feed(self, text: str) -> list[Piece]:
        self._held += text
        if self._calling:
            return []
        if not self._started:
            stripped = self._held.lstrip()
            if not stripped:
                return []
            self._started = True
            if self.forced or stripped[0] in "{[":
                self._calling = True
                return []
        at = min((self._held.find(opener) for opener in _OPENERS if opener in self._held), default=-1)
        if at >= 0:
            self._calling = True
            said, self._held = self._held[:at], self._held[at:]
            return [Content(said)] if said else []
        keep = _partial_opener(self._held)
        said = self._held[: len(self._held) - keep]
        self._held = self._held[len(said):]
        return [Content(said)] if said else []

    def finish(self) -> list[Piece]:
        text, self._held = self._held, ""
        if not self._calling:
            return [Content(text)] if text else []
        calls, rest = self._calls(text)
        if not calls:
            return [Content(text)] if text else []
        if self.single:
            calls = calls[:1]
        return ([Content(rest)] if rest.strip() else []) + list(calls)

    def _calls(self, text: str) -> tuple[list[Call], str]:
        """The calls in `text`, and the words around them."""
        if "<tool_call>" in text:
            calls = [_as_call(_loads(body), self.names) for body in _TAGGED.findall(text)]
            return [call for call in calls if call is not None], _TAGGED.sub("", text)
        body = text.replace("[TOOL_CALLS]", "", 1).strip()
        data = _loads(body)
        items = data if isinstance(data, list) else [data]
        calls = [_as_call(item, self.names) for item in items]
        if calls and all(call is not None for call in calls):
            return calls, ""  # type: ignore[return-value]
        return [], text


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _partial_opener(text: str) -> int:
    """Length of the longest tail of `text` that could still grow into a call opener."""
    for length in range(min(len(text), max(map(len, _OPENERS)) - 1), 0, -1):
        if any(opener.startswith(text[-length:]) for opener in _OPENERS):
            return length
    return 0
