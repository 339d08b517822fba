"""Shared fixtures: generated GGUF models (real tokenizer, seeded weights), network-namespace detection, and the
one rule for tests that need a lockdown tool: skip on a developer's machine, fail under CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from functools import cache
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


@cache
def network_namespace_available() -> bool:
    """True when `unshare -rn` can make an isolated network namespace here (the 'air-gapped host' of the tests)."""
    try:
        probe = subprocess.run(["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def lockdown_gap(*tools: str, netns: bool = False, root: bool = False) -> str | None:
    """Why a lockdown test cannot run here (a tool missing, no namespace, not root), or None when it can."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (.ci/run installs nftables, iproute2, systemd, util-linux)"
    if netns and not network_namespace_available():
        return "cannot create a network namespace here (`unshare -rn ip link set lo up` failed)"
    if root and os.geteuid() != 0:
        return "needs root (to load nftables rules in a namespace and switch to the service user inside it)"
    return None


def require_lockdown(*tools: str, netns: bool = False, root: bool = False) -> None:
    """Skip a lockdown test that cannot run here; under CI (`CI` set) fail instead, so CI never skips the lockdown."""
    reason = lockdown_gap(*tools, netns=netns, root=root)
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the lockdown tests, but {reason}", pytrace=False)
    pytest.skip(reason)


from real_model import gemma_model  # noqa: E402, F401  (the real Gemma 3 270M, for what a generated model cannot show)
