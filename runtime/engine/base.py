"""The one seam between the API server and an inference backend.

Shaped like a transport: the server submits a `GenerationRequest` and iterates events; backend errors are
translated into `EngineError`s here, so the server never sees a llama.cpp exception.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    grammar: str | None = None
    """GBNF grammar text (from `response_format` json_object / json_schema); None for free text."""


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    id: str
    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    principal: str = "anonymous"
    """Fairness key for admission: requests queue fairly across principals (API keys)."""


@dataclass(frozen=True)
class TextDelta:
    text: str
    """UTF-8-safe text to append; may be empty while a multi-byte character or a possible stop string is held back."""


@dataclass(frozen=True)
class Finished:
    reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    completion_tokens: int


GenerationEvent = TextDelta | Finished


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int
    """Tokens read for all inputs (the usage a client is told and the audit log records)."""


@dataclass(frozen=True)
class EngineStats:
    running: int
    queued: int
    kv_cells_used: int
    kv_cells_total: int
    sequences_total: int


class EngineError(Exception):
    """Base of everything an engine raises to the server."""


class ContextLengthExceeded(EngineError):
    """Prompt + max_tokens can never fit one sequence's context: refuse at once (400), never truncate."""

    def __init__(self, message: str, *, needed: int, limit: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.limit = limit


class Overloaded(EngineError):
    """The admission queue is full: answer 429 with Retry-After."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineUnavailable(EngineError):
    """The backend failed or is shutting down: answer 503."""


@dataclass(frozen=True)
class ModelCard:
    name: str
    sha256: str
    n_ctx: int
    """Tokens one sequence may hold (prompt + completion)."""
    embeddings: bool = False
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    """BOS/EOS texts a chat template prints (`{{ bos_token }}`): the engine fills them from the vocabulary it loads."""
    extra: dict[str, object] = field(default_factory=dict)


class Engine(Protocol):
    card: ModelCard

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Admit, then stream events ending in exactly one `Finished`.

        Raises ContextLengthExceeded or Overloaded before the first event. Closing the iterator (client gone)
        cancels the request and frees its sequence and KV cells at the next scheduler step.
        """
        ...

    async def embed(self, texts: list[str]) -> Embeddings: ...

    def stats(self) -> EngineStats: ...
