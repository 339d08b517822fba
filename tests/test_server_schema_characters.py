"""A JSON schema's constants outside the Basic Multilingual Plane become grammar that emits those characters.

llama-cpp-python's converter spells such a character as a JSON surrogate pair (`\\ud83e\\udda9`), which GBNF reads
as two code points: the sampler would be held to six bytes that are not UTF-8. The real model shows the damage
(tests/test_real_model.py); these tests pin the grammar text.
"""

from __future__ import annotations

from sealbox.runtime.server.structured_output import schema_grammar

PARAM = "response_format.json_schema.schema"


def test_an_enum_value_with_an_emoji_is_spelled_as_the_character_in_the_grammar() -> None:
    grammar = schema_grammar({"enum": ["🦩 flamingo", "é"]}, param=PARAM, strict=True)
    assert '"\\"🦩 flamingo\\""' in grammar
    assert "\\ud83e" not in grammar.lower()


def test_a_property_name_with_an_emoji_is_spelled_as_the_character_in_the_grammar() -> None:
    schema = {"type": "object", "properties": {"🦩": {"type": "integer"}}, "required": ["🦩"],
              "additionalProperties": False}  # fmt: skip
    grammar = schema_grammar(schema, param=PARAM, strict=True)
    assert "🦩" in grammar and "\\udda9" not in grammar.lower()


def test_an_escaped_backslash_before_u_stays_literal_text() -> None:
    """`\\\\ud83e` in a constant is a backslash and the letters "ud83e", not an escape: it is left as written."""
    grammar = schema_grammar({"const": "\\ud83e\\udda9"}, param=PARAM, strict=True)
    assert "🦩" not in grammar and r"\\ud83e\\udda9" in grammar

