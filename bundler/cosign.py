"""`bundle sign`: a second person adds their signature offline, after checking what they sign.

A co-signature is a statement about the bytes, so the co-signer's tool checks them first: format, expiry, paths, and
every part against the manifest. Existing signatures are checked too when the co-signer names trusted keys; without
them the co-signer vouches for the content alone, which is what the two-person rule asks of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from securesystemslib.signer import Key, Signer

from sealbox.bundler.blobs import ByteCounter
from sealbox.bundler.manifest import MANIFEST_FILE, Manifest
from sealbox.bundler.signing import envelope_bytes, require_signatures, sign
from sealbox.runtime.durable_file import write_atomically
from sealbox.bundler.verify import check_contents, check_expiry, check_paths, read_unverified


@dataclass(frozen=True)
class CosignResult:
    manifest: Manifest
    added: tuple[str, ...]
    """Key ids of the signatures made now."""
    signed_by: tuple[str, ...]
    """Every key id with a signature on the envelope now (checked or not)."""


def cosign_bundle(
    directory: Path,
    signers: Sequence[Signer],
    *,
    trusted: Sequence[Key] = (),
    threshold: int = 1,
    now: datetime | None = None,
    on_bytes: ByteCounter | None = None,
) -> CosignResult:
    """Check the bundle's content once (and, given `trusted`, its signatures), then add each signer's signature.

    A key that had already signed signs again (same payload, so the same statement). The envelope is replaced
    atomically; other signatures are kept.

    Raises:
        BundleError: the bundle fails a check; nothing is written then.
        ValueError: `threshold` out of range for `trusted`.
    """
    directory = directory.absolute()
    envelope, manifest = read_unverified(directory)
    if trusted:
        require_signatures(envelope, trusted, threshold)
    check_expiry(manifest, now or datetime.now(timezone.utc))
    check_paths(manifest)
    check_contents(directory, manifest, on_bytes=on_bytes)
    for signer in signers:
        sign(envelope, signer)
    write_atomically(directory / MANIFEST_FILE, envelope_bytes(envelope), mode=0o644)
    return CosignResult(manifest, tuple(s.public_key.keyid for s in signers), tuple(sorted(envelope.signatures)))
