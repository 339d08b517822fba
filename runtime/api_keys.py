"""API keys of an appliance: `<root>/api-keys.json` holds a principal name, a default purpose and the key's hash.

The key itself is shown once, at creation, and never stored: a stolen file names who may call the API but lets no one
call it. A key carries 256 random bits, so one SHA-256 (no slow KDF) is as strong as the key; it is compared in
constant time against every stored hash, so how long a lookup takes says nothing about which key came close.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from sealbox.runtime.durable_file import write_atomically
from sealbox.runtime.exit_codes import ExitCode
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

KEY_PREFIX = "sbx-"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_PURPOSE_MAX = 200


class ApiKeyError(Exception):
    """The key file cannot be read or written, or a key operation is refused (duplicate, unknown name)."""

    exit_code = ExitCode.API_KEY


@dataclass(frozen=True)
class ApiKey:
    """One stored key: who it belongs to and what for. No secret here."""

    name: str
    """The principal the audit log names for every request made with this key."""
    purpose: str
    """Default purpose of processing for the audit log (a request may name its own in `X-Sealbox-Purpose`)."""
    sha256: str
    created_at: str
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's name and its default purpose."""

    name: str
    purpose: str


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ApiKeyError(f"{name!r}: a key name is 1-64 letters, digits, '.', '_', '@' or '-', starting alphanumeric")
    return name


class ApiKeyStore:
    """The key file, read fresh on every load so that a revocation takes effect without a restart."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[ApiKey]:
        """Raises ApiKeyError when the file exists but is not a key file."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ApiKeyError(f"{self.path}: cannot read API keys: {exc.strerror}") from exc
        try:
            data = json.loads(text)
            return [ApiKey(**entry) for entry in data["keys"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ApiKeyError(f"{self.path}: not an API key file: {exc}") from exc

    def _save(self, keys: list[ApiKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"keys": [asdict(key) for key in keys]}, indent=2) + "\n"
        try:
            write_atomically(self.path, data.encode("utf-8"), mode=0o600)
        except OSError as exc:
            raise ApiKeyError(f"{self.path}: cannot write API keys: {exc.strerror}") from exc

    def create(self, name: str, *, purpose: str = "unspecified") -> tuple[ApiKey, str]:
        """A new key for principal `name`; returns the stored entry and the secret (shown once, never stored).

        Raises:
            ApiKeyError: the name is invalid or already has an active key.
        """
        check_name(name)
        if len(purpose) > _PURPOSE_MAX or not purpose.isprintable():
            raise ApiKeyError(f"a purpose is printable text of at most {_PURPOSE_MAX} characters")
        keys = self.load()
        if any(key.name == name and key.active for key in keys):
            raise ApiKeyError(f"{name}: an active key with this name exists; revoke it first")
        secret = KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        entry = ApiKey(name=name, purpose=purpose, sha256=_hash(secret), created_at=_now())
        self._save([key for key in keys if key.name != name] + [entry])
        return entry, secret

    def revoke(self, name: str) -> ApiKey:
        """Raises ApiKeyError when no active key has this name."""
        keys = self.load()
        for i, key in enumerate(keys):
            if key.name == name and key.active:
                revoked = ApiKey(**{**asdict(key), "revoked_at": _now()})
                keys[i] = revoked
                self._save(keys)
                return revoked
        raise ApiKeyError(f"{name}: no active API key with this name")


class Authenticator:
    """Bearer-token check for the server, over a key list reloaded when the file changes."""

    def __init__(self, store: ApiKeyStore) -> None:
        self.store = store
        self._stamp: tuple[int, int] | None = None
        self._keys: list[ApiKey] = []

    def active_keys(self) -> list[ApiKey]:
        try:
            stat = self.store.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_ino)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp != self._stamp:
            self._keys = [key for key in self.store.load() if key.active]
            self._stamp = stamp
        return self._keys

    def authenticate(self, secret: str) -> Principal | None:
        """The principal whose active key this is, or None. Compares against every key, in constant time each."""
        presented = _hash(secret)
        found: ApiKey | None = None
        for key in self.active_keys():
            if hmac.compare_digest(presented, key.sha256):
                found = key
        return Principal(found.name, found.purpose) if found is not None else None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
