"""Load a model in a child process first: llama.cpp aborts the whole process on some malformed files.

`probe_model` runs `python -m runtime.models.probe PATH`; the child parses the header, loads the model on the CPU with
the engine's own backend and a tiny context, tokenizes a string and decodes it: one forward pass through every weight
matrix, with the matmul kernels the server will use (its KV cache types are the memory plan's to choose). A child killed by a signal or a timeout becomes a clear reason, and the
caller (the server, `doctor`) stays up and serves the models that passed.

A child that faults (SIGSEGV, SIGILL, SIGBUS) only with llama.cpp's CPU extra buffer types (AMX tiles, repacked weights) is probed again
without them: some hypervisors report AMX to a guest that cannot execute it, and llama.cpp's AMX matmul then kills
the process on the first request (seen here: SIGSEGV in `ggml_backend_amx_mul_mat` for any Q8_0 model on a Xeon
guest). Such a model is served without them, a little slower, instead of not at all.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sealbox.runtime.models.gguf_facts import ModelFacts, ModelFileError, read_facts

PROBE_TEXT = "sealbox probe: hello world"
CPU_FAULTS = frozenset({"SIGSEGV", "SIGILL", "SIGBUS"})
"""The signals an instruction the CPU cannot run raises: only these send the probe round again without extras."""


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str
    facts: ModelFacts | None = None
    extra_buffers: bool = True
    """False when the model works only without llama.cpp's CPU extra buffer types: load it that way."""


def probe_model(path: Path, *, facts: ModelFacts | None = None, timeout_s: float = 120) -> ProbeResult:
    """Check `path` in a child process; never raises for a bad model. `facts`: the header's, when the caller has
    read it already (it is not read again)."""
    path = Path(path)
    if facts is None:
        try:
            facts = read_facts(path)
        except ModelFileError as exc:
            return ProbeResult(False, str(exc))
    result, killed_by = _run_child(path, facts, extra_buffers=True, timeout_s=timeout_s)
    if killed_by not in CPU_FAULTS:  # an abort (a malformed file) or a kill (OOM) is not the CPU's doing
        return result
    fallback, _ = _run_child(path, facts, extra_buffers=False, timeout_s=timeout_s)
    if not fallback.ok:
        return result
    return ProbeResult(
        True,
        f"{path}: llama.cpp's CPU extra buffer types (AMX, repacked weights) crash on this host ({killed_by}); "
        "served without them",
        facts,
        extra_buffers=False,
    )


def _run_child(path: Path, facts: ModelFacts, *, extra_buffers: bool, timeout_s: float) -> tuple[ProbeResult, str | None]:
    """The child's verdict, and the name of the signal that killed it (None when it exited by itself)."""
    # -P: the working directory never goes on the child's sys.path (a `sealbox/` there would shadow the installed one).
    command = [sys.executable, "-P", "-m", "sealbox.runtime.models.probe", str(path)] + ([] if extra_buffers else ["--no-extra-buffers"])
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return ProbeResult(False, f"{path}: llama.cpp did not finish loading within {timeout_s:.0f} s", facts), None
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        reason = f"{path}: llama.cpp aborted while loading ({name}){last_line(child.stderr)}"
        return ProbeResult(False, reason, facts), name
    if child.returncode != 0:
        return ProbeResult(False, f"{path}: cannot be loaded{last_line(child.stderr)}", facts), None
    try:
        report = json.loads(child.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return ProbeResult(False, f"{path}: the probe gave no result", facts), None
    if report.get("tokens", 0) < 1:
        return ProbeResult(False, f"{path}: tokenizer produced no tokens", facts), None
    return ProbeResult(True, "ok", facts, extra_buffers=extra_buffers), None


def last_line(stderr: str) -> str:
    """`: <the last non-blank line>` of a failed child's stderr (cut at 300 characters), or nothing: what a reason
    quotes of llama.cpp's own words."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return f": {lines[-1][:300]}" if lines else ""


def _child(path: str, *, extra_buffers: bool) -> None:
    # Imported only in the child: the parent never touches llama.cpp for an unproven file.
    from sealbox.runtime.engine.llama_backend import BatchBuffer, Context, ContextSettings, Model

    model = Model(Path(path), extra_buffers=extra_buffers)
    tokens = model.tokenize(PROBE_TEXT, add_bos=True, special=False)
    context = Context(model, ContextSettings(n_ctx=64, n_seq_max=1, n_batch=64, n_threads=os.cpu_count() or 1))
    if tokens:
        batch = BatchBuffer(64)
        batch.add_run(tokens[:64], 0, 0, output_last=True)
        context.decode(batch)
    print(json.dumps({"tokens": len(tokens), "n_vocab": model.n_vocab}))


if __name__ == "__main__":
    _child(sys.argv[1], extra_buffers="--no-extra-buffers" not in sys.argv[2:])
