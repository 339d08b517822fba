"""A model with sliding-window layers (Gemma 3) keeps only each sequence's last window of cells there: a cached
prefix is continued from only while the window before it is still held, and a reproducible request only from a
sequence that never dropped a cell."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sealbox.runtime.engine import GenerationRequest, SamplingParams
from sealbox.runtime.engine.llama_batch import LlamaBatchEngine
from engine_support import collect, running_engine

GREEDY = SamplingParams(temperature=0.0)
FREE = SamplingParams(temperature=0.7)
TEXT = " ".join(f"Item {i} of the inventory lists a crate of tools stored in room {i % 17}." for i in range(200))


def started(model: Path):
    """Greedy requests are reproducible here (the policy's "seeded-and-greedy")."""
    return running_engine(model, "gemma-window", n_seq_max=1, n_ctx_per_seq=4096, queue_size=4, n_threads=2,
                          reproducible_greedy=True)  # fmt: skip


async def answer(engine: LlamaBatchEngine, prompt: list[int], sampling: SamplingParams, max_tokens: int = 8) -> str:
    text, _ = await collect(engine, GenerationRequest(id="r", prompt_tokens=prompt, max_tokens=max_tokens,
                                                      sampling=sampling))  # fmt: skip
    return text


def test_the_engine_keeps_only_a_window_of_cells_in_sliding_window_layers(gemma_model: Path) -> None:
    async def scenario() -> tuple[int, int]:
        async with started(gemma_model) as engine:
            assert engine._context is not None
            long_prompt = engine.tokenize(TEXT)[:1500]
            await answer(engine, long_prompt, FREE)
            return engine._context.n_swa, engine._context.first_position(0)

    window, first = asyncio.run(scenario())
    assert window > 0
    assert first > 0  # the oldest cells of the 1,500-token sequence were dropped


def test_a_prefix_whose_window_was_dropped_is_computed_again(gemma_model: Path) -> None:
    """Continuing at position 700 needs the cells before it, which a 1,500-token sequence no longer holds: the
    request is computed from the start, for a free request as for a greedy one, and the greedy one answers as on a
    fresh engine."""

    async def scenario() -> tuple[int, int, str, str]:
        async with started(gemma_model) as fresh:
            tokens = fresh.tokenize(TEXT)
            rewound = tokens[:700] + fresh.tokenize(" Which room holds item 3?", add_bos=False)
            expected = await answer(fresh, rewound, GREEDY)
        async with started(gemma_model) as engine:
            await answer(engine, tokens[:1500], FREE)
            before = engine.prompt_tokens_reused
            got = await answer(engine, rewound, GREEDY)
            greedy_reused = engine.prompt_tokens_reused - before
            await answer(engine, tokens[:1500], FREE)
            before = engine.prompt_tokens_reused
            await answer(engine, rewound, FREE)
            return greedy_reused, engine.prompt_tokens_reused - before, expected, got

    greedy_reused, free_reused, expected, got = asyncio.run(scenario())
    assert greedy_reused == 0
    assert free_reused == 0
    assert got == expected


def test_a_follow_up_that_continues_the_sequence_still_reuses_it(gemma_model: Path) -> None:
    """A conversation's next turn starts where the last one ended: its window is all there, so it is reused."""

    async def scenario() -> tuple[int, int]:
        async with started(gemma_model) as engine:
            tokens = engine.tokenize(TEXT)[:1500]
            await answer(engine, tokens, FREE, max_tokens=1)
            before = engine.prompt_tokens_reused
            follow_up = tokens + engine.tokenize(" And item 4?", add_bos=False)
            await answer(engine, follow_up, FREE)
            return engine.prompt_tokens_reused - before, len(tokens)

    reused, held = asyncio.run(scenario())
    assert reused >= held - 1
