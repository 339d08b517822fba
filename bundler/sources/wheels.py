"""Wheels for the TARGET host: resolved by pip for the target's Python and platform, never for this one.

pip does the resolving (`pip download --only-binary=:all: --python-version … --platform … --abi …`), so wheel tags
and `Requires-Python` are checked for the isolated host, and `--wheelhouse` directories join the search as
`--find-links`. pip's own configuration (index, find-links, cache) is used as it is. pip (25.3) evaluates environment
markers (`; python_version < "3.11"`) against the interpreter it runs in, though, whatever `--python-version` says; so
when the target differs from this host, pip runs under a few-line shim that gives its marker evaluation the target's
values (`marker_environment`), and a dependency is fetched exactly when the target would install it.

A project that publishes only an sdist (llama-cpp-python does) has no wheel pip could download. When this host can
stand in for the target (same Python, a platform tag the target accepts), it is built here with `pip wheel --no-deps`
(pip's wheel cache makes a rebuild instant) and the resolution runs again with it; otherwise a `--wheelhouse` must hold
a wheel of it built on a host like the target, and without one it is refused, naming the package and why.

pip's output stays in the work directory's pipes; when pip fails, the last lines of its stderr end the error.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.message import Message
from collections.abc import Sequence
from pathlib import Path

from packaging import tags
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

from sealbox.bundler.errors import InputError
from sealbox.bundler.manifest import Target
from sealbox.bundler.sources import Artifact

REPO_ROOT = Path(__file__).resolve().parents[2]
SEALBOX_EXTRAS = ("engine",)
"""The sealbox wheel travels with its inference engine: a release without llama-cpp-python could not serve."""
PIP_TIMEOUT_S = 3600
"""A cold llama.cpp build takes minutes on a small host; a hung index should still end some day."""
ERROR_TAIL_LINES = 8
_MAX_BUILDS = 64
_NO_MATCH = re.compile(r"No matching distribution found for (.+)$", re.MULTILINE)
_LINUX_ARCH = re.compile(r"(?:many|musl)?linux(?:1|2010|2014|_\d+_\d+)?_(.+)")
_MACOS_ARCH = re.compile(r"macosx_\d+_\d+_(.+)")
_WINDOWS = {"win32": "x86", "win_amd64": "AMD64", "win_arm64": "ARM64"}
_IMPLEMENTATIONS = {"cp": ("cpython", "CPython"), "pp": ("pypy", "PyPy")}
_MARKER_SHIM = """
import json, sys
try:
    from pip._vendor.packaging import markers
    from pip._internal.cli.main import main
except ImportError as exc:
    sys.exit(f"ERROR: this pip cannot evaluate markers for another target ({exc}); use a pip like 25.3")
target = json.loads(sys.argv.pop(1))
host = markers.default_environment
markers.default_environment = lambda: {**host(), **target}
sys.exit(main(sys.argv[1:]))
"""
_LICENSE_CLASSIFIER = "License :: "
_MAX_LICENSE_FIELD = 120  # longer `License:` values are the license's full text, not its name


def collect_wheels(
    *,
    requirements: list[Path],
    wheels: list[str],
    wheelhouses: list[Path],
    target: Target,
    work_dir: Path,
    include_sealbox: bool,
    prebuilt: Sequence[tuple[Path, str]] = (),
    sealbox_extras: Sequence[str] = SEALBOX_EXTRAS,
) -> list[Artifact]:
    """Every wheel the target needs for `requirements` files, `wheels` (requirement strings or wheel paths) and, with
    `include_sealbox`, sealbox itself: dependencies included, one Artifact (role `wheel`) per file, in name order.

    With only `wheelhouses` given, every wheel in them is a requirement. `work_dir` is emptied first: files left by an
    interrupted run with other inputs must not join this one. `prebuilt` wheels (path, provenance), built here for
    the target (the CUDA engine), join the search with their own platform tags. `sealbox_extras` are the extras
    sealbox's wheel is installed with (none for a vLLM bundle: vLLM is the engine there, not llama.cpp).

    Raises:
        InputError: a requirements file or wheelhouse is missing; a requirement has no wheel for the target and cannot
            be built here (the message names it and says why); pip failed (its last lines end the message).
    """
    _check_inputs(requirements, wheelhouses)
    if work_dir.exists():
        shutil.rmtree(work_dir)
    download, built_dir = work_dir / "download", work_dir / "built"
    download.mkdir(parents=True)
    built_dir.mkdir()
    specs = list(wheels)
    built: dict[str, str] = {}  # file name of each wheel made here (from an sdist, or sealbox's own) -> provenance
    for wheel, provenance in prebuilt:
        shutil.copy2(wheel, built_dir / wheel.name)
        built[wheel.name] = provenance
    if include_sealbox:
        sealbox = build_sealbox_wheel(work_dir / "sealbox-source", built_dir)
        built[sealbox.name] = f"{REPO_ROOT} (sealbox, built from its source tree)"
        specs.append(f"{sealbox}[{','.join(sealbox_extras)}]" if sealbox_extras else str(sealbox))
    if not requirements and not wheels:
        specs += [str(path) for house in wheelhouses for path in sorted(house.glob("*.whl"))]
    if not requirements and not specs:
        return []

    platforms = list(target.platforms) or list(tags.platform_tags())  # none given: this host's, as pip would
    platforms += [tag.platform for wheel, _ in prebuilt for tag in _wheel_tags(wheel) if tag.platform not in ("any", *platforms)]
    tried: set[str] = set()
    for _ in range(_MAX_BUILDS):
        result = _pip_download(requirements, specs, wheelhouses + [built_dir], target, platforms, download)
        if result.returncode == 0:
            break
        missing = _missing_requirement(result.stderr)
        if missing is None:
            raise InputError(f"pip could not collect the wheels for {_describe(target)}:\n{_tail(result.stderr)}")
        name = canonicalize_name(missing.name)
        if name in tried:
            raise InputError(
                f"{missing}: built here, but pip still finds no wheel of it for {_describe(target)}:\n"
                f"{_tail(result.stderr)}"
            )
        tried.add(name)
        wheel = _build_from_sdist(missing, target, wheelhouses, built_dir)
        built[wheel.name] = _sdist_origin(wheel, wheelhouses)
        # This host stands in for the target, so its own platform tag (e.g. linux_x86_64) is one the target accepts.
        platforms += [tag.platform for tag in _wheel_tags(wheel) if tag.platform not in ("any", *platforms)]
    else:
        raise InputError(f"more than {_MAX_BUILDS} packages without a wheel for {_describe(target)}; giving up")
    return [_artifact(path, built.get(path.name), wheelhouses) for path in sorted(download.glob("*.whl"))]


def host_stands_in_for(target: Target) -> str | None:
    """Why a wheel built on this host might not install on the target, or None when this host can build for it."""
    host_python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if target.python != host_python:
        return f"this host runs Python {host_python}, the target {target.python}"
    if target.implementation != tags.interpreter_name():
        return f"this host runs {tags.interpreter_name()}, the target {target.implementation}"
    abi = target.abi or f"{target.implementation}{target.python.replace('.', '')}"
    ours = {(tag.abi, tag.platform) for tag in tags.sys_tags()}
    if target.platforms and not any((abi, platform) in ours for platform in target.platforms):
        return f"this host ({next(iter(tags.sys_tags()))}) matches none of the target's {abi} platform tags"
    return None


def marker_environment(target: Target) -> dict[str, str]:
    """The PEP 508 marker values the target's Python and first platform tag tell (python_version, sys_platform,
    platform_machine, …). Values they do not tell are assumed: a patch level of `.0` for another Python, this host's
    `platform_release`."""
    version = target.python
    host_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    full = _full_version() if version == host_version else f"{version}.0"
    environment = {"python_version": version, "python_full_version": full}
    if target.implementation in _IMPLEMENTATIONS:
        name, label = _IMPLEMENTATIONS[target.implementation]
        environment |= {"implementation_name": name, "platform_python_implementation": label}
        environment["implementation_version"] = full
    platform = target.platforms[0] if target.platforms else next(iter(tags.platform_tags()), "any")
    if match := _LINUX_ARCH.fullmatch(platform):
        environment |= {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix"}
        environment["platform_machine"] = match.group(1)
    elif match := _MACOS_ARCH.fullmatch(platform):
        environment |= {"sys_platform": "darwin", "platform_system": "Darwin", "os_name": "posix"}
        if match.group(1) in ("arm64", "x86_64"):
            environment["platform_machine"] = match.group(1)
    elif platform in _WINDOWS:
        environment |= {"sys_platform": "win32", "platform_system": "Windows", "os_name": "nt"}
        environment["platform_machine"] = _WINDOWS[platform]
    return environment


def _full_version() -> str:
    return ".".join(str(part) for part in sys.version_info[:3])


def _host_marker_environment() -> dict[str, str]:
    from packaging.markers import default_environment

    return dict(default_environment())


def build_sealbox_wheel(source: Path, out: Path) -> Path:
    """sealbox's own wheel, built by `pip wheel --no-deps` from a clean copy of the tree it runs from.

    A copy, so the build neither writes `build/` into the tree nor packs a module deleted there since the last build
    (setuptools' `build/lib` keeps it).

    Raises:
        InputError: sealbox is not running from a source tree, or the build failed.
    """
    copy_source_tree(REPO_ROOT, source)
    result = _pip(["wheel", "--no-deps", "--wheel-dir", str(out), str(source)], "pip wheel (sealbox)")
    if result.returncode != 0:
        raise InputError(f"could not build the sealbox wheel from {REPO_ROOT}:\n{_tail(result.stderr)}")
    (wheel,) = [path for path in out.glob("*.whl") if canonicalize_name(parse_wheel_filename(path.name)[0]) == "sealbox"]
    return wheel


def copy_source_tree(root: Path, into: Path) -> Path:
    """The files a build of `root` reads: its top-level files and the folders pyproject.toml's `package-dir` maps.

    Raises:
        InputError: `root` has no pyproject.toml (sealbox was installed from a wheel, not run from its tree).
    """
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        raise InputError(
            f"{root}: no pyproject.toml, so sealbox cannot build its own wheel here; "
            "pass --no-sealbox-wheel, or put a sealbox wheel in a --wheelhouse and name it with --wheel"
        )
    config = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    package_dirs = set(config.get("tool", {}).get("setuptools", {}).get("package-dir", {}).values())
    if into.exists():
        shutil.rmtree(into)
    into.mkdir(parents=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for item in sorted(root.iterdir()):
        if item.name.startswith(".") or item.name.endswith(".egg-info"):
            continue
        if item.is_file():
            shutil.copy2(item, into / item.name)
        elif item.is_dir() and item.name in package_dirs:
            shutil.copytree(item, into / item.name, ignore=skip)
    return into


def wheel_license(metadata: Message) -> str | None:
    """The license a wheel's METADATA states: License-Expression, else a short License field, else the classifiers."""
    expression = (metadata.get("License-Expression") or "").strip()
    if expression:
        return expression
    field = (metadata.get("License") or "").strip()
    if field and "\n" not in field and len(field) <= _MAX_LICENSE_FIELD and field.upper() != "UNKNOWN":
        return field
    names = [
        value.split("::")[-1].strip()
        for value in metadata.get_all("Classifier") or []
        if value.startswith(_LICENSE_CLASSIFIER) and value.count("::") >= 2
    ]
    return "; ".join(dict.fromkeys(names)) or None


def read_wheel_metadata(path: Path) -> Message:
    """The `*.dist-info/METADATA` of a wheel, parsed as the email-style headers it is.

    Raises:
        InputError: not a zip, or no single METADATA at the top level.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = [name for name in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", name)]
            if len(names) != 1:
                raise InputError(f"{path.name}: not a wheel (expected one *.dist-info/METADATA, found {len(names)})")
            raw = archive.read(names[0])
    except zipfile.BadZipFile as exc:
        raise InputError(f"{path.name}: not a wheel ({exc})") from exc
    return email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw)


def _check_inputs(requirements: list[Path], wheelhouses: list[Path]) -> None:
    for path in requirements:
        if not path.is_file():
            raise InputError(f"{path}: no such requirements file")
    for house in wheelhouses:
        if not house.is_dir():
            raise InputError(f"{house}: --wheelhouse is not a directory")


def _target_args(target: Target, platforms: list[str]) -> list[str]:
    abi = target.abi or f"{target.implementation}{target.python.replace('.', '')}"
    args = ["--only-binary=:all:", "--python-version", target.python, "--implementation", target.implementation]
    args += ["--abi", abi]
    for platform in platforms:
        args += ["--platform", platform]
    return args


def _pip_download(
    requirements: list[Path],
    specs: list[str],
    find_links: list[Path],
    target: Target,
    platforms: list[str],
    dest: Path,
) -> subprocess.CompletedProcess[str]:
    args = ["download", "--progress-bar", "off", "--dest", str(dest), *_target_args(target, platforms)]
    for folder in find_links:
        args += ["--find-links", str(folder.absolute())]
    for path in requirements:
        args += ["--requirement", str(path)]
    markers = marker_environment(target)
    host = _host_marker_environment()
    differs = any(host.get(key) != value for key, value in markers.items())
    return _pip([*args, *specs], "pip download", markers=markers if differs else None)


def _missing_requirement(stderr: str) -> Requirement | None:
    """The requirement pip found no wheel for (the last one it names), or None when pip failed for another reason.

    Its marker is dropped: pip already evaluated it for the target (`extra == "engine"` holds there, not here)."""
    matches = _NO_MATCH.findall(stderr)
    if not matches:
        return None
    try:
        requirement = Requirement(matches[-1].strip())
    except InvalidRequirement:
        return None
    requirement.marker = None
    return requirement


def _build_from_sdist(missing: Requirement, target: Target, wheelhouses: list[Path], built_dir: Path) -> Path:
    """Build `missing` here from its sdist, if this host can stand in for the target; else refuse, saying why."""
    reason = host_stands_in_for(target)
    where = f"the index{', the wheelhouses' if wheelhouses else ''}"
    if reason is not None:
        raise InputError(
            f"{missing}: no wheel for {_describe(target)} on {where}, and it cannot be built here: {reason}. "
            "Build its wheel on a host like the target (`pip wheel --no-deps "
            f"'{missing}'`) and pass that directory with --wheelhouse"
        )
    out = built_dir / canonicalize_name(missing.name)
    args = ["wheel", "--no-deps", "--progress-bar", "off", "--wheel-dir", str(out)]
    args += ["--no-binary", missing.name]  # the sdist: a wheel pip found would be one the target already refused
    for house in wheelhouses:
        args += ["--find-links", str(house.absolute())]
    result = _pip([*args, str(missing)], f"pip wheel {missing}")
    if result.returncode != 0:
        raise InputError(
            f"{missing}: no wheel for {_describe(target)} on {where}, and building it here failed:\n{_tail(result.stderr)}"
        )
    wheels = sorted(out.glob("*.whl"))
    if len(wheels) != 1:
        raise InputError(f"{missing}: pip wheel made {len(wheels)} wheels, expected one")
    target_wheel = built_dir / wheels[0].name
    os.replace(wheels[0], target_wheel)
    shutil.rmtree(out)
    return target_wheel


def _sdist_origin(wheel: Path, wheelhouses: list[Path]) -> str:
    """The sdist a wheel built here came from: a wheelhouse file when one matches, else the index."""
    name, version, _build, _tags = parse_wheel_filename(wheel.name)
    for house in wheelhouses:
        for sdist in sorted(house.glob("*.tar.gz")) + sorted(house.glob("*.zip")):
            stem = sdist.name.removesuffix(".tar.gz").removesuffix(".zip")
            sdist_name, _, sdist_version = stem.rpartition("-")
            if canonicalize_name(sdist_name) == name and sdist_version == str(version):
                return f"{sdist.absolute()} (sdist, built on this host)"
    return f"pypi:{name}=={version} (sdist, built on this host)"


def _wheel_tags(path: Path) -> frozenset[tags.Tag]:
    try:
        return parse_wheel_filename(path.name)[3]
    except InvalidWheelFilename as exc:
        raise InputError(f"{path.name}: {exc}") from exc


def _artifact(path: Path, built: str | None, wheelhouses: list[Path]) -> Artifact:
    try:
        name, version, _build, _tags = parse_wheel_filename(path.name)
    except InvalidWheelFilename as exc:
        raise InputError(f"{path.name}: {exc}") from exc
    metadata = read_wheel_metadata(path)
    meta: dict[str, object] = {
        "name": metadata.get("Name") or name,
        "version": metadata.get("Version") or str(version),
    }
    license_name = wheel_license(metadata)
    if license_name:
        meta["license"] = license_name
    if built is not None:
        meta["built_here"] = True
        provenance = built
    else:
        provenance = _wheelhouse_file(path, wheelhouses) or f"pypi:{name}=={version}"
    return Artifact(role="wheel", path=f"wheels/{path.name}", file=path, provenance=provenance, meta=meta)


def _wheelhouse_file(path: Path, wheelhouses: list[Path]) -> str | None:
    for house in wheelhouses:
        candidate = house / path.name
        if candidate.is_file() and candidate.stat().st_size == path.stat().st_size:
            return str(candidate.absolute())
    return None


def _describe(target: Target) -> str:
    platforms = ", ".join(target.platforms[:3]) + (", …" if len(target.platforms) > 3 else "")
    return f"Python {target.python} ({target.implementation}/{target.abi or 'default ABI'}; {platforms or 'this platform'})"


def _pip(args: list[str], what: str, *, markers: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run this interpreter's pip; with `markers`, under the shim that evaluates environment markers with them."""
    env = {**os.environ, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    command = [sys.executable, "-m", "pip"]
    if markers is not None:  # -P: the shim runs from -c, which would otherwise put the working directory on sys.path
        command = [sys.executable, "-P", "-c", _MARKER_SHIM, json.dumps(markers)]
    try:
        return subprocess.run(
            [*command, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=PIP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise InputError(f"{what} did not finish within {PIP_TIMEOUT_S} s") from exc


def _tail(stderr: str) -> str:
    """pip's last lines, without its warnings about index locations that do not exist (noise, not the cause)."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("WARNING: Location ")]
    return "\n".join(lines[-ERROR_TAIL_LINES:]) or "(pip printed nothing on stderr)"
