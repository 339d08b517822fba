"""The same seed gives the same answer: a seeded (or greedy) request answers the same whatever the engine served
before it, though prefix reuse would otherwise evaluate its prompt in other chunks (and move llama.cpp's logits)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sealbox.runtime.engine import GenerationRequest, ModelCard, SamplingParams, TextDelta
from sealbox.runtime.engine.llama_batch import LlamaBatchEngine

CONTEXT = 1024
SYSTEM = "the people of the water and the hills " * 12
SEEDED = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1234)
GREEDY = SamplingParams(temperature=0.0)


def make_engine(model: Path) -> LlamaBatchEngine:
    return LlamaBatchEngine(model, ModelCard(name="tiny-repro", sha256="0" * 64, n_ctx=CONTEXT), n_seq_max=4,
                            n_ctx_per_seq=CONTEXT, queue_size=8, n_threads=1, prefill_chunk=32)  # fmt: skip


async def complete(engine: LlamaBatchEngine, tokens: list[int], sampling: SamplingParams,
                   max_tokens: int = 48) -> tuple[str, list[float]]:  # fmt: skip
    """The text, and each token's log-probability: bit for bit the same when the arithmetic was, where a text shows a
    difference in the logits only once it flips a token."""
    request = GenerationRequest(id="r", prompt_tokens=tokens, max_tokens=max_tokens, sampling=sampling, logprobs=0)
    events = [event async for event in engine.generate(request) if isinstance(event, TextDelta)]
    return "".join(event.text for event in events), [lp.logprob for event in events for lp in event.logprobs]


Answer = tuple[str, list[float]]


def answers(model: Path, sampling: SamplingParams) -> tuple[Answer, Answer]:
    """The request on a fresh engine, and again after traffic that left parts of its prompt in the cache."""

    async def scenario() -> tuple[Answer, Answer]:
        fresh = make_engine(model)
        await fresh.start()
        try:
            prompt = fresh.tokenize(SYSTEM + "what is the question")
            alone = await complete(fresh, prompt, sampling)
        finally:
            await fresh.stop()
        engine = make_engine(model)
        await engine.start()
        try:
            for other in ("and something else", "what is", SYSTEM[:50]):
                await complete(engine, engine.tokenize(SYSTEM + other), SamplingParams(temperature=0.7), max_tokens=5)
            after = await complete(engine, prompt, sampling)
        finally:
            await engine.stop()
        return alone, after

    return asyncio.run(scenario())


def test_a_seeded_request_answers_the_same_after_traffic_that_shares_its_prefix(tiny_model: Path) -> None:
    alone, after = answers(tiny_model, SEEDED)
    assert after == alone


def test_a_greedy_request_answers_the_same_after_traffic_that_shares_its_prefix(tiny_model: Path) -> None:
    alone, after = answers(tiny_model, GREEDY)
    assert after == alone
