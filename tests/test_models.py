"""The model layer: generated GGUFs load in llama.cpp, their facts are read from the header, bad files are refused."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import llama_cpp
import openai
import pytest

from sealbox.runtime.models.gguf_facts import NotGGUFError, kv_bytes_per_token, read_facts, read_model_file
from sealbox.runtime.models.probe import probe_model
from sealbox.runtime.models.synthetic import CHAT_TEMPLATE, vocabulary


def test_generated_vocabulary_is_unique_and_has_full_byte_fallback() -> None:
    tokens, scores, types = vocabulary()
    assert len(tokens) == len(set(tokens)) == len(scores) == len(types)
    assert all(f"<0x{b:02X}>" in tokens for b in range(256))


def test_facts_of_a_generated_model_match_what_was_written(tiny_model: Path) -> None:
    facts = read_facts(tiny_model)
    assert facts.architecture == "llama"
    assert facts.context_length == 4096
    assert facts.head_count_kv < facts.head_count, "the test model uses grouped-query attention"
    assert facts.head_dim == facts.embedding_length // facts.head_count
    assert facts.vocab_size == len(vocabulary()[0])
    assert facts.chat_template_sha256 == hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()
    assert read_model_file(tiny_model).chat_template == CHAT_TEMPLATE
    assert facts.license == "apache-2.0"
    assert facts.parameter_count > 100_000


def test_kv_bytes_per_token_counts_k_and_v_for_every_layer_and_kv_head(tiny_model: Path) -> None:
    facts = read_facts(tiny_model)
    assert kv_bytes_per_token(facts) == facts.block_count * facts.head_count_kv * facts.head_dim * 2 * 2
    assert kv_bytes_per_token(facts, "f32", "f32") == 2 * kv_bytes_per_token(facts)


def test_sizes_scale_to_the_requested_target(make_model: Callable[..., Path]) -> None:
    model = make_model("eight.gguf", size="8MB")
    assert 6 << 20 < model.stat().st_size < 10 << 20
    assert read_facts(model).file_type == "MOSTLY_F16"


def test_same_seed_gives_the_same_bytes(make_model: Callable[..., Path]) -> None:
    a = make_model("a.gguf", seed=7)
    b = make_model("b.gguf", seed=7)
    assert a.read_bytes() == b.read_bytes()


def test_llama_cpp_loads_the_model_and_generates_greedily_and_deterministically(tiny_model: Path) -> None:
    model = llama_cpp.Llama(model_path=str(tiny_model), n_ctx=256, verbose=False)
    tokens = model.tokenize(b"hello world the patient record", add_bos=True)
    assert model.detokenize(tokens) == b"hello world the patient record"
    assert len(tokens) == 6, "whole words tokenize to one piece each"
    first = model("the patient", max_tokens=12, temperature=0)["choices"][0]["text"]
    second = model("the patient", max_tokens=12, temperature=0)["choices"][0]["text"]
    assert first and first == second


@pytest.mark.parametrize("kind", ["not_gguf", "truncated", "bad_magic_version"])
def test_facts_refuse_a_malformed_file_with_a_clear_message(make_malformed_model: Callable[[str], Path], kind: str) -> None:
    path = make_malformed_model(kind)
    with pytest.raises(NotGGUFError) as caught:
        read_facts(path)
    assert str(path) in str(caught.value)


def test_facts_name_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotGGUFError, match="cannot read"):
        read_facts(tmp_path / "absent.gguf")


def test_probe_accepts_a_good_model(tiny_model: Path) -> None:
    result = probe_model(tiny_model)
    assert result.ok, result.reason
    assert result.facts is not None and result.facts.architecture == "llama"


def test_probe_reports_a_vocabulary_that_aborts_llama_cpp_without_dying(make_malformed_model: Callable[[str], Path]) -> None:
    result = probe_model(make_malformed_model("duplicate_vocab"))
    assert not result.ok
    assert "aborted" in result.reason and "SIGABRT" in result.reason


@pytest.mark.parametrize("kind", ["not_gguf", "truncated"])
def test_probe_reports_malformed_files(make_malformed_model: Callable[[str], Path], kind: str) -> None:
    result = probe_model(make_malformed_model(kind))
    assert not result.ok and result.reason


def test_a_q8_0_model_is_served_whether_or_not_this_hosts_amx_kernels_crash(
    tmp_path: Path, make_model: Callable[..., Path]
) -> None:
    """llama.cpp hands Q8_0 weights to its AMX kernels where the CPU reports AMX; a guest that cannot run AMX is then
    killed at the first matmul. The probe decodes in a child, and the server loads what the probe found to work."""
    from server_support import ServerProcess

    model = make_model("quantized.gguf", size="1MB", weight_type="q8_0")
    probe = probe_model(model)
    assert probe.ok, probe.reason
    assert probe.extra_buffers or "served without them" in probe.reason
    with ServerProcess(tmp_path, models=[model], no_auth=True) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        answer = client.completions.create(model="quantized", prompt="hello", max_tokens=4, temperature=0)
        assert answer.usage.completion_tokens == 4
        assert server.alive
