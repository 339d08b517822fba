"""Installed releases on an appliance: `<root>/releases/<name>-<version>/`, the `current` switch, rollback and gc.

A release directory appears in `releases/` only by one `rename` of a directory built completely in staging, so every
directory there is whole. `current` is a relative symlink (`releases/<name>-<version>`) replaced atomically: a new
link under a temporary name, then `os.replace` over the old one. What the server reads is `release.json`; what the
installer keeps about how a release arrived (manifest digest, signers, downgrade) is `install.json` beside it.

Rollback protection needs a memory that outlives the releases gc removes, and it is appliance-wide:
`releases/.highest.json` keeps the bundle name this appliance runs and, per bundle name, the highest version ever
installed (only grows). A bundle under another name is not a way around the floor: replacing the name is its own
confirmed, recorded act (`bundle install --replace-name`), never a side effect of installing.

`bundle rollback` goes back only to a release that the trust store, as it is now, would accept: its signed manifest
must carry signatures of `threshold` currently trusted keys (a key removed since is no longer trusted), unless the
operator overrides that on purpose, which is recorded.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealbox.bundler.audit_trail import record
from sealbox.bundler.crashpoints import crash_point
from sealbox.bundler.errors import BundleError
from sealbox.bundler.manifest import Manifest, manifest_digest
from sealbox.bundler.signing import SignatureCheck, parse_envelope, require_signatures
from sealbox.bundler.trust import TrustPolicy
from sealbox.bundler.verify import MAX_MANIFEST_BYTES
from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.policy import Policy
from sealbox.runtime.regular_file import read_regular
from sealbox.runtime.release import (
    INSTALL_FILE,
    MANIFEST_FILE,
    ReleaseFileError,
    ReleaseRecord,
    read_json,
    read_record,
)
from sealbox.runtime.durable_file import fsync_directory, write_atomically
from sealbox.runtime.exit_codes import ExitCode

HIGHEST_FILE = ".highest.json"
CURRENT_TEMP = ".current.new"
TRASH_DIR = "trash"


class ReleaseError(Exception):
    """A release operation cannot be done (no such release, nothing to roll back to, another install running)."""

    exit_code = ExitCode.RELEASE


class UntrustedReleaseError(ReleaseError):
    """`bundle rollback` refuses a release that no longer carries the signatures the trust store requires."""

    exit_code = ExitCode.UNTRUSTED_RELEASE


def release_dir_name(name: str, version: int) -> str:
    return f"{name}-{version}"


@dataclass(frozen=True)
class VersionFloor:
    """Rollback protection for the whole appliance: the bundle name it runs, and the highest version of every name."""

    name: str | None
    """The bundle name installs must carry (None before the first install)."""
    versions: dict[str, int]

    def highest(self, name: str) -> int | None:
        return self.versions.get(name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "versions": dict(sorted(self.versions.items()))}


@dataclass(frozen=True)
class InstallRecord:
    """`install.json`: how this release got here (for `bundle list`, gc order, and the audit trail)."""

    name: str
    version: int
    manifest_sha256: str
    installed_at: str
    signed_by: tuple[str, ...]
    downgrade: bool = False
    base_manifest_sha256: str | None = None
    venv: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "name": self.name,
            "version": self.version,
            "manifest_sha256": self.manifest_sha256,
            "installed_at": self.installed_at,
            "signed_by": list(self.signed_by),
            "downgrade": self.downgrade,
            "base_manifest_sha256": self.base_manifest_sha256,
            "venv": self.venv,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InstallRecord:
        data = dict(data)
        return cls(
            name=str(data.pop("name")),
            version=int(data.pop("version")),
            manifest_sha256=str(data.pop("manifest_sha256")),
            installed_at=str(data.pop("installed_at")),
            signed_by=tuple(data.pop("signed_by", ())),
            downgrade=bool(data.pop("downgrade", False)),
            base_manifest_sha256=data.pop("base_manifest_sha256", None),
            venv=bool(data.pop("venv", False)),
            extra=data,
        )


@dataclass(frozen=True)
class Release:
    directory: Path
    release: ReleaseRecord
    install: InstallRecord

    @property
    def label(self) -> str:
        return self.directory.name

    def manifest(self) -> Manifest:
        """The manifest this release was installed from (its signatures were checked at install)."""
        envelope = parse_envelope(read_regular(self.directory / MANIFEST_FILE, limit=MAX_MANIFEST_BYTES))
        return Manifest.from_bytes(envelope.payload)

    def blob_digests(self) -> set[str]:
        """Every store blob this release uses: its own and those carried by a delta's base."""
        return {entry.sha256 for entry in self.manifest().blobs}

    def policy(self) -> Policy:
        return Policy.load(self.directory / self.release.policy)


@dataclass(frozen=True)
class GcResult:
    releases_removed: tuple[str, ...]
    blobs_removed: tuple[str, ...]
    bytes_freed: int
    staging_cleared: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "releases_removed": list(self.releases_removed),
            "blobs_removed": list(self.blobs_removed),
            "bytes_freed": self.bytes_freed,
            "staging_cleared": self.staging_cleared,
        }


def policy_in_force(root: HostRoot) -> Policy:
    """The policy of the live release, or the shipped defaults when nothing is installed yet."""
    current = Releases(root).current()
    return current.policy() if current else Policy.default()


class Releases:
    """The releases of one `<root>`. Changing methods expect `lock()` to be held by the caller."""

    def __init__(self, root: HostRoot) -> None:
        self.root = root

    # -- reading -------------------------------------------------------------------------------------------------

    def load(self, directory: Path) -> Release | None:
        """The release in `directory`, or None when it is not a whole release."""
        try:
            release = read_record(directory)
            install = InstallRecord.from_dict(read_json(directory / INSTALL_FILE))
        except (ReleaseFileError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return Release(directory, release, install)

    def all(self) -> list[Release]:
        """Whole releases, oldest install first."""
        if not self.root.releases.is_dir():
            return []
        found = []
        for item in self.root.releases.iterdir():
            if item.name.startswith(".") or item.is_symlink() or not item.is_dir():
                continue
            if (release := self.load(item)) is not None:
                found.append(release)
        return sorted(found, key=lambda r: (r.install.installed_at, r.release.version, r.label))

    def get(self, label: str) -> Release:
        """Raises ReleaseError when `releases/<label>` is not an installed release."""
        directory = self.root.releases / label
        release = self.load(directory) if "/" not in label and not label.startswith(".") else None
        if release is None:
            names = ", ".join(r.label for r in self.all()) or "none"
            raise ReleaseError(f"no installed release {label!r} (installed: {names})")
        return release

    def current(self) -> Release | None:
        try:
            target = os.readlink(self.root.current)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ReleaseError(f"{self.root.current} is not a symlink: {exc.strerror}") from exc
        return self.load((self.root.path / target) if not os.path.isabs(target) else Path(target))

    def highest(self, name: str) -> int | None:
        """The highest version of `name` ever installed here."""
        return self.floor().highest(name)

    def floor(self) -> VersionFloor:
        """The appliance's version floor: the recorded one, raised by whatever releases are on disk.

        Raises:
            ReleaseError: the floor file is unreadable (never guessed: restore it).
        """
        path = self.root.releases / HIGHEST_FILE
        name: str | None = None
        versions: dict[str, int] = {}
        try:
            data = read_json(path) if os.path.lexists(path) else None
            if isinstance(data, dict) and "versions" in data:
                name = None if data.get("name") is None else str(data["name"])
                versions = {str(k): int(v) for k, v in data["versions"].items()}
            elif data is not None:  # the first format: {name: version}
                versions = {str(k): int(v) for k, v in data.items()}
        except (ReleaseFileError, ValueError, TypeError, AttributeError) as exc:
            raise ReleaseError(f"{path}: unreadable ({exc}); restore it from a backup") from exc
        releases = self.all()
        for release in releases:
            versions[release.release.name] = max(versions.get(release.release.name, -1), release.release.version)
        if name is None:
            current = self.current()
            if current is not None:
                name = current.release.name
            elif releases:
                name = releases[-1].release.name
            elif len(versions) == 1:
                name = next(iter(versions))
        return VersionFloor(name, versions)

    # -- changing ------------------------------------------------------------------------------------------------

    # -- changing ------------------------------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One installer, rollback or gc at a time per root: an flock on the root directory itself (writes nothing).

        Raises:
            ReleaseError: another sealbox holds the lock.
        """
        if not self.root.path.exists():
            self.root.path.mkdir(parents=True)
            os.chmod(self.root.path, 0o755)  # not the umask's choice
        fd = os.open(self.root.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise ReleaseError(f"{self.root.path}: another sealbox install, rollback or gc is running") from exc
            yield
        finally:
            os.close(fd)

    def raise_floor(self, name: str, version: int) -> None:
        """Record that the appliance now runs `name` and that `name` reached `version` (a version never lowers)."""
        floor = self.floor()
        versions = dict(floor.versions)
        versions[name] = max(versions.get(name, version), version)
        updated = VersionFloor(name, versions)
        if updated == floor and os.path.lexists(self.root.releases / HIGHEST_FILE):
            return
        write_atomically(self.root.releases / HIGHEST_FILE, (json.dumps(updated.to_dict(), indent=2) + "\n").encode(),
                         mode=0o644)

    def require_trusted(self, release: Release, trust: TrustPolicy) -> SignatureCheck:
        """The release's signed manifest, checked against the trust store as it is now.

        Raises:
            UntrustedReleaseError: the manifest is unreadable, not the one the release was installed from, or not
                signed by `threshold` currently trusted keys.
        """
        path = release.directory / MANIFEST_FILE
        try:
            envelope = parse_envelope(read_regular(path, limit=MAX_MANIFEST_BYTES))
            check = require_signatures(envelope, trust.keys, trust.threshold)
        except (BundleError, OSError) as exc:
            raise UntrustedReleaseError(
                f"{release.label} is not signed as the trust store now requires: {exc}; "
                "use --allow-untrusted to roll back to it anyway (recorded)"
            ) from exc
        if manifest_digest(envelope.payload) != release.install.manifest_sha256:
            raise UntrustedReleaseError(
                f"{path} is not the manifest {release.label} was installed from ({INSTALL_FILE} records "
                f"{release.install.manifest_sha256[:16]})"
            )
        return check

    def place(self, staged: Path, label: str) -> Path:
        """Rename a release built in staging into `releases/<label>` (one atomic rename)."""
        self.root.releases.mkdir(parents=True, exist_ok=True)
        final = self.root.releases / label
        os.rename(staged, final)
        fsync_directory(self.root.releases)
        return final

    def switch(self, release: Release) -> None:
        """Point `current` at `release` atomically: readers see the old release or the new one, never neither."""
        temp = self.root.path / CURRENT_TEMP
        temp.unlink(missing_ok=True)
        os.symlink(f"{self.root.releases.name}/{release.label}", temp)
        crash_point("current-link")
        os.replace(temp, self.root.current)
        fsync_directory(self.root.path)

    def rollback(
        self, label: str | None = None, *, trust: TrustPolicy, allow_untrusted: bool = False
    ) -> tuple[Release | None, Release]:
        """Switch `current` back to `label`, or to the release installed before the current one.

        The target must be signed by `trust.threshold` keys of `trust` (the host's trust store now), unless
        `allow_untrusted`, which the audit record says.

        Returns (from, to). Raises ReleaseError when there is nothing to go back to; UntrustedReleaseError when the
        target is not signed as required; AuditTrailError when the switch cannot be recorded (then `current` is
        switched back).
        """
        releases = self.all()
        current = self.current()
        if label is not None:
            target = self.get(label)
            if current is not None and target.label == current.label:
                raise ReleaseError(f"{label} is already the current release")
        else:
            if current is None:
                raise ReleaseError("no release is current; install one with `sealbox bundle install`")
            labels = [r.label for r in releases]
            index = labels.index(current.label) if current.label in labels else len(labels)
            if index == 0:
                raise ReleaseError(f"{current.label} is the oldest installed release; there is nothing to roll back to")
            target = releases[index - 1]
        signed_by: list[str] = []
        untrusted_reason: str | None = None
        try:
            signed_by = list(self.require_trusted(target, trust).valid)
        except UntrustedReleaseError as exc:
            if not allow_untrusted:
                raise
            untrusted_reason = str(exc)
        self.switch(target)
        try:
            record(
                self.root,
                "bundle.rollback",
                target.policy(),
                **{"from": current.label if current else None, "to": target.label},
                name=target.release.name,
                version=target.release.version,
                manifest_sha256=target.install.manifest_sha256,
                signed_by=signed_by,
                untrusted_override=untrusted_reason,
            )
        except BaseException:
            if current is not None:
                self.switch(current)
            raise
        return current, target

    def kept(self, keep: int) -> list[Release]:
        """The releases gc keeps: the `keep` installed last, and the current one whatever its age."""
        releases = self.all()
        kept = releases[-keep:] if keep > 0 else []
        current = self.current()
        if current is not None and current.label not in {r.label for r in kept}:
            kept.append(current)
        return kept

    def gc(self, keep: int) -> GcResult:
        """Remove releases beyond the last `keep` (never the current one), store blobs no kept release uses, and
        what interrupted installs left in staging."""
        kept = self.kept(keep)
        kept_labels = {r.label for r in kept}
        removed = []
        for release in self.all():
            if release.label not in kept_labels:
                self._remove_release(release.directory)
                removed.append(release.label)
        staging_cleared = self._clear_staging()
        used: set[str] = set()
        for release in kept:
            used |= release.blob_digests()
        blobs, freed = self._sweep_store(used)
        return GcResult(tuple(removed), tuple(blobs), freed, staging_cleared)

    def _remove_release(self, directory: Path) -> None:
        # Renamed out of releases/ first: a crash mid-delete leaves trash in staging, never half a release in releases/.
        trash = self.root.staging / TRASH_DIR
        trash.mkdir(parents=True, exist_ok=True)
        target = trash / f"{directory.name}.{uuid.uuid4().hex[:8]}"
        os.rename(directory, target)
        fsync_directory(directory.parent)
        shutil.rmtree(target)

    def _clear_staging(self) -> bool:
        staging = self.root.staging
        if not staging.exists():
            return False
        leftovers = list(staging.iterdir())
        for item in leftovers:
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
        staging.rmdir()
        return bool(leftovers)

    def _sweep_store(self, used: set[str]) -> tuple[list[str], int]:
        store = self.root.store
        if not store.is_dir():
            return [], 0
        removed: list[str] = []
        freed = 0
        for item in sorted(store.iterdir()):
            if item.name in used:
                continue
            freed += item.lstat().st_size
            item.unlink()
            removed.append(item.name)
        if removed:
            fsync_directory(store)
        return removed, freed
