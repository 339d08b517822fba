"""A slot is one KV sequence of the context and the request it is serving, if any.

The slot keeps a mirror of the tokens its sequence holds in the cache, so a later request that starts with the same
tokens (a shared system prompt) can reuse those cells instead of computing them again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from sealbox.runtime.engine.task import GenerationTask
from sealbox.runtime.engine.text_stream import TextStream


class SlotState(enum.Enum):
    IDLE = "idle"
    PREFILL = "prefill"
    """Prompt tokens still to be decoded."""
    GENERATING = "generating"


@dataclass(eq=False)
class Slot:
    id: int
    """The llama.cpp sequence id."""
    state: SlotState = SlotState.IDLE
    task: GenerationTask | None = None
    cached: list[int] = field(default_factory=list)
    """Tokens in this sequence's cells, position i at index i."""
    last_used: int = 0
    """Scheduler step at which the slot last held a request (least recently used is evicted first)."""
    canonical: int = 0
    """Leading cells computed in whole canonical prompt chunks (see `Scheduler`): a reproducible request may reuse
    these and only these, since any other chunking moves the logits."""
    follows: Slot | None = None
    """While set, this slot waits for that slot's prompt to be evaluated and copies its cells (a choice of n > 1)."""

    # Per request; reset by `assign`.
    prompt: list[int] = field(default_factory=list)
    text: TextStream = field(default_factory=TextStream)
    pending: int = -1
    """Sampled token not yet decoded into the cache (-1 when there is none)."""
    output_index: int = -1
    """Batch index of this slot's logits in the batch being decoded, or -1."""
    generated: int = 0
    first_token_at: float = 0.0
    last_token_at: float = 0.0

    def assign(self, task: GenerationTask, reused: int, step: int) -> None:
        """Take a request whose first `reused` prompt tokens are already in this sequence's cells."""
        self.task = task
        self.state = SlotState.PREFILL
        self.prompt = task.prompt_tokens
        self.text = TextStream(task.request.stop)
        self.pending = -1
        self.output_index = -1
        self.generated = 0
        self.first_token_at = 0.0
        self.last_token_at = 0.0
        self.last_used = step
        self.follows = None
        del self.cached[reused:]
        self.canonical = min(self.canonical, reused)

    def release(self, step: int) -> GenerationTask:
        task = self.task
        assert task is not None
        self.task = None
        self.state = SlotState.IDLE
        self.pending = -1
        self.output_index = -1
        self.follows = None
        self.last_used = step
        return task

    @property
    def busy(self) -> bool:
        return self.task is not None

    def common_prefix(self, tokens: list[int]) -> int:
        cached = self.cached
        limit = min(len(cached), len(tokens))
        n = 0
        while n < limit and cached[n] == tokens[n]:
            n += 1
        return n
