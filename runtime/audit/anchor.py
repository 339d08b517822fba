"""Anchors: a signed checkpoint kept off the host, in the C2SP signed-note / tlog-checkpoint text form.

Nothing on the host can show that the whole log was wiped and restarted, or rolled back to an old backup: the
files would be consistent. An operator who copied a checkpoint off the host (`sealbox audit anchor`) can: a later
log must still hold, at the anchor's size, the record whose hash the anchor signed.

The text (c2sp.org/tlog-checkpoint, c2sp.org/signed-note)::

    sealbox.audit/<16 hex of the key id>     origin
    1234                                      tree size: the last seq covered
    <base64 of the 32-byte chain head>        "root hash": here the hash of record 1234, the chain head
    2025-01-31T12:00:00.000000Z               extension line: when it was signed
                                              blank line
    — sealbox.audit/… <base64(4-byte key hash + 64-byte Ed25519 signature)>

This module parses and checks the note (no I/O); the verifier decides whether a log extends it.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sealbox.runtime.audit.checkpoint import ORIGIN_PREFIX, key_id, note_key_hash, origin_for
from sealbox.runtime.audit.errors import AuditFormatError

_EM_DASH = "\u2014"


@dataclass(frozen=True)
class Anchor:
    """A parsed checkpoint note: what it claims (origin, size, head) and its signature lines, not yet checked."""

    origin: str
    size: int
    head: str  # hex, like record hashes
    body: bytes
    signatures: tuple[tuple[str, bytes], ...]  # (key name, key hash + signature)

    @classmethod
    def parse(cls, text: str, *, source: str) -> "Anchor":
        """Raises AuditFormatError naming what is not a tlog checkpoint note."""
        body, separator, signature_block = text.partition("\n\n")
        if not separator:
            raise AuditFormatError(f"{source}: not a signed note (no blank line between the body and the signatures)")
        lines = body.split("\n")
        if len(lines) < 3:
            raise AuditFormatError(f"{source}: a checkpoint note has an origin, a tree size and a root hash")
        origin, size_text, root = lines[:3]
        if not origin.startswith(ORIGIN_PREFIX):
            raise AuditFormatError(f"{source}: origin {origin!r} is not a sealbox audit log ({ORIGIN_PREFIX}…)")
        if not size_text.isdigit() or (size_text.startswith("0") and size_text != "0"):
            raise AuditFormatError(f"{source}: tree size {size_text!r} is not a decimal number")
        try:
            raw = base64.b64decode(root, validate=True)
        except binascii.Error as exc:
            raise AuditFormatError(f"{source}: root hash is not base64: {exc}") from exc
        if len(raw) != 32:
            raise AuditFormatError(f"{source}: root hash is {len(raw)} bytes, not 32")
        signatures = []
        for line in signature_block.rstrip("\n").split("\n"):
            parts = line.split(" ")
            if len(parts) != 3 or parts[0] != _EM_DASH:
                raise AuditFormatError(f"{source}: signature line {line!r} is not '— <name> <base64>'")
            try:
                signatures.append((parts[1], base64.b64decode(parts[2], validate=True)))
            except binascii.Error as exc:
                raise AuditFormatError(f"{source}: signature of {parts[1]} is not base64: {exc}") from exc
        return cls(origin, int(size_text), raw.hex(), (body + "\n").encode(), tuple(signatures))

    def check(self, public: Ed25519PublicKey) -> str | None:
        """None when a signature line of this log's key verifies over the body; else why not."""
        name = origin_for(key_id(public))
        if self.origin != name:
            return f"the anchor's origin {self.origin} is not this log's ({name}): another log, or another key"
        expected = note_key_hash(name, public)
        for signer, blob in self.signatures:
            if signer != name or blob[:4] != expected:
                continue
            try:
                public.verify(blob[4:], self.body)
            except InvalidSignature:
                return "the anchor's signature does not verify: the note was altered or forged"
            return None
        return f"the anchor carries no signature by {name}'s key"
