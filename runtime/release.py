"""The release contract: `release.json`, and which release (and so which models, policy and files) is in force.

`bundle install` writes a release directory and points `<root>/current` at it; `sealbox serve` and `sealbox doctor`
read it back. This module is the one place that knows the file names, the record's shape, how `current` is resolved,
and where each signed file of a release lives, so the writer and the three readers cannot drift apart.

Where the bytes of a release are: the policy is copied into `policy.toml`; models and plain files are relative
symlinks `releases/<label>/<path>` → `store/sha256/<digest>`; wheels stay in the store (the venv is built from them).
Every one of them is named, with its sha256, by the signed manifest (`manifest.json`, a DSSE envelope whose signature
the bundle side checks); `release_files` lists them and `check_release_file` re-hashes one.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.regular_file import read_regular, sha256_regular
from sealbox.runtime.strict_json import loads_unique

RELEASE_FILE = "release.json"
INSTALL_FILE = "install.json"
MANIFEST_FILE = "manifest.json"
POLICY_FILE = "policy.toml"
MAX_RECORD_BYTES = 64 << 20


class ReleaseFileError(Exception):
    """No release is in force, or a release's records cannot be read; the message names the file."""


@dataclass(frozen=True)
class ModelLink:
    name: str
    """The file stem: the model name clients ask for."""
    path: str
    """`models/<file>`, relative to the release directory: a symlink into the store."""
    sha256: str
    license: str | None = None
    """As the signed manifest states it; served by `/v1/models` and shown by the doctor."""
    origin: str | None = None
    """The model's provenance (`hf://…@commit`, `ollama://…@sha256:…`, a local path)."""

    def to_dict(self) -> dict[str, str]:
        data = {"name": self.name, "path": self.path, "sha256": self.sha256}
        data |= {key: value for key, value in (("license", self.license), ("origin", self.origin)) if value}
        return data


@dataclass(frozen=True)
class ReleaseRecord:
    """`release.json`: the contract the server reads to know which models and which policy are in force."""

    name: str
    version: int
    models: tuple[ModelLink, ...]
    policy: str = POLICY_FILE

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "models": [model.to_dict() for model in self.models],
            "policy": self.policy,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReleaseRecord:
        """Raises KeyError, TypeError, ValueError for a record of the wrong shape."""
        models = tuple(
            ModelLink(str(m["name"]), str(m["path"]), str(m["sha256"]), _optional_text(m.get("license")),
                      _optional_text(m.get("origin")))  # fmt: skip
            for m in data["models"]
        )
        return cls(str(data["name"]), int(data["version"]), models, str(data.get("policy", POLICY_FILE)))


def _optional_text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def read_json(path: Path) -> Any:
    """A release's JSON file, opened as a regular file only (a FIFO never blocks), duplicate keys refused.

    Raises:
        ReleaseFileError: missing, not a regular file, unreadable or not JSON.
    """
    try:
        return loads_unique(read_regular(path, limit=MAX_RECORD_BYTES))
    except (OSError, ValueError) as exc:
        raise ReleaseFileError(f"{path}: unreadable: {exc}") from exc


def read_record(directory: Path) -> ReleaseRecord:
    """`<directory>/release.json`. Raises ReleaseFileError."""
    path = directory / RELEASE_FILE
    data = read_json(path)
    try:
        return ReleaseRecord.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ReleaseFileError(f"{path}: not a release record: {exc!r}") from exc


def current_directory(root: HostRoot) -> Path:
    """The release directory `<root>/current` points at (it must be a directory directly under `releases/`).

    Raises:
        ReleaseFileError: no release is in force, or `current` points elsewhere.
    """
    current = root.current
    if not current.is_symlink() and not current.exists():
        raise ReleaseFileError(f"no active release: {current} does not exist")
    target = current.resolve()
    if not target.is_dir():
        raise ReleaseFileError(f"{current} points at {target}, which is not a directory")
    if target.parent != root.releases.resolve():
        raise ReleaseFileError(f"{current} points at {target}, outside {root.releases}")
    return target


def store_link_target(root: HostRoot, path: str, sha256: str) -> str:
    """The relative symlink target that puts store blob `sha256` at release path `path` (`<root>` may move)."""
    up = "../" * (len(PurePosixPath(path).parts) + 1)
    return f"{up}{root.store.relative_to(root.path)}/{sha256}"


@dataclass(frozen=True)
class ReleaseFile:
    """One signed file of a release: what the manifest says, and where its bytes are on this host."""

    role: str
    path: str
    sha256: str
    size: int
    location: Path
    """The regular file holding the bytes (the store blob, or the release's `policy.toml`)."""
    link: Path | None = None
    """The release's symlink to `location` (models and plain files), whose target must be exactly `link_target`."""
    link_target: str | None = None


def signed_payload(directory: Path) -> dict[str, Any]:
    """The payload of the release's `manifest.json` envelope, NOT signature-checked here (the bundle side does that).

    Raises:
        ReleaseFileError: unreadable, not an envelope, or a payload that is not a JSON object.
    """
    path = directory / MANIFEST_FILE
    envelope = read_json(path)
    try:
        payload = loads_unique(base64.b64decode(envelope["payload"], validate=True))
    except (KeyError, TypeError, ValueError) as exc:
        raise ReleaseFileError(f"{path}: not a signed manifest envelope: {exc!r}") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("blobs"), list):
        raise ReleaseFileError(f"{path}: the signed payload lists no blobs")
    return payload


def is_model_directory_file(meta: object) -> bool:
    """A file of a model directory (safetensors, for vLLM), kept at its own path under `models/<dir>/`."""
    return isinstance(meta, dict) and meta.get("format") == "safetensors"


def model_link(path: str, meta: object) -> str:
    """Where a model blob lives in the release: a GGUF file at `models/<file>`, a model directory's file at its
    manifest path (`models/<dir>/<file>`: its siblings' names, config.json and the like, would collide if flattened)."""
    if is_model_directory_file(meta):
        return path
    return f"models/{PurePosixPath(path).name}"


def release_files(root: HostRoot, directory: Path, *, default_policy: bytes) -> list[ReleaseFile]:
    """Every file the release's signed manifest names, with where its bytes live; the policy in force is checked
    against the signed policy blob, or against `default_policy` when the bundle carried none.

    Raises:
        ReleaseFileError: the manifest cannot be read, or an entry lacks its path, digest or size.
    """
    files: list[ReleaseFile] = []
    policy_seen = False
    for index, blob in enumerate(signed_payload(directory)["blobs"]):
        try:
            role, path, digest, size = str(blob["role"]), str(blob["path"]), str(blob["sha256"]), int(blob["size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ReleaseFileError(f"{directory / MANIFEST_FILE}: blobs[{index}] is malformed: {exc!r}") from exc
        blob_path = root.store / digest
        if role == "policy":
            policy_seen = True
            files.append(ReleaseFile(role, POLICY_FILE, digest, size, directory / POLICY_FILE))
        elif role == "model":
            link = model_link(path, blob.get("meta"))
            files.append(ReleaseFile(role, link, digest, size, blob_path, directory / link, store_link_target(root, link, digest)))
        elif role in ("file", "sbom"):
            files.append(ReleaseFile(role, path, digest, size, blob_path, directory / path, store_link_target(root, path, digest)))
        else:
            files.append(ReleaseFile(role, path, digest, size, blob_path))
    if not policy_seen:
        files.append(
            ReleaseFile("policy", POLICY_FILE, hashlib.sha256(default_policy).hexdigest(), len(default_policy),
                        directory / POLICY_FILE)  # fmt: skip
        )
    return files


def check_release_file(file: ReleaseFile) -> str | None:
    """Why `file`'s bytes on this host are not the signed ones (re-hashed, every byte), or None when they are."""
    if file.link is not None:
        try:
            target = os.readlink(file.link)
        except OSError as exc:
            return f"{file.path}: not the release's link into the store ({exc.strerror})"
        if target != file.link_target:
            return f"{file.path}: links to {target}, not to the signed blob {file.link_target}"
    try:
        digest, size = sha256_regular(file.location)
    except OSError as exc:
        return f"{file.path}: {file.location}: cannot read: {exc.strerror or exc}"
    if size != file.size or digest != file.sha256:
        return f"{file.path}: sha256 {digest} ({size} bytes) is not the signed {file.sha256} ({file.size} bytes)"
    return None
