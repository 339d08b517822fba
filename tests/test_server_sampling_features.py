"""The sampling features apps send, through a real `sealbox serve` and the official `openai` client: several choices
(`n`), `logprobs`/`top_logprobs`, `logit_bias`, several prompts in one text completion, `echo`, and the same answer
for the same seed whatever the server answered before."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_support import ServerProcess

POLICY = """
[limits]
context = 512
max_tokens = 128
max_sequences = 4
queue_size = 16
"""
SYSTEM = "You answer questions about the people of the water and the hills, briefly and kindly. " * 3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("sampling"), models=[tiny_model], policy_text=POLICY,
                       no_auth=True) as process:  # fmt: skip
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def counter(server: ServerProcess, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name)  # fmt: skip


def test_n_3_returns_3_indexed_choices_from_one_evaluation_of_the_prompt(client: openai.OpenAI,
                                                                          server: ServerProcess) -> None:  # fmt: skip
    submitted = counter(server, "sealbox_prompt_tokens_total")
    reused = counter(server, "sealbox_prompt_tokens_reused_total")
    requests = counter(server, "sealbox_requests_total")
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "three answers about the river delta, please"}],
        n=3, max_tokens=12, temperature=1.0, seed=11,
    )  # fmt: skip
    prompt = answer.usage.prompt_tokens
    assert [choice.index for choice in answer.choices] == [0, 1, 2]
    assert all(choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
               for choice in answer.choices)  # fmt: skip
    assert len({choice.message.content for choice in answer.choices}) > 1  # choice i samples with seed + i
    assert counter(server, "sealbox_prompt_tokens_total") - submitted == 3 * prompt
    # Choices 1 and 2 copied choice 0's evaluated prompt: at least 2 × the prompt was not computed again.
    assert counter(server, "sealbox_prompt_tokens_reused_total") - reused >= 2 * prompt
    assert 3 <= answer.usage.completion_tokens <= 3 * 12  # every choice's completion, the prompt counted once
    assert counter(server, "sealbox_requests_total") - requests == 1  # one request, however many choices


def test_n_3_streams_chunks_for_each_choice_each_ending_with_a_finish_reason(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], n=3, max_tokens=8, temperature=1.0,
        seed=5, stream=True,
    )  # fmt: skip
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                finished[choice.index] = choice.finish_reason
    assert sorted(finished) == [0, 1, 2]
    unstreamed = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], n=3, max_tokens=8, temperature=1.0, seed=5,
    )  # fmt: skip
    assert texts == {choice.index: choice.message.content for choice in unstreamed.choices}


def test_chat_logprobs_are_sorted_and_hold_the_greedy_token_first(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "the water"}], max_tokens=10, temperature=0,
        logprobs=True, top_logprobs=4,
    )  # fmt: skip
    content = answer.choices[0].logprobs.content
    assert content and len(content) <= answer.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0.0 and bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        values = [top.logprob for top in entry.top_logprobs]
        assert len(values) == 4 and values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
    stopped = answer.choices[0].finish_reason == "stop"  # the end-of-generation token is not reported
    assert len(content) == answer.usage.completion_tokens - stopped


def test_chat_logprobs_are_off_unless_asked_for(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert answer.choices[0].logprobs is None


def test_a_logit_bias_of_minus_100_forbids_a_token_and_plus_100_forces_it(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "the hills"}]
    free = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True)
    first = free.choices[0].logprobs.content[0]
    banned = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                            logprobs=True, logit_bias={str(TOKENIZER.id_of(first.bytes)): -100})  # fmt: skip
    assert banned.choices[0].logprobs.content[0].token != first.token
    water = TOKENIZER.id_of(list(b" water"))
    forced = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=1.0, seed=2,
                                            logprobs=True, logit_bias={str(water): 100})  # fmt: skip
    assert [entry.token for entry in forced.choices[0].logprobs.content] == [" water"] * 5


class _Tokenizer:
    """The tiny model's own tokenizer, loaded in the test process through llama.cpp (the ids the server uses)."""

    def __init__(self) -> None:
        self._model = None

    def load(self, path: Path) -> None:
        from sealbox.runtime.engine.llama_backend import Model

        self._model = Model(path)

    def tokenize(self, text: str) -> list[int]:
        assert self._model is not None
        return self._model.tokenize(text, add_bos=False, special=False)

    def id_of(self, piece: list[int]) -> int:
        """The token whose bytes are `piece` (as a logprob entry reports them)."""
        assert self._model is not None
        wanted = bytes(piece)
        return next(token for token in range(self._model.n_vocab) if self._model.piece(token) == wanted)


TOKENIZER = _Tokenizer()


@pytest.fixture(scope="module", autouse=True)
def _tokenizer(tiny_model: Path) -> None:
    TOKENIZER.load(tiny_model)


def test_a_list_of_3_prompts_returns_3_choices_in_prompt_order(client: openai.OpenAI) -> None:
    prompts = ["the water", "the hills and", "once upon a time"]
    batch = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0)
    assert [choice.index for choice in batch.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, batch.choices):
        alone = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
        assert choice.text == alone.choices[0].text
    assert batch.usage.prompt_tokens == sum(len(TOKENIZER.tokenize(p)) + 1 for p in prompts)  # each with its BOS


def test_two_prompts_with_n_2_number_choices_prompt_by_prompt(client: openai.OpenAI) -> None:
    batch = client.completions.create(model="tiny", prompt=["the water", "the hills"], n=2, max_tokens=4,
                                      temperature=0)  # fmt: skip
    assert [choice.index for choice in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text  # greedy: a prompt's choices agree
    assert batch.choices[2].text == batch.choices[3].text


def test_echo_prepends_the_prompt_to_the_completion(client: openai.OpenAI) -> None:
    plain = client.completions.create(model="tiny", prompt="the people of", max_tokens=6, temperature=0)
    echoed = client.completions.create(model="tiny", prompt="the people of", max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == "the people of" + plain.choices[0].text
    streamed = client.completions.create(model="tiny", prompt="the people of", max_tokens=6, temperature=0,
                                         echo=True, stream=True)  # fmt: skip
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == echoed.choices[0].text


def test_completion_logprobs_come_as_parallel_arrays(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="tiny", prompt="the water", max_tokens=6, temperature=0, logprobs=3)
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == answer.usage.completion_tokens - (answer.choices[0].finish_reason == "stop")
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == len(logprobs.top_logprobs)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert max(top.values()) == logprob and top[token] == logprob


def test_a_seeded_request_gives_the_same_answer_before_and_after_traffic_sharing_its_prefix(
    client: openai.OpenAI,
) -> None:
    question = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "who lives by the river?"}]
    options = {"max_tokens": 24, "temperature": 1.0, "seed": 424242, "logprobs": True}
    before = client.chat.completions.create(model="tiny", messages=question, **options)
    for other in ("who lives in the hills?", "what do they eat?", "who"):
        client.chat.completions.create(model="tiny", messages=[question[0], {"role": "user", "content": other}],
                                       max_tokens=6, temperature=0.8)  # fmt: skip
    after = client.chat.completions.create(model="tiny", messages=question, **options)
    assert after.choices[0].message.content == before.choices[0].message.content
    assert [e.logprob for e in after.choices[0].logprobs.content] == [e.logprob for e in before.choices[0].logprobs.content]


def test_streamed_chat_logprobs_equal_the_unstreamed_ones(client: openai.OpenAI) -> None:
    """Greedy and seeded: the second request reuses the first one's prompt cells, which only a reproducible request
    does without moving its logits."""
    options = {"model": "tiny", "messages": [{"role": "user", "content": "the hills"}], "max_tokens": 8,
               "temperature": 0, "seed": 7, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    whole = client.chat.completions.create(**options)
    streamed = [entry for chunk in client.chat.completions.create(**options, stream=True)
                for choice in chunk.choices if choice.logprobs is not None for entry in choice.logprobs.content]  # fmt: skip
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole.choices[0].logprobs.content]


def test_a_streamed_list_of_prompts_sends_each_choice_under_its_index(client: openai.OpenAI) -> None:
    prompts = ["the water", "the hills"]
    whole = client.completions.create(model="tiny", prompt=prompts, max_tokens=5, temperature=0)
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    for chunk in client.completions.create(model="tiny", prompt=prompts, max_tokens=5, temperature=0, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                finished[choice.index] = choice.finish_reason
    assert texts == {choice.index: choice.text for choice in whole.choices}
    assert sorted(finished) == [0, 1]
