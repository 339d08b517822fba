"""Local inputs of `bundle create`: GGUF models, policy files, and any other file, each checked before packing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sealbox.bundler.errors import InputError
from sealbox.bundler.sources import Artifact
from sealbox.runtime.policy import Policy, PolicyError


def _regular_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise InputError(f"{path}: no such {what}")
    if not path.is_file():
        raise InputError(f"{path}: {what} is not a regular file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: {what} is not readable")
    return path


def model_facts(path: Path) -> dict[str, Any]:
    """The GGUF facts the manifest records for a model; refuses a file that is not GGUF.

    Raises:
        InputError: not a GGUF file (bad magic, unsupported version, truncated header).
    """
    from sealbox.runtime.models.gguf_facts import NotGGUFError, read_facts

    try:
        return read_facts(path).to_dict()
    except NotGGUFError as exc:
        raise InputError(
            f"{path}: not a GGUF model ({exc.reason}); --model takes a .gguf file or hf://owner/repo/file.gguf"
        ) from exc


def local_model(path: Path) -> Artifact:
    """A local `.gguf`: its header is read now, so a wrong file is refused before anything is written."""
    _regular_file(path, "model")
    return Artifact(
        role="model",
        path=f"models/{path.name}",
        file=path,
        provenance=str(path.absolute()),
        meta=model_facts(path),
    )


def local_policy(path: Path) -> Artifact:
    """A policy TOML, validated with the same rules the appliance applies when it loads it."""
    _regular_file(path, "policy")
    try:
        policy = Policy.load(path)
    except PolicyError as exc:
        raise InputError(f"invalid policy: {exc}") from exc
    return Artifact(
        role="policy",
        path=f"policies/{path.name}",
        file=path,
        provenance=str(path.absolute()),
        meta={"settings_sha256": policy.digest()},
    )


def local_file(path: Path) -> Artifact:
    _regular_file(path, "file")
    return Artifact(role="file", path=f"files/{path.name}", file=path, provenance=str(path.absolute()))
