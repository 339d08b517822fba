"""Memory without OOM and concurrency without collapse: what the engine refuses, makes wait, and lets go."""

from __future__ import annotations

import asyncio
import re
import time
from functools import partial
from pathlib import Path

import pytest

from sealbox.runtime import metrics
from sealbox.runtime.engine.base import (
    ContextLengthExceeded,
    EngineUnavailable,
    Finished,
    GenerationRequest,
    Overloaded,
    SamplingParams,
    TextDelta,
)
from sealbox.runtime.engine.errors import GrammarError, InvalidRequest
from sealbox.runtime.engine.llama_batch import LlamaBatchEngine
from engine_support import make_engine, running_engine

GREEDY = SamplingParams(temperature=0.0)
ENDLESS = SamplingParams(temperature=0.0, grammar="root ::= [a-z ] root")
"""A grammar with no end: end-of-generation is never allowed, so only max_tokens, a cancel or a stop ends it."""


started = partial(running_engine, queue_size=8)


def request(
    engine: LlamaBatchEngine, prompt: str, max_tokens: int, sampling: SamplingParams = GREEDY
) -> GenerationRequest:
    return GenerationRequest(
        id=prompt, prompt_tokens=engine.tokenize(prompt), max_tokens=max_tokens, sampling=sampling
    )


async def drain(stream) -> Finished:
    async for event in stream:
        if isinstance(event, Finished):
            return event
    raise AssertionError("the stream ended without Finished")


async def wait_until(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.005)


def scrape(name: str, model: str, **labels: str) -> float:
    body, _ = metrics.render_latest()
    wanted = {"model": model, **labels}
    for line in body.decode().splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[line.index("{") : line.index("}")]))
        if found == wanted:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_cancelled_stream_frees_its_sequence_and_cells_at_the_next_step(tiny_model: Path) -> None:
    model_name = "tiny-cancel"

    async def scenario() -> None:
        async with started(tiny_model, model_name, n_ctx_per_seq=4096) as engine:
            cancelled_before = scrape("sealbox_requests_total", model_name, status="cancelled")
            stream = engine.generate(request(engine, "the water of the day", 4000, ENDLESS))
            assert isinstance(await anext(stream), TextDelta)
            assert engine.stats().running == 1
            assert scrape("sealbox_running_sequences", model_name) == 1
            assert engine.stats().kv_cells_used > 0
            await stream.aclose()  # the client went away
            await wait_until(lambda: engine.stats().running == 0, "the cancelled request is released")
            stats = engine.stats()
            assert stats.kv_cells_used == 0
            assert scrape("sealbox_running_sequences", model_name) == 0
            assert scrape("sealbox_kv_cells_used", model_name) == 0
            assert scrape("sealbox_requests_total", model_name, status="cancelled") == cancelled_before + 1
            # The freed sequence serves the next request.
            finished = await drain(engine.generate(request(engine, "one more", 4, ENDLESS)))
            assert (finished.reason, finished.completion_tokens) == ("length", 4)

    asyncio.run(scenario())


def test_a_stream_cancelled_while_queued_leaves_the_queue_at_once(tiny_model: Path) -> None:
    async def scenario() -> None:
        async with started(tiny_model, "tiny-cancel-queued", n_seq_max=1) as engine:
            running = engine.generate(request(engine, "first in", 240, ENDLESS))
            queued = engine.generate(request(engine, "second waits", 40))
            assert engine.stats().queued == 1
            await queued.aclose()
            assert engine.stats().queued == 0
            assert (await drain(running)).reason == "length"

    asyncio.run(scenario())


def test_a_flood_past_the_queue_limit_is_refused_with_retry_after_and_the_rest_complete(tiny_model: Path) -> None:
    model_name = "tiny-flood"

    async def scenario() -> None:
        async with started(tiny_model, model_name, n_seq_max=2, queue_size=3) as engine:
            rejected_before = scrape("sealbox_rejected_requests_total", model_name, reason="overloaded")
            accepted, refused = [], []
            for i in range(12):
                try:
                    accepted.append(engine.generate(request(engine, f"flood {i}", 240, ENDLESS)))
                except Overloaded as exc:
                    refused.append(exc)
            assert len(accepted) == 5  # two running, three queued
            assert len(refused) == 7
            assert all(exc.retry_after_s >= 1 for exc in refused)
            assert engine.stats().queued == 3
            results = await asyncio.gather(*(drain(stream) for stream in accepted))
            assert [finished.reason for finished in results] == ["length"] * 5
            assert scrape("sealbox_rejected_requests_total", model_name, reason="overloaded") == rejected_before + 7

    asyncio.run(scenario())


def test_a_request_that_would_exceed_the_kv_budget_waits_instead_of_failing(tiny_model: Path) -> None:
    async def scenario() -> None:
        # 512 cells shared by 4 sequences of 256: two 200-token requests cannot both hold their cells at once.
        async with started(tiny_model, "tiny-kv-budget", n_seq_max=4, n_ctx_per_seq=256, kv_cells=512) as engine:
            order: list[str] = []

            async def run(name: str, stream) -> Finished:
                async for event in stream:
                    if isinstance(event, Finished):
                        order.append(f"{name} finished")
                        return event
                    if f"{name} started" not in order:
                        order.append(f"{name} started")
                raise AssertionError("no Finished")

            first = engine.generate(request(engine, "the first", 240, ENDLESS))
            second = engine.generate(request(engine, "the second", 240, ENDLESS))
            third = engine.generate(request(engine, "the third", 240))
            stats = engine.stats()
            assert (stats.running, stats.queued) == (2, 1), "a sequence is free, but the cells are not"
            results = await asyncio.gather(run("first", first), run("second", second), run("third", third))
            assert all(finished.reason in {"length", "stop"} for finished in results)
            assert order.index("third started") > min(order.index("first finished"), order.index("second finished"))

    asyncio.run(scenario())


def test_a_request_larger_than_one_sequence_is_refused_at_once(tiny_model: Path) -> None:
    async def scenario() -> None:
        async with started(tiny_model, "tiny-too-long", n_ctx_per_seq=256) as engine:
            prompt = request(engine, "the water of the day", 1)
            with pytest.raises(ContextLengthExceeded) as caught:
                engine.generate(request(engine, "the water of the day", 256))
            assert caught.value.limit == 256
            assert caught.value.needed == len(prompt.prompt_tokens) + 256
            assert engine.stats().queued == 0 and engine.stats().running == 0

    asyncio.run(scenario())


def test_bad_requests_are_refused_before_they_are_queued(tiny_model: Path) -> None:
    async def scenario() -> None:
        async with started(tiny_model, "tiny-invalid") as engine:
            with pytest.raises(InvalidRequest):
                engine.generate(GenerationRequest(id="empty", prompt_tokens=[], max_tokens=4))
            with pytest.raises(InvalidRequest):
                engine.generate(GenerationRequest(id="oov", prompt_tokens=[1, 10**7], max_tokens=4))
            with pytest.raises(GrammarError):
                engine.generate(
                    request(engine, "x", 4, sampling=SamplingParams(grammar='root ::= ( "unclosed" '))
                )
            assert engine.stats().queued == 0 and engine.stats().running == 0
        with pytest.raises(EngineUnavailable):
            engine.generate(GenerationRequest(id="late", prompt_tokens=[1], max_tokens=4))

    asyncio.run(scenario())


def test_stopping_the_engine_fails_open_streams_with_engine_unavailable(tiny_model: Path) -> None:
    async def scenario() -> None:
        engine = make_engine(tiny_model, "tiny-stop", queue_size=8, n_seq_max=1, n_ctx_per_seq=4096)
        await engine.start()
        running = engine.generate(request(engine, "the long one", 4000, ENDLESS))
        queued = engine.generate(request(engine, "the waiting one", 8))
        await anext(running)
        await engine.stop()
        for stream in (running, queued):
            with pytest.raises(EngineUnavailable):
                await drain(stream)

    asyncio.run(scenario())
