"""The host's trust store: which publisher keys may sign what this host installs, and how many must agree.

Layout of `<root>/trust/`: one `<key id>.pub` per trusted key (SubjectPublicKeyInfo PEM, re-encoded from what the
operator handed us so the store holds nothing but the key), a `<key id>.json` beside it with the operator's name for
the key and when it was added, and `threshold` (one integer: distinct trusted keys that must sign; absent = 1).

The `.pub` file is the commitment: it is written last on add and removed first on remove, so a crash leaves at most
an orphan `.json` that nothing reads. Every change is recorded in the audit log; if the record cannot be written the
change is undone (fail closed: no key is trusted without a trace).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from securesystemslib.signer import Key, SSlibKey

from sealbox.bundler.audit_trail import record
from sealbox.bundler.errors import KeyFileError
from sealbox.bundler.keys import load_public_key
from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.regular_file import read_regular
from sealbox.runtime.strict_json import loads_unique
from sealbox.runtime.durable_file import write_atomically
from sealbox.runtime.exit_codes import ExitCode

THRESHOLD_FILE = "threshold"
PUBLIC_SUFFIX = ".pub"
META_SUFFIX = ".json"
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class TrustStoreError(Exception):
    """The trust store refuses a change, or cannot be used to verify (empty, threshold above the keys, bad file)."""

    exit_code = ExitCode.TRUST_STORE


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    name: str
    added: str
    """UTC time the key was added, ISO 8601."""
    key: Key

    def to_dict(self) -> dict[str, str]:
        return {"key_id": self.key_id, "name": self.name, "added": self.added}


@dataclass(frozen=True)
class TrustPolicy:
    """What a verifier needs: the trusted keys and the threshold, checked to be usable together."""

    keys: tuple[Key, ...]
    threshold: int


class TrustStore:
    """`<root>/trust/`: read on every verification, changed only by the `sealbox trust` commands."""

    def __init__(self, root: HostRoot) -> None:
        self.root = root
        self.directory = root.trust

    # -- reading -------------------------------------------------------------------------------------------------

    def keys(self) -> list[TrustedKey]:
        """Every trusted key, sorted by name then key id.

        Raises:
            TrustStoreError: a `.pub` file is unreadable, not Ed25519, or named after another key's id.
        """
        if not self.directory.is_dir():
            return []
        found: list[TrustedKey] = []
        for path in sorted(self.directory.glob(f"*{PUBLIC_SUFFIX}")):
            try:
                key = load_public_key(path)
            except KeyFileError as exc:
                raise TrustStoreError(f"trust store: {exc}") from exc
            if key.keyid != path.name.removesuffix(PUBLIC_SUFFIX):
                raise TrustStoreError(f"trust store: {path} holds key {key.keyid}, not the key its name says")
            name, added = self._meta(key.keyid)
            found.append(TrustedKey(key.keyid, name, added, key))
        return sorted(found, key=lambda item: (item.name, item.key_id))

    def _meta(self, key_id: str) -> tuple[str, str]:
        try:
            data = loads_unique(read_regular(self.directory / f"{key_id}{META_SUFFIX}", limit=64 * 1024))
            return str(data["name"]), str(data["added"])
        except (OSError, ValueError, KeyError, TypeError):
            return key_id, ""  # the key itself is what is trusted; a lost label only costs its name

    def threshold(self) -> int:
        """The configured threshold (1 when never set).

        Raises:
            TrustStoreError: the threshold file is not a positive integer.
        """
        path = self.directory / THRESHOLD_FILE
        try:
            text = read_regular(path, limit=64).decode("ascii").strip()
        except FileNotFoundError:
            return 1
        except (OSError, UnicodeDecodeError) as exc:
            raise TrustStoreError(f"trust store: cannot read {path}: {exc}") from exc
        if not text.isdigit() or int(text) < 1:
            raise TrustStoreError(f"trust store: {path} must hold a positive integer, not {text[:20]!r}")
        return int(text)

    def policy(self) -> TrustPolicy:
        """The keys and threshold a bundle is verified against.

        Raises:
            TrustStoreError: no key is trusted, or the threshold exceeds the trusted keys (nothing could ever pass).
        """
        keys = self.keys()
        threshold = self.threshold()
        if not keys:
            raise TrustStoreError(
                f"trust store {self.directory} holds no key: add the publisher's key with `sealbox trust add PUB` first"
            )
        if threshold > len(keys):
            raise TrustStoreError(
                f"trust store: threshold {threshold} is above the {len(keys)} trusted keys; add keys or lower it"
            )
        return TrustPolicy(tuple(item.key for item in keys), threshold)

    def find(self, ref: str) -> TrustedKey:
        """A trusted key by key id (or a unique prefix of 4+ hex digits) or by name.

        Raises:
            TrustStoreError: nothing, or more than one key, matches.
        """
        keys = self.keys()
        matches = [item for item in keys if item.key_id == ref or item.name == ref]
        if not matches and len(ref) >= 4 and re.fullmatch(r"[0-9a-f]+", ref):
            matches = [item for item in keys if item.key_id.startswith(ref)]
        if not matches:
            raise TrustStoreError(f"trust store: no trusted key has the id or name {ref!r}")
        if len(matches) > 1:
            raise TrustStoreError(f"trust store: {ref!r} matches {len(matches)} keys; give the full key id")
        return matches[0]

    # -- changing ------------------------------------------------------------------------------------------------

    def add(self, public_key: Path, *, name: str | None = None, now: datetime | None = None) -> TrustedKey:
        """Trust the Ed25519 key in `public_key` (a `.pub` file), under `name` (default: the file's stem).

        Raises:
            TrustStoreError: not an Ed25519 public key, bad or taken name, or the key is already trusted.
            AuditTrailError: the audit record could not be written (the key is removed again).
        """
        try:
            key = load_public_key(public_key)
        except KeyFileError as exc:
            raise TrustStoreError(str(exc)) from exc
        label = name if name is not None else public_key.name.removesuffix(PUBLIC_SUFFIX)
        if not _NAME.fullmatch(label):
            raise TrustStoreError(f"key name {label!r} must be 1-64 of A-Z a-z 0-9 . _ @ - and start with a letter or digit")
        existing = self.keys()
        for item in existing:
            if item.key_id == key.keyid:
                raise TrustStoreError(f"key {key.keyid} is already trusted (as {item.name!r})")
            if item.name == label:
                raise TrustStoreError(f"the name {label!r} is taken by key {item.key_id}; choose another with --name")
        added = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._make_directory()
        meta = {"key_id": key.keyid, "name": label, "added": added, "source": str(public_key.absolute())}
        write_atomically(self.directory / f"{key.keyid}{META_SUFFIX}", (json.dumps(meta, indent=2) + "\n").encode(),
                         mode=0o644)
        pub = self.directory / f"{key.keyid}{PUBLIC_SUFFIX}"
        write_atomically(pub, _pem(key), mode=0o644)
        trusted = TrustedKey(key.keyid, label, added, key)
        try:
            self._record("trust.add", key_id=key.keyid, name=label)
        except BaseException:
            self._delete(key.keyid)
            raise
        return trusted

    def remove(self, ref: str) -> TrustedKey:
        """Stop trusting a key (by id, id prefix or name).

        Raises:
            TrustStoreError: no such key, or removing it would leave fewer keys than the threshold.
            AuditTrailError: the audit record could not be written (the key is put back).
        """
        item = self.find(ref)
        remaining = len(self.keys()) - 1
        threshold = self.threshold()
        if remaining and remaining < threshold:
            raise TrustStoreError(
                f"removing {item.key_id} ({item.name}) would leave {remaining} keys under threshold {threshold}; "
                "lower the threshold first (`sealbox trust threshold N`)"
            )
        files = [self.directory / f"{item.key_id}{suffix}" for suffix in (META_SUFFIX, PUBLIC_SUFFIX)]
        saved = {path: path.read_bytes() for path in files if path.exists()}
        self._delete(item.key_id)
        try:
            self._record("trust.remove", key_id=item.key_id, name=item.name)
        except BaseException:
            for path, data in saved.items():  # meta first, the `.pub` commitment last
                write_atomically(path, data, mode=0o644)
            raise
        return item

    def set_threshold(self, threshold: int) -> int:
        """Require `threshold` distinct trusted keys on every bundle (two-person rule: 2).

        Raises:
            TrustStoreError: below 1 or above the number of trusted keys.
            AuditTrailError: the audit record could not be written (the old threshold is put back).
        """
        count = len(self.keys())
        if threshold < 1 or threshold > count:
            raise TrustStoreError(f"threshold {threshold} must be between 1 and the {count} trusted keys")
        previous = self.threshold()
        path = self.directory / THRESHOLD_FILE
        write_atomically(path, f"{threshold}\n".encode(), mode=0o644)
        try:
            self._record("trust.threshold", threshold=threshold, previous=previous)
        except BaseException:
            write_atomically(path, f"{previous}\n".encode(), mode=0o644)
            raise
        return threshold

    def _make_directory(self) -> None:
        """`<root>/trust/` (and `<root>`) with modes set here, not by the umask: nobody else may add a key."""
        for directory in (self.root.path, self.directory):
            if not directory.exists():
                directory.mkdir(parents=True)
                os.chmod(directory, 0o755)

    def _delete(self, key_id: str) -> None:
        (self.directory / f"{key_id}{PUBLIC_SUFFIX}").unlink(missing_ok=True)  # the commitment goes first
        (self.directory / f"{key_id}{META_SUFFIX}").unlink(missing_ok=True)

    def _record(self, event: str, **fields: object) -> None:
        from sealbox.bundler.releases import policy_in_force

        record(self.root, event, policy_in_force(self.root), **fields)


def _pem(key: SSlibKey) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key.keyval["public"]))
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
