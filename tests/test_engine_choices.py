"""Several choices from one prompt, logprobs and logit_bias, in the batching engine itself."""

from __future__ import annotations

import asyncio
import math
from functools import partial
from pathlib import Path

from sealbox.runtime.engine import Finished, GenerationRequest, SamplingParams, TextDelta, TokenLogprob
from sealbox.runtime.engine.llama_batch import LlamaBatchEngine
from engine_support import running_engine

CONTEXT = 512
PROMPT = "the people of the water " * 6


started = partial(running_engine, name="tiny-choices", n_ctx_per_seq=CONTEXT, queue_size=8, n_threads=1)


async def run(engine: LlamaBatchEngine, request: GenerationRequest) -> tuple[dict[int, str], dict[int, list[TokenLogprob]], dict[int, Finished]]:
    texts: dict[int, str] = {}
    logprobs: dict[int, list[TokenLogprob]] = {}
    finished: dict[int, Finished] = {}
    async for event in engine.generate(request):
        if isinstance(event, TextDelta):
            texts[event.index] = texts.get(event.index, "") + event.text
            logprobs.setdefault(event.index, []).extend(event.logprobs)
        else:
            finished[event.index] = event
    return texts, logprobs, finished


def test_three_choices_evaluate_the_prompt_once_and_differ_by_seed(tiny_model: Path) -> None:
    async def scenario() -> None:
        async with started(tiny_model) as engine:
            tokens = engine.tokenize(PROMPT)
            request = GenerationRequest(id="n3", prompt_tokens=tokens, max_tokens=12, n=3,
                                        sampling=SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7))  # fmt: skip
            texts, _, finished = await run(engine, request)
            assert engine.prompt_tokens_decoded == len(tokens)
            assert sorted(finished) == [0, 1, 2]
            assert all(f.prompt_tokens == len(tokens) and f.completion_tokens > 0 for f in finished.values())
            assert len(set(texts.values())) > 1, texts
            again, _, _ = await run(engine, request)
            assert again == texts

    asyncio.run(scenario())


def test_logprobs_are_sorted_normalised_and_hold_the_greedy_choice_first(tiny_model: Path) -> None:
    async def scenario() -> None:
        async with started(tiny_model) as engine:
            tokens = engine.tokenize(PROMPT)
            request = GenerationRequest(id="lp", prompt_tokens=tokens, max_tokens=8, logprobs=5,
                                        sampling=SamplingParams(temperature=0.0))  # fmt: skip
            _, logprobs, finished = await run(engine, request)
        steps = logprobs[0]
        assert len(steps) == finished[0].completion_tokens - (finished[0].reason == "stop")
        for step in steps:
            values = [lp for _, _, lp in step.top]
            assert len(values) == 5 and values == sorted(values, reverse=True)
            assert step.top[0][0] == step.token and math.isclose(step.top[0][2], step.logprob)
            assert step.logprob <= 0.0 and sum(math.exp(v) for v in values) <= 1.0 + 1e-6

    asyncio.run(scenario())


def test_a_logit_bias_of_minus_100_forbids_a_token_and_plus_100_forces_one(tiny_model: Path) -> None:
    async def scenario() -> None:
        async with started(tiny_model) as engine:
            tokens = engine.tokenize(PROMPT)
            greedy = SamplingParams(temperature=0.0)
            free = GenerationRequest(id="free", prompt_tokens=tokens, max_tokens=6, logprobs=0, sampling=greedy)
            _, logprobs, _ = await run(engine, free)
            first = logprobs[0][0].token
            banned = GenerationRequest(id="ban", prompt_tokens=tokens, max_tokens=6, logprobs=0,
                                       sampling=SamplingParams(temperature=0.0, logit_bias=((first, -100.0),)))  # fmt: skip
            _, banned_logprobs, _ = await run(engine, banned)
            forced_token = engine.tokenize(" water", add_bos=False)[0]
            forced = GenerationRequest(id="force", prompt_tokens=tokens, max_tokens=6, logprobs=0,
                                       sampling=SamplingParams(temperature=1.0, seed=3, logit_bias=((forced_token, 100.0),)))  # fmt: skip
            _, forced_logprobs, _ = await run(engine, forced)
        assert first not in [step.token for step in banned_logprobs[0]]
        assert [step.token for step in forced_logprobs[0]] == [forced_token] * 6

    asyncio.run(scenario())
