"""The concurrency math (`runtime.memory_plan`) and `sealbox plan`, which prints it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sealbox.runtime.sizes import GiB, MiB
from sealbox.runtime.memory_plan import (
    MemoryPlanError,
    ModelShape,
    estimate_compute_bytes,
    plan,
    plan_model,
)
from sealbox.runtime.models.gguf_facts import kv_bytes_per_token, read_facts

SEALBOX = Path(sys.executable).with_name("sealbox")

# A 7B-class model at 4 bits: 32 layers, 8 KV heads of 128 → 2 × 32 × 8 × 128 × 2 bytes = 128 KiB of f16 KV per token.
SEVEN_B = ModelShape(
    weight_bytes=4_100 * MiB,
    layer_bytes=120 * MiB,
    layers=32,
    n_embd=4096,
    n_head=32,
    n_vocab=32_000,
    context_length=32_768,
    kv_bytes_per_token=128 * 1024,
)


def test_the_kv_budget_is_the_memory_left_after_weights_compute_and_headroom() -> None:
    result = plan(SEVEN_B, memory_bytes=24 * GiB, context=8192, users=16, fraction=0.9)
    compute = estimate_compute_bytes(SEVEN_B, context=8192)
    assert result.kv_budget_bytes == int(24 * GiB * 0.9) - SEVEN_B.weight_bytes - compute
    assert result.kv_bytes_per_sequence == 8192 * 128 * 1024  # 1 GiB
    assert result.sequences_that_fit == result.kv_budget_bytes // GiB
    assert result.context_for_users == result.kv_budget_bytes // (128 * 1024 * 16)


def test_when_all_users_fit_the_engine_gets_one_full_stream_each() -> None:
    result = plan(SEVEN_B, memory_bytes=64 * GiB, context=8192, users=16)
    assert result.fits
    sizing = result.engine_sizing()
    assert (sizing.n_seq_max, sizing.n_ctx_per_seq, sizing.kv_cells) == (16, 8192, 16 * 8192)


def test_when_not_all_users_fit_they_share_the_cells_that_do() -> None:
    result = plan(SEVEN_B, memory_bytes=16 * GiB, context=8192, users=16)
    assert not result.fits
    assert 1 <= result.sequences_that_fit < 16
    sizing = result.engine_sizing()
    assert sizing.n_seq_max == 16
    assert sizing.kv_cells == result.kv_cells_budget < 16 * 8192
    assert sizing.kv_cells >= 8192, "at least one full sequence always fits a plan that is served"


def test_a_plan_where_not_one_sequence_fits_is_refused_with_the_numbers() -> None:
    result = plan(SEVEN_B, memory_bytes=5 * GiB, context=8192, users=4)
    assert result.sequences_that_fit == 0
    with pytest.raises(MemoryPlanError, match="not even one sequence of 8192 tokens fits"):
        result.engine_sizing()


def test_the_context_is_capped_by_the_models_own() -> None:
    result = plan(SEVEN_B, memory_bytes=256 * GiB, context=1_000_000, users=1)
    assert result.context == 32_768
    assert result.context_for_users == 32_768


def test_a_gpu_that_holds_the_weights_and_a_sequence_takes_the_whole_model() -> None:
    result = plan(SEVEN_B, memory_bytes=16 * GiB, gpu_memory_bytes=80 * GiB, context=8192, users=16)
    assert result.gpu_layers == SEVEN_B.layers + 1
    assert result.kv_budget_bytes == int(80 * GiB * 0.9) - SEVEN_B.weight_bytes - result.compute_bytes
    assert result.fits


def test_a_small_gpu_takes_the_layers_that_fit_with_their_share_of_the_cache() -> None:
    result = plan(SEVEN_B, memory_bytes=64 * GiB, gpu_memory_bytes=4 * GiB, context=8192, users=4)
    assert 0 < result.gpu_layers < SEVEN_B.layers
    kv_per_layer = 4 * 8192 * SEVEN_B.kv_bytes_per_token // SEVEN_B.layers
    used = result.gpu_layers * (SEVEN_B.layer_bytes + kv_per_layer) + result.compute_bytes
    assert used <= int(4 * GiB * 0.9)
    assert used + SEVEN_B.layer_bytes + kv_per_layer > int(4 * GiB * 0.9), "one more layer would not fit"


def run_plan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SEALBOX), "plan", *args], capture_output=True, text=True, timeout=120)


def test_sealbox_plan_prints_the_concurrency_math_for_a_real_gguf(tiny_model: Path) -> None:
    result = run_plan("--model", str(tiny_model), "--memory", "2GiB", "--ctx", "1024", "--users", "16", "--json")
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout)
    assert numbers["weight_bytes"] > 0
    assert numbers["kv_bytes_per_token"] > 0
    assert numbers["kv_bytes_per_sequence"] == numbers["kv_bytes_per_token"] * 1024
    assert numbers["sequences_that_fit"] == numbers["kv_budget_bytes"] // numbers["kv_bytes_per_sequence"]
    assert numbers["users"] == 16 and numbers["fits"] is True

    table = run_plan("--model", str(tiny_model), "--memory", "2GiB", "--ctx", "1024", "--users", "16")
    assert table.returncode == 0, table.stderr
    for label in ("weights", "KV cache per token", "sequences that fit", "largest context for 16 users", "GPU layers"):
        assert label in table.stdout


def test_sealbox_plan_exits_nonzero_when_nothing_fits(tiny_model: Path) -> None:
    result = run_plan("--model", str(tiny_model), "--memory", "1MiB", "--ctx", "1024", "--users", "1")
    assert result.returncode == 1
    assert "not even one sequence" in result.stdout


def test_sealbox_plan_refuses_a_bad_memory_size(tiny_model: Path) -> None:
    result = run_plan("--model", str(tiny_model), "--memory", "lots")
    assert result.returncode == 2
    assert "'lots' is not a size" in result.stderr


def test_the_kv_cache_is_planned_at_8_bits_by_default_and_f16_on_request(tiny_model: Path) -> None:
    facts = read_facts(tiny_model)
    common = ("--model", str(tiny_model), "--memory", "2GiB", "--ctx", "1024", "--users", "4", "--json")
    default = json.loads(run_plan(*common).stdout)
    exact = json.loads(run_plan(*common, "--kv-cache", "f16").stdout)
    assert default["kv_cache"] == {"k": "q8_0", "v": "q8_0"}
    assert default["kv_bytes_per_token"] == kv_bytes_per_token(facts, "q8_0", "q8_0")
    assert exact["kv_cache"] == {"k": "f16", "v": "f16"}
    assert exact["kv_bytes_per_token"] == kv_bytes_per_token(facts) == 2 * 32 / 34 * default["kv_bytes_per_token"]


def test_a_pool_shared_on_the_cpu_is_planned_with_an_f16_v_cache_which_it_needs_without_flash_attention(
    tiny_model: Path,
) -> None:
    facts = read_facts(tiny_model)
    per_sequence = 1024 * kv_bytes_per_token(facts, "q8_0", "q8_0")
    roomy = plan_model(tiny_model, kv_cache="q8_0", memory_bytes=2 * GiB, context=1024, users=4)
    assert (roomy.shape.type_k, roomy.shape.type_v) == ("q8_0", "q8_0") and not roomy.shares_a_pool
    shared = plan_model(tiny_model, kv_cache="q8_0", memory_bytes=2 * GiB, context=1024, users=4, kv_cells=2048)
    assert shared.shares_a_pool
    assert (shared.shape.type_k, shared.shape.type_v) == ("q8_0", "f16")
    assert shared.engine_sizing().type_v == "f16"
    assert shared.shape.kv_bytes_per_token * 1024 > per_sequence


def test_a_head_that_is_not_a_whole_number_of_q8_0_blocks_keeps_an_f16_cache(make_model) -> None:
    """llama.cpp refuses (split streams) or aborts on (a shared pool) a q8_0 cache whose head size is not a multiple
    of 32, as Phi-2's 80 is: such a model is planned, and so served, with f16."""
    model = make_model("head16.gguf", size="1MB", head_size=16)
    assert read_facts(model).head_dim == 16
    for cells in (None, 2048):
        result = plan_model(model, kv_cache="q8_0", memory_bytes=2 * GiB, context=1024, users=4, kv_cells=cells)
        assert (result.shape.type_k, result.shape.type_v) == ("f16", "f16")


def test_sealbox_plan_splits_the_layers_over_several_gpus_and_says_so(tiny_model: Path) -> None:
    result = run_plan("--model", str(tiny_model), "--memory", "2GiB", "--gpu-memory", "1GiB,1GiB", "--ctx", "128",
                      "--users", "4", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    shares = plan["gpu_split"]
    assert [share["gpu"] for share in shares] == [0, 1]
    assert sum(share["layers"] for share in shares) == plan["layers"] and plan["cpu_layers"] == 0
    assert all(share["layers"] >= 1 for share in shares)
    assert [share["output_head"] for share in shares] == [False, True]
    assert plan["gpu_split_note"] == "layer split over 2 GPUs in proportion to their memory"
    table = run_plan("--model", str(tiny_model), "--memory", "2GiB", "--gpu-memory", "1GiB,1MiB", "--ctx", "128",
                     "--users", "4")  # fmt: skip
    text = " ".join(table.stdout.split())
    assert "GPU 1: not used: 921.6 KiB holds the compute buffers" in text  # 90% of 1 MiB, the policy's headroom
    assert "1 GPU(s) not used (see each line)" in text


def test_zero_sequences_asks_for_as_many_as_fit_at_full_context_up_to_the_cap(tiny_model: Path) -> None:
    from sealbox.runtime.memory_plan import AUTO_SEQUENCES

    roomy = plan_model(tiny_model, kv_cache="f16", memory_bytes=8 * GiB, context=1024, users=0)
    assert roomy.users == AUTO_SEQUENCES and roomy.fits and not roomy.shares_a_pool
    per_sequence = roomy.kv_bytes_per_sequence
    tight = plan_model(tiny_model, kv_cache="f16", memory_bytes=8 * GiB, context=1024, users=0,
                       kv_cells=5 * 1024 + 100)  # fmt: skip
    assert tight.users == 5, "as many full sequences as the cells hold, each with its own stream"
    assert tight.fits and tight.kv_bytes_per_sequence == per_sequence


def test_flash_attention_is_off_in_a_pool_shared_on_the_cpu_whatever_was_chosen(tiny_model: Path) -> None:
    split = plan_model(tiny_model, kv_cache="q8_0", memory_bytes=2 * GiB, context=1024, users=4, flash_attention=True)
    assert split.engine_sizing().flash_attention and split.engine_sizing().type_v == "q8_0"
    off = plan_model(tiny_model, kv_cache="q8_0", memory_bytes=2 * GiB, context=1024, users=4, flash_attention=False)
    assert not off.engine_sizing().flash_attention and off.engine_sizing().type_v == "f16"  # q8_0 V needs it
    pooled = plan_model(tiny_model, kv_cache="f16", memory_bytes=2 * GiB, context=1024, users=4, kv_cells=2048,
                        flash_attention=True)  # fmt: skip
    assert pooled.shares_a_pool and not pooled.engine_sizing().flash_attention
