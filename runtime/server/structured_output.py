"""`response_format` (and tool calls, see `tool_calls`) as llama.cpp grammars: the sampler can only emit text the schema allows.

The schema is compiled by llama-cpp-python's own JSON-schema-to-GBNF converter with remote `$ref`s disabled (an
appliance fetches nothing). A schema the converter cannot handle is the client's 400, not our 500.

The converter enforces a subset of JSON Schema and ignores the rest without a word (`minimum`, `multipleOf`,
`uniqueItems`, a `maxLength` beside a `pattern`…). With `strict: true` (OpenAI's promise that the answer conforms)
a schema that uses anything outside that subset is refused, naming the keyword; without it the schema is best effort.

The converter spells repetition out: `{"maxLength": 1000000000}` becomes a grammar of eight gigabytes, built in the
event loop. So the counts a schema may ask for are bounded before it runs (lengths, item and property counts, regex
quantifiers), and so is the size of the grammar it returns.
"""

from __future__ import annotations

import json
import re
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from sealbox.runtime.server.errors import ApiError
from sealbox.runtime.server.schemas import ResponseFormat

MAX_SCHEMA_BYTES = 64 * 1024
MAX_REPEAT = 1024
"""Largest length, item count or regex repetition a schema may ask for."""
MAX_PROPERTIES = 256
"""Properties of one object schema (the converter's work grows with the square of the optional ones)."""
MAX_GRAMMAR_BYTES = 512 * 1024

_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "minContains",
           "maxContains")  # fmt: skip
_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def _unbounded(schema: Any) -> str | None:
    """Why `schema` would make the converter spell out too much, or None. Walks every node (iteratively)."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key in _COUNTS:
            value = node.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > MAX_REPEAT:
                return f"{key} {value} is above the {MAX_REPEAT} this server enforces"
        properties = node.get("properties")
        if isinstance(properties, dict) and len(properties) > MAX_PROPERTIES:
            return f"an object schema has {len(properties)} properties; at most {MAX_PROPERTIES} are enforced"
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            for match in _QUANTIFIER.finditer(pattern):
                if any(len(group) > 6 or int(group) > MAX_REPEAT for group in match.groups() if group):
                    return f"the pattern repeats {match.group(0)}; at most {MAX_REPEAT} repetitions are enforced"
        stack.extend(node.values())
    return None


_ANNOTATIONS = frozenset({"title", "description", "$schema", "$id", "$comment", "default", "examples", "deprecated",
                          "readOnly", "writeOnly", "$defs", "definitions"})  # fmt: skip
_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})


def _enforced_keys(node: dict[str, Any]) -> frozenset[str]:
    """The keywords of one schema node that the converter turns into grammar: it takes the first branch that applies,
    in this order (llama_cpp.llama_grammar.SchemaConverter.visit), and ignores every other keyword of the node."""
    kind = node.get("type")
    if "$ref" in node:
        return frozenset({"$ref"})
    if "oneOf" in node or "anyOf" in node:
        return frozenset({"oneOf"} if "oneOf" in node else {"anyOf"})
    if isinstance(kind, list):
        return frozenset({"type"})
    if "const" in node:
        return frozenset({"const", "type"})
    if "enum" in node:
        return frozenset({"enum", "type"})
    if kind in (None, "object") and (
        "properties" in node or ("additionalProperties" in node and node["additionalProperties"] is not True)
    ):
        return frozenset({"type", "properties", "required", "additionalProperties"})
    if kind in (None, "object") and "allOf" in node:
        return frozenset({"type"})  # merged loosely (only the members' properties): never enforced as written
    if kind in (None, "array") and ("items" in node or "prefixItems" in node):
        if isinstance(node.get("items", node.get("prefixItems")), list):
            return frozenset({"type", "items", "prefixItems"})
        return frozenset({"type", "items", "minItems", "maxItems"})
    if kind in (None, "string") and "pattern" in node:
        return frozenset({"type", "pattern"})
    if kind in (None, "string") and node.get("format") in _FORMATS:
        return frozenset({"type", "format"})
    if kind == "string" and ("minLength" in node or "maxLength" in node):
        return frozenset({"type", "minLength", "maxLength"})
    return frozenset({"type"})


def _children(node: dict[str, Any]) -> list[tuple[str, Any]]:
    children: list[tuple[str, Any]] = []
    for key in ("properties", "$defs", "definitions"):
        if isinstance(node.get(key), dict):
            children += [(f"{key}.{name}", child) for name, child in node[key].items()]
    for key in ("items", "prefixItems", "anyOf", "oneOf", "allOf", "additionalProperties"):
        value = node.get(key)
        if isinstance(value, dict):
            children.append((key, value))
        elif isinstance(value, list):
            children += [(f"{key}.{i}", child) for i, child in enumerate(value)]
    return children


def _unenforced(schema: Any) -> str | None:
    """The first keyword of `schema` that the grammar would not enforce, as `path: keyword`, or None."""
    stack: list[tuple[str, Any]] = [("", schema)]
    while stack:
        where, node = stack.pop()
        if not isinstance(node, dict):
            continue
        ignored = sorted(set(node) - _enforced_keys(node) - _ANNOTATIONS)
        if ignored:
            return f"{where + ': ' if where else ''}{ignored[0]}"
        stack.extend((f"{where}.{path}" if where else path, child) for path, child in reversed(_children(node)))
    return None


def schema_grammar(schema: dict[str, Any], *, param: str, strict: bool = False) -> str:
    """The grammar that makes the sampler emit only JSON `schema` allows.

    Raises:
        ApiError: 400 when the schema is too large, asks for too much repetition, cannot be converted, or (strict)
            uses a keyword the grammar would not enforce.
    """
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise ApiError(400, f"the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes", param=param)
    if strict and (ignored := _unenforced(schema)) is not None:
        raise ApiError(400, f"strict: the JSON schema uses {ignored}, which this server cannot enforce (drop it, "
                       "or send strict: false for best effort)", code="invalid_schema", param=param)  # fmt: skip
    reason = _unbounded(schema)
    if reason is not None:
        raise ApiError(400, f"the JSON schema cannot be enforced: {reason}", code="invalid_schema", param=param)
    try:
        grammar = json_schema_to_gbnf(text)
    except Exception as exc:  # the converter raises whatever it meets (KeyError, ValueError, RecursionError…)
        raise ApiError(400, f"the JSON schema cannot be enforced: {exc!r}", code="invalid_schema", param=param) from exc
    # llama-cpp-python's converter lets a string hold raw control characters (`char ::= [^"\\]`), and a `pattern`'s
    # `.` even a bare quote or backslash (`dot ::= [^\x0A\x0D]`). JSON forbids all of them unescaped, so one sampled
    # U+0000-U+001F would make the answer unparseable. Exclude them as JSON_GBNF does (it leaves out DEL as well).
    for loose, tight in _LOOSE_RULES:
        grammar = grammar.replace(loose, tight)
    grammar = _whole_characters(grammar)
    if len(grammar) > MAX_GRAMMAR_BYTES:
        raise ApiError(400, f"the JSON schema cannot be enforced: its grammar is larger than {MAX_GRAMMAR_BYTES} "
                       "bytes", code="invalid_schema", param=param)  # fmt: skip
    return grammar


_LOOSE_RULES = (
    (r'char ::= [^"\\]', r'char ::= [^"\\\x7F\x00-\x1F]'),
    (r"dot ::= [^\x0A\x0D]", r'dot ::= [^"\\\x7F\x00-\x1F]'),
)


# The converter writes a constant (`const`, `enum`, a property name) as `json.dumps` spells it, so a character outside
# the Basic Multilingual Plane becomes a JSON surrogate pair, `\ud83e\udda9`. GBNF reads each `\uXXXX` as one code
# point and would make the sampler emit two UTF-8-encoded surrogates: six bytes that are not text, where the schema
# asked for 🦩. Each pair (after an even run of backslashes, so an escaped backslash is left alone) becomes the
# character itself, which GBNF takes as UTF-8.
_SURROGATE_PAIR = re.compile(r"(?<!\\)((?:\\\\)*)\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})", re.IGNORECASE)


def _whole_characters(grammar: str) -> str:
    def character(match: re.Match[str]) -> str:
        high, low = int(match.group(2), 16), int(match.group(3), 16)
        return match.group(1) + chr(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))

    return _SURROGATE_PAIR.sub(character, grammar)


def response_format_grammar(response_format: ResponseFormat | None) -> str | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return JSON_GBNF
    assert response_format.json_schema is not None
    schema = response_format.json_schema.schema_ or {"type": "object"}
    return schema_grammar(schema, param="response_format.json_schema.schema",
                          strict=bool(response_format.json_schema.strict))  # fmt: skip
