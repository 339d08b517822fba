"""`bundle install`: a verified bundle becomes the live release, and nothing half-done is ever live.

The order is the safety argument (each step's name is also a crash point, `bundler.crashpoints`):

1. Check, writing nothing: the trust store is usable; `manifest.json` is signed by `threshold` trusted keys, not
   expired, of a known format, with safe paths; the bundle holds exactly the listed files at their signed sizes;
   rollback protection, appliance-wide: the bundle carries the name this appliance runs (another name is
   `--replace-name`, asked on a terminal and recorded, never a side effect) and a version above every version of
   that name this host has had (or `--allow-downgrade`, confirmed); a delta's base blobs are in the store; the
   content can form a release (one policy at most, distinct model names, wheels for this Python).
2. Stage, writing only under `<root>/staging/`: blobs the store already holds are re-hashed there, every byte (a
   store blob is never trusted by its size; a delta's base blob that fails is a refusal, a carried one is taken
   from the bundle instead); the free space is checked against what is left to copy; each new blob is joined from
   its parts while every part's and the whole blob's sha256 are checked, in one pass, into a temporary file that is
   fsync'd and renamed; the bundle's copy of the blobs not copied is hashed too. Then the release is built beside
   them: manifest, policy (its bytes checked against the signed digest as they are read), model links, the offline
   venv from the bundled wheels, the service files, `release.json`, every mode set explicitly (not by the umask).
   A refusal here (tampered part, pip refusing a wheel) removes the staging directory: `<root>` is as it was.
3. Commit: blobs are renamed into the store (content-addressed, so extra ones are harmless), the release directory is
   renamed into `releases/` (one rename: it is there whole or not at all), the version floor is raised, the install
   is recorded, and `current` is switched atomically. Only then are old releases and unused blobs collected.

A crash anywhere leaves `current` on the previous release, untouched; running the same install again finishes the
job: leftovers in staging are discarded, blobs already in the store are not copied again, a release already placed
is only activated.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from sealbox.bundler.audit_trail import record
from sealbox.bundler.blobs import assemble, check_store_blob
from sealbox.bundler.digests import ExpectedBytes
from sealbox.bundler.crashpoints import crash_point
from sealbox.bundler.delta import require_base_blobs
from sealbox.bundler.errors import BundleError, IntegrityError, PathError
from sealbox.bundler.evaluation_gate import already_passed, gate_release
from sealbox.bundler.manifest import BlobEntry, Manifest
from sealbox.bundler.offline_venv import VenvError, WheelFile, build_offline_venv, wheel_identity
from sealbox.bundler.progress import Progress, SilentProgress
from sealbox.bundler.releases import GcResult, InstallRecord, Release, Releases, policy_in_force, release_dir_name
from sealbox.bundler.sources import model_license
from sealbox.bundler.service_files import ServiceContext, ServiceFileError, write_service_files
from sealbox.bundler.mesh_keys import KeyPackage
from sealbox.runtime.mesh.host_identity import MeshIdentityError
from sealbox.bundler.trust import TrustStore, TrustStoreError
from sealbox.bundler.verify import VerifiedManifest, check_layout, check_parts, list_bundle, open_manifest, read_manifest_file
from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.policy import Policy, PolicyError, default_policy_text
from sealbox.runtime.regular_file import read_regular
from sealbox.runtime.release import (
    INSTALL_FILE,
    MANIFEST_FILE,
    POLICY_FILE,
    RELEASE_FILE,
    ModelLink,
    ReleaseRecord,
    is_model_directory_file,
    store_link_target,
)
from sealbox.runtime.sizes import format_size
from sealbox.runtime.durable_file import fsync_directory
from sealbox.runtime.exit_codes import ExitCode

STAGE_PREFIX = "install-"
RESERVED = frozenset({RELEASE_FILE, INSTALL_FILE, MANIFEST_FILE, POLICY_FILE, "models", "venv", "service", "evaluation.json"})


class RollbackError(BundleError):
    """The bundle's version is not above the highest version of its name this host has installed."""

    exit_code = ExitCode.ROLLBACK


class DowngradeDeclinedError(RollbackError):
    """`--allow-downgrade` was given but the operator did not confirm it."""

    exit_code = ExitCode.DECLINED


class NameChangeError(RollbackError):
    """The bundle's name is not the one this appliance runs: replacing it is `--replace-name`, confirmed, not an install."""


class NameChangeDeclinedError(DowngradeDeclinedError):
    """`--replace-name` was given but the operator did not confirm it (no terminal to answer on, or no)."""


class FreeSpaceError(BundleError):
    """The store's filesystem has less free space than the blobs to copy need; nothing was written."""

    exit_code = ExitCode.FREE_SPACE


class ReleaseContentError(BundleError):
    """The bundle verifies but cannot form a release here (two policies, clashing model names, wheels for
    another Python, a policy this host's sealbox rejects)."""

    exit_code = ExitCode.RELEASE_CONTENT


Confirm = Callable[[str], bool]


@dataclass(frozen=True, kw_only=True)
class InstallRequest:
    bundle: Path
    root: HostRoot
    allow_downgrade: bool = False
    confirm: Confirm | None = None
    """Asked (with a one-line question) before a downgrade; None refuses every downgrade that needs confirming."""
    replace_name: bool = False
    """Install a bundle whose name differs from the one this appliance runs (asks `confirm_name`; recorded)."""
    confirm_name: Confirm | None = None
    """Asked before the appliance's bundle name is replaced; None refuses the replacement."""
    now: datetime | None = None
    keep: int | None = None
    """Releases kept after the install (default: the installed policy's `releases.keep`)."""
    skip_eval: bool = False
    """Activate without running the bundle's evaluation suite (asked through `confirm_skip_eval`; recorded)."""
    confirm_skip_eval: Confirm | None = None
    """Asked before `skip_eval` takes effect; None refuses the skip."""
    mesh_host: str | None = None
    """This host's name in the policy's `[mesh]`: the walls are rendered for its peers."""
    mesh_keys: Path | None = None
    """This host's key package: refused before the release is placed unless the policy's mesh CA issued it for
    `mesh_host` (the CLI installs it once the release is live)."""


@dataclass(frozen=True)
class InstallResult:
    release: Release
    previous: str | None
    manifest_sha256: str
    resumed: bool
    """The release was already on disk (placed by an interrupted run, or an older release activated again): this
    run checked the bundle and activated it, copying nothing."""
    activated: bool
    downgrade: bool
    blobs_copied: int
    bytes_copied: int
    blobs_present: int
    venv: bool
    gc: GcResult | None
    seconds: float
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": True,
            "release": self.release.label,
            "directory": str(self.release.directory),
            "name": self.release.release.name,
            "version": self.release.release.version,
            "manifest_sha256": self.manifest_sha256,
            "previous": self.previous,
            "resumed": self.resumed,
            "activated": self.activated,
            "downgrade": self.downgrade,
            "blobs_copied": self.blobs_copied,
            "bytes_copied": self.bytes_copied,
            "blobs_present": self.blobs_present,
            "venv": self.venv,
            "gc": self.gc.to_dict() if self.gc else None,
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class ReleasePlan:
    """Where each blob of the manifest goes in the release, decided before anything is written."""

    models: tuple[tuple[BlobEntry, str], ...]
    """(entry, `models/<file>`)."""
    policy: BlobEntry | None
    wheels: tuple[tuple[BlobEntry, str], ...]
    """(entry, wheel file name)."""
    files: tuple[tuple[BlobEntry, str], ...]
    """(entry, release-relative path) for plain files and the SBOM."""


def plan_release(manifest: Manifest) -> ReleasePlan:
    """Raises ReleaseContentError when the manifest's content cannot be laid out as one release."""
    models: dict[str, BlobEntry] = {}
    directory_files = []
    for entry in manifest.entries("model"):
        if is_model_directory_file(entry.meta):  # a vLLM model's file: kept at its path, verified like any file
            parts = PurePosixPath(entry.path).parts
            if len(parts) != 3 or parts[0] != "models" or any(part in (".", "..") for part in parts):
                raise ReleaseContentError(f"{entry.path}: a model directory's file must be models/<dir>/<file>")
            directory_files.append((entry, entry.path))
            continue
        name = PurePosixPath(entry.path).name
        if name in models:
            raise ReleaseContentError(f"models {models[name].path} and {entry.path} would both be models/{name}")
        models[name] = entry
    policies = manifest.entries("policy")
    if len(policies) > 1:
        raise ReleaseContentError(f"the bundle carries {len(policies)} policies ({', '.join(p.path for p in policies)}); "
                                  "which is in force would be ambiguous")
    wheels: dict[str, BlobEntry] = {}
    for entry in manifest.entries("wheel"):
        filename = PurePosixPath(entry.path).name
        try:
            wheel_identity(filename)
        except ValueError as exc:
            raise ReleaseContentError(f"{entry.path}: {exc}") from exc
        if filename in wheels:
            raise ReleaseContentError(f"wheels {wheels[filename].path} and {entry.path} have the same file name")
        wheels[filename] = entry
    files = directory_files
    for entry in manifest.blobs:
        if entry.role in ("file", "sbom", "eval"):
            if PurePosixPath(entry.path).parts[0] in RESERVED:
                raise ReleaseContentError(f"{entry.path}: the release keeps that name for itself")
            files.append((entry, entry.path))
    if wheels:
        host = f"{sys.version_info.major}.{sys.version_info.minor}"
        if manifest.target.python != host:
            raise ReleaseContentError(
                f"the bundle's wheels are for Python {manifest.target.python}; this host's sealbox runs Python {host}"
            )
    return ReleasePlan(
        models=tuple((entry, f"models/{name}") for name, entry in models.items()),
        policy=policies[0] if policies else None,
        wheels=tuple((entry, filename) for filename, entry in wheels.items()),
        files=tuple(files),
    )


def check_sizes(directory: Path, manifest: Manifest) -> None:
    """Every carried part has its signed size (by `stat`): a truncated copy is refused before anything is written."""
    for entry in manifest.carried():
        for index, name in enumerate(entry.part_files()):
            ExpectedBytes.of_part(entry, index).check_size(os.lstat(directory / name).st_size)


def _unique(entries: list[BlobEntry]) -> list[BlobEntry]:
    return list({entry.sha256: entry for entry in entries}.values())


def _store_holds(store: Path, entry: BlobEntry, on_bytes: Callable[[int], None] | None = None) -> bool:
    """Whether the store's copy of `entry` is exactly the signed bytes: every byte re-hashed, never trusted by size
    (a local user who flips a byte of a store blob must not get it into the next release)."""
    try:
        check_store_blob(store, entry, on_bytes)
    except (FileNotFoundError, IntegrityError, PathError):
        return False
    return True


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _seal_modes(tree: Path) -> None:
    """Modes set explicitly, whatever the umask: directories 0755, files 0644 (0755 when executable), symlinks as is."""
    for directory, dirs, files in os.walk(tree):
        os.chmod(directory, 0o755)
        for name in files:
            path = Path(directory) / name
            info = path.lstat()
            if not os.path.islink(path):
                os.chmod(path, 0o755 if info.st_mode & 0o111 else 0o644)


def _now_text(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class _Stage:
    """`<root>/staging/install-<label>/`: new blobs under `blobs/`, the release under `release/`, pip's work in `work/`."""

    root: HostRoot
    label: str
    copied: list[BlobEntry] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.root.staging / f"{STAGE_PREFIX}{self.label}"

    @property
    def blobs(self) -> Path:
        return self.path / "blobs"

    @property
    def release(self) -> Path:
        return self.path / "release"

    def open(self) -> None:
        if self.path.exists():  # an interrupted run's leftovers: never trusted, always rebuilt
            shutil.rmtree(self.path)
        self.blobs.mkdir(parents=True)
        self.release.mkdir()

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            self.root.staging.rmdir()  # only when empty: a refusal must leave no trace, a finished install neither
        except OSError:
            pass

    def blob(self, entry: BlobEntry) -> Path:
        """Where the verified bytes of `entry` are now: staged by this run, or already in the store."""
        staged = self.blobs / entry.sha256
        return staged if staged.exists() else self.root.store / entry.sha256


class Installer:
    """One install of one bundle into one root. Use `install_bundle`."""

    def __init__(self, request: InstallRequest, progress: Progress) -> None:
        self.request = request
        self.root = request.root
        self.directory = request.bundle.absolute()
        self.progress = progress
        self.releases = Releases(self.root)
        self.notes: list[str] = []
        self.verified: VerifiedManifest | None = None
        self.manifest_bytes = b""

    # -- 1. check ------------------------------------------------------------------------------------------------

    def check(self) -> tuple[VerifiedManifest, ReleasePlan]:
        trust = TrustStore(self.root).policy()
        self.progress.step("checking signatures, expiry and layout")
        self.manifest_bytes = read_manifest_file(self.directory)
        verified = open_manifest(
            self.manifest_bytes,
            trusted=trust.keys,
            threshold=trust.threshold,
            now=self.request.now or datetime.now(timezone.utc),
        )
        self.verified = verified
        manifest = verified.manifest
        check_layout(manifest, list_bundle(self.directory))
        check_sizes(self.directory, manifest)
        return verified, plan_release(manifest)

    def check_version(self, verified: VerifiedManifest) -> tuple[Release | None, bool, str | None]:
        """(the release of this very bundle if one is already placed, whether this is a confirmed downgrade, the
        bundle name this install replaces when `--replace-name` was confirmed).

        Rollback protection is appliance-wide: the bundle must carry the name this appliance runs (another name is a
        deliberate, confirmed replacement, never a side effect), and a version above every version of its name.

        Raises:
            NameChangeError: another name than the appliance runs, without `--replace-name`.
            NameChangeDeclinedError: `--replace-name` was given, the operator did not confirm.
            RollbackError: the version is not above the highest installed, or the same version holds another bundle.
            DowngradeDeclinedError: `--allow-downgrade` was given, the operator did not confirm.
        """
        manifest = verified.manifest
        label = release_dir_name(manifest.name, manifest.version)
        placed = self.releases.load(self.root.releases / label)
        if placed is not None:
            if placed.install.manifest_sha256 != verified.sha256:
                raise RollbackError(
                    f"releases/{label} already holds a different bundle of {manifest.name} version {manifest.version} "
                    f"(manifest {placed.install.manifest_sha256[:16]}, this one {verified.sha256[:16]}); "
                    "a version is installed once"
                )
        floor = self.releases.floor()
        replaces = self._check_name(floor.name, manifest.name, manifest.version)
        highest = floor.highest(manifest.name)
        # Re-running the install of the newest version (after a crash) is not a downgrade; activating an older
        # release that is still on disk is, and needs the same confirmation as installing one.
        if highest is None or manifest.version > highest or (placed is not None and manifest.version == highest):
            return placed, False, replaces
        question = (
            f"{manifest.name} version {manifest.version} is not above version {highest}, already installed here; "
            "install it anyway (downgrade)?"
        )
        if not self.request.allow_downgrade:
            raise RollbackError(
                f"rollback protection: {manifest.name} version {manifest.version} is not above version {highest}, "
                "the highest installed here (use --allow-downgrade to install it on purpose)"
            )
        if self.request.confirm is None or not self.request.confirm(question):
            raise DowngradeDeclinedError(
                f"downgrade of {manifest.name} to version {manifest.version} (from {highest}) was not confirmed"
            )
        return placed, True, replaces

    def _check_name(self, running: str | None, name: str, version: int) -> str | None:
        if running is None or running == name:
            return None
        if not self.request.replace_name:
            raise NameChangeError(
                f"rollback protection: this appliance runs bundles named {running}; {name} version {version} would "
                f"replace it (use --replace-name to replace the appliance's bundle on purpose: asked and recorded)"
            )
        question = f"replace the bundle this appliance runs, {running}, with {name} version {version}?"
        if self.request.confirm_name is None or not self.request.confirm_name(question):
            raise NameChangeDeclinedError(f"replacing {running} with {name} version {version} was not confirmed")
        return running

    # -- 2. stage ------------------------------------------------------------------------------------------------

    def stage_blobs(self, stage: _Stage, manifest: Manifest) -> int:
        """Copy into staging every blob the store does not hold exactly (absent, or not the signed bytes), checking
        every byte; re-hash the store's copy of the others, and of a delta's base blobs; check the bundle's copy of
        every carried blob either way. Returns the number of carried blobs the store already held.

        Raises:
            IntegrityError, PathError: a part of the bundle, or a base blob the bundle does not carry, is not the
                signed bytes.
            FreeSpaceError: the blobs to copy do not fit on the store's filesystem (checked before copying).
        """
        carried = _unique(manifest.carried())
        stored = [entry for entry in carried if os.path.lexists(self.root.store / entry.sha256)]
        base = [entry for entry in _unique(manifest.blobs) if entry.in_base and entry.sha256 not in {e.sha256 for e in carried}]
        reused: list[BlobEntry] = []
        with self.progress.bytes(f"re-checking {len(stored) + len(base)} blob(s) in the store",
                                 sum(e.size for e in stored + base)) as advance:  # fmt: skip
            for entry in stored:
                if _store_holds(self.root.store, entry, advance):
                    reused.append(entry)
                else:
                    self.notes.append(f"the store's copy of {entry.path} was not the signed bytes: replaced")
            for entry in base:
                check_store_blob(self.root.store, entry, advance)  # a delta cannot replace what it does not carry
        kept = {entry.sha256 for entry in reused}
        new = [entry for entry in carried if entry.sha256 not in kept]
        total = sum(entry.size for entry in new)
        free = _free_bytes(self.root.store)
        if total > free:
            raise FreeSpaceError(
                f"the store needs {total} bytes ({format_size(total)}) for {len(new)} new blob(s); its filesystem has "
                f"{free} bytes ({format_size(free)}) free at {self.root.path}"
            )
        with self.progress.bytes(f"copying {len(new)} blob(s) into the store", total) as advance:
            for entry in new:
                started = [False]

                def on_bytes(count: int, started: list[bool] = started) -> None:
                    advance(count)
                    if not started[0]:
                        started[0] = True
                        crash_point("blob-copy")

                assemble(self.directory, entry, stage.blobs / entry.sha256, on_bytes)
                stage.copied.append(entry)
        if reused:
            # Already in the store: not copied again, but the bundle is still verified completely.
            with self.progress.bytes(f"checking {len(reused)} blob(s) already in the store", 0) as advance:
                check_parts(self.directory, replace(manifest, blobs=tuple(reused)), on_bytes=advance)
        fsync_directory(stage.blobs)
        return len(reused)

    def build_release(
        self, stage: _Stage, verified: VerifiedManifest, plan: ReleasePlan, *, downgrade: bool, final: Path
    ) -> Policy:
        manifest = verified.manifest
        release = stage.release
        (release / MANIFEST_FILE).write_bytes(self.manifest_bytes)  # the signed envelope exactly as it arrived
        policy_text = self._policy_text(stage, plan.policy) if plan.policy else default_policy_text()
        try:
            policy = Policy.from_toml(policy_text, source=plan.policy.path if plan.policy else "policies/default.toml")
        except PolicyError as exc:
            raise ReleaseContentError(f"the bundle's policy is not valid for this sealbox: {exc}") from exc
        (release / POLICY_FILE).write_text(policy_text, encoding="utf-8")
        models = []
        for entry, path in plan.models:
            self._link(release, path, entry)
            models.append(ModelLink(PurePosixPath(path).stem, path, entry.sha256,
                                    license=model_license(entry.meta), origin=entry.provenance or None))  # fmt: skip
        for entry, path in plan.files:
            self._link(release, path, entry)
        venv = bool(plan.wheels)
        if venv:
            self.progress.step(f"installing {len(plan.wheels)} wheels into an offline virtualenv")
            wheels = [WheelFile(filename, entry.sha256, stage.blob(entry)) for entry, filename in plan.wheels]
            build_offline_venv(release / "venv", final=final / "venv", wheels=wheels, work=stage.path / "work")
            executable = final / "venv" / "bin" / "sealbox"
            crash_point("venv-built")
        else:
            executable = Path(os.path.abspath(sys.executable)).parent / "sealbox"
            self.notes.append(
                f"the bundle carries no wheels: no virtualenv was built; the service runs this host's sealbox ({executable})"
            )
        if self.request.mesh_keys is not None:
            try:
                KeyPackage.read(self.request.mesh_keys).verify(policy, self.request.mesh_host)
            except MeshIdentityError as exc:
                raise ReleaseContentError(f"mesh key package {self.request.mesh_keys}: {exc}") from exc
        context = ServiceContext.build(label=final.name, root=self.root.path, release_dir=final, executable=executable,
                                       policy=policy, mesh_host=self.request.mesh_host)  # fmt: skip
        write_service_files(release, context)
        install = InstallRecord(
            name=manifest.name,
            version=manifest.version,
            manifest_sha256=verified.sha256,
            installed_at=_now_text(datetime.now(timezone.utc)),
            signed_by=verified.signatures.valid,
            downgrade=downgrade,
            base_manifest_sha256=manifest.base.manifest_sha256 if manifest.base else None,
            venv=venv,
        )
        _write_json(release / INSTALL_FILE, install.to_dict())
        _write_json(release / RELEASE_FILE, ReleaseRecord(manifest.name, manifest.version, tuple(models)).to_dict())
        _seal_modes(release)
        return policy

    def _policy_text(self, stage: _Stage, entry: BlobEntry) -> str:
        """The policy's bytes as read for the release, checked against the signed digest (the bytes that go live)."""
        path = stage.blob(entry)
        data = read_regular(path, limit=max(entry.size, 1))
        expected = ExpectedBytes.of_blob(entry, str(path), what="the policy")
        expected.update(data)
        expected.finish()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ReleaseContentError(f"{entry.path}: the policy is not UTF-8 text: {exc}") from exc

    def _link(self, release: Path, path: str, entry: BlobEntry) -> None:
        # Relative, so `<root>` can be moved or mounted elsewhere: releases/<label>/<path> → store/sha256/<digest>.
        link = release / path
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(store_link_target(self.root, path, entry.sha256), link)

    def gate(self, release_dir: Path, models: dict[str, Path], blob: Callable[[BlobEntry], Path]) -> None:
        """The bundle's evaluation suite against this release, before `current` can point at it (`evaluation_gate`)."""
        assert self.verified is not None
        self.progress.step("evaluating the release in a staging server")
        outcome = gate_release(root=self.root, manifest=self.verified.manifest, manifest_sha256=self.verified.sha256,
                               release_dir=release_dir, models=models, blob=blob, skip=self.request.skip_eval,
                               confirm=self.request.confirm_skip_eval)  # fmt: skip
        self.notes.append(outcome.summary)

    # -- 3. commit -----------------------------------------------------------------------------------------------

    def fill_store(self, stage: _Stage) -> None:
        if not stage.copied:
            return
        if not self.root.store.exists():
            self.root.store.mkdir(parents=True)
            os.chmod(self.root.store.parent, 0o755)
            os.chmod(self.root.store, 0o755)
        for index, entry in enumerate(stage.copied):
            staged = stage.blobs / entry.sha256
            os.chmod(staged, 0o444)  # shared by every release that uses it: nobody edits a blob in place
            os.replace(staged, self.root.store / entry.sha256)
            if index == 0:
                crash_point("store-partial")
        fsync_directory(self.root.store)

    def run(self) -> InstallResult:
        started = time.perf_counter()
        verified, plan = self.check()
        manifest = verified.manifest
        label = release_dir_name(manifest.name, manifest.version)
        with self.releases.lock():
            placed, downgrade, replaces = self.check_version(verified)
            require_base_blobs(manifest, self.root.store)
            crash_point("verified")
            resumed = placed is not None
            stage = _Stage(self.root, label)
            stage.open()
            try:
                present = self.stage_blobs(stage, manifest)
                copied, bytes_copied = len(stage.copied), sum(entry.size for entry in stage.copied)
                crash_point("blobs-staged")
                final = self.root.releases / label
                if placed is None:
                    self.build_release(stage, verified, plan, downgrade=downgrade, final=final)
                    crash_point("release-staged")
                else:
                    self.progress.step(f"{label} is already on disk; checked the bundle and the store, activating it")
            except BaseException:
                stage.discard()
                raise
            if placed is None:
                # Before anything is placed: a failing suite leaves the release in staging and `current` as it was.
                self.gate(stage.release, {PurePosixPath(p).stem: stage.blob(e) for e, p in plan.models}, stage.blob)
            self.fill_store(stage)
            crash_point("store-filled")
            if placed is None:
                if not self.root.releases.exists():
                    self.root.releases.mkdir(parents=True)
                    os.chmod(self.root.releases, 0o755)
                self.releases.place(stage.release, label)
                crash_point("release-placed")
            stage.discard()
            if placed is None:
                placed = self.releases.load(final)
                assert placed is not None, f"{final} was placed whole"
            else:
                live = self.releases.current()
                if (live is None or live.label != placed.label) and not already_passed(placed.directory, verified.sha256):
                    models = {m.name: placed.directory / m.path for m in placed.release.models}
                    self.gate(placed.directory, models, lambda entry: self.root.store / entry.sha256)
            return self.activate(placed, verified, downgrade, resumed, started, copied, bytes_copied, present, replaces)

    def activate(
        self,
        release: Release,
        verified: VerifiedManifest,
        downgrade: bool,
        resumed: bool,
        started: float,
        copied: int,
        bytes_copied: int,
        present: int,
        replaces: str | None,
    ) -> InstallResult:
        manifest = verified.manifest
        policy = release.policy()
        if replaces is not None:
            record(self.root, "bundle.replace_name", policy, **{"from": replaces, "to": manifest.name},
                   version=manifest.version, manifest_sha256=verified.sha256)  # fmt: skip
        self.releases.raise_floor(manifest.name, manifest.version)
        fields = dict(
            name=manifest.name,
            version=manifest.version,
            manifest_sha256=verified.sha256,
            release=release.label,
            signed_by=list(verified.signatures.valid),
            downgrade=downgrade,
            base_manifest_sha256=manifest.base.manifest_sha256 if manifest.base else None,
        )
        record(self.root, "bundle.install", policy, **fields, resumed=resumed, replaces_name=replaces)
        previous = self.releases.current()
        activated = previous is None or previous.label != release.label
        if activated:
            self.releases.switch(release)
            try:
                record(
                    self.root,
                    "bundle.activate",
                    policy,
                    name=manifest.name,
                    version=manifest.version,
                    manifest_sha256=verified.sha256,
                    release=release.label,
                    previous=previous.label if previous else None,
                )
            except BaseException:
                if previous is not None:  # fail closed: an activation nobody recorded is undone
                    self.releases.switch(previous)
                raise
        crash_point("activated")
        keep = self.request.keep if self.request.keep is not None else policy.releases.keep
        collected = self.releases.gc(keep)
        return InstallResult(
            release=release,
            previous=previous.label if previous else None,
            manifest_sha256=verified.sha256,
            resumed=resumed,
            activated=activated,
            downgrade=downgrade,
            blobs_copied=copied,
            bytes_copied=bytes_copied,
            blobs_present=present,
            venv=release.install.venv,
            gc=collected,
            seconds=time.perf_counter() - started,
            notes=tuple(self.notes),
        )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def install_bundle(request: InstallRequest, progress: Progress | None = None) -> InstallResult:
    """Verify `request.bundle` against the host's trust store and make it the live release.

    Every refusal is recorded in the audit log as `bundle.refused` and leaves `<root>` as it was (apart from the log).

    Raises:
        BundleError: the bundle is refused (a verification failure, RollbackError, DowngradeDeclinedError,
            DeltaBaseError, ReleaseContentError).
        TrustStoreError: the trust store is empty or unusable.
        VenvError, ServiceFileError: the release could not be built (nothing went live; also recorded as refused).
        ReleaseError: another install holds the root.
        AuditTrailError: an event could not be recorded (the install is not activated).
        OSError: the disk failed; re-run the install once fixed.
    """
    installer = Installer(request, progress or SilentProgress())
    try:
        return installer.run()
    except (BundleError, TrustStoreError, VenvError, ServiceFileError) as exc:
        _record_refusal(installer, exc)
        raise


def _record_refusal(installer: Installer, error: Exception) -> None:
    fields: dict[str, Any] = {
        "bundle": str(installer.directory),
        "error": type(error).__name__,
        "exit_code": getattr(error, "exit_code", 1),
        "reason": str(error),
    }
    if installer.verified is not None:
        manifest = installer.verified.manifest
        fields |= {"name": manifest.name, "version": manifest.version, "manifest_sha256": installer.verified.sha256}
    try:
        policy = policy_in_force(installer.root)
    except Exception:  # a refusal is recorded even when the live policy cannot be read
        policy = Policy.default()
    record(installer.root, "bundle.refused", policy, **fields)
