"""Per-request sampling in a shared batch: seeds, grammars and stop strings belong to their own request."""

from __future__ import annotations

import asyncio
import json
import math
import re
from functools import partial
from pathlib import Path

from sealbox.runtime.engine.base import Finished, GenerationRequest, SamplingParams
from sealbox.runtime.engine.llama_batch import LlamaBatchEngine
from engine_support import collect, running_engine

GREEDY = SamplingParams(temperature=0.0)


started = partial(running_engine, name="tiny-sampling", n_seq_max=8)


async def complete(engine: LlamaBatchEngine, prompt: str, *, max_tokens: int = 32,
                   sampling: SamplingParams = GREEDY, stop: tuple[str, ...] = ()) -> tuple[str, Finished]:
    request = GenerationRequest(
        id=prompt, prompt_tokens=engine.tokenize(prompt), max_tokens=max_tokens, sampling=sampling, stop=stop
    )
    return await collect(engine, request)


def run(scenario) -> None:
    asyncio.run(scenario())


def test_the_same_seed_gives_the_same_text_at_temperature_above_zero(tiny_model: Path) -> None:
    async def scenario() -> None:
        async with started(tiny_model) as engine:
            seeded = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1234)
            other = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=98765)
            prompt = "the people of the water"
            # Run the same seed concurrently with other traffic too: the chain belongs to the request.
            first, second, *_ = await asyncio.gather(
                complete(engine, prompt, sampling=seeded),
                complete(engine, prompt, sampling=seeded),
                complete(engine, prompt, sampling=other),
                complete(engine, "unrelated traffic", sampling=other),
            )
            again = await complete(engine, prompt, sampling=seeded)
            different = await complete(engine, prompt, sampling=other)
            greedy = await complete(engine, prompt)
        assert first == second == again
        assert first[0] != different[0] or first[0] != greedy[0], "sampling at temperature 1 ignored the seed"

    run(scenario)


def test_a_grammar_constrains_the_output_and_ends_it(tiny_model: Path) -> None:
    grammar = r'''
root   ::= "{" ws "\"answer\"" ws ":" ws answer ws "}"
answer ::= "\"yes\"" | "\"no\"" | [0-9] | [1-9] [0-9]
ws     ::= [ ]?
'''

    async def scenario() -> None:
        async with started(tiny_model) as engine:
            results = await asyncio.gather(*(
                complete(engine, f"answer me {i}", max_tokens=64,
                         sampling=SamplingParams(temperature=1.0, seed=i, grammar=grammar))
                for i in range(6)
            ))
            free_text, _ = await complete(engine, "answer me 0", max_tokens=64)
        for text, finished in results:
            assert finished.reason == "stop", f"the grammar completed, so generation should end: {text!r}"
            assert re.fullmatch(r'\{ ?"answer" ?: ?("yes"|"no"|[0-9]|[1-9][0-9]) ?\}', text), text
            assert json.loads(text)["answer"] in ("yes", "no") or isinstance(json.loads(text)["answer"], int)
        assert not re.fullmatch(r"\{.*\}", free_text), "the grammar of other requests leaked into this one"

    run(scenario)


def test_a_stop_string_ends_the_stream_and_is_not_sent(tiny_model: Path) -> None:
    async def scenario() -> None:
        async with started(tiny_model) as engine:
            full, _ = await complete(engine, "the day of the water", max_tokens=48)
            stop = full[len(full) // 2 : len(full) // 2 + 3]
            assert len(stop) == 3
            cut, finished = await complete(engine, "the day of the water", max_tokens=48, stop=(stop,))
        assert cut == full[: full.index(stop)]
        assert finished.reason == "stop"
        assert finished.completion_tokens < 48

    run(scenario)


def test_a_repeat_penalty_changes_greedy_output_only_for_its_request(tiny_model: Path) -> None:
    async def scenario() -> None:
        async with started(tiny_model) as engine:
            prompt = "had had had had had had"
            plain, penalised, plain_again = await asyncio.gather(
                complete(engine, prompt, max_tokens=32),
                complete(engine, prompt, max_tokens=32, sampling=SamplingParams(temperature=0.0, repeat_penalty=5.0)),
                complete(engine, prompt, max_tokens=32),
            )
        assert plain == plain_again
        assert penalised[0] != plain[0]

    run(scenario)


def test_embeddings_are_unit_vectors_that_depend_on_the_text(tiny_model: Path) -> None:
    async def scenario() -> None:
        async with started(tiny_model, embeddings=True) as engine:
            embedded = await engine.embed(["the water of the day", "people", "the water of the day"])
            first, second, first_again = embedded.vectors
        assert math.isclose(math.fsum(x * x for x in first), 1.0, rel_tol=1e-4)
        assert first == first_again
        assert first != second

    run(scenario)


def test_plain_greedy_picks_what_llama_cpps_greedy_sampler_picks(gemma_model: Path) -> None:
    """Plain greedy takes the largest logit with numpy instead of copying Gemma's 262,144 candidates into
    llama.cpp's chain; a bias of 0 on one token (nothing changed) sends the same request through the chain."""

    async def scenario() -> None:
        async with started(gemma_model, n_ctx_per_seq=512) as engine:
            through_chain = SamplingParams(temperature=0.0, logit_bias=((7, 0.0),))
            for prompt in ("The capital of France is", "Once upon a time, in a village by the sea,"):
                fast, _ = await complete(engine, prompt, max_tokens=48)
                chain, _ = await complete(engine, prompt, max_tokens=48, sampling=through_chain)
                assert fast == chain and fast

    run(scenario)
