"""Prefix reuse: a prompt that starts with tokens already in the cache does not compute them again, and answers
exactly as if it had."""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path

from sealbox.runtime.engine.base import Finished, GenerationRequest, SamplingParams, TextDelta
from sealbox.runtime.engine.llama_batch import LlamaBatchEngine
from engine_support import collect, running_engine

GREEDY = SamplingParams(temperature=0.5, top_k=1)
"""The most likely token, yet not a reproducible request (no seed, temperature above 0): such a request reuses any
cached prefix, where a reproducible one reuses only whole canonical chunks (tests/test_engine_reproducible.py)."""
ENDLESS = SamplingParams(temperature=0.5, top_k=1, grammar="root ::= [a-z ] root")
SYSTEM = "the people of the water " * 20
"""A shared system prompt, long enough (over 64 tokens) for a copy between sequences to pay."""
CONTEXT = 1024


started = partial(running_engine, name="tiny-prefix", n_ctx_per_seq=CONTEXT)


async def complete(engine: LlamaBatchEngine, tokens: list[int], *, max_tokens: int = 16,
                   sampling: SamplingParams = GREEDY) -> tuple[str, Finished]:
    request = GenerationRequest(id="p", prompt_tokens=tokens, max_tokens=max_tokens, sampling=sampling)
    return await collect(engine, request)


async def answer_without_reuse(model: Path, tokens: list[int]) -> str:
    async with started(model, n_seq_max=1) as engine:
        text, _ = await complete(engine, tokens)
        assert engine.prompt_tokens_decoded == len(tokens)
        return text


def test_a_follow_up_prompt_computes_only_its_new_tokens(tiny_model: Path) -> None:
    async def scenario() -> None:
        async with started(tiny_model) as engine:
            first = engine.tokenize(SYSTEM + "first question")
            await complete(engine, first)
            assert engine.prompt_tokens_decoded == len(first)
            follow_up = first + engine.tokenize(" and a second one", add_bos=False)
            before = engine.prompt_tokens_decoded
            text, finished = await complete(engine, follow_up)
            computed = engine.prompt_tokens_decoded - before
        assert 1 <= computed <= len(follow_up) - len(first), f"{computed} prompt tokens computed; {len(first)} cached"
        assert finished.prompt_tokens == len(follow_up)
        assert text == await answer_without_reuse(tiny_model, follow_up)

    asyncio.run(scenario())


def test_a_shared_system_prompt_is_copied_from_a_running_sequence(tiny_model: Path) -> None:
    async def scenario() -> None:
        async with started(tiny_model) as engine:
            system = engine.tokenize(SYSTEM)
            long_prompt = system + engine.tokenize("a", add_bos=False)
            running = engine.generate(
                GenerationRequest(id="long", prompt_tokens=long_prompt, max_tokens=CONTEXT - len(long_prompt),
                                  sampling=ENDLESS)
            )
            assert isinstance(await anext(running), TextDelta)  # its prompt is in the cache now
            before = engine.prompt_tokens_decoded
            question = system + engine.tokenize("what is it", add_bos=False)
            text, _ = await complete(engine, question)
            computed = engine.prompt_tokens_decoded - before
            await running.aclose()
        assert computed <= len(question) - len(system), f"{computed} computed; the {len(system)}-token prefix was not"
        assert text == await answer_without_reuse(tiny_model, question)

    asyncio.run(scenario())


def test_a_different_prompt_on_a_used_sequence_starts_clean(tiny_model: Path) -> None:
    async def scenario() -> None:
        async with started(tiny_model, n_seq_max=1) as engine:
            await complete(engine, engine.tokenize(SYSTEM + "one"))
            other = engine.tokenize("water people day " * 10)
            text, _ = await complete(engine, other)
        assert text == await answer_without_reuse(tiny_model, other)

    asyncio.run(scenario())
