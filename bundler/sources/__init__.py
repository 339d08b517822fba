"""Where a bundle's contents come from: local files, `hf://` models, wheels for the target, the SBOM.

Every source resolves its input to `Artifact`s: a local file to pack plus what the manifest records about it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Role = Literal["model", "wheel", "policy", "sbom", "file", "eval"]


@dataclass(frozen=True)
class Artifact:
    role: Role
    path: str
    """Logical path inside the bundle, POSIX, relative (e.g. `models/tiny.gguf`, `wheels/x-1.0-py3-none-any.whl`)."""
    file: Path
    """Local file whose bytes are packed."""
    provenance: str
    """`hf://owner/repo/file@<commit>`, `pypi:<name>==<version>`, or the local path it was read from."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Role-specific facts recorded in the manifest: GGUF facts for models, name/version/license for wheels."""
    expected_sha256: str | None = None
    """The digest the source vouches for (an Ollama blob's name): checked by the one read that packs the file."""


LICENSE_LINE_LIMIT = 200


def model_license(meta: dict[str, Any]) -> str | None:
    """The license a model states, in order of authority: its GGUF header, its hub card, the first line of its
    Ollama license layer (the full text stays in the metadata)."""
    for key in ("license", "hf_license"):
        value = meta.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    text = meta.get("ollama_license")
    if isinstance(text, str):
        for line in text.splitlines():
            if line.strip():
                return line.strip()[:LICENSE_LINE_LIMIT]
    return None
