"""`sealbox serve` under concurrent load, through a real server process on loopback and the official `openai` client.

Many streams answer as each would alone; a client that hangs up frees its sequence; a flood past the queue is told
to come back later (429 + Retry-After), never a 5xx; a request that does not fit the KV budget now waits for room.
What the server holds is read from its own `/metrics`, polled with a deadline (every poll is a real observation).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families
from server_support import ServerProcess

PROMPTS = [f"the {word} of the {place} and {i} more" for i, (word, place) in enumerate(
    zip("one two three four five six seven eight nine ten many some people word time water".split() * 2,
        "city river light house bank record model data host server green blue red world name day".split()
        + "day name world red blue green server host data model record bank house light river city".split())
)]  # fmt: skip
assert len(set(PROMPTS)) == 32

Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]


def write_policy(directory: Path, name: str, **limits: int | str) -> Path:
    path = directory / f"{name}.toml"
    path.write_text("[limits]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in limits.items()),
                    encoding="utf-8")  # fmt: skip
    return path


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start a `sealbox serve` over the tiny model with the given `[limits]`; every server stops with the module."""
    started: list[ServerProcess] = []

    def start(name: str, **limits: int | str) -> ServerProcess:
        directory = tmp_path_factory.mktemp(name)
        server = ServerProcess(root=directory / "root", models=[tiny_model], no_auth=True,
                               policy=write_policy(directory, name, **limits))  # fmt: skip
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def roomy_server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    """32 sequences of 4096 tokens, every one able to reach its full context at once; greedy requests reproducible
    (the policy's "seeded-and-greedy": a greedy stream answers the same among 32 as alone)."""
    return serve("roomy", context=4096, max_tokens=4000, max_sequences=32, queue_size=64,
                 reproducible="seeded-and-greedy")  # fmt: skip


@pytest.fixture(scope="module")
def small_queue_server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    return serve("small-queue", context=512, max_tokens=500, max_sequences=2, queue_size=2)


@pytest.fixture(scope="module")
def small_kv_server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    """Four sequences, but KV cells for one full context only: the policy's `kv_cells` caps the cache."""
    return serve("small-kv", context=2048, max_tokens=2000, max_sequences=4, queue_size=8, kv_cells=2048)


def client_for(server: ServerProcess) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def model_name(server: ServerProcess) -> str:
    return server.models[0].stem


async def scrape(http: httpx.AsyncClient, server: ServerProcess) -> Metrics:
    response = await http.get(f"{server.url}/metrics")
    assert response.status_code == 200
    found: Metrics = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = {key: value for key, value in sample.labels.items() if key != "model"}
            found[(sample.name, frozenset(labels.items()))] = sample.value
    return found


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def ended(metrics: Metrics, *statuses: str) -> float:
    """Requests the server counts as ended with any of `statuses` (`sealbox_requests_total`)."""
    return sum(value(metrics, "sealbox_requests_total", status=status) for status in statuses)


async def poll_until(http: httpx.AsyncClient, server: ServerProcess, condition: Callable[[Metrics], bool], what: str,
                     timeout_s: float = 30.0) -> Metrics:  # fmt: skip
    """Scrape `/metrics` until `condition` holds; fail naming `what` (and the last gauges) at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = await scrape(http, server)
        if condition(metrics):
            return metrics
        if time.monotonic() > deadline:
            gauges = {name: v for (name, _), v in metrics.items() if name.startswith(("sealbox_running", "sealbox_kv",
                                                                                       "sealbox_queue"))}  # fmt: skip
            raise AssertionError(f"timed out waiting until {what}; last gauges: {gauges}")


async def chat_stream(client: AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> tuple[str, str | None]:
    """Stream one greedy chat completion to its end: (the text, the finish reason)."""
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, stream=True
    )
    parts: list[str] = []
    reason = None
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason is not None:
                reason = choice.finish_reason
    return "".join(parts), reason


def test_32_concurrent_streams_each_answer_as_they_would_alone(roomy_server: ServerProcess) -> None:
    model = model_name(roomy_server)

    async def scenario() -> None:
        client = client_for(roomy_server)
        async with httpx.AsyncClient() as http:
            before = await scrape(http, roomy_server)
            alone = [await chat_stream(client, model, prompt, max_tokens=24) for prompt in PROMPTS]
            together = await asyncio.gather(*(chat_stream(client, model, prompt, max_tokens=24) for prompt in PROMPTS))
            after = await poll_until(http, roomy_server, lambda m: value(m, "sealbox_running_sequences") == 0,
                                     "every stream has given its sequence back")  # fmt: skip
        await client.close()

        for i, ((text, reason), (alone_text, alone_reason)) in enumerate(zip(together, alone, strict=True)):
            assert text == alone_text, f"prompt {i} answered differently among 32 streams than alone"
            assert reason == alone_reason
        assert all(text for text, _ in together), "every stream produced text"
        assert len({text for text, _ in together}) > 1, "distinct prompts give distinct answers: outputs are not mixed"
        finished = ended(after, "stop", "length") - ended(before, "stop", "length")
        assert finished == 64, "32 alone and 32 together, all finished normally"
        assert value(after, "sealbox_rejected_requests_total", reason="overloaded") == 0

    asyncio.run(scenario())


def test_a_stream_whose_client_hangs_up_frees_its_sequence_and_cells(roomy_server: ServerProcess) -> None:
    model = model_name(roomy_server)

    async def scenario() -> None:
        client = client_for(roomy_server)
        async with httpx.AsyncClient() as http:
            idle = await poll_until(http, roomy_server, lambda m: value(m, "sealbox_running_sequences") == 0,
                                    "the server is idle")  # fmt: skip
            stream = await client.completions.create(
                model=model, prompt="the water of the day", max_tokens=4000, temperature=0, stream=True
            )
            first = await anext(aiter(stream))
            assert first.choices and first.choices[0].text, "a first chunk of text arrived"
            running = await scrape(http, roomy_server)
            assert value(running, "sealbox_running_sequences") == 1
            assert value(running, "sealbox_kv_cells_used") > 0
            await stream.close()  # the client hangs up: the connection is closed mid-stream
            freed = await poll_until(
                http, roomy_server,
                lambda m: value(m, "sealbox_running_sequences") == 0 and value(m, "sealbox_kv_cells_used") == 0,
                "the hung-up stream's sequence and KV cells are free",
            )  # fmt: skip
        await client.close()
        cancelled = value(freed, "sealbox_requests_total", status="cancelled")
        assert cancelled == value(idle, "sealbox_requests_total", status="cancelled") + 1
        generated = value(freed, "sealbox_generated_tokens_total") - value(idle, "sealbox_generated_tokens_total")
        assert 0 < generated < 4000, "the stream stopped early: it was cancelled, not run to its max_tokens"

    asyncio.run(scenario())


def test_a_flood_past_the_queue_is_answered_429_with_retry_after_and_never_5xx(
    small_queue_server: ServerProcess,
) -> None:
    model = model_name(small_queue_server)
    flood = 64  # 2 sequences + 2 queue places: most of these must be turned away

    async def scenario() -> tuple[list[httpx.Response], Metrics, httpx.Response]:
        limits = httpx.Limits(max_connections=flood, max_keepalive_connections=flood)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            body = {"model": model, "max_tokens": 500, "temperature": 0}
            responses = await asyncio.gather(*(
                http.post(f"{small_queue_server.base_url}/completions", json={**body, "prompt": f"the day {i}"})
                for i in range(flood)
            ))  # fmt: skip
            after = await scrape(http, small_queue_server)
            later = await http.post(f"{small_queue_server.base_url}/completions",
                                    json={**body, "prompt": "the water", "max_tokens": 4})  # fmt: skip
        return responses, after, later

    responses, after, later = asyncio.run(scenario())
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 429}, f"only answers or come-back-later: {sorted(set(statuses))}"
    refused = [response for response in responses if response.status_code == 429]
    assert refused, "a flood of 64 onto 2 sequences and 2 queue places is refused in part"
    assert statuses.count(200) >= 4, "the requests that found a sequence or a queue place were answered"
    for response in refused:
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["type"] == "rate_limit_error"
    assert value(after, "sealbox_requests_total", status="overloaded") == len(refused)
    assert small_queue_server.alive
    assert later.status_code == 200, "the server still answers after the flood"


async def completion_stream(client: AsyncOpenAI, model: str, prompt: str,
                            max_tokens: int) -> tuple[int, str, str | None]:  # fmt: skip
    """Stream one greedy text completion to its end: (the HTTP status, the text, the finish reason)."""
    response = await client.completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
    )
    parts: list[str] = []
    reason = None
    async for chunk in response.parse():
        for choice in chunk.choices:
            parts.append(choice.text)
            reason = choice.finish_reason or reason
    return response.status_code, "".join(parts), reason


def test_a_request_that_does_not_fit_the_kv_budget_waits_for_room_then_completes(
    small_kv_server: ServerProcess,
) -> None:
    model = model_name(small_kv_server)
    max_tokens = 1100  # a few prompt tokens + 1100 > half of the 2048 cells: two cannot be held at once

    async def scenario() -> None:
        client = client_for(small_kv_server)
        async with httpx.AsyncClient() as http:
            sized = await scrape(http, small_kv_server)
            assert value(sized, "sealbox_kv_cells_total") == 2048, "the policy's kv_cells caps the cache"
            assert value(sized, "sealbox_sequences_total") == 4, "with four sequences to share it"
            first = await client.completions.create(
                model=model, prompt="the water of the day", max_tokens=max_tokens, temperature=0, stream=True
            )
            first_chunks = aiter(first)
            await anext(first_chunks)  # the first request is running and holds its cells
            second = asyncio.create_task(completion_stream(client, model, "the city of the river", max_tokens))
            waiting = await poll_until(http, small_kv_server, lambda m: value(m, "sealbox_queue_depth") == 1,
                                       "the second request waits in the queue")  # fmt: skip
            assert value(waiting, "sealbox_running_sequences") == 1, "a sequence is free: it waits for KV cells"
            first_reason = None
            async for chunk in first_chunks:
                for choice in chunk.choices:
                    first_reason = choice.finish_reason or first_reason
            status, second_text, second_reason = await second
            done = await poll_until(http, small_kv_server, lambda m: value(m, "sealbox_running_sequences") == 0,
                                    "both requests have ended")  # fmt: skip
        await client.close()
        assert first_reason == "length", "the first request ran to its max_tokens"
        assert status == 200, "the request that waited was answered, not refused"
        assert second_reason == "length", "and ran to its max_tokens once there was room"
        assert second_text
        assert value(done, "sealbox_queue_depth") == 0
        assert value(done, "sealbox_requests_total", status="length") == 2
        for refusal in ("overloaded", "context_length", "cancelled", "error"):
            assert value(done, "sealbox_requests_total", status=refusal) == 0, refusal

    asyncio.run(scenario())


def test_a_kv_cells_limit_below_one_context_is_refused_at_start(tmp_path: Path, tiny_model: Path) -> None:
    policy = write_policy(tmp_path, "too-small", context=4096, kv_cells=1024)
    result = ServerProcess(root=tmp_path / "root", models=[tiny_model], no_auth=True, policy=policy).run_to_exit()
    assert result.returncode == 2
    assert "kv_cells (1024) must hold at least one full context (4096 tokens)" in result.stderr
