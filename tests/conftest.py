"""Shared fixtures: generated GGUF models (real tokenizer, seeded weights) and network-namespace detection."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

from sealbox.runtime.models.synthetic import write_malformed_model, write_test_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~1 MB llama GGUF, written once per session: loads in milliseconds, generates deterministic text."""
    return write_test_model(tmp_path_factory.mktemp("models") / "tiny.gguf", size="1MB", seed=0)


@pytest.fixture(scope="session")
def make_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory for other sizes/seeds: `make_model("name.gguf", size="4MB", seed=1, embedding=True)`."""
    directory = tmp_path_factory.mktemp("more-models")

    def make(name: str, **options: object) -> Path:
        return write_test_model(directory / name, **options)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def embedding_model(make_model: Callable[..., Path]) -> Path:
    """A ~1 MB GGUF that declares mean pooling: the server offers it for `/v1/embeddings`."""
    return make_model("embedder.gguf", size="1MB", seed=1, embedding=True)


@pytest.fixture(scope="session")
def make_malformed_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    directory = tmp_path_factory.mktemp("bad-models")
    return lambda kind: write_malformed_model(directory / f"{kind}.gguf", kind)


def network_namespace_available() -> bool:
    """True when `unshare -rn` can make an isolated network namespace here (the 'air-gapped host' of the tests)."""
    try:
        probe = subprocess.run(["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


from real_model import gemma_model  # noqa: E402, F401  (the real Gemma 3 270M, for what a generated model cannot show)
