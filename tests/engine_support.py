"""One way for the engine tests to build a batching engine on a test model, hold it running, and read a stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sealbox.runtime.engine.base import Finished, GenerationRequest, ModelCard, TextDelta
from sealbox.runtime.engine.llama_batch import LlamaBatchEngine

DEFAULTS: dict[str, object] = {"n_seq_max": 4, "n_ctx_per_seq": 256, "queue_size": 16, "n_threads": 2}


def make_engine(model: Path, name: str, **options: object) -> LlamaBatchEngine:
    """An engine on `model` whose card's context is one sequence's (`n_ctx_per_seq`); `options` override DEFAULTS."""
    settings = DEFAULTS | options
    card = ModelCard(name=name, sha256="0" * 64, n_ctx=settings["n_ctx_per_seq"])  # type: ignore[arg-type]
    return LlamaBatchEngine(model, card, **settings)  # type: ignore[arg-type]


@asynccontextmanager
async def running_engine(model: Path, name: str, **options: object) -> AsyncIterator[LlamaBatchEngine]:
    """A started engine, stopped when the block ends however it ends."""
    engine = make_engine(model, name, **options)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def collect(engine: LlamaBatchEngine, request: GenerationRequest) -> tuple[str, Finished]:
    """The text of a one-choice stream and the one Finished that ends it."""
    parts: list[str] = []
    finished: list[Finished] = []
    async for event in engine.generate(request):
        if isinstance(event, TextDelta):
            parts.append(event.text)
        else:
            finished.append(event)
    assert len(finished) == 1, "a stream ends in exactly one Finished"
    return "".join(parts), finished[0]
