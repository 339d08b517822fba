"""The engine seam: the server talks to any inference backend only through what this module exports (`Engine`, its
requests, events and errors, `open_engine`), never through a backend's own modules."""

from __future__ import annotations

import os
import sys
from pathlib import Path

OPENMP_SPIN_COUNT = "1000"
"""How long llama.cpp's CPU threads (OpenMP) spin at a barrier before they sleep, where they share the host.

A graph step passes hundreds of barriers. When the host is busier than its cores (other engines, other services), a
thread that spins for its partner steals the very CPU the partner needs to arrive, and a step takes a scheduler
quantum per barrier: throughput collapses. Spinning briefly lets a busy host schedule the partner. libgomp reads it
once, when llama.cpp is loaded, so it is set when this package is first imported; an operator's own GOMP_SPINCOUNT
or OMP_WAIT_POLICY wins. A server whose one engine has the host to itself spins longer
(`dedicate_openmp_threads`)."""

OPENMP_SPIN_COUNT_DEDICATED = "300000"
"""libgomp's own default, for an engine alone on its host: its threads spin through the few milliseconds of Python
between two decodes instead of sleeping and being woken for each (at 32 streams on this project's 2-core VM, 11–20%
more tokens/s in interleaved runs, `scripts/bench-serve`); the server lets the event loop write a step's tokens
before the next decode, so the spinning threads do not stand in its way."""

_OPERATOR_CHOSE = "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ
if not _OPERATOR_CHOSE:
    os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT


def dedicate_openmp_threads() -> str | None:
    """Let llama.cpp's threads spin as long as libgomp's default: for a server with one engine, before llama.cpp is
    loaded. The spin count now in force, or None when it cannot change: the operator chose one, or llama.cpp is
    loaded already (libgomp has read it)."""
    if _OPERATOR_CHOSE or "llama_cpp" in sys.modules:
        return None
    os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT_DEDICATED
    return OPENMP_SPIN_COUNT_DEDICATED


from sealbox.runtime.engine.base import (  # noqa: E402  (after the OpenMP setting, which must come first)
    ContextLengthExceeded,
    Embeddings,
    Engine,
    EngineError,
    EngineLoadError,
    EngineOptions,
    EngineStats,
    EngineUnavailable,
    Finished,
    GenerationEvent,
    GenerationRequest,
    GrammarError,
    InvalidRequest,
    ModelCard,
    Overloaded,
    SamplingParams,
    TextDelta,
    TokenLogprob,
)


from sealbox.runtime.engine.accelerator import AcceleratorDecision, AcceleratorError, host_decision  # noqa: E402


def open_engine(model_path: Path, card: ModelCard, options: EngineOptions) -> Engine:
    """The engine for one model file: llama.cpp in-process with continuous batching. Not started (`await start()`;
    it raises EngineLoadError when llama.cpp cannot load the file). llama.cpp is imported here, on first use."""
    from sealbox.runtime.engine.llama_batch import LlamaBatchEngine

    return LlamaBatchEngine(
        model_path,
        card,
        n_seq_max=options.n_seq_max,
        n_ctx_per_seq=options.n_ctx_per_seq,
        kv_cells=options.kv_cells,
        queue_size=options.queue_size,
        n_gpu_layers=options.n_gpu_layers,
        n_threads=options.n_threads,
        embeddings=options.embeddings,
        flash_attention=options.flash_attention,
        extra_buffers=options.extra_buffers,
        type_k=options.type_k,
        type_v=options.type_v,
        reproducible_greedy=options.reproducible_greedy,
    )


__all__ = [
    "AcceleratorDecision", "AcceleratorError", "host_decision",
    "ContextLengthExceeded", "Embeddings", "Engine", "EngineError", "EngineLoadError", "EngineOptions", "EngineStats",
    "EngineUnavailable", "Finished", "GenerationEvent", "GenerationRequest", "GrammarError", "InvalidRequest",
    "ModelCard", "Overloaded", "SamplingParams", "TextDelta", "TokenLogprob", "dedicate_openmp_threads", "open_engine",
]  # fmt: skip
