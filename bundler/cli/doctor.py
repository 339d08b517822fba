"""The bundle side of `sealbox doctor`: the installed release's signed manifest against the host's trust store.

`runtime` never imports `bundler`, so the doctor cannot check a DSSE signature itself; the `sealbox` command registers
`manifest_signature` with `runtime.doctor.set_manifest_verifier` (see `sealbox.cli`). It checks what
`bundle install` checked before the release went live, against the trust store as it is now: the envelope's
signatures (threshold of distinct trusted keys, no bad signature by a trusted key), the payload's format, and that
this manifest is the one the release was built from (`install.json`'s digest, `release.json`'s name and version).
Expiry is not judged: it bounds when a bundle may be installed, not how long an installed release may run.
"""

from __future__ import annotations

from pathlib import Path

from sealbox.bundler.errors import BundleError
from sealbox.bundler.manifest import Manifest, format_time, manifest_digest
from sealbox.bundler.signing import parse_envelope, require_signatures
from sealbox.bundler.trust import TrustStore, TrustStoreError
from sealbox.bundler.verify import read_manifest_file
from sealbox.runtime.doctor import CheckStatus, Finding, set_manifest_verifier
from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.release import INSTALL_FILE, RELEASE_FILE, ReleaseFileError, read_json, read_record


def manifest_signature(release_dir: Path, trust_dir: Path) -> Finding:
    """The doctor's `manifest-signature` check: PASS when the release's manifest is signed as the trust store requires
    and is the manifest the release was installed from; FAIL naming the first thing that is not so."""
    store = TrustStore(HostRoot(trust_dir.parent))
    try:
        trust = store.policy()
        names = {key.key_id: key.name for key in store.keys()}
    except TrustStoreError as exc:
        return Finding(CheckStatus.FAIL, f"cannot verify against the trust store: {exc}")
    try:
        envelope = parse_envelope(read_manifest_file(release_dir))
        signatures = require_signatures(envelope, trust.keys, trust.threshold)
        manifest = Manifest.from_bytes(envelope.payload)
    except BundleError as exc:
        return Finding(CheckStatus.FAIL, str(exc), (f"release: {release_dir}",))
    except OSError as exc:
        return Finding(CheckStatus.FAIL, f"{release_dir}/manifest.json: cannot read: {exc.strerror or exc}")
    digest = manifest_digest(envelope.payload)
    mismatch = _release_mismatch(release_dir, manifest, digest)
    signers = ", ".join(f"{names.get(key_id, key_id)} ({key_id})" for key_id in signatures.valid)
    details = (
        f"manifest sha256 {digest}",
        f"signed by {signers}",
        f"expires {format_time(manifest.expires)} (judged at install, not here)",
    )
    if mismatch is not None:
        return Finding(CheckStatus.FAIL, mismatch, details)
    return Finding(
        CheckStatus.PASS,
        f"{manifest.name} version {manifest.version}: {signatures.describe()} (threshold {trust.threshold})",
        details,
    )


def _release_mismatch(release_dir: Path, manifest: Manifest, digest: str) -> str | None:
    """Why the signed manifest is not the one this release was built from, or None."""
    try:
        install = read_json(release_dir / INSTALL_FILE)
        record = read_record(release_dir)
    except ReleaseFileError as exc:
        return f"{release_dir}: {INSTALL_FILE} or {RELEASE_FILE} unreadable: {exc}"
    if not isinstance(install, dict) or install.get("manifest_sha256") != digest:
        recorded = install.get("manifest_sha256") if isinstance(install, dict) else None
        return (f"manifest.json (sha256 {digest[:16]}…) is not the manifest this release was installed from "
                f"({INSTALL_FILE} records {recorded})")  # fmt: skip
    named = (record.name, record.version)
    if named != (manifest.name, manifest.version):
        return (f"{RELEASE_FILE} names {named[0]} version {named[1]}; the signed manifest is {manifest.name} "
                f"version {manifest.version}")  # fmt: skip
    return None


def register() -> None:
    """Make `sealbox doctor` and `serve --strict` check the manifest signature in this process."""
    set_manifest_verifier(manifest_signature)
