"""The KV cache type and attention kernel are measured per model and host, within what the policy leaves open, and
remembered; what is remembered is read as a regular file only and checked against today's candidates."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sealbox.runtime.models.calibration import (
    CANDIDATES,
    CalibrationError,
    KernelChoice,
    Measurement,
    candidates_for,
    choose,
    fastest,
)


def test_the_policy_pins_what_is_timed() -> None:
    assert candidates_for(kv_cache="auto", flash_attention="auto", head_dim=64) == list(CANDIDATES)
    assert {c.type_k for c in candidates_for(kv_cache="f16", flash_attention="auto", head_dim=64)} == {"f16"}
    assert candidates_for(kv_cache="f16", flash_attention="on", head_dim=64) == [KernelChoice("f16", "f16", True)]
    assert all(not c.flash_attention and c.type_v == "f16"
               for c in candidates_for(kv_cache="auto", flash_attention="off", head_dim=64))  # fmt: skip


def test_a_head_that_q8_0_cannot_hold_is_timed_in_f16_only() -> None:
    assert {c.type_k for c in candidates_for(kv_cache="auto", flash_attention="auto", head_dim=80)} == {"f16"}
    assert {c.type_k for c in candidates_for(kv_cache="q8_0", flash_attention="auto", head_dim=80)} == {"f16"}


def test_the_fastest_candidate_is_measured_once_and_remembered(tiny_model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "calibration"
    first = choose(tiny_model, sha256="ab" * 32, candidates=list(CANDIDATES), threads=1, extra_buffers=True,
                   cache_dir=cache)  # fmt: skip
    assert first in CANDIDATES
    (record,) = cache.iterdir()
    assert record.name.startswith("ab" * 32) and oct(record.stat().st_mode & 0o777) == "0o600"
    assert len(json.loads(record.read_text())["measured"]) == len(CANDIDATES)
    # Remembered: a second start measures nothing (it could not: the model file is gone).
    gone = tmp_path / "gone.gguf"
    again = choose(gone, sha256="ab" * 32, candidates=list(CANDIDATES), threads=1, extra_buffers=True, cache_dir=cache)
    assert again == first


def test_a_model_that_cannot_be_timed_is_a_calibration_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(CalibrationError):
        choose(broken, sha256="cd" * 32, candidates=list(CANDIDATES), threads=1, extra_buffers=True, cache_dir=None)


@pytest.mark.parametrize("planted", ["symlink", "fifo", "garbage", "foreign choice"])
def test_a_remembered_choice_that_is_not_a_plain_record_of_a_candidate_is_measured_again(
    planted: str, tiny_model: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "calibration"
    pinned = [KernelChoice("f16", "f16", True), KernelChoice("f16", "f16", False)]
    first = choose(tiny_model, sha256="ef" * 32, candidates=pinned, threads=1, extra_buffers=True, cache_dir=cache)
    (record,) = cache.iterdir()
    other = next(c for c in pinned if c != first)
    planted_record = json.dumps({"type_k": other.type_k, "type_v": other.type_v,
                                 "flash_attention": other.flash_attention})  # fmt: skip
    record.unlink()
    if planted == "symlink":
        target = tmp_path / "elsewhere.json"
        target.write_text(planted_record)
        record.symlink_to(target)
    elif planted == "fifo":
        os.mkfifo(record)
    elif planted == "garbage":
        record.write_text("{not json")
    else:
        record.write_text(json.dumps({"type_k": "q4_0", "type_v": "q4_0", "flash_attention": True}))
    gone = tmp_path / "gone.gguf"  # measuring again is the only way left, and it fails: proof nothing was taken
    with pytest.raises(CalibrationError):
        choose(gone, sha256="ef" * 32, candidates=pinned, threads=1, extra_buffers=True, cache_dir=cache)


def test_another_candidate_must_beat_llama_cpps_default_by_more_than_the_noise() -> None:
    default, other = CANDIDATES[0], CANDIDATES[2]
    close = [Measurement(default, 0.0020, 0.0100, 0.0200), Measurement(other, 0.0020, 0.0098, 0.0195)]
    clear = [Measurement(default, 0.0020, 0.0100, 0.0200), Measurement(other, 0.0015, 0.0080, 0.0160)]
    assert fastest(close) == default
    assert fastest(clear) == other
