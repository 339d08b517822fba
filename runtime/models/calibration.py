"""Which KV cache type and attention kernel serve this model fastest on this host: measured once, then remembered.

No one setting is fastest everywhere. On this project's 2-core machine a q8_0 cache with flash attention once decoded
the synthetic test model fastest, and Gemma 3 270M (one KV head of 256 values) 1.7× slower than f16 before its
sliding-window layers kept only their window; today its four candidates measure within 4–16% of each other. The
kernels' cost depends on the model's head shape, the engine's cache layout and the CPU's instructions.

So at a model's first start `choose` times each candidate the policy leaves open, in a child process (llama.cpp
may abort on an unusual model, and the server must stay up): the same split-stream context the engine builds, a
prompt prefilled on one sequence and copied to the others, then decode steps of one token per sequence, and steps
of a single stream. A candidate costs what a request's tokens cost it: a prompt token, and a generated token half
at that many sequences and half alone. The fastest is kept, per model digest and host (CPU, threads, llama.cpp
build), in `<root>/run/calibration/`, so later starts take no time. The policy pins either setting (`[limits] kv_cache`, `flash_attention`) and then nothing is timed
for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sealbox.runtime.durable_file import write_atomically
from sealbox.runtime.models.probe import last_line
from sealbox.runtime.regular_file import read_regular
from sealbox.runtime.strict_json import loads_unique

log = logging.getLogger("sealbox.calibration")

SEQUENCES = 8
"""Sequences decoded together while timing: a busy server's step, small enough to calibrate in seconds."""
PROMPT_TOKENS = 256
"""Depth of every timed sequence: attention over a few hundred cells, as a chat turn has."""
DECODE_STEPS = 6
ROUNDS = 2
"""Each candidate's prefill and decode steps are timed this many times, interleaved with the others' (so a burst of
load elsewhere, or the first touch of the weights, hits them all); its best time counts, since noise only adds time."""
TIMEOUT_S = 300.0
MARGIN = 0.05
"""How much cheaper than the first candidate another must measure to be chosen (see `fastest`): a repeated
calibration of Gemma 3 270M here put its four candidates within 4–16% of each other, in varying order."""
METHOD = 2
"""What is timed and how (part of the key a measurement is remembered under): 2 times a lone stream unpadded."""


@dataclass(frozen=True)
class KernelChoice:
    """The KV cache's element types and whether attention runs as flash attention."""

    type_k: str
    type_v: str
    flash_attention: bool

    def describe(self) -> str:
        return f"K {self.type_k}, V {self.type_v}, flash attention {'on' if self.flash_attention else 'off'}"


CANDIDATES = (
    KernelChoice("f16", "f16", True),
    KernelChoice("f16", "f16", False),
    KernelChoice("q8_0", "q8_0", True),
    KernelChoice("q8_0", "f16", False),
)
"""What llama.cpp's CPU backend can run: a quantized V cache needs flash attention."""


@dataclass(frozen=True)
class Measurement:
    choice: KernelChoice
    prefill_s_per_token: float
    decode_s_per_token: float

    lone_s_per_token: float = 0.0
    """A single stream's step: one row (a request that is not reproducible is not padded, see `engine.scheduler`)."""

    @property
    def cost(self) -> float:
        """Seconds a prompt token and a generated token take, the generated one half at SEQUENCES streams and half
        alone: a server spends its hours between busy and idle, and the kernels' ranking differs between the two
        (without flash attention Gemma 3 270M's two-row step took 2.3× its one with, for 1.1× at 8 sequences)."""
        return self.prefill_s_per_token + (self.decode_s_per_token + self.lone_s_per_token) / 2


class CalibrationError(Exception):
    """The candidates could not be timed (the child failed): the caller falls back to a fixed choice."""


def candidates_for(*, kv_cache: str, flash_attention: str, head_dim: int) -> list[KernelChoice]:
    """The candidates the policy leaves open (`kv_cache`: auto, f16, q8_0; `flash_attention`: auto, on, off); a head
    size that is not a whole number of q8_0 blocks (32 values) rules q8_0 out: llama.cpp refuses or aborts on it."""
    chosen = []
    for candidate in CANDIDATES:
        if kv_cache != "auto" and candidate.type_k != kv_cache:
            continue
        if flash_attention != "auto" and candidate.flash_attention != (flash_attention == "on"):
            continue
        if "q8_0" in (candidate.type_k, candidate.type_v) and head_dim % 32:
            continue
        chosen.append(candidate)
    if not chosen:  # q8_0 pinned on a head it cannot hold: f16, as the memory plan has always done
        chosen = [c for c in CANDIDATES if c.type_k == "f16" and (flash_attention == "auto" or
                                                                  c.flash_attention == (flash_attention == "on"))]  # fmt: skip
    return chosen


def host_fingerprint(threads: int, extra_buffers: bool) -> str:
    """What makes a measurement valid elsewhere only by accident: the CPU, its instruction set, the threads, and the
    llama.cpp build."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("model name", "flags")):
                    cpu += line
                if line.startswith("flags"):
                    break
    except OSError:
        cpu = platform.processor()
    try:
        engine = version("llama-cpp-python")
    except PackageNotFoundError:
        engine = "unknown"
    text = json.dumps([cpu, os.cpu_count(), threads, engine, extra_buffers, SEQUENCES, PROMPT_TOKENS, METHOD])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def choose(
    model: Path,
    *,
    sha256: str,
    candidates: list[KernelChoice],
    threads: int,
    extra_buffers: bool,
    cache_dir: Path | None,
) -> KernelChoice:
    """The fastest of `candidates` for this model on this host: remembered, or measured now (and remembered).

    Raises:
        CalibrationError: the child could not time them.
    """
    if len(candidates) == 1:
        return candidates[0]
    key = f"{sha256}-{host_fingerprint(threads, extra_buffers)}"
    remembered = _recall(cache_dir, key, candidates) if cache_dir is not None else None
    if remembered is not None:
        return remembered
    started = time.monotonic()
    measurements = _measure_in_child(model, candidates, threads=threads, extra_buffers=extra_buffers)
    best = fastest(measurements)
    log.info(
        "calibrated %s in %.1f s: %s",
        model.name, time.monotonic() - started,
        "; ".join(f"{m.choice.describe()}: {1 / m.prefill_s_per_token:.0f} prompt tok/s, "
                  f"{1 / m.decode_s_per_token:.0f} tok/s at {SEQUENCES} sequences, {1 / m.lone_s_per_token:.0f} alone"
                  for m in measurements),
    )  # fmt: skip
    if cache_dir is not None:
        _remember(cache_dir, key, best, measurements)
    return best


def fastest(measurements: list[Measurement]) -> KernelChoice:
    """The cheapest candidate, unless the first one (llama.cpp's own default, f16 and flash attention, where the
    policy leaves it open) is within `MARGIN` of it: on a noisy host two near-equal kernels would otherwise trade
    places from one start to the next, and a server's speed with them."""
    best = min(measurements, key=lambda m: m.cost)
    first = measurements[0]
    return first.choice if first.cost <= best.cost * (1 + MARGIN) else best.choice


def _recall(cache_dir: Path, key: str, candidates: list[KernelChoice]) -> KernelChoice | None:
    """The remembered choice, if there is one among today's candidates; anything unreadable is measured again."""
    path = cache_dir / f"{key}.json"
    try:
        record = loads_unique(read_regular(path, limit=64 * 1024))
        choice = KernelChoice(record["type_k"], record["type_v"], record["flash_attention"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # NotRegularFileError is an OSError
        log.warning("%s: ignoring the remembered calibration (%s); measuring again", path, exc)
        return None
    if choice not in candidates:  # another policy's pin, or a file that names something no candidate is
        return None
    return choice


def _remember(cache_dir: Path, key: str, best: KernelChoice, measurements: list[Measurement]) -> None:
    record = asdict(best) | {"measured": [asdict(m.choice) | {"prefill_s_per_token": m.prefill_s_per_token,
                                                              "decode_s_per_token": m.decode_s_per_token,
                                                              "lone_s_per_token": m.lone_s_per_token}
                                          for m in measurements]}  # fmt: skip
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(cache_dir / f"{key}.json", json.dumps(record, indent=1).encode(), mode=0o600)
    except OSError as exc:  # a read-only root costs a calibration per start, nothing more
        log.warning("cannot remember the calibration in %s: %s", cache_dir, exc)


def _measure_in_child(model: Path, candidates: list[KernelChoice], *, threads: int, extra_buffers: bool) -> list[Measurement]:
    payload = json.dumps({"model": str(model), "threads": threads, "extra_buffers": extra_buffers,
                          "candidates": [asdict(c) for c in candidates]})  # fmt: skip
    # -P: the working directory never goes on the child's sys.path (a `sealbox/` there would shadow the installed one).
    command = [sys.executable, "-P", "-m", "sealbox.runtime.models.calibration", payload]
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise CalibrationError(f"timing the KV cache candidates took over {TIMEOUT_S:.0f} s") from exc
    if child.returncode != 0:
        raise CalibrationError(f"timing the KV cache candidates failed ({child.returncode}){last_line(child.stderr)}")
    try:
        rows = json.loads(child.stdout.strip().splitlines()[-1])
        return [Measurement(KernelChoice(**row["choice"]), float(row["prefill"]), float(row["decode"]),
                            float(row["lone"])) for row in rows]  # fmt: skip
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise CalibrationError(f"the calibration child gave no result: {exc}") from exc


def _time_candidates(model_path: Path, candidates: list[KernelChoice], *, threads: int, extra_buffers: bool) -> list[dict]:
    """In the child: build each candidate's context, prefill once, copy the prompt to every sequence, time steps."""
    from sealbox.runtime.engine.llama_backend import BatchBuffer, Context, ContextSettings, Model

    model = Model(model_path, extra_buffers=extra_buffers)
    text = "The committee met on a grey morning and read the reports aloud, one section at a time. " * 64
    prompt = model.tokenize(text, add_bos=True, special=False)[:PROMPT_TOKENS]
    n_ctx_seq = 1024
    batch = BatchBuffer(max(len(prompt), SEQUENCES))
    contexts: list[tuple[KernelChoice, Context]] = []
    best_prefill: dict[KernelChoice, float] = {}
    best_decode: dict[KernelChoice, float] = {}
    best_lone: dict[KernelChoice, float] = {}
    try:
        for choice in candidates:
            settings = ContextSettings(n_ctx=SEQUENCES * n_ctx_seq, n_seq_max=SEQUENCES, n_batch=512, n_threads=threads,
                                       flash_attention=choice.flash_attention, type_k=choice.type_k,
                                       type_v=choice.type_v)  # fmt: skip
            contexts.append((choice, Context(model, settings)))
        position = len(prompt)
        for _ in range(ROUNDS):
            for choice, context in contexts:
                context.clear()
                batch.clear()
                batch.add_run(prompt, 0, 0, output_last=True)
                started = time.perf_counter()
                context.decode(batch)
                prefill = (time.perf_counter() - started) / len(prompt)
                best_prefill[choice] = min(prefill, best_prefill.get(choice, prefill))
                for seq in range(1, SEQUENCES):
                    context.share(0, seq, len(prompt))
                elapsed = []
                for step in range(DECODE_STEPS + 1):  # the first step warms the buffers up and is not counted
                    batch.clear()
                    for seq in range(SEQUENCES):
                        batch.add(prompt[(step + seq) % len(prompt)], position + step, seq, True)
                    started = time.perf_counter()
                    context.decode(batch)
                    elapsed.append(time.perf_counter() - started)
                decode = sum(elapsed[1:]) / (DECODE_STEPS * SEQUENCES)
                best_decode[choice] = min(decode, best_decode.get(choice, decode))
                lone = []
                for step in range(DECODE_STEPS):  # one stream's token alone, then dropped again
                    batch.clear()
                    batch.add(prompt[step % len(prompt)], position + DECODE_STEPS + 1, 0, True)
                    started = time.perf_counter()
                    context.decode(batch)
                    lone.append(time.perf_counter() - started)
                    context.forget(0, position + DECODE_STEPS + 1)
                best_lone[choice] = min(min(lone), best_lone.get(choice, min(lone)))
    finally:
        for _, context in contexts:
            context.close()
        model.close()
    return [{"choice": asdict(c), "prefill": best_prefill[c], "decode": best_decode[c], "lone": best_lone[c]}
            for c in candidates]  # fmt: skip


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    rows = _time_candidates(Path(request["model"]), [KernelChoice(**c) for c in request["candidates"]],
                            threads=int(request["threads"]), extra_buffers=bool(request["extra_buffers"]))  # fmt: skip
    print(json.dumps(rows))
