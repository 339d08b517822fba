"""The same seed gives the same answer: a seeded request (and a greedy one, where the policy says "seeded-and-greedy")
answers the same whatever the engine served before it or serves beside it, though prefix reuse and load would
otherwise evaluate its prompt in other chunks and its tokens in other batch shapes (and move llama.cpp's logits)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from sealbox.runtime.engine import Finished, GenerationRequest, SamplingParams, TextDelta
from sealbox.runtime.engine.llama_batch import LlamaBatchEngine
from engine_support import running_engine

CONTEXT = 1024
SYSTEM = "the people of the water and the hills " * 12
SEEDED = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1234)
GREEDY = SamplingParams(temperature=0.0)
ENDLESS = "root ::= [a-z ] root"
"""A grammar that never lets a request end before max_tokens."""


def started(model: Path, *, pooled: bool = False,
            reproducible_greedy: bool = True) -> AbstractAsyncContextManager[LlamaBatchEngine]:  # fmt: skip
    """Split streams (a sequence's own cells, flash attention), or with `pooled` one pool of cells shared by all;
    greedy requests reproducible unless `reproducible_greedy` is False (the policy's default, "seeded")."""
    return running_engine(model, "tiny-repro", n_ctx_per_seq=CONTEXT, queue_size=8, n_threads=1, prefill_chunk=32,
                          kv_cells=2 * CONTEXT if pooled else None, reproducible_greedy=reproducible_greedy)  # fmt: skip


async def complete(engine: LlamaBatchEngine, tokens: list[int], sampling: SamplingParams,
                   max_tokens: int = 48) -> tuple[str, list[float]]:  # fmt: skip
    """The text, and each token's log-probability: bit for bit the same when the arithmetic was, where a text shows a
    difference in the logits only once it flips a token."""
    request = GenerationRequest(id="r", prompt_tokens=tokens, max_tokens=max_tokens, sampling=sampling, logprobs=0)
    events = [event async for event in engine.generate(request) if isinstance(event, TextDelta)]
    return "".join(event.text for event in events), [lp.logprob for event in events for lp in event.logprobs]


Answer = tuple[str, list[float]]


def answers(model: Path, sampling: SamplingParams, *, pooled: bool = False) -> tuple[Answer, Answer, Answer]:
    """The request on a fresh engine; again after traffic that left parts of its prompt in the cache; and on a fresh
    engine again, beside a stream that started first."""

    async def scenario() -> tuple[Answer, Answer, Answer]:
        async with started(model, pooled=pooled) as fresh:
            prompt = fresh.tokenize(SYSTEM + "what is the question")
            alone = await complete(fresh, prompt, sampling)
        async with started(model, pooled=pooled) as engine:
            for other in ("and something else", "what is", SYSTEM[:50]):
                await complete(engine, engine.tokenize(SYSTEM + other), SamplingParams(temperature=0.7), max_tokens=5)
            after = await complete(engine, prompt, sampling)
        async with started(model, pooled=pooled) as busy:
            other = busy.generate(GenerationRequest(id="other", prompt_tokens=busy.tokenize("a long story " * 3),
                                                    max_tokens=400, sampling=SamplingParams(temperature=0.7)))  # fmt: skip
            assert isinstance(await anext(other), TextDelta)  # it is generating now
            beside = await complete(busy, prompt, sampling)
            await other.aclose()
        return alone, after, beside

    return asyncio.run(scenario())


def test_a_seeded_request_answers_the_same_after_traffic_that_shares_its_prefix(tiny_model: Path) -> None:
    alone, after, _ = answers(tiny_model, SEEDED)
    assert after == alone


def test_a_seeded_request_answers_the_same_beside_a_running_stream(tiny_model: Path) -> None:
    alone, _, beside = answers(tiny_model, SEEDED)
    assert beside == alone


def test_a_greedy_request_answers_the_same_after_and_beside_other_traffic(tiny_model: Path) -> None:
    alone, after, beside = answers(tiny_model, GREEDY)
    assert after == alone
    assert beside == alone


def test_a_seeded_request_answers_the_same_after_traffic_in_a_shared_pool(tiny_model: Path) -> None:
    """In a pool shared by all sequences a request's cells lie between the others', and the order llama.cpp sums
    them in follows: beside other traffic the last bits still move there (the README says so)."""
    alone, after, _ = answers(tiny_model, SEEDED, pooled=True)
    assert after == alone


def test_a_request_that_reserves_a_whole_shared_pool_still_completes_beside_its_padding(tiny_model: Path) -> None:
    """The padding token of a lone step takes a cell the reservation leaves free: the decode never finds the pool full."""

    async def scenario() -> None:
        pool = {"n_seq_max": 2, "kv_cells": 256, "queue_size": 2, "n_threads": 1, "reproducible_greedy": True}
        async with running_engine(tiny_model, "tiny-full", **pool) as engine:
            prompt = engine.tokenize("the water " * 10)
            request = GenerationRequest(id="full", prompt_tokens=prompt, max_tokens=256 - len(prompt),
                                        sampling=SamplingParams(temperature=0.0, grammar="root ::= [a-z ] root"))  # fmt: skip
            events = [event async for event in engine.generate(request)]
        assert events[-1] == Finished("length", prompt_tokens=len(prompt), completion_tokens=256 - len(prompt))

    asyncio.run(scenario())


def same_length_prompts(engine: LlamaBatchEngine, n: int) -> list[list[int]]:
    """`n` prompts of one token length (the test model's tokenizer splits words unevenly), then one longer."""
    prompts = [engine.tokenize(f"{SYSTEM} question {word}") for word in
               ("one", "two", "six", "ten", "red", "big", "old", "new", "sun", "sea", "cat", "dog")]  # fmt: skip
    length = max((len(prompt) for prompt in prompts), key=[len(prompt) for prompt in prompts].count)
    chosen = [prompt for prompt in prompts if len(prompt) == length][:n]
    assert len(chosen) == n, "the word list has too few prompts of one length"
    return chosen + [engine.tokenize(SYSTEM + "a much longer question than those here")]


def test_greedy_requests_sent_together_answer_as_each_does_alone(tiny_model: Path) -> None:
    """A burst of prompts, four of one length and one longer, each answers as it does alone. (Prefilling chunks of
    one length in one step would cut them nowhere, yet it moves their logits: llama.cpp's kernels sum a query row
    differently beside another sequence's rows. So each reproducible chunk keeps a step of its own.)"""

    async def scenario() -> tuple[list[Answer], list[Answer]]:
        async with started(tiny_model) as engine:
            prompts = same_length_prompts(engine, 4)
            alone = [await complete(engine, prompt, GREEDY) for prompt in prompts]
        async with started(tiny_model) as engine:
            together = await asyncio.gather(*(complete(engine, prompt, GREEDY) for prompt in prompts))
        return alone, list(together)

    alone, together = asyncio.run(scenario())
    assert together == alone



async def lone_token_padded(model: Path, sampling: SamplingParams, *, reproducible_greedy: bool = True) -> bool:
    """Whether a request's first token after its prompt, alone in a step, gets a padding row."""
    async with started(model, reproducible_greedy=reproducible_greedy) as engine:
        scheduler = engine._scheduler
        assert scheduler is not None
        scheduler.stop()  # the loop ends: this test drives one step by hand
        await asyncio.to_thread(engine._thread.join)  # type: ignore[union-attr]
        scheduler._stopping = False  # taking requests again, with no loop to run them
        scheduler.admission._closed = False
        prompt = engine.tokenize("the people of the water")
        stream = engine.generate(GenerationRequest(id="r", prompt_tokens=prompt, max_tokens=40,
                                                   sampling=replace(sampling, grammar=ENDLESS)))  # fmt: skip
        scheduler.place_admitted()
        scheduler.step()  # the prompt, and its first token sampled
        scheduler.batch.clear()
        scheduler.build_batch()  # that token alone
        assert scheduler.batch.n_tokens == 1
        padding = scheduler._pad_lone_token() is not None
        await stream.aclose()
        return padding


def test_only_a_reproducible_lone_token_is_padded(tiny_model: Path) -> None:
    """The padding buys a reproducible request the kernels of a batch; a free request alone keeps the faster ones."""
    assert asyncio.run(lone_token_padded(tiny_model, GREEDY))
    assert asyncio.run(lone_token_padded(tiny_model, SEEDED))
    assert not asyncio.run(lone_token_padded(tiny_model, SamplingParams(temperature=0.7)))


def test_by_default_only_a_seeded_lone_token_is_padded(tiny_model: Path) -> None:
    """The policy's default ("seeded"): a greedy request without a seed streams alone at the speed of one row; one
    with a seed is still padded."""
    assert not asyncio.run(lone_token_padded(tiny_model, GREEDY, reproducible_greedy=False))
    assert asyncio.run(lone_token_padded(tiny_model, replace(GREEDY, seed=5), reproducible_greedy=False))
