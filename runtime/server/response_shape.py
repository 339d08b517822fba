"""The OpenAI bodies of one completion, whole or as stream chunks, shaped in one place.

The answer and the stream read the generated text through the same `ToolCallParser` and the same finish-reason rule,
so a tool call is a tool call either way: `message.tool_calls` whole, or `delta.tool_calls` chunks in a stream (the
call's index, id, type and name first, then its arguments), and `finish_reason: "tool_calls"` in both. A request
made with the legacy `functions` gets the legacy shape (`function_call`, `finish_reason: "function_call"`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sealbox.runtime.server.tool_calls import Call, Content, Piece, ToolCallParser


def finish_reason(engine_reason: str, *, called: bool, legacy: bool) -> str:
    if called:
        return "function_call" if legacy else "tool_calls"
    return "length" if engine_reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class CompletionShape:
    """One completion's identity and how its text is read; `chunk`, `text` and `finish` shape what is sent."""

    id: str
    model: str
    chat: bool
    fingerprint: str | None = None
    parser: ToolCallParser | None = None
    legacy: bool = False
    index: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    _calls: int = 0

    # -- the stream -------------------------------------------------------------------------------------------------

    def envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        """A chunk's body around `choices`."""
        data: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                                "created": self.created, "model": self.model, "choices": choices}  # fmt: skip
        if self.chat:
            data["system_fingerprint"] = self.fingerprint
        return data

    def opening(self) -> list[dict[str, Any]]:
        """The chunks before any text: a chat stream names the role first."""
        if not self.chat:
            return []
        delta = {"role": "assistant", "content": "", "refusal": None}
        return [self.envelope([self._choice(delta, None)])]

    def text(self, text: str, *, logprobs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The chunks for newly generated `text` (none while a tool call is still being read, unless the tokens'
        `logprobs` must be sent: then a chunk with an empty delta carries them)."""
        if not text and logprobs is None:
            return []
        pieces = (self.parser.feed(text) if self.parser is not None else [Content(text)]) if text else []
        choices = self._deltas(pieces)
        if logprobs is not None:
            if not choices:
                choices = [self._choice({}, None)]
            choices[0]["logprobs"] = logprobs
        return [self.envelope([choice]) for choice in choices]

    def closing(self, engine_reason: str) -> list[dict[str, Any]]:
        """The last chunks: what the parser still held, then the finish reason."""
        pieces = self.parser.finish() if self.parser is not None else []
        chunks = [self.envelope([choice]) for choice in self._deltas(pieces)]
        reason = finish_reason(engine_reason, called=self._calls > 0, legacy=self.legacy)
        return chunks + [self.envelope([self._choice({}, reason)])]

    def _choice(self, delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
        if not self.chat:
            return {"index": self.index, "text": delta.get("content", ""), "logprobs": None, "finish_reason": reason}
        return {"index": self.index, "delta": delta, "logprobs": None, "finish_reason": reason}

    def _deltas(self, pieces: list[Piece]) -> list[dict[str, Any]]:
        choices = []
        for piece in pieces:
            if isinstance(piece, Content):
                if piece.text:
                    choices.append(self._choice({"content": piece.text}, None))
                continue
            if self.legacy:
                if self._calls:
                    continue  # the legacy form carries one call
                choices.append(self._choice({"function_call": {"name": piece.name, "arguments": ""}}, None))
                choices.append(self._choice({"function_call": {"arguments": piece.arguments}}, None))
            else:
                head = {"index": self._calls, "id": piece.id, "type": "function",
                        "function": {"name": piece.name, "arguments": ""}}  # fmt: skip
                choices.append(self._choice({"tool_calls": [head]}, None))
                arguments = {"index": self._calls, "function": {"arguments": piece.arguments}}
                choices.append(self._choice({"tool_calls": [arguments]}, None))
            self._calls += 1
        return choices

    # -- the whole answer -------------------------------------------------------------------------------------------

    def whole_choice(self, text: str, engine_reason: str, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        """This choice of the non-streamed body, for its generated `text`, read exactly as the stream reads it."""
        if not self.chat:
            return {"index": self.index, "text": text, "logprobs": logprobs,
                    "finish_reason": finish_reason(engine_reason, called=False, legacy=False)}  # fmt: skip
        pieces: list[Piece] = []
        if self.parser is not None:
            pieces = self.parser.feed(text) + self.parser.finish()
        else:
            pieces = [Content(text)]
        said = "".join(piece.text for piece in pieces if isinstance(piece, Content))
        calls = [piece for piece in pieces if isinstance(piece, Call)]
        message: dict[str, Any] = {"role": "assistant", "content": said or (None if calls else ""), "refusal": None}
        if calls and self.legacy:
            message["function_call"] = {"name": calls[0].name, "arguments": calls[0].arguments}
        elif calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                for call in calls
            ]
        return {"index": self.index, "message": message, "logprobs": logprobs,
                "finish_reason": finish_reason(engine_reason, called=bool(calls), legacy=self.legacy)}  # fmt: skip

    def whole(self, text: str, engine_reason: str, counted: dict[str, int]) -> dict[str, Any]:
        """The non-streamed body of a one-choice answer."""
        return self.body([self.whole_choice(text, engine_reason)], counted)

    def body(self, choices: list[dict[str, Any]], counted: dict[str, int]) -> dict[str, Any]:
        """The non-streamed body around its `choices` (each from its own shape's `whole_choice`)."""
        base = {"id": self.id, "created": self.created, "model": self.model}
        if not self.chat:
            return {**base, "object": "text_completion", "choices": choices, "usage": counted}
        return {**base, "object": "chat.completion", "system_fingerprint": self.fingerprint, "choices": choices,
                "usage": counted}  # fmt: skip
