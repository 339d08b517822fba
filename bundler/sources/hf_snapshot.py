"""`hf://owner/repo@<commit>`: a whole model repository in safetensors, for the vLLM engine kind.

A vLLM model is a directory (config, tokenizer, weight shards), so the reference names a repository, not a file,
and it must be pinned to a full commit: a branch moves, and a bundle that names "main" would not say which bytes it
carries. Only top-level files of the kinds vLLM reads without running code are taken: safetensors weights, JSON
configs, tokenizer files and chat templates. Pickled weights (`*.bin`, `*.pt`) are never carried: loading one runs
code. Each file becomes one `model` blob under `models/<repo>/`, with its own sha256 in the signed manifest, so
install and the doctor check every file like any other blob. Where the hub vouches for a weight file's sha256 (its
LFS pointer), the bytes packed must have it; every safetensors header is read and checked against the file's size.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from sealbox.bundler.errors import InputError
from sealbox.bundler.sources import Artifact
from sealbox.bundler.sources.huggingface import HfReference, _translate

SCHEME = "hf://"
FORM = "hf://owner/repo@<40-hex commit>"
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_TAKEN = re.compile(r"(?:[A-Za-z0-9_.-]+\.(?:safetensors|json|jinja|tiktoken)|tokenizer\.model|merges\.txt|vocab\.txt)")
REQUIRED = ("config.json",)
MAX_HEADER = 100 << 20
"""safetensors' own limit on its JSON header."""


def is_snapshot_reference(ref: str) -> bool:
    """`hf://owner/repo[@rev]` (two path parts): a repository; three or more name one GGUF file."""
    return ref.startswith(SCHEME) and ref[len(SCHEME):].partition("@")[0].count("/") == 1


def parse_snapshot_reference(ref: str) -> HfReference:
    """Split `hf://owner/repo@<commit>`.

    Raises:
        InputError: not that form, or a revision that is not a full commit hash (a branch or tag could move).
    """
    body, _, revision = ref[len(SCHEME):].partition("@")
    owner, _, repo = body.partition("/")
    for part in (owner, repo):
        if not _REPO_PART.fullmatch(part) or ".." in part or part.endswith((".git", ".")):
            raise InputError(f"{ref}: {part!r} is not a valid Hugging Face owner or repository name ({FORM})")
    if not _COMMIT.fullmatch(revision):
        raise InputError(f"{ref}: a safetensors model must be pinned to a full 40-hex commit, not {revision or 'nothing'!r}; "
                         f"a branch or tag can move under the signed manifest ({FORM})")  # fmt: skip
    return HfReference(repo_id=f"{owner}/{repo}", filename="", revision=revision)


def resolve_hf_snapshot(ref: str, *, cache_dir: Path) -> list[Artifact]:
    """Every file of the repository at the commit that a vLLM model directory needs, downloaded into `cache_dir`.

    Raises:
        InputError: a malformed or unpinned reference; an unknown repository or commit; no config.json or no
            safetensors weights; a file that is not safetensors, or not the bytes the hub's LFS pointer names.
        OSError: the cache directory could not be written.
    """
    from huggingface_hub import HfApi, constants, hf_hub_download

    parsed = parse_snapshot_reference(ref)
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    try:
        info = HfApi(endpoint=endpoint).model_info(parsed.repo_id, revision=parsed.revision, files_metadata=True)
    except Exception as exc:  # noqa: BLE001 - translated at this seam, re-raised if not the hub's
        raise _translate(exc, ref, parsed, endpoint, unreachable=f"cannot reach {endpoint} to list the repository") from exc
    if info.sha != parsed.revision:
        raise InputError(f"{ref}: {endpoint} answered for commit {info.sha}, not the pinned one")
    siblings = {s.rfilename: s for s in info.siblings or []}
    taken = sorted(name for name in siblings if _TAKEN.fullmatch(name))
    missing = [name for name in REQUIRED if name not in taken]
    if missing or not any(name.endswith(".safetensors") for name in taken):
        raise InputError(f"{ref}: not a safetensors model directory (needs config.json and *.safetensors; "
                         f"it has {', '.join(sorted(siblings)[:8]) or 'no files'})")  # fmt: skip
    name = parsed.repo_id.split("/")[1]
    license_name = getattr(info.card_data, "license", None) if info.card_data is not None else None
    artifacts = []
    for filename in taken:
        try:
            file = Path(hf_hub_download(parsed.repo_id, filename, revision=parsed.revision, cache_dir=cache_dir,
                                        endpoint=endpoint))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - translated at this seam, re-raised if not the hub's
            raise _translate(exc, ref, parsed, endpoint, unreachable=f"cannot reach {endpoint} to fetch {filename}") from exc
        lfs = siblings[filename].lfs
        meta: dict[str, Any] = {"format": "safetensors", "model_dir": f"models/{name}", "hf_repo": parsed.repo_id,
                                "hf_revision": parsed.revision, "hf_commit": parsed.revision}  # fmt: skip
        if isinstance(license_name, str):
            meta["hf_license"] = license_name
        if filename.endswith(".safetensors"):
            meta |= safetensors_facts(file, f"{ref} {filename}")
        artifacts.append(Artifact(role="model", path=f"models/{name}/{filename}", file=file,
                                  provenance=f"{SCHEME}{parsed.repo_id}/{filename}@{parsed.revision}", meta=meta,
                                  expected_sha256=lfs.sha256 if lfs is not None else None))  # fmt: skip
    return artifacts


def safetensors_facts(path: Path, where: str) -> dict[str, Any]:
    """Tensor count, parameter count and dtypes from a safetensors header, which must describe the whole file.

    Raises:
        InputError: the header is not safetensors', or its tensors end before or after the file does.
    """
    size = path.stat().st_size
    with path.open("rb") as stream:
        raw = stream.read(8)
        if len(raw) != 8:
            raise InputError(f"{where}: not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", raw)
        if not 2 <= length <= min(MAX_HEADER, size - 8):
            raise InputError(f"{where}: not a safetensors file (header length {length} for a {size}-byte file)")
        try:
            header = json.loads(stream.read(length))
        except ValueError as exc:
            raise InputError(f"{where}: not a safetensors file (its header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise InputError(f"{where}: not a safetensors file (its header is not a JSON object)")
    end, parameters, dtypes = 0, 0, set()
    for key, tensor in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in tensor["data_offsets"])
            count = 1
            for dimension in tensor["shape"]:
                count *= int(dimension)
            dtypes.add(str(tensor["dtype"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: tensor {key!r} has no readable dtype, shape and data_offsets") from exc
        if not 0 <= begin <= stop:
            raise InputError(f"{where}: tensor {key!r} has data_offsets {begin}..{stop}")
        end, parameters = max(end, stop), parameters + count
    if 8 + length + end != size:
        raise InputError(f"{where}: its tensors end at byte {8 + length + end}, the file at {size} (truncated or padded)")
    return {"tensors": len(header) - ("__metadata__" in header), "parameter_count": parameters,
            "dtypes": sorted(dtypes)}  # fmt: skip
