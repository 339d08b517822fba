"""Delta bundles: carry only the blobs the base release lacks; the host supplies the rest from its store.

Creating: the new manifest lists every blob, as always, but marks those whose digest the base manifest already
lists as `in_base`; their bytes stay out of the bundle (a model update moves only the new model). The signature
covers the marks, so nobody can turn a full bundle into a delta, or back, unnoticed.

Installing: every `in_base` blob must already be in `<root>/store/sha256/` with its signed size. If any is not, the
install is refused before anything is written, and the refusal lists exactly which (path, digest, size), so the
operator knows what full bundle to bring.

`create_delta` is `bundle create` told the base's blobs (digest and size): a file of a base blob's size is hashed
first, and when it is a base blob it is listed `in_base` and never written, so only the new blobs reach the disk
(a model update writes the new model, not the old ones it keeps). Crash safety and resuming are `bundle create`'s.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from sealbox.bundler.create import CreateRequest, CreateResult, create_bundle
from sealbox.bundler.errors import BundleError, InputError
from sealbox.bundler.manifest import MANIFEST_FILE, Base, Manifest, manifest_digest
from sealbox.bundler.progress import Progress
from sealbox.bundler.signing import parse_envelope
from sealbox.runtime.regular_file import read_regular
from sealbox.runtime.exit_codes import ExitCode


@dataclass(frozen=True)
class MissingBaseBlob:
    path: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, object]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


class DeltaBaseError(BundleError):
    """A delta bundle's base blobs are not all in this host's store; `missing` lists every one that is not."""

    exit_code = ExitCode.DELTA_BASE

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
    sizes: dict[str, int]
    """Every blob of the base: digest → size."""

    @property
    def digests(self) -> frozenset[str]:
        return frozenset(self.sizes)

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
            envelope = parse_envelope(read_regular(file, limit=64 << 20))
            manifest = Manifest.from_bytes(envelope.payload)
        except OSError as exc:
            raise InputError(f"--base {file}: cannot read: {exc.strerror}") from exc
        except BundleError as exc:
            raise InputError(f"--base {file}: {exc}") from exc
        base = Base(name=manifest.name, version=manifest.version, manifest_sha256=manifest_digest(envelope.payload))
        return cls(base, {entry.sha256: entry.size for entry in manifest.blobs})


def create_delta(request: CreateRequest, base: BaseManifest, progress: Progress | None = None) -> CreateResult:
    """`bundle create --base`: a signed bundle at `request.out` carrying only the blobs `base` lacks; the base's blobs
    are hashed to recognise them, never written.

    Raises:
        InputError: an input is refused, or `--out` is in use.
        OSError: the disk failed; a re-run continues.
    """
    return create_bundle(replace(request, base=base.base), progress, in_base=base.sizes)
