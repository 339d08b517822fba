"""Load a model in a child process first: llama.cpp aborts the whole process on some malformed files.

`probe_model` runs `python -m runtime.models.probe PATH`; the child parses the header, loads the model on the CPU with
a tiny context and tokenizes a string. A child killed by a signal or a timeout becomes a clear reason, and the caller
(the server, `doctor`) stays up and serves the models that passed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from runtime.models.gguf_facts import ModelFacts, ModelFileError, read_facts

PROBE_TEXT = "sealbox probe: hello world"


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str
    facts: ModelFacts | None = None


def probe_model(path: Path, *, timeout_s: float = 120) -> ProbeResult:
    """Check `path` in a child process; never raises for a bad model."""
    path = Path(path)
    try:
        facts = read_facts(path)
    except ModelFileError as exc:
        return ProbeResult(False, str(exc))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")])))
    try:
        child = subprocess.run(
            [sys.executable, "-m", "runtime.models.probe", str(path)],
            capture_output=True, text=True, timeout=timeout_s, env=env, check=False,
        )
    except subprocess.TimeoutExpired:
        return ProbeResult(False, f"{path}: llama.cpp did not finish loading within {timeout_s:.0f} s", facts)
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        return ProbeResult(False, f"{path}: llama.cpp aborted while loading ({name}){_last_line(child.stderr)}", facts)
    if child.returncode != 0:
        return ProbeResult(False, f"{path}: cannot be loaded{_last_line(child.stderr)}", facts)
    try:
        report = json.loads(child.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return ProbeResult(False, f"{path}: the probe gave no result", facts)
    if report.get("tokens", 0) < 1:
        return ProbeResult(False, f"{path}: tokenizer produced no tokens", facts)
    return ProbeResult(True, "ok", facts)


def _last_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return f": {lines[-1][:300]}" if lines else ""


def _child(path: str) -> None:
    import llama_cpp  # imported only in the child: the parent never touches llama.cpp for an unproven file

    model = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, n_gpu_layers=0, verbose=False)
    tokens = model.tokenize(PROBE_TEXT.encode(), add_bos=True)
    print(json.dumps({"tokens": len(tokens), "n_vocab": model.n_vocab()}))


if __name__ == "__main__":
    _child(sys.argv[1])
