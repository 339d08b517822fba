"""Bundle verification: every check, in a fixed order, each raising a typed `BundleError` naming file and part.

The order (each step relies on the ones before it):

1. `manifest.json` parses as a DSSE envelope with sealbox's payload type        → FormatError
2. signatures: at least `threshold` DISTINCT trusted keys signed, none of the
   trusted keys' signatures is bad                                               → SignatureError / UntrustedSignerError / ThresholdError
3. the signed payload is a manifest of a format version this sealbox reads      → FormatError
4. not expired                                                                   → ExpiredError
5. paths: every logical path is relative without `..`, no path claimed twice;
   the directory holds no symlink, device or fifo anywhere                       → PathError
6. exactly the files the manifest lists: none missing, none extra               → MissingFileError / ExtraFileError
7. every part's size (stat, before reading) and sha256, parts hashed in
   parallel threads (hashlib releases the GIL), first failure in manifest order  → SizeMismatchError / DigestMismatchError

Steps 1-5 (`open_manifest`, `check_paths`) and 6 (`check_layout`) are pure functions of bytes and a listing; only
`list_bundle` and the part hashing do I/O. Installers call `verify_bundle` and install only from its `VerifyResult`.

Blob digests: a single-part blob's digest *is* its part's digest, checked in step 7. A split blob's whole digest is
covered transitively: the signed manifest binds each part's size and sha256, so bytes matching every part are exactly
the bytes `create` hashed into the blob digest. Re-hashing the concatenation would serialise the parallel part hashing
back into one stream, so it is opt-in (`full_digests=True`, `--full-digests`); `blobs.assemble`, which installers use
to join parts into the host store, re-derives it anyway in the same pass as the copy.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from securesystemslib.dsse import Envelope
from securesystemslib.signer import Key

from sealbox.bundler.blobs import ByteCounter, check_file, open_part
from sealbox.bundler.digests import ExpectedBytes
from sealbox.bundler.errors import (
    BundleError,
    ExpiredError,
    ExtraFileError,
    FormatError,
    MissingFileError,
    PathError,
)
from sealbox.bundler.manifest import BLOB_DIR, MANIFEST_FILE, BlobEntry, Manifest, format_time, manifest_digest
from sealbox.bundler.signing import SignatureCheck, parse_envelope, require_signatures
from sealbox.runtime.regular_file import file_kind

_ALLOWED_DIRS = frozenset({"blobs", BLOB_DIR})
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
"""A manifest for thousands of wheels is a few MB; anything far larger is refused before it is parsed."""


@dataclass(frozen=True)
class VerifiedManifest:
    """A manifest whose signatures, format, expiry and logical paths have been checked (steps 1-5)."""

    manifest: Manifest
    payload: bytes
    sha256: str
    """Digest of the signed payload: how a delta bundle's `base` and a host's release records name this manifest."""
    signatures: SignatureCheck
    envelope: Envelope


@dataclass(frozen=True)
class VerifyResult:
    """A bundle that passed every check; `manifest` is safe to act on."""

    directory: Path
    verified: VerifiedManifest
    files_checked: int
    bytes_checked: int
    seconds: float
    full_digests: bool
    checked_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def manifest(self) -> Manifest:
        return self.verified.manifest

    @property
    def manifest_sha256(self) -> str:
        return self.verified.sha256

    @property
    def signed_by(self) -> tuple[str, ...]:
        return self.verified.signatures.valid

    def part_paths(self, entry: BlobEntry) -> list[Path]:
        """Absolute paths of an entry's part files, in order (an entry carried by the base has none here)."""
        return [] if entry.in_base else [self.directory / name for name in entry.part_files()]

    def to_dict(self) -> dict[str, Any]:
        manifest = self.manifest
        return {
            "ok": True,
            "directory": str(self.directory),
            "name": manifest.name,
            "version": manifest.version,
            "expires": format_time(manifest.expires),
            "manifest_sha256": self.manifest_sha256,
            "signed_by": list(self.signed_by),
            "threshold": self.verified.signatures.threshold,
            "untrusted_signatures": list(self.verified.signatures.untrusted),
            "files_checked": self.files_checked,
            "bytes_checked": self.bytes_checked,
            "seconds": round(self.seconds, 3),
            "full_digests": self.full_digests,
        }


def open_manifest(
    data: bytes, *, trusted: Sequence[Key], threshold: int = 1, now: datetime | None = None
) -> VerifiedManifest:
    """Steps 1-5 on the bytes of `manifest.json`: no I/O.

    Raises:
        FormatError, SignatureError, UntrustedSignerError, ThresholdError, ExpiredError, PathError: the first that fails.
        ValueError: `threshold` is not between 1 and the number of distinct trusted keys.
    """
    envelope = parse_envelope(data)  # step 1
    signatures = require_signatures(envelope, trusted, threshold)  # step 2
    manifest = Manifest.from_bytes(envelope.payload)  # step 3
    check_expiry(manifest, now or datetime.now(timezone.utc))  # step 4
    check_paths(manifest)  # step 5, logical half
    return VerifiedManifest(manifest, envelope.payload, manifest_digest(envelope.payload), signatures, envelope)


def check_expiry(manifest: Manifest, now: datetime) -> None:
    """Raises ExpiredError once `now` reaches `expires` (an old bundle must be re-signed, not replayed)."""
    if now >= manifest.expires:
        raise ExpiredError(
            f"manifest.json: bundle {manifest.name} version {manifest.version} expired at "
            f"{format_time(manifest.expires)} (now {format_time(now)})"
        )


def unsafe_path_reason(path: str) -> str | None:
    """Why a logical path could escape the release directory it is installed into, or None when it is safe."""
    if not path:
        return "is empty"
    if "\0" in path or "\\" in path:
        return "contains a NUL or a backslash"
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        return "is absolute"
    segments = path.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        return "has an empty, '.' or '..' segment"
    return None


def check_paths(manifest: Manifest) -> None:
    """Raises PathError for a logical path that escapes the release or is claimed by two entries."""
    seen: set[str] = set()
    for index, entry in enumerate(manifest.blobs):
        reason = unsafe_path_reason(entry.path)
        if reason:
            raise PathError(f"manifest.json: blobs[{index}].path {entry.path!r} {reason}")
        if entry.path in seen:
            raise PathError(f"manifest.json: blobs[{index}].path {entry.path!r} is listed twice")
        seen.add(entry.path)


def list_bundle(directory: Path) -> set[str]:
    """Every file and directory under `directory`, relative, directories with a trailing `/`; nothing followed.

    Raises:
        PathError: a symlink, device, fifo or socket anywhere in the tree (step 5, on-disk half).
    """
    found: set[str] = set()
    pending = [""]
    while pending:
        relative = pending.pop()
        with os.scandir(directory / relative if relative else directory) as entries:
            for item in entries:
                name = f"{relative}{item.name}"
                if item.is_symlink():
                    raise PathError(f"{name}: is a symlink; a bundle holds plain files only")
                mode = item.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    found.add(f"{name}/")
                    pending.append(f"{name}/")
                elif stat.S_ISREG(mode):
                    found.add(name)
                else:
                    raise PathError(f"{name}: is {file_kind(mode)}, not a regular file or directory")
    return found


def check_layout(manifest: Manifest, listing: set[str]) -> dict[str, tuple[BlobEntry, int]]:
    """Step 6: the listing holds exactly `manifest.json` and the part files the manifest requires.

    Returns the required part files (relative path → entry and part index).

    Raises:
        MissingFileError: the first required part (manifest order) that is absent.
        ExtraFileError: the first (sorted) file or directory the manifest does not account for.
    """
    expected = manifest.expected_files()
    for name, (entry, index) in expected.items():
        if name not in listing:
            raise MissingFileError(
                f"{name}: missing (part {index} of {len(entry.parts)} of {entry.path})", file=name
            )
    allowed = set(expected) | {MANIFEST_FILE} | {f"{name}/" for name in _ALLOWED_DIRS}
    extra = sorted(listing - allowed)
    if extra:
        raise ExtraFileError(f"{extra[0]}: not listed in the manifest; a bundle holds only what it signs", file=extra[0])
    return expected


@dataclass(frozen=True)
class _Job:
    order: int
    entry: BlobEntry
    indices: tuple[int, ...]
    """Part indices checked by this job: one, or all of a split blob when its whole digest is re-derived."""


def _part_label(entry: BlobEntry, index: int) -> str:
    return f"part {index} of {len(entry.parts)} of {entry.path}"


class _StopEvent(Protocol):
    def is_set(self) -> bool: ...


class _FirstFailure:
    """Stops the jobs after the earliest failing one, never those before it: with parts hashed in parallel, the part
    reported is still the first bad one in manifest order, whichever thread finished first."""

    def __init__(self) -> None:
        self.order: float = float("inf")
        self._lock = threading.Lock()

    def record(self, order: int) -> None:
        with self._lock:
            self.order = min(self.order, order)

    def stop_for(self, order: int) -> _StopEvent:
        return _StopAfter(self, order)


@dataclass(frozen=True)
class _StopAfter:
    failure: _FirstFailure
    order: int

    def is_set(self) -> bool:
        return self.failure.order < self.order


def _check_job(
    directory: Path, job: _Job, *, whole: bool, stop: _StopEvent, on_bytes: ByteCounter | None
) -> int | None:
    """Hash this job's parts; returns bytes read, None when skipped, raises the part's failure."""
    if stop.is_set():
        return None
    entry = job.entry
    names = entry.part_files()
    whole_bytes = ExpectedBytes.of_blob(entry, names[0]) if whole else None
    total = 0
    for index in job.indices:
        consumers = [whole_bytes.update] if whole_bytes else []
        got = check_file(directory / names[index], ExpectedBytes.of_part(entry, index), consumers=consumers,
                         on_bytes=on_bytes, stop=stop)  # type: ignore[arg-type]  # fmt: skip
        if got < 0:
            return None
        total += got
    if whole_bytes is not None:
        whole_bytes.finish()
    return total


def check_parts(
    directory: Path,
    manifest: Manifest,
    *,
    workers: int | None = None,
    full_digests: bool = False,
    on_bytes: ByteCounter | None = None,
) -> tuple[int, int]:
    """Step 7: every part's size and sha256; returns (files, bytes) checked.

    Sizes are compared by `stat` first, in manifest order, so a truncated copy is named before any hashing. Parts are
    then hashed on `workers` threads; after a failure no new part starts, parts already started finish, and the
    failure earliest in manifest order is raised, so the report does not depend on thread timing.

    Raises:
        SizeMismatchError, DigestMismatchError: named to file and part.
        PathError: a part became a symlink or special file since the listing.
    """
    jobs: list[_Job] = []
    seen: set[str] = set()
    for entry in manifest.carried():
        if entry.sha256 in seen:
            continue
        seen.add(entry.sha256)
        for index, name in enumerate(entry.part_files()):
            ExpectedBytes.of_part(entry, index).check_size(os.lstat(directory / name).st_size)
        if full_digests and len(entry.parts) > 1:
            jobs.append(_Job(len(jobs), entry, tuple(range(len(entry.parts)))))
        else:
            jobs.extend(_Job(len(jobs) + index, entry, (index,)) for index in range(len(entry.parts)))
    # Larger jobs first would balance better, but manifest order keeps "first failure" well defined; parts are
    # mostly equal-sized anyway.
    first_failure = _FirstFailure()
    failures: dict[int, BaseException] = {}
    checked = [0, 0]
    lock = threading.Lock()

    def run(job: _Job) -> None:
        try:
            got = _check_job(directory, job, whole=full_digests and len(job.indices) > 1,
                             stop=first_failure.stop_for(job.order), on_bytes=on_bytes)  # fmt: skip
        except BaseException as exc:
            first_failure.record(job.order)
            with lock:
                failures[job.order] = exc
            return
        if got is not None:
            with lock:
                checked[0] += len(job.indices)
                checked[1] += got

    count = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    with ThreadPoolExecutor(max_workers=count, thread_name_prefix="verify") as pool:
        list(pool.map(run, jobs))
    if failures:
        raise failures[min(failures)]
    return checked[0], checked[1]


def read_manifest_file(directory: Path) -> bytes:
    """The bytes of `<directory>/manifest.json`, refusing a symlink and an absurd size.

    Raises:
        MissingFileError, PathError, FormatError.
    """
    path = directory / MANIFEST_FILE
    try:
        fd, info = open_part(path)
    except FileNotFoundError as exc:
        raise MissingFileError(
            f"{MANIFEST_FILE}: missing (not a bundle, or an interrupted create)", file=MANIFEST_FILE
        ) from exc
    except PathError as exc:
        raise PathError(f"{MANIFEST_FILE}: {str(exc).split(': ', 1)[-1]}") from exc
    with open(fd, "rb") as reader:
        if info.st_size > MAX_MANIFEST_BYTES:
            raise FormatError(f"{MANIFEST_FILE}: {info.st_size} bytes is too large for a manifest")
        return reader.read(MAX_MANIFEST_BYTES + 1)


def verify_bundle(
    directory: Path,
    *,
    trusted: Sequence[Key],
    threshold: int = 1,
    now: datetime | None = None,
    workers: int | None = None,
    full_digests: bool = False,
    on_bytes: ByteCounter | None = None,
) -> VerifyResult:
    """Run steps 1-7 on a bundle directory; returns the result only when every check holds.

    Args:
        trusted: verification keys (`bundler.keys.load_public_key`); duplicates count once.
        threshold: how many distinct trusted keys must have signed.
        now: the time expiry is judged at (default: now, UTC).
        workers: hashing threads (default: CPU count).
        full_digests: also re-derive each split blob's whole digest (one stream per split blob: slower).
        on_bytes: called from hashing threads with each chunk's length (progress bars).

    Raises:
        BundleError: a subclass naming the first failed check (see the module docstring for the order).
        ValueError: `threshold` out of range for `trusted`.
        OSError: the disk failed us (unreadable directory…): not a verdict on the bundle.
    """
    started = time.perf_counter()
    directory = directory.absolute()
    verified = open_manifest(read_manifest_file(directory), trusted=trusted, threshold=threshold, now=now)
    files, size = check_contents(
        directory, verified.manifest, workers=workers, full_digests=full_digests, on_bytes=on_bytes
    )
    return VerifyResult(directory, verified, files, size, time.perf_counter() - started, full_digests)


def check_contents(
    directory: Path,
    manifest: Manifest,
    *,
    workers: int | None = None,
    full_digests: bool = False,
    on_bytes: ByteCounter | None = None,
) -> tuple[int, int]:
    """Steps 5 (on disk), 6 and 7: no symlink or special file, exactly the listed files, every byte of every part.

    Returns (files, bytes) checked. Raises PathError, MissingFileError, ExtraFileError, SizeMismatchError,
    DigestMismatchError."""
    check_layout(manifest, list_bundle(directory))
    return check_parts(directory, manifest, workers=workers, full_digests=full_digests, on_bytes=on_bytes)


def read_unverified(directory: Path) -> tuple[Envelope, Manifest]:
    """The envelope and manifest of a bundle WITHOUT checking signatures, expiry or bytes: for `inspect` and co-signing.

    Raises MissingFileError, PathError, FormatError."""
    envelope = parse_envelope(read_manifest_file(directory))
    return envelope, Manifest.from_bytes(envelope.payload)


def failure_to_dict(error: BundleError) -> dict[str, Any]:
    """The JSON form of a refusal (`bundle verify --json`)."""
    data: dict[str, Any] = {
        "ok": False,
        "error": type(error).__name__,
        "exit_code": error.exit_code,
        "message": str(error),
    }
    for attribute in ("file", "blob", "part"):
        if hasattr(error, attribute):
            data[attribute] = getattr(error, attribute)
    return data
