"""The release's own Python environment, built on the isolated host from the bundle's wheels and nothing else.

pip runs with `--no-index` (no network, no index), `--find-links` pointing at the bundle's wheels only,
`--require-hashes` over a requirements file generated from the signed manifest (every wheel pinned by name, version
and sha256), `--only-binary :all:` (nothing is built here) and `--isolated` (no user or site pip configuration can
add an index). The environment has no pip of its own: the host's pip installs into it through `--python`.

The venv is built in staging and then renamed into `releases/`, but virtualenvs write their own absolute path into
their scripts (`#!<venv>/bin/python`, `activate`); `relocate` rewrites that path to the final one before the rename,
so the scripts are right the moment the release appears.
"""

from __future__ import annotations

import os
import subprocess
import sys
from sealbox.runtime.exit_codes import ExitCode
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename


class VenvError(Exception):
    """The offline environment could not be built (pip refused the wheels, or venv failed); nothing went live."""

    exit_code = ExitCode.VENV


@dataclass(frozen=True)
class WheelFile:
    filename: str
    """The wheel's own file name (`name-version-tags.whl`): pip reads name, version and tags from it."""
    sha256: str
    blob: Path
    """Where its verified bytes are (staging or the store)."""


def wheel_identity(filename: str) -> tuple[str, str]:
    """(canonical project name, version) of a wheel file name; raises ValueError for a name pip would not accept."""
    try:
        name, version, _build, _tags = parse_wheel_filename(filename)
    except InvalidWheelFilename as exc:
        raise ValueError(f"{filename!r} is not a valid wheel file name: {exc}") from exc
    return str(name), str(version)


def requirements_text(wheels: list[WheelFile]) -> str:
    """One pinned line per project with the hash of every wheel of it (several platforms' wheels may travel).

    Raises ValueError when two versions of one project are in the bundle: the environment would be ambiguous.
    """
    hashes: dict[str, set[str]] = defaultdict(set)
    versions: dict[str, set[str]] = defaultdict(set)
    for wheel in wheels:
        name, version = wheel_identity(wheel.filename)
        hashes[name].add(wheel.sha256)
        versions[name].add(version)
    lines = []
    for name in sorted(hashes):
        if len(versions[name]) > 1:
            raise ValueError(f"the bundle carries {name} in versions {sorted(versions[name])}; one version per project")
        (version,) = versions[name]
        pins = " ".join(f"--hash=sha256:{digest}" for digest in sorted(hashes[name]))
        lines.append(f"{canonicalize_name(name)}=={version} {pins}")
    return "\n".join(lines) + "\n"


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR:")]
        detail = " | ".join(errors or lines[-3:]) or "no output"
        raise VenvError(f"{what} failed (exit {result.returncode}): {detail}")


def build_offline_venv(target: Path, *, final: Path, wheels: list[WheelFile], work: Path) -> None:
    """Create a virtualenv at `target` holding exactly `wheels`, with scripts already pointing at `final`.

    Raises:
        VenvError: venv or pip failed (message ends with pip's last lines), or the wheels are ambiguous.
    """
    links = work / "find-links"
    links.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        # pip needs the wheel's real file name; the store names bytes by digest. A symlink costs no copy.
        os.symlink(wheel.blob.absolute(), links / wheel.filename)
    try:
        requirements = requirements_text(wheels)
    except ValueError as exc:
        raise VenvError(str(exc)) from exc
    (work / "requirements.txt").write_text(requirements, encoding="utf-8")
    _run([sys.executable, "-m", "venv", "--without-pip", str(target)], "python -m venv")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(target / "bin" / "python"),
            "install",
            "--isolated",
            "--no-input",
            "--disable-pip-version-check",
            "--no-cache-dir",
            "--no-index",
            "--find-links",
            str(links),
            "--only-binary",
            ":all:",
            "--require-hashes",
            "--no-warn-script-location",
            "-r",
            str(work / "requirements.txt"),
        ],
        "pip install --no-index --require-hashes",
    )
    relocate(target, final)


def relocate(venv: Path, final: Path) -> int:
    """Rewrite `venv`'s own absolute path to `final` in its scripts and `pyvenv.cfg`; returns files changed."""
    old, new = os.fsencode(venv.absolute()), os.fsencode(final)
    candidates = [venv / "pyvenv.cfg"]
    candidates += [item for item in (venv / "bin").iterdir() if item.is_file() and not item.is_symlink()]
    changed = 0
    for path in candidates:
        data = path.read_bytes()
        if old not in data or b"\0" in data:  # text only: a binary would break if a string changed length
            continue
        mode = path.stat().st_mode
        path.write_bytes(data.replace(old, new))
        os.chmod(path, mode)
        changed += 1
    return changed
