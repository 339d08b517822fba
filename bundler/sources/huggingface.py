"""`hf://owner/repo/path/file.gguf[@revision]` models, pinned to the commit they were read at.

A branch or tag moves; a commit does not. The revision (default `main`) is resolved to its commit once, the file is
downloaded *at that commit*, and the provenance records the commit, so the signed manifest names the exact bytes'
origin even if the branch moves a second later. A reference pinned to a full commit is served from the cache without
the network, since nothing about it can have changed.

`HF_ENDPOINT` is read at each call (not at import, as `huggingface_hub` does), so a mirror set by the caller is honoured.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sealbox.bundler.errors import InputError
from sealbox.bundler.sources import Artifact

SCHEME = "hf://"
DEFAULT_REVISION = "main"
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_FORM = "hf://owner/repo/path/file.gguf[@revision]"
_SUGGESTIONS = 5


@dataclass(frozen=True)
class HfReference:
    """A parsed `hf://` reference: which file of which repository, at which (not yet resolved) revision."""

    repo_id: str
    filename: str
    """Path inside the repository, POSIX (`Q4_K_M/model.gguf`)."""
    revision: str

    def at(self, commit: str) -> str:
        """The provenance string: this file at an exact commit."""
        return f"{SCHEME}{self.repo_id}/{self.filename}@{commit}"


def parse_hf_reference(ref: str) -> HfReference:
    """Split `hf://owner/repo/path/file.gguf[@revision]`; refuses anything that could not name one GGUF file.

    Raises:
        InputError: not of that form (missing parts, `..`, empty revision, not a `.gguf`).
    """
    if not ref.startswith(SCHEME):
        raise InputError(f"{ref}: not an hf:// reference ({_FORM})")
    body, at, revision = ref[len(SCHEME) :].partition("@")
    if at and not revision:
        raise InputError(f"{ref}: empty revision after '@' ({_FORM})")
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise InputError(f"{ref}: expected {_FORM}")
    owner, repo, path = parts[0], parts[1], parts[2:]
    for part in (owner, repo):
        if not _REPO_PART.fullmatch(part) or ".." in part or part.endswith((".git", ".")):
            raise InputError(f"{ref}: {part!r} is not a valid Hugging Face owner or repository name")
    if any(part in (".", "..") or "\\" in part for part in path):
        raise InputError(f"{ref}: the file path must stay inside the repository (no '.', '..' or '\\')")
    filename = "/".join(path)
    if not filename.lower().endswith(".gguf"):
        raise InputError(f"{ref}: {filename!r} is not a .gguf file; sealbox serves GGUF models only")
    return HfReference(repo_id=f"{owner}/{repo}", filename=filename, revision=revision or DEFAULT_REVISION)


def resolve_hf_model(ref: str, *, cache_dir: Path) -> Artifact:
    """Resolve `ref` to a commit, download the file at that commit into `cache_dir`, and check it is GGUF.

    The returned meta holds where it came from (`hf_repo`, `hf_revision`, `hf_commit`, and `hf_license` from the model
    card when it states one); `create` adds the GGUF header facts, as for a local model.

    Raises:
        InputError: a malformed reference; an unknown or inaccessible repository, revision or file; the hub cannot be
            reached (for a branch or tag: pin a commit to use the cache); the file is not GGUF.
        OSError: the cache directory could not be written.
    """
    from huggingface_hub import constants

    parsed = parse_hf_reference(ref)
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    meta: dict[str, Any] = {"hf_repo": parsed.repo_id, "hf_revision": parsed.revision}
    if _COMMIT.fullmatch(parsed.revision):
        commit = parsed.revision  # immutable: no lookup needed, and a cached copy is as good as a download
    else:
        commit, license_name = _resolve_commit(ref, parsed, endpoint)
        if license_name:
            meta["hf_license"] = license_name
    meta["hf_commit"] = commit
    file = _download(ref, parsed, commit, endpoint, cache_dir)
    _check_gguf(ref, file)
    return Artifact(
        role="model",
        path=f"models/{PurePosixPath(parsed.filename).name}",
        file=file,
        provenance=parsed.at(commit),
        meta=meta,
    )


def _resolve_commit(ref: str, parsed: HfReference, endpoint: str) -> tuple[str, str | None]:
    """The commit `parsed.revision` points at now, and the model card's license; checks the file is in that commit."""
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint).model_info(parsed.repo_id, revision=parsed.revision)
    except Exception as exc:  # noqa: BLE001 - translated at this seam, re-raised if not the hub's
        unreachable = (
            f"cannot reach {endpoint} to resolve {parsed.revision!r} to a commit "
            "(pin one, @<40 hex>, to use a copy already in the cache)"
        )
        raise _translate(exc, ref, parsed, endpoint, unreachable=unreachable) from exc
    if not info.sha or not _COMMIT.fullmatch(info.sha):
        raise InputError(f"{ref}: {endpoint} did not state the commit of revision {parsed.revision!r}")
    if info.siblings is not None:
        names = [sibling.rfilename for sibling in info.siblings]
        if parsed.filename not in names:
            raise InputError(_no_such_file(ref, parsed, info.sha, names))
    card = info.card_data
    license_name = getattr(card, "license", None) if card is not None else None
    return info.sha, license_name if isinstance(license_name, str) else None


def _download(ref: str, parsed: HfReference, commit: str, endpoint: str, cache_dir: Path) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(
            parsed.repo_id, parsed.filename, revision=commit, cache_dir=cache_dir, endpoint=endpoint
        )
    except Exception as exc:  # noqa: BLE001 - translated at this seam, re-raised if not the hub's
        unreachable = f"cannot reach {endpoint}, and {parsed.filename} at {commit[:12]} is not in the cache {cache_dir}"
        raise _translate(exc, ref, parsed, endpoint, unreachable=unreachable) from exc
    return Path(path)


def _check_gguf(ref: str, file: Path) -> None:
    # The same header reader as for a local --model: a wrong file is refused here, before anything is packed.
    from sealbox.runtime.models.gguf_facts import NotGGUFError, read_facts

    try:
        read_facts(file)
    except NotGGUFError as exc:
        raise InputError(f"{ref}: the downloaded file is not a GGUF model ({exc.reason})") from exc


def _no_such_file(ref: str, parsed: HfReference, commit: str, names: list[str]) -> str:
    ggufs = sorted(name for name in names if name.lower().endswith(".gguf"))
    found = f"; its .gguf files: {', '.join(ggufs[:_SUGGESTIONS])}" if ggufs else "; it holds no .gguf file"
    more = f" (and {len(ggufs) - _SUGGESTIONS} more)" if len(ggufs) > _SUGGESTIONS else ""
    return f"{ref}: {parsed.repo_id} has no file {parsed.filename!r} at {parsed.revision} ({commit[:12]}){found}{more}"


def _translate(exc: Exception, ref: str, parsed: HfReference, endpoint: str, *, unreachable: str) -> Exception:
    """huggingface_hub's (and its HTTP client's) exceptions, as one InputError naming the reference.

    Anything not from the hub (an OSError of the cache disk, a bug) is returned unchanged, so it is raised as itself.
    """
    import httpx2
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return InputError(
            f"{ref}: {parsed.repo_id} is gated; accept its terms on the hub and log in (HF_TOKEN or `hf auth login`)"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return InputError(
            f"{ref}: no model repository {parsed.repo_id} on {endpoint} (or it is private and no token with access is set)"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return InputError(f"{ref}: {parsed.repo_id} has no revision {parsed.revision!r}")
    if isinstance(exc, errors.RemoteEntryNotFoundError):
        return InputError(f"{ref}: {parsed.repo_id} has no file {parsed.filename!r} at {parsed.revision}")
    if isinstance(exc, errors.HFValidationError):
        return InputError(f"{ref}: the hub refuses the repository id or revision: {exc}")
    if isinstance(exc, (httpx2.TransportError, errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)):
        return InputError(f"{ref}: {unreachable}: {_first_line(exc)}")
    if isinstance(exc, errors.HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = response.status_code if response is not None else "an error"
        return InputError(f"{ref}: {endpoint} answered {status}: {_first_line(exc)}")
    if isinstance(exc, errors.FileMetadataError):
        return InputError(f"{ref}: {endpoint} does not answer like a Hugging Face hub: {_first_line(exc)}")
    return exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
