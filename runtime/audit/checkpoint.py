"""Signed checkpoints and the host audit key that signs them.

A checkpoint commits to the log as it stood: the number of records (`size`, the last seq) and the hash of record
`size` (`head`), signed with the host's Ed25519 audit key. Because every record hash covers the one before it, a
valid checkpoint authenticates every record up to `size` and every anchor hash in front of them: rewriting any of
them changes `head`. A new log starts with a checkpoint at size 0 over the genesis hash, so a log whose
checkpoints are all gone is never anchored again.

The signed message is the body of a C2SP signed note in the tlog-checkpoint format (c2sp.org/tlog-checkpoint):
the origin line `sealbox.audit/<first 16 hex of the key id>`, the tree size (= `size`), the "root hash" in base64
(here the chain head: the hash of record `size`, which commits to every record before it, not a Merkle root), and
one extension line, the signing time. So a stored checkpoint can be printed as a standard note for an operator to
keep off the host (`sealbox audit anchor`), signature and all, and checked later with the public key alone.

The key is generated on first open: `audit-key` (PKCS#8 PEM, mode 0600, never leaves the host) and `audit-key.pub`
(SubjectPublicKeyInfo PEM), which every export carries and auditors should keep a copy of, obtained independently.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sealbox.runtime.audit.errors import AuditFormatError, AuditKeyError
from sealbox.runtime.durable_file import write_atomically
from sealbox.runtime.audit.record import canonical

PRIVATE_KEY_NAME = "audit-key"
PUBLIC_KEY_NAME = "audit-key.pub"
CHECKPOINTS_NAME = "checkpoints.jsonl"
ORIGIN_PREFIX = "sealbox.audit/"
_ED25519_NOTE_TYPE = b"\x01"  # the signature-type byte of an Ed25519 note key (c2sp.org/signed-note)
_STATEMENT_DOMAIN = b"sealbox-audit-export-statement-v1\n"


def key_id(public: Ed25519PublicKey) -> str:
    """SHA-256 of the raw 32-byte public key, hex: how records of checkpoints and reports name a key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_key_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public_key(pem: bytes, *, source: str) -> Ed25519PublicKey:
    """Parse a PEM public key; raises AuditFormatError naming the source when it is not an Ed25519 key."""
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise AuditFormatError(f"{source}: not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise AuditFormatError(f"{source}: not an Ed25519 public key")
    return key


def read_public_key(path: Path) -> Ed25519PublicKey:
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise AuditFormatError(f"{path}: cannot read public key: {exc.strerror}") from exc
    return load_public_key(pem, source=str(path))


@dataclass(frozen=True)
class Checkpoint:
    size: int
    head: str
    time: str
    key: str
    sig: str

    def message(self) -> bytes:
        return signed_message(self.size, self.head, self.time, self.key)

    def to_note(self, public: Ed25519PublicKey) -> str:
        """The checkpoint as a C2SP signed note: body, blank line, `— <name> <base64(key hash + signature)>`."""
        name = origin_for(self.key)
        signature = base64.b64decode(self.sig)
        line = base64.b64encode(note_key_hash(name, public) + signature).decode("ascii")
        return f"{self.message().decode()}\n\u2014 {name} {line}\n"

    def to_dict(self) -> dict[str, object]:
        return {"size": self.size, "head": self.head, "time": self.time, "key": self.key, "sig": self.sig}

    def to_line(self) -> bytes:
        return canonical(self.to_dict()) + b"\n"

    @classmethod
    def from_dict(cls, data: object) -> "Checkpoint":
        """Raises ValueError saying which member is missing or of the wrong type."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        size, head, time, key, sig = (data.get(name) for name in ("size", "head", "time", "key", "sig"))
        if type(size) is not int or size < 0:
            raise ValueError(f"size {size!r} is not a non-negative integer")
        for name, value in (("head", head), ("time", time), ("key", key), ("sig", sig)):
            if not isinstance(value, str):
                raise ValueError(f"{name} is missing or not a string")
        return cls(size, head, time, key, sig)  # type: ignore[arg-type]

    @classmethod
    def from_line(cls, line: bytes) -> "Checkpoint":
        try:
            return cls.from_dict(json.loads(line))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"not a checkpoint: {exc}") from exc

    def signature_holds(self, public: Ed25519PublicKey) -> bool:
        try:
            public.verify(base64.b64decode(self.sig, validate=True), self.message())
        except (InvalidSignature, binascii.Error, ValueError):
            return False
        return True


def origin_for(key: str) -> str:
    """The log's origin line: names the log by its key, so checkpoints of another host's log never pass for this one."""
    return ORIGIN_PREFIX + key[:16]


def signed_message(size: int, head: str, time: str, key: str) -> bytes:
    """The note body a checkpoint signs: origin, size, base64 head, time (an extension line), each line ending in \\n."""
    try:
        root = base64.b64encode(bytes.fromhex(head)).decode("ascii")
    except ValueError:
        root = "!" + head  # not hex: the message still differs from any real one, so the signature cannot hold
    return f"{origin_for(key)}\n{size}\n{root}\n{time}\n".encode()


def note_key_hash(name: str, public: Ed25519PublicKey) -> bytes:
    """The 4-byte key hash that prefixes a note signature: SHA-256(name, newline, type 0x01, raw key)[:4]."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(name.encode() + b"\n" + _ED25519_NOTE_TYPE + raw).digest()[:4]


def statement_message(statement: dict[str, object]) -> bytes:
    """What an export statement's signature covers: a domain line and the canonical JSON of the statement."""
    return _STATEMENT_DOMAIN + canonical(statement)


def statement_holds(statement: dict[str, object], sig: object, public: Ed25519PublicKey) -> bool:
    if not isinstance(sig, str):
        return False
    try:
        public.verify(base64.b64decode(sig, validate=True), statement_message(statement))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


class AuditKey:
    """The host audit key: signs checkpoints. Generated once; refused when others could read it."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = private.public_key()
        self.id = key_id(self.public)

    def sign(self, size: int, head: str, time: str) -> Checkpoint:
        sig = base64.b64encode(self._private.sign(signed_message(size, head, time, self.id))).decode("ascii")
        return Checkpoint(size, head, time, self.id, sig)

    def sign_statement(self, statement: dict[str, object]) -> str:
        """Base64 Ed25519 signature over an export statement (see `statement_message`)."""
        return base64.b64encode(self._private.sign(statement_message(statement))).decode("ascii")

    def public_pem(self) -> str:
        return public_key_pem(self.public)

    @classmethod
    def load_or_create(cls, directory: Path, *, may_create: bool, owner: tuple[int, int] | None) -> "AuditKey":
        """The key in `directory`, generated (0600, owned like the directory) when there is none and `may_create`.

        Raises:
            AuditKeyError: the private key is missing where checkpoints already exist (it must be restored, not
                replaced), unreadable, not Ed25519, or readable by group or others.
        """
        private_path = directory / PRIVATE_KEY_NAME
        public_path = directory / PUBLIC_KEY_NAME
        try:
            fd = os.open(private_path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            if not may_create:
                raise AuditKeyError(
                    f"{private_path} is missing but {directory / CHECKPOINTS_NAME} holds checkpoints it signed: "
                    "restore the host audit key from backup (a new key would make the old checkpoints unverifiable)"
                ) from None
            return cls._create(private_path, public_path, owner)
        except OSError as exc:
            raise AuditKeyError(f"{private_path}: cannot open the host audit key: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if mode & 0o077:
                raise AuditKeyError(
                    f"{private_path} has mode {stat.filemode(mode)}: the host audit key must be readable only by "
                    f"the service user (chmod 600 {private_path})"
                )
            pem = handle.read()
        try:
            private = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise AuditKeyError(f"{private_path}: not a PEM private key without passphrase: {exc}") from exc
        if not isinstance(private, Ed25519PrivateKey):
            raise AuditKeyError(f"{private_path}: not an Ed25519 key")
        key = cls(private)
        if not public_path.exists():
            write_atomically(public_path, key.public_pem().encode(), mode=0o644, owner=owner)
        return key

    @classmethod
    def _create(cls, private_path: Path, public_path: Path, owner: tuple[int, int] | None) -> "AuditKey":
        key = cls(Ed25519PrivateKey.generate())
        pem = key._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            write_atomically(private_path, pem, mode=0o600, owner=owner)
            public_path.unlink(missing_ok=True)  # a stray public key from an earlier key would mislead auditors
            write_atomically(public_path, key.public_pem().encode(), mode=0o644, owner=owner)
        except OSError as exc:
            raise AuditKeyError(f"{private_path}: cannot create the host audit key: {exc.strerror}") from exc
        return key


