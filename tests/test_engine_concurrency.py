"""Many requests in one llama.cpp context: every stream completes, and each answers as it would alone."""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path

from sealbox.runtime.engine.base import Finished, GenerationRequest, SamplingParams
from sealbox.runtime.engine.llama_batch import LlamaBatchEngine
from engine_support import collect, running_engine

GREEDY = SamplingParams(temperature=0.0)


started = partial(running_engine, name="tiny-concurrency", queue_size=64, reproducible_greedy=True)
"""Greedy requests reproducible, as under the policy's "seeded-and-greedy": each answers among 32 as alone."""


async def complete(engine: LlamaBatchEngine, prompt: str, *, max_tokens: int, sampling: SamplingParams = GREEDY,
                   request_id: str = "r") -> tuple[str, Finished]:
    request = GenerationRequest(
        id=request_id, prompt_tokens=engine.tokenize(prompt), max_tokens=max_tokens, sampling=sampling
    )
    return await collect(engine, request)


PROMPTS = [f"the {word} of water and day {i}" for i, word in enumerate(
    "one two three four five six seven eight nine ten many more some people word time".split() * 2
)]


def test_32_concurrent_greedy_generations_each_equal_their_output_alone(tiny_model: Path) -> None:
    async def scenario() -> None:
        async with started(tiny_model, n_seq_max=1) as alone_engine:
            alone = [await complete(alone_engine, prompt, max_tokens=24) for prompt in PROMPTS]

        async with started(tiny_model, n_seq_max=32) as engine:
            together = await asyncio.gather(
                *(complete(engine, prompt, max_tokens=24, request_id=f"r{i}") for i, prompt in enumerate(PROMPTS))
            )
            assert engine.stats().running == 0

        assert len(together) == 32
        for i, ((text, finished), (alone_text, alone_finished)) in enumerate(zip(together, alone, strict=True)):
            assert text == alone_text, f"prompt {i} answered differently under load"
            assert finished == alone_finished
        assert len({text for text, _ in together}) > 1, "different prompts should give different outputs"

    asyncio.run(scenario())


def test_more_requests_than_sequences_queue_and_all_complete(tiny_model: Path) -> None:
    async def scenario() -> None:
        async with started(tiny_model, n_seq_max=3, queue_size=64) as engine:
            results = await asyncio.gather(*(complete(engine, p, max_tokens=8, request_id=p) for p in PROMPTS[:12]))
        assert [finished.reason for _, finished in results] == ["length"] * 12
        assert all(finished.completion_tokens == 8 for _, finished in results)

    asyncio.run(scenario())


def test_a_stream_reports_prompt_and_completion_token_counts(tiny_model: Path) -> None:
    async def scenario() -> None:
        async with started(tiny_model) as engine:
            prompt_tokens = len(engine.tokenize(PROMPTS[0]))
            _, finished = await complete(engine, PROMPTS[0], max_tokens=5)
        assert finished.prompt_tokens == prompt_tokens
        assert finished.completion_tokens <= 5
        assert finished.reason in {"length", "stop"}

    asyncio.run(scenario())
