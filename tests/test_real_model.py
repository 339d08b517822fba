"""What only a real tokenizer shows, on the real Gemma 3 270M served by `sealbox serve` and read by the `openai` client.

The synthetic test model's small made-up vocabulary cannot show where a real one cuts text: a stop string across a
token boundary, a character split over byte-fallback tokens, a grammar that must lead the sampler through a
vocabulary of 262,144 real pieces. Gemma can: its greedy continuations of the prompts below were observed through
this server, and each test first checks the premise it depends on (that the stop spans tokens, that the character
spans tokens), so a changed model or build fails loudly instead of passing vacuously.
Greedy decoding and few tokens: the CPU is slow.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema_rs
import openai
import pytest

from server_support import ServerProcess

FRANCE = "The capital of France is"
"""Greedy: " the capital of the United Kingdom. It is the largest city in France and the" (a base model)."""
ACROSS = "e larg"
"""The end of the token " the" and the start of the next, " largest": in the answer, but in no single token."""
FLAMINGOS = "Pink birds: 🦩🦩🦩"
"""Greedy: more flamingos. Gemma's vocabulary has no piece for 🦩 (U+1F9A9): it is four byte-fallback tokens."""
FLAMINGO = "🦩"
LOVE = "I love flamingos 🦩"
"""Greedy: "\\n\\nI love flamingos 🦩\\n\\n…": ASCII tokens, then a character in four byte tokens."""
RIVERS = [{"role": "user", "content": "Name three rivers."}]
"""Greedy, in Gemma's turns: "Name three rivers.\nRiver Name\n…" (a base model echoes)."""
ACROSS_THREE = "s.\nRi"
"""The end of " rivers", all of "." and "\n", the start of "River": three token boundaries."""
CITY = {"type": "object", "additionalProperties": False, "required": ["city", "population"],
        "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer"}}}  # fmt: skip
BIRD = {"type": "object", "additionalProperties": False, "required": ["bird"],
        "properties": {"bird": {"enum": ["🦩 flamingo", "🐧 penguin"]}}}  # fmt: skip
"""Constants whose emoji Gemma has no piece for: the grammar must lead the sampler through their byte tokens."""


@dataclass
class Gemma:
    client: openai.OpenAI
    model: str

    def complete(self, prompt: str, *, stream: bool, **options: Any) -> tuple[str, str, list[str]]:
        """The answer's text, finish reason and (streamed) its text deltas, under greedy decoding."""
        if not stream:
            reply = self.client.completions.create(model=self.model, prompt=prompt, temperature=0, **options)
            return reply.choices[0].text, reply.choices[0].finish_reason, [reply.choices[0].text]
        chunks = list(self.client.completions.create(model=self.model, prompt=prompt, temperature=0, stream=True,
                                                     **options))  # fmt: skip
        deltas = [chunk.choices[0].text for chunk in chunks if chunk.choices]
        finish = _finish_reasons(chunks)
        assert len(finish) == 1, finish
        return "".join(deltas), finish[0], deltas

    def tokens(self, prompt: str, max_tokens: int) -> list[str]:
        """The greedy continuation as the server's own tokenizer cut it (`logprobs` names every sampled token)."""
        reply = self.client.completions.create(model=self.model, prompt=prompt, temperature=0, max_tokens=max_tokens,
                                               logprobs=0)  # fmt: skip
        assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.tokens is not None
        return reply.choices[0].logprobs.tokens


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory, gemma_model: Path) -> Iterator[Gemma]:
    root = tmp_path_factory.mktemp("appliance")
    policy = "[limits]\ncontext = 1024\nmax_tokens = 64\nmax_sequences = 2\n"
    with ServerProcess(root, models=[gemma_model], policy_text=policy, no_auth=True) as server:
        with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300) as client:
            yield Gemma(client, client.models.list().data[0].id)


def _finish_reasons(chunks: list[Any]) -> list[str]:
    return [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]


def _whole_text(delta: str) -> bool:
    """Text a client can use: no replacement character, no lone surrogate from a torn character."""
    try:
        delta.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\ufffd" not in delta


@pytest.fixture(scope="module")
def france_tokens(gemma: Gemma) -> list[str]:
    return gemma.tokens(FRANCE, 16)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_stop_string_spanning_two_tokens_ends_the_answer_just_before_it(gemma: Gemma, france_tokens: list[str],
                                                                          stream: bool) -> None:  # fmt: skip
    spoken = "".join(france_tokens)
    assert ACROSS in spoken and not [token for token in france_tokens if ACROSS in token], france_tokens
    text, finish, _deltas = gemma.complete(FRANCE, stream=stream, max_tokens=16, stop=[ACROSS])
    # The "e" of " the" was sampled before " largest" showed it to be a stop's start: it must never reach the client.
    assert text == spoken[: spoken.index(ACROSS)]
    assert text.endswith(" th") and ACROSS not in text
    assert finish == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_chat_stop_string_across_three_token_boundaries_ends_the_reply_before_it(gemma: Gemma, stream: bool) -> None:
    options: dict[str, Any] = dict(model=gemma.model, messages=RIVERS, temperature=0, max_tokens=8)
    tokens = gemma.client.chat.completions.create(logprobs=True, **options).choices[0].logprobs
    assert tokens is not None and tokens.content is not None
    pieces = [token.token for token in tokens.content]
    spoken = "".join(pieces)
    start = spoken.index(ACROSS_THREE)
    ends = [len("".join(pieces[: i + 1])) for i in range(len(pieces))]
    assert [end for end in ends if start < end < start + len(ACROSS_THREE)] == [start + 1, start + 2, start + 3], pieces
    if stream:
        chunks = list(gemma.client.chat.completions.create(stream=True, stop=ACROSS_THREE, **options))
        content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        finish = _finish_reasons(chunks)
    else:
        reply = gemma.client.chat.completions.create(stop=ACROSS_THREE, **options)
        content, finish = reply.choices[0].message.content or "", [reply.choices[0].finish_reason]
    assert content == spoken[:start] == "Name three river"
    assert finish == ["stop"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_stop_string_that_is_one_character_over_four_byte_tokens_ends_the_answer_before_it(
    gemma: Gemma, stream: bool
) -> None:
    text, finish, _deltas = gemma.complete(LOVE, stream=stream, max_tokens=12, stop=[FLAMINGO])
    assert text == "\n\nI love flamingos "
    assert finish == "stop"


def test_a_character_split_over_four_byte_tokens_streams_as_whole_characters(gemma: Gemma) -> None:
    whole = gemma.client.completions.create(model=gemma.model, prompt=FLAMINGOS, temperature=0, max_tokens=12)
    # The premise: twelve tokens made three characters, so each character spans tokens.
    assert whole.choices[0].text == FLAMINGO * 3
    assert whole.usage is not None and whole.usage.completion_tokens == 12
    text, finish, deltas = gemma.complete(FLAMINGOS, stream=True, max_tokens=12)
    assert text == whole.choices[0].text and finish == "length"
    assert all(_whole_text(delta) for delta in deltas), deltas
    # Each character goes out in the chunk of its last byte, not before and not piecemeal.
    assert [delta for delta in deltas if delta] == [FLAMINGO] * 3


def test_a_stream_mixing_ascii_and_a_split_character_equals_the_whole_answer(gemma: Gemma) -> None:
    whole, _finish, _ = gemma.complete(LOVE, stream=False, max_tokens=14)
    streamed, _finish, deltas = gemma.complete(LOVE, stream=True, max_tokens=14)
    assert FLAMINGO in whole and streamed == whole
    assert all(_whole_text(delta) for delta in deltas), deltas


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_answer_cut_inside_a_character_ends_in_one_replacement_character(gemma: Gemma, stream: bool) -> None:
    """Ten tokens are two flamingos and half of a third: the half is not text, and it ends the answer as one U+FFFD
    (as a decoder that meets the end of its input does), the same streamed or whole, never as a torn surrogate."""
    text, finish, deltas = gemma.complete(FLAMINGOS, stream=stream, max_tokens=10)
    assert text == FLAMINGO * 2 + "\ufffd" and finish == "length"
    if stream:
        assert [delta for delta in deltas if delta] == [FLAMINGO, FLAMINGO, "\ufffd"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_strict_json_schema_answer_parses_and_validates_on_the_real_vocabulary(gemma: Gemma, stream: bool) -> None:
    options: dict[str, Any] = dict(
        model=gemma.model, temperature=0, max_tokens=64,
        messages=[{"role": "user", "content": "Give the largest city of France and its population as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": CITY}},
    )  # fmt: skip
    if stream:
        chunks = list(gemma.client.chat.completions.create(stream=True, **options))
        content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        finish = _finish_reasons(chunks)
    else:
        reply = gemma.client.chat.completions.create(**options)
        content, finish = reply.choices[0].message.content or "", [reply.choices[0].finish_reason]
    # "stop", not "length": the grammar closed the object within the budget, so the whole answer is the document.
    assert finish == ["stop"], content
    document = json.loads(content)
    jsonschema_rs.validate(CITY, document)
    assert document["city"]


def test_completion_logprob_offsets_count_a_character_split_over_tokens_once_streamed_or_not(gemma: Gemma) -> None:
    """`text_offset` is where each token starts in the text: the four byte tokens of 🦩 all start at the character,
    and the tokens after it are found at their offsets (not three characters further on); the stream says the same."""
    whole = gemma.client.completions.create(model=gemma.model, prompt=LOVE, temperature=0, max_tokens=14, logprobs=0)
    text, logprobs = whole.choices[0].text, whole.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.text_offset is not None
    at = text.index(FLAMINGO)
    assert logprobs.text_offset.count(at) == 4  # the premise: four tokens make the flamingo
    for token, offset in zip(logprobs.tokens, logprobs.text_offset, strict=True):
        if token != "\ufffd":
            assert text[offset : offset + len(token)] == token, (token, offset, text)
    chunks = gemma.client.completions.create(model=gemma.model, prompt=LOVE, temperature=0, max_tokens=14, logprobs=0,
                                             stream=True)  # fmt: skip
    streamed = [offset for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for offset in chunk.choices[0].logprobs.text_offset or []]  # fmt: skip
    assert streamed == logprobs.text_offset


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_strict_enum_of_emoji_outside_the_vocabulary_answers_one_of_its_values(gemma: Gemma, stream: bool) -> None:
    options: dict[str, Any] = dict(
        model=gemma.model, temperature=0, max_tokens=32,
        messages=[{"role": "user", "content": "Which bird is pink? Answer as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "bird", "strict": True, "schema": BIRD}},
    )  # fmt: skip
    if stream:
        chunks = list(gemma.client.chat.completions.create(stream=True, **options))
        deltas = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
        assert all(_whole_text(delta) for delta in deltas), deltas
        content = "".join(deltas)
    else:
        content = gemma.client.chat.completions.create(**options).choices[0].message.content or ""
    assert "\ufffd" not in content, content
    jsonschema_rs.validate(BIRD, json.loads(content))
