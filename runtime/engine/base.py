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
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) added to the logits before anything samples them; -100 forbids a token, +100 forces it."""

    def reproducible(self, *, greedy_too: bool) -> bool:
        """Whether the request answers the same whatever ran before or beside it (see `scheduler`): always with a
        seed, and a greedy one where the engine was asked to (`EngineOptions.reproducible_greedy`)."""
        return self.seed is not None or (greedy_too and self.temperature <= 0.0)


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    id: str
    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    principal: str = "anonymous"
    """Fairness key for admission: requests queue fairly across principals (API keys)."""
    n: int = 1
    """Choices generated from this prompt. The prompt is evaluated once and its cells copied to the other choices'
    sequences; choice i samples with seed + i, so seeded choices differ from each other and repeat across requests."""
    logprobs: int | None = None
    """Report each sampled token's log-probability and this many most likely alternatives (0: none); None: off."""


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token's log-probability under the logits its sampler saw (the model's, plus `logit_bias`)."""

    token: int
    piece: bytes
    logprob: float
    top: tuple[tuple[int, bytes, float], ...] = ()
    """The most likely tokens at that step, most likely first: (token id, bytes, log-probability)."""


@dataclass(frozen=True)
class TextDelta:
    text: str
    """UTF-8-safe text to append; may be empty while a multi-byte character or a possible stop string is held back."""
    index: int = 0
    """The choice this text belongs to (0 .. n - 1)."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """The tokens sampled for this delta, when the request asked for logprobs (a held-back token is reported here
    even while its text waits)."""


@dataclass(frozen=True)
class Finished:
    reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    completion_tokens: int
    index: int = 0
    """The choice that finished; a stream of n choices ends after n `Finished` events."""


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


class EngineLoadError(EngineUnavailable):
    """The backend could not load the model file (or build a context for it): the model is not served."""


class InvalidRequest(EngineError):
    """The request cannot be served as given (an empty prompt, a grammar that does not parse): answer 400."""


class GrammarError(InvalidRequest):
    """The request's GBNF grammar does not parse."""


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


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """How an engine is sized and placed (from `runtime.memory_plan`): see `LlamaBatchEngine` for each."""

    n_seq_max: int
    n_ctx_per_seq: int
    queue_size: int
    kv_cells: int | None = None
    n_gpu_layers: int = 0
    n_threads: int | None = None
    embeddings: bool = False
    flash_attention: bool | None = None
    """None: on for split streams, off in a shared pool (see `LlamaBatchEngine`)."""
    extra_buffers: bool = True
    type_k: str = "f16"
    type_v: str = "f16"
    reproducible_greedy: bool = False
    """Greedy requests without a seed are reproducible too (policy `[limits] reproducible`), at the price of a
    second row in each step of a lone stream and a step of its own for each prompt chunk (see `scheduler`)."""


class Engine(Protocol):
    card: ModelCard

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]: ...

    def detokenize(self, tokens: list[int]) -> str:
        """Raises InvalidRequest for a token id outside the vocabulary."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Admit, then stream events ending in exactly one `Finished` per choice (`request.n`).

        Raises ContextLengthExceeded or Overloaded before the first event. Closing the iterator (client gone)
        cancels the request and frees its sequence and KV cells at the next scheduler step.
        """
        ...

    async def embed(self, texts: list[str]) -> Embeddings: ...

    def stats(self) -> EngineStats: ...

    @property
    def prompt_tokens_decoded(self) -> int:
        """Prompt tokens computed since start (prefix reuse and shared choices keep it below those submitted)."""
        ...
