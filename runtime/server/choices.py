"""Several choices in one answer: the engine's event streams of one or more prompts merged into one, numbered as
OpenAI numbers choices (prompt i's choice j is choice i·n + j), collected per choice, and their logprobs in OpenAI's
two shapes (chat's `content` list, text completions' parallel arrays)."""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from sealbox.runtime.engine import Finished, GenerationEvent, TextDelta, TokenLogprob


class MergedEvents(AsyncIterator[GenerationEvent]):
    """The events of several prompts' streams as one, each event renumbered to its choice in the whole answer.

    Closing it closes every stream (so every sequence is freed); an engine error from any stream ends it.
    """

    def __init__(self, streams: list[AsyncIterator[GenerationEvent]], n: int) -> None:
        self._streams = streams
        self._n = n
        self._pending: dict[int, asyncio.Future[GenerationEvent]] = {}
        self._open = set(range(len(streams)))

    def __aiter__(self) -> MergedEvents:
        return self

    async def __anext__(self) -> GenerationEvent:
        if len(self._streams) == 1:
            if not self._open:
                raise StopAsyncIteration
            try:
                return self._renumber(0, await anext(self._streams[0]))
            except StopAsyncIteration:
                self._open.clear()
                raise
        while self._open:
            for i in self._open:
                if i not in self._pending:
                    self._pending[i] = asyncio.ensure_future(anext(self._streams[i]))  # type: ignore[arg-type]
            done, _ = await asyncio.wait(self._pending.values(), return_when=asyncio.FIRST_COMPLETED)
            i = min(j for j, future in self._pending.items() if future in done)
            future = self._pending.pop(i)
            try:
                return self._renumber(i, future.result())
            except StopAsyncIteration:
                self._open.discard(i)
        raise StopAsyncIteration

    def _renumber(self, prompt: int, event: GenerationEvent) -> GenerationEvent:
        return event if prompt == 0 else replace(event, index=prompt * self._n + event.index)

    async def aclose(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._open.clear()
        for stream in self._streams:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()


@dataclass
class Choice:
    """One choice's answer as it arrives."""

    index: int
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: Finished | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass
class Choices:
    """Every choice of an answer, and the usage they add up to (each prompt counted once, not once per choice)."""

    n: int
    """Choices per prompt."""
    by_index: dict[int, Choice] = field(default_factory=dict)

    def add(self, event: GenerationEvent) -> Choice:
        choice = self.by_index.get(event.index)
        if choice is None:
            choice = self.by_index[event.index] = Choice(event.index)
        if isinstance(event, TextDelta):
            if event.text:
                choice.parts.append(event.text)
            choice.logprobs.extend(event.logprobs)
        else:
            choice.finished = event
        return choice

    def ordered(self) -> list[Choice]:
        return [self.by_index[i] for i in sorted(self.by_index)]

    def total(self) -> Finished:
        """One `Finished` for the whole answer: prompts once each, completions summed, the first choice's reason."""
        finished = [choice.finished for choice in self.ordered() if choice.finished is not None]
        return Finished(
            finished[0].reason if finished else "cancelled",
            prompt_tokens=sum(f.prompt_tokens for f in finished if f.index % self.n == 0),
            completion_tokens=sum(f.completion_tokens for f in finished),
        )


def _token_text(piece: bytes) -> str:
    return piece.decode("utf-8", "replace")


def chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    """Chat's `logprobs`: `content[i].{token, logprob, bytes, top_logprobs}`, most likely alternative first."""
    return {
        "content": [
            {
                "token": _token_text(item.piece),
                "logprob": item.logprob,
                "bytes": list(item.piece),
                "top_logprobs": [{"token": _token_text(piece), "logprob": logprob, "bytes": list(piece)}
                                 for _token, piece, logprob in item.top],  # fmt: skip
            }
            for item in items
        ],
        "refusal": None,
    }


def completion_logprobs(items: list[TokenLogprob], *, offset: int = 0) -> dict[str, Any]:
    """Text completions' `logprobs`: parallel `tokens`, `token_logprobs`, `top_logprobs`, `text_offset` (characters
    from the start of the choice's text, `offset` being where the completion starts in it).

    Offsets count the characters the text holds, not the tokens' own renderings: the byte tokens of one character
    (each rendered U+FFFD) all start where that character does, and count as that one character."""
    offsets = []
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for item in items:
        offsets.append(offset)
        offset += len(decoder.decode(item.piece))
    return {
        "tokens": [_token_text(item.piece) for item in items],
        "token_logprobs": [item.logprob for item in items],
        "top_logprobs": [_top_dict(item) for item in items],
        "text_offset": offsets,
    }


def _top_dict(item: TokenLogprob) -> dict[str, float]:
    """The alternatives as `{token: logprob}` (the sampled token alone when none were asked for); two tokens that
    render alike keep the likelier one."""
    top: dict[str, float] = {}
    for _token, piece, logprob in item.top or ((item.token, item.piece, item.logprob),):
        top.setdefault(_token_text(piece), logprob)
    return top
