"""A generation request in flight: what the request handler and the scheduler thread share about it.

The handler owns the asyncio side (the event queue on its loop); the scheduler owns the rest. The only field both
write is `cancelled`, a plain flag: set by the handler, read by the scheduler at its next step.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from sealbox.runtime.engine.base import EngineError, GenerationEvent, GenerationRequest
from sealbox.runtime.engine.sampling import SamplerChain


@dataclass(frozen=True)
class Failed:
    """Internal event: the engine failed this request; the stream raises `error` instead of yielding."""

    error: EngineError


@dataclass(eq=False, kw_only=True)
class GenerationTask:
    request: GenerationRequest
    sampler: SamplerChain
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[GenerationEvent | Failed]
    cells: int
    """KV cells reserved for this request while it runs: prompt + max_tokens."""
    index: int = 0
    """Which of the request's n choices this task generates."""
    leader: GenerationTask | None = None
    """For choices 1 .. n-1: the task of choice 0, whose evaluated prompt this one copies instead of computing it."""
    submitted_at: float = field(default_factory=time.monotonic)
    admitted_at: float = 0.0
    cancelled: bool = False
    done: bool = False
    """Set once `Finished` has been sent (or the task was dropped while queued)."""

    @property
    def principal(self) -> str:
        return self.request.principal

    @property
    def prompt_tokens(self) -> list[int]:
        return self.request.prompt_tokens
