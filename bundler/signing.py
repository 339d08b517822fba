"""Signatures over the manifest: a DSSE envelope (securesystemslib), threshold-checked against trusted keys.

`manifest.json` at the bundle root *is* the envelope: `{"payload": b64(canonical manifest), "payloadType": …,
"signatures": [{"keyid", "sig"}…]}`. Signatures cover DSSE's pre-authentication encoding of the payload type and the
payload bytes, so nothing outside the signed bytes can change what a verifier reads. A co-signer appends a signature
without touching the payload (two-person rule).

Checking and enforcing are two calls, as in python-tuf: `check_signatures` returns what it found; `require_signatures`
raises the first refusal.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import UnverifiedSignatureError, VerificationError
from securesystemslib.signer import Key, Signer

from sealbox.bundler.errors import FormatError, SignatureError, ThresholdError, UntrustedSignerError
from sealbox.runtime.strict_json import DuplicateKeyError, loads_unique

PAYLOAD_TYPE = "application/vnd.sealbox.manifest+json"


def new_envelope(payload: bytes) -> Envelope:
    return Envelope(payload=payload, payload_type=PAYLOAD_TYPE, signatures={})


def sign(envelope: Envelope, signer: Signer) -> None:
    """Add (or replace) `signer`'s signature; other signatures stay."""
    envelope.sign(signer)


def parse_envelope(data: bytes) -> Envelope:
    """Raises FormatError when `data` is not a DSSE envelope carrying a sealbox manifest."""
    try:
        raw = loads_unique(data)
    except DuplicateKeyError as exc:
        raise FormatError(f"manifest.json: {exc} (parsers disagree on which one counts: refused)") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"manifest.json is not JSON: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("signatures"), list):
        raise FormatError("manifest.json is not a DSSE envelope (payload, payloadType, signatures)")
    keyids = [item.get("keyid") if isinstance(item, dict) else None for item in raw["signatures"]]
    if len(set(map(str, keyids))) != len(keyids):
        raise FormatError("manifest.json: two signatures name the same keyid (only one could count: refused)")
    try:
        envelope = Envelope.from_dict(raw)
    except Exception as exc:  # securesystemslib raises KeyError, ValueError, binascii.Error, its FormatError…
        raise FormatError(f"manifest.json is not a valid DSSE envelope: {type(exc).__name__}: {exc}") from exc
    if envelope.payload_type != PAYLOAD_TYPE:
        raise FormatError(f"manifest.json payloadType is {envelope.payload_type!r}, not {PAYLOAD_TYPE!r}")
    return envelope


def envelope_bytes(envelope: Envelope) -> bytes:
    return (json.dumps(envelope.to_dict(), indent=2, sort_keys=True) + "\n").encode("utf-8")


@dataclass(frozen=True)
class SignatureCheck:
    """What the signatures on an envelope amount to against a set of trusted keys."""

    threshold: int
    valid: tuple[str, ...]
    """Distinct trusted key ids whose signature verifies."""
    invalid: tuple[str, ...]
    """Trusted key ids whose signature does NOT verify: the payload changed after they signed."""
    untrusted: tuple[str, ...]
    """Key ids of signatures by keys not in the trusted set (ignored, reported)."""

    def __bool__(self) -> bool:
        return not self.invalid and len(self.valid) >= self.threshold

    def describe(self) -> str:
        text = f"signed by {len(self.valid)} of the {self.threshold} required trusted keys"
        if self.untrusted:
            text += f"; ignored signatures by untrusted keys {', '.join(self.untrusted)}"
        return text


def distinct_keys(trusted: Sequence[Key]) -> dict[str, Key]:
    """Trusted keys by key id; the same key listed twice counts once."""
    return {key.keyid: key for key in trusted}


def check_signatures(envelope: Envelope, trusted: Sequence[Key], threshold: int) -> SignatureCheck:
    """Verify every signature that names a trusted key; never raises for a bad signature."""
    keys = distinct_keys(trusted)
    pae = envelope.pae()
    valid: list[str] = []
    invalid: list[str] = []
    untrusted: list[str] = []
    for keyid, signature in envelope.signatures.items():
        key = keys.get(keyid)
        if key is None:
            untrusted.append(keyid)
            continue
        try:
            key.verify_signature(signature, pae)
        except (UnverifiedSignatureError, VerificationError):
            invalid.append(keyid)
        else:
            valid.append(keyid)
    return SignatureCheck(threshold, tuple(sorted(valid)), tuple(sorted(invalid)), tuple(sorted(untrusted)))


def require_signatures(envelope: Envelope, trusted: Sequence[Key], threshold: int) -> SignatureCheck:
    """Enforce M-of-N over distinct trusted keys.

    Raises:
        ValueError: threshold below 1 or above the number of distinct trusted keys (a caller's mistake, not the bundle's).
        SignatureError: a signature by a trusted key does not verify (manifest edited after signing).
        UntrustedSignerError: no signature comes from a trusted key.
        ThresholdError: fewer distinct trusted keys signed than `threshold`.
    """
    count = len(distinct_keys(trusted))
    if threshold < 1 or threshold > count:
        raise ValueError(f"threshold {threshold} must be between 1 and the number of trusted keys ({count})")
    check = check_signatures(envelope, trusted, threshold)
    if check.invalid:
        raise SignatureError(
            f"manifest.json: the signature by trusted key {check.invalid[0]} does not match the manifest "
            "(edited after signing, or a corrupted signature)"
        )
    if not check.valid:
        signers = ", ".join(check.untrusted) or "nobody"
        raise UntrustedSignerError(
            f"manifest.json: no signature by a trusted key (signed by {signers})", valid=0, threshold=threshold
        )
    if len(check.valid) < threshold:
        raise ThresholdError(f"manifest.json: {check.describe()}", valid=len(check.valid), threshold=threshold)
    return check
