"""Publisher keys: Ed25519 pairs on disk, loaded as securesystemslib signers and verification keys.

Files: `<name>.key` (PKCS#8 PEM, encrypted with a passphrase unless asked otherwise, mode 0600) and `<name>.pub`
(SubjectPublicKeyInfo PEM, the file an isolated host trusts). The key id is the first 16 hex digits of the sha256 of
the raw 32-byte public key: short enough to read aloud when two people compare keys, derived so nobody can choose it.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.signer import CryptoSigner, SSlibKey

from sealbox.bundler.errors import KeyFileError
from sealbox.runtime.regular_file import NotRegularFileError, read_regular

PASSPHRASE_ENV = "SEALBOX_KEY_PASSPHRASE"
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
KEY_ID_HEX = 16
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ENCRYPTED_PEM = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX]


def verification_key(public: Ed25519PublicKey) -> SSlibKey:
    """The securesystemslib key for `public`, under sealbox's key id (signatures name it)."""
    return SSlibKey.from_crypto(public, keyid=key_id(public))


@dataclass(frozen=True)
class KeyPairFiles:
    private: Path
    public: Path
    key_id: str
    encrypted: bool


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode`, refusing to replace anything that exists (O_EXCL: no race, no silent overwrite)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError as exc:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key (move it away first)") from exc
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)  # the umask may have narrowed (or, for 0644, hidden) the mode
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def generate_key_pair(name: str, out_dir: Path, *, passphrase: bytes | None) -> KeyPairFiles:
    """Write `<name>.key` (0600, encrypted unless `passphrase` is None) and `<name>.pub` (0644) into `out_dir`.

    Raises:
        KeyFileError: bad name, empty passphrase, or either file already exists (nothing is written then).
    """
    if not _KEY_NAME.fullmatch(name):
        raise KeyFileError(f"key name {name!r} must be 1-64 of A-Z a-z 0-9 . _ - and start with a letter or digit")
    if passphrase is not None and not passphrase:
        raise KeyFileError("the passphrase is empty; use --no-encryption to write an unencrypted key on purpose")
    private_path = out_dir / f"{name}{PRIVATE_SUFFIX}"
    public_path = out_dir / f"{name}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise KeyFileError(f"{path} already exists; refusing to overwrite a key (move it away first)")
    if not out_dir.exists():
        out_dir.mkdir(parents=True)
        os.chmod(out_dir, 0o755)  # not the umask's choice: nobody else may swap a key in

    private = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase is not None else serialization.NoEncryption()
    )
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return KeyPairFiles(private_path, public_path, key_id(private.public_key()), passphrase is not None)


MAX_KEY_FILE_BYTES = 64 * 1024


def _read(path: Path, what: str) -> bytes:
    """A key file's bytes: a regular file only (a FIFO or a device never blocks us, a symlink is not followed)."""
    try:
        return read_regular(path, limit=MAX_KEY_FILE_BYTES)
    except NotRegularFileError as exc:
        raise KeyFileError(f"{exc.strerror}; a {what} must be a plain file") from exc
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path}: no such {what} file") from exc
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read {what}: {exc.strerror}") from exc


def load_public_key(path: Path) -> SSlibKey:
    """Read a `.pub` file (SubjectPublicKeyInfo PEM, Ed25519).

    Raises:
        KeyFileError: unreadable, not PEM, or not an Ed25519 key.
    """
    data = _read(path, "public key")
    try:
        public = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(f"{path}: not a PEM public key") from exc
    if not isinstance(public, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key ({type(public).__name__})")
    return verification_key(public)


def private_key_is_encrypted(path: Path) -> bool:
    """Whether loading `path` needs a passphrase (so the CLI asks only when it must)."""
    return _ENCRYPTED_PEM in _read(path, "private key")


def load_signer(path: Path, *, passphrase: bytes | None) -> CryptoSigner:
    """Read a `.key` file into a signer whose signatures carry the sealbox key id.

    Raises:
        KeyFileError: unreadable, encrypted without (or with a wrong) passphrase, or not Ed25519.
    """
    data = _read(path, "private key")
    encrypted = _ENCRYPTED_PEM in data
    if encrypted and not passphrase:
        raise KeyFileError(f"{path}: the key is encrypted; set {PASSPHRASE_ENV} or enter the passphrase at the prompt")
    try:
        private = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except ValueError as exc:
        reason = "wrong passphrase" if encrypted else "not a PEM private key"
        raise KeyFileError(f"{path}: cannot load the private key ({reason})") from exc
    if not isinstance(private, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 private key ({type(private).__name__})")
    return CryptoSigner(private, verification_key(private.public_key()))
