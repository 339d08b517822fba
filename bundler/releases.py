"""Installed releases on an appliance: `<root>/releases/<name>-<version>/`, the `current` switch, rollback and gc.

A release directory appears in `releases/` only by one `rename` of a directory built completely in staging, so every
directory there is whole. `current` is a relative symlink (`releases/<name>-<version>`) replaced atomically: a new
link under a temporary name, then `os.replace` over the old one. What the server reads is `release.json`; what the
installer keeps about how a release arrived (manifest digest, signers, downgrade) is `install.json` beside it.

Rollback protection needs a memory that outlives the releases gc removes: `releases/.highest.json` keeps, per bundle
name, the highest version ever installed, and only grows.
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
from sealbox.bundler.blobs import fsync_dir, write_atomically
from sealbox.bundler.crashpoints import crash_point
from sealbox.bundler.manifest import Manifest
from sealbox.bundler.signing import parse_envelope
from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.policy import Policy

RELEASE_FILE = "release.json"
INSTALL_FILE = "install.json"
MANIFEST_FILE = "manifest.json"
POLICY_FILE = "policy.toml"
HIGHEST_FILE = ".highest.json"
CURRENT_TEMP = ".current.new"
TRASH_DIR = "trash"


class ReleaseError(Exception):
    """A release operation cannot be done (no such release, nothing to roll back to, another install running)."""

    exit_code = 23


def release_dir_name(name: str, version: int) -> str:
    return f"{name}-{version}"


@dataclass(frozen=True)
class ModelLink:
    name: str
    """The file stem: the model name clients ask for."""
    path: str
    """`models/<file>`, relative to the release directory: a symlink into the store."""
    sha256: str
    license: str | None = None
    """As the signed manifest states it; served by `/v1/models` and shown by the doctor."""
    origin: str | None = None
    """The model's provenance (`hf://…@commit`, `ollama://…@sha256:…`, a local path)."""

    def to_dict(self) -> dict[str, str]:
        data = {"name": self.name, "path": self.path, "sha256": self.sha256}
        data |= {key: value for key, value in (("license", self.license), ("origin", self.origin)) if value}
        return data


@dataclass(frozen=True)
class ReleaseRecord:
    """`release.json`: the contract the server reads to know which models and which policy are in force."""

    name: str
    version: int
    models: tuple[ModelLink, ...]
    policy: str = POLICY_FILE

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "models": [model.to_dict() for model in self.models],
            "policy": self.policy,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReleaseRecord:
        models = tuple(
            ModelLink(str(m["name"]), str(m["path"]), str(m["sha256"]), m.get("license"), m.get("origin"))
            for m in data["models"]
        )
        return cls(str(data["name"]), int(data["version"]), models, str(data.get("policy", POLICY_FILE)))


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
        envelope = parse_envelope((self.directory / MANIFEST_FILE).read_bytes())
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
            release = ReleaseRecord.from_dict(json.loads((directory / RELEASE_FILE).read_bytes()))
            install = InstallRecord.from_dict(json.loads((directory / INSTALL_FILE).read_bytes()))
        except (OSError, ValueError, KeyError, TypeError):
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
        """The highest version of `name` ever installed here (the floor for rollback protection)."""
        versions = [r.release.version for r in self.all() if r.release.name == name]
        floor = self._highest_map().get(name)
        if floor is not None:
            versions.append(floor)
        return max(versions) if versions else None

    def _highest_map(self) -> dict[str, int]:
        try:
            data = json.loads((self.root.releases / HIGHEST_FILE).read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ReleaseError(f"{self.root.releases / HIGHEST_FILE}: unreadable ({exc}); restore it from a backup") from exc
        return {str(k): int(v) for k, v in data.items()}

    # -- changing ------------------------------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One installer, rollback or gc at a time per root: an flock on the root directory itself (writes nothing).

        Raises:
            ReleaseError: another sealbox holds the lock.
        """
        self.root.path.mkdir(parents=True, exist_ok=True)
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
        """Record that `name` reached `version` (never lowers it)."""
        current = self._highest_map()
        if current.get(name, -1) >= version:
            return
        current[name] = version
        write_atomically(self.root.releases / HIGHEST_FILE, (json.dumps(current, sort_keys=True, indent=2) + "\n").encode())

    def place(self, staged: Path, label: str) -> Path:
        """Rename a release built in staging into `releases/<label>` (one atomic rename)."""
        self.root.releases.mkdir(parents=True, exist_ok=True)
        final = self.root.releases / label
        os.rename(staged, final)
        fsync_dir(self.root.releases)
        return final

    def switch(self, release: Release) -> None:
        """Point `current` at `release` atomically: readers see the old release or the new one, never neither."""
        temp = self.root.path / CURRENT_TEMP
        temp.unlink(missing_ok=True)
        os.symlink(f"{self.root.releases.name}/{release.label}", temp)
        crash_point("current-link")
        os.replace(temp, self.root.current)
        fsync_dir(self.root.path)

    def rollback(self, label: str | None = None) -> tuple[Release | None, Release]:
        """Switch `current` back to `label`, or to the release installed before the current one.

        Returns (from, to). Raises ReleaseError when there is nothing to go back to; AuditTrailError when the
        switch cannot be recorded (then `current` is switched back).
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
        fsync_dir(directory.parent)
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
            fsync_dir(store)
        return removed, freed
