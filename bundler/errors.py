"""What can be wrong with a bundle, with its inputs, or with a key: two roots, one exit code per class.

`BundleError` is about what a bundle *is* (bad signature, bad bytes, bad layout): the refusal of a copied directory.
`InputError` and `KeyFileError` are about what the operator handed `create`/`sign`. What the disk did stays an `OSError`.
Every class carries the exit code `sealbox` returns for it, so scripts can tell one refusal from another.

Exit codes: 0 ok · 1 unexpected / I/O · 2 usage · 3 input refused · 4 key file ·
10-19 verification failures in the order verify checks them · 20-29 install (20 rollback protection, 21 delta
base, 22 trust store, 23 release, 24 service files, 25 venv, 26 audit, 27 content, 28 not confirmed, 29 free space) ·
30 rollback to a release the trust store no longer accepts.
"""

from __future__ import annotations

from sealbox.runtime.exit_codes import ExitCode


class BundleError(Exception):
    """The bundle is refused; the message is one line naming the file, part or field at fault."""

    exit_code = ExitCode.INTEGRITY


class FormatError(BundleError):
    """manifest.json is not a DSSE envelope of a sealbox manifest this version understands, or breaks its schema."""

    exit_code = ExitCode.FORMAT


class SignatureError(BundleError):
    """A signature that names a trusted key does not verify: the manifest (or the signature) changed after signing."""

    exit_code = ExitCode.SIGNATURE


class ThresholdError(SignatureError):
    """Fewer distinct trusted keys signed than the threshold requires."""

    exit_code = ExitCode.THRESHOLD

    def __init__(self, message: str, *, valid: int, threshold: int) -> None:
        super().__init__(message)
        self.valid = valid
        self.threshold = threshold


class UntrustedSignerError(ThresholdError):
    """No signature at all comes from a trusted key (signed, but by someone this host does not trust)."""

    exit_code = ExitCode.UNTRUSTED_SIGNER


class ExpiredError(BundleError):
    """The manifest's expiry time has passed."""

    exit_code = ExitCode.EXPIRED


class PathError(BundleError):
    """A path escapes the bundle (`..`, absolute), is not a plain file (symlink, device), or is claimed twice."""

    exit_code = ExitCode.PATH


class MissingFileError(BundleError):
    """A file the manifest lists is not in the bundle directory."""

    exit_code = ExitCode.MISSING_FILE

    def __init__(self, message: str, *, file: str) -> None:
        super().__init__(message)
        self.file = file


class ExtraFileError(BundleError):
    """The bundle directory holds a file the manifest does not list."""

    exit_code = ExitCode.EXTRA_FILE

    def __init__(self, message: str, *, file: str) -> None:
        super().__init__(message)
        self.file = file


class IntegrityError(BundleError):
    """A part's bytes are not the bytes the manifest signed; names the file and the part."""

    exit_code = ExitCode.INTEGRITY

    def __init__(self, message: str, *, file: str, blob: str, part: int) -> None:
        super().__init__(message)
        self.file = file
        self.blob = blob
        self.part = part


class SizeMismatchError(IntegrityError):
    """A part is shorter or longer than the manifest says (truncated copy, appended bytes)."""

    exit_code = ExitCode.SIZE_MISMATCH


class DigestMismatchError(IntegrityError):
    """A part's (or a whole blob's) sha256 differs from the manifest (flipped bits, swapped parts)."""

    exit_code = ExitCode.INTEGRITY


class InputError(Exception):
    """`bundle create` refuses an input (not a GGUF, not a file, invalid policy, clashing paths) before writing anything."""

    exit_code = ExitCode.REFUSED


class KeyFileError(Exception):
    """A key file is missing, malformed, not Ed25519, encrypted without a passphrase, or would be overwritten."""

    exit_code = ExitCode.KEY_FILE
