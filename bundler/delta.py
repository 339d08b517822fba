"""Delta bundles: carry only the blobs the base release lacks; the host supplies the rest from its store.

Creating: the new manifest lists every blob, as always, but marks those whose digest the base manifest already
lists as `in_base`; their bytes stay out of the bundle (a model update moves only the new model). The signature
covers the marks, so nobody can turn a full bundle into a delta, or back, unnoticed.

Installing: every `in_base` blob must already be in `<root>/store/sha256/` with its signed size. If any is not, the
install is refused before anything is written, and the refusal lists exactly which (path, digest, size), so the
operator knows what full bundle to bring.

`create_delta` builds the full bundle in a work directory inside `--out` with `bundle create`'s own code, then moves
only the carried blobs out and signs the delta manifest. Until `manifest.json` is written, `--out` holds no manifest,
and until the work directory is removed it holds an extra file: a crash never leaves a directory that verifies,
and a re-run picks up where it stopped.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from dataclasses import dataclass, replace
from pathlib import Path

from sealbox.bundler.blobs import write_atomically
from sealbox.bundler.create import CreateRequest, CreateResult, create_bundle
from sealbox.bundler.errors import BundleError, InputError
from sealbox.bundler.manifest import BLOB_DIR, MANIFEST_FILE, Base, Manifest, manifest_digest
from sealbox.bundler.progress import Progress
from sealbox.bundler.signing import envelope_bytes, new_envelope, parse_envelope, sign

DELTA_WORK_DIR = ".sealbox-delta"


@dataclass(frozen=True)
class MissingBaseBlob:
    path: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, object]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


class DeltaBaseError(BundleError):
    """A delta bundle's base blobs are not all in this host's store; `missing` lists every one that is not."""

    exit_code = 21

    def __init__(self, message: str, *, missing: tuple[MissingBaseBlob, ...]) -> None:
        super().__init__(message)
        self.missing = missing


def missing_base_blobs(manifest: Manifest, store: Path) -> list[MissingBaseBlob]:
    """The `in_base` blobs of `manifest` that `store` lacks (absent, not a plain file, or of another size)."""
    missing: dict[str, MissingBaseBlob] = {}
    for entry in manifest.blobs:
        if not entry.in_base or entry.sha256 in missing:
            continue
        try:
            info = os.lstat(store / entry.sha256)
        except FileNotFoundError:
            info = None
        if info is None or not stat.S_ISREG(info.st_mode) or info.st_size != entry.size:
            missing[entry.sha256] = MissingBaseBlob(entry.path, entry.sha256, entry.size)
    return list(missing.values())


def require_base_blobs(manifest: Manifest, store: Path) -> None:
    """Raises DeltaBaseError naming every missing base blob; returns quietly for a full bundle."""
    missing = missing_base_blobs(manifest, store)
    if not missing:
        return
    base = manifest.base
    of = f" of {base.name} version {base.version}" if base else ""
    listing = "; ".join(f"{item.path} (sha256 {item.sha256}, {item.size} bytes)" for item in missing)
    raise DeltaBaseError(
        f"delta bundle {manifest.name} version {manifest.version} needs {len(missing)} blob(s){of} that this host's "
        f"store lacks: {listing}; install the base (or a full bundle) first",
        missing=tuple(missing),
    )


# -- creating --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseManifest:
    """The manifest a delta builds on (an earlier bundle's `manifest.json`, or an installed release's)."""

    base: Base
    digests: frozenset[str]

    @classmethod
    def load(cls, path: Path) -> BaseManifest:
        """Read `path` (a `manifest.json`, or a bundle or release directory holding one).

        Signatures are not checked: this is the publisher's own earlier manifest, and what the base means on a host
        is checked there, against its store, by digest.

        Raises:
            InputError: missing, or not a sealbox manifest envelope.
        """
        file = path / MANIFEST_FILE if path.is_dir() else path
        try:
            envelope = parse_envelope(file.read_bytes())
            manifest = Manifest.from_bytes(envelope.payload)
        except OSError as exc:
            raise InputError(f"--base {file}: cannot read: {exc.strerror}") from exc
        except BundleError as exc:
            raise InputError(f"--base {file}: {exc}") from exc
        base = Base(name=manifest.name, version=manifest.version, manifest_sha256=manifest_digest(envelope.payload))
        return cls(base, frozenset(entry.sha256 for entry in manifest.blobs))


def mark_in_base(manifest: Manifest, base: BaseManifest) -> Manifest:
    """The same manifest with every blob the base lists marked `in_base`, and the base recorded."""
    blobs = tuple(replace(entry, in_base=entry.sha256 in base.digests) for entry in manifest.blobs)
    return replace(manifest, blobs=blobs, base=base.base)


def _check_delta_out(out: Path) -> None:
    if not out.exists():
        return
    if out.is_symlink() or not out.is_dir():
        raise InputError(f"{out}: --out exists and is not a directory")
    if (out / MANIFEST_FILE).exists():
        raise InputError(f"{out}: already holds a bundle (manifest.json); choose a new --out")
    stray = sorted(item.name for item in out.iterdir() if item.name not in (DELTA_WORK_DIR, "blobs"))
    if stray:
        raise InputError(f"{out}: not empty and not an interrupted delta create (holds {', '.join(stray[:3])})")


def _full_bundle(request: CreateRequest, work: Path, progress: Progress | None) -> Manifest:
    """The full bundle inside the work directory: created, or read back when an earlier run finished it."""
    if (work / MANIFEST_FILE).exists():
        return Manifest.from_bytes(parse_envelope((work / MANIFEST_FILE).read_bytes()).payload)
    return create_bundle(replace(request, out=work), progress).manifest


def create_delta(request: CreateRequest, base: BaseManifest, progress: Progress | None = None) -> CreateResult:
    """`bundle create --base`: a signed bundle at `request.out` carrying only the blobs `base` lacks.

    Raises:
        InputError: an input is refused, or `--out` is in use.
        OSError: the disk failed; a re-run continues.
    """
    started = time.perf_counter()
    out = request.out
    _check_delta_out(out)
    work = out / DELTA_WORK_DIR
    out.mkdir(parents=True, exist_ok=True)
    full = _full_bundle(replace(request, base=base.base), work, progress)
    delta = mark_in_base(full, base)
    (out / BLOB_DIR).mkdir(parents=True, exist_ok=True)
    for name in delta.expected_files():
        if (work / name).exists():  # a re-run finds some already moved
            os.replace(work / name, out / name)
    payload = delta.canonical_bytes()
    envelope = new_envelope(payload)
    for signer in request.signers:
        sign(envelope, signer)
    write_atomically(out / MANIFEST_FILE, envelope_bytes(envelope), temp_dir=work)
    shutil.rmtree(work)
    carried = delta.carried()
    skipped = [entry for entry in delta.blobs if entry.in_base]
    return CreateResult(
        directory=out.absolute(),
        manifest=delta,
        manifest_sha256=manifest_digest(payload),
        signed_by=tuple(sorted(envelope.signatures)),
        blobs_written=len({entry.sha256 for entry in carried}),
        blobs_reused=len({entry.sha256 for entry in skipped}),
        bytes_written=sum({entry.sha256: entry.size for entry in carried}.values()),
        bytes_reused=sum({entry.sha256: entry.size for entry in skipped}.values()),
        seconds=time.perf_counter() - started,
    )
