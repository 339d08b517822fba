"""The CUDA engine recipe, on a host with no GPU and no CUDA toolkit: its exact inputs, and its linking.

Nothing CUDA is built here (CI must not build CUDA). The linking tests build a SMALL stand-in instead: a C shared
library placed where llama-cpp-python puts its libraries (`llama_cpp/lib/`), linked against stub `libcudart.so.12`
and `libcublas.so.12` that travel in wheels named like NVIDIA's and install where NVIDIA's do
(`nvidia/<lib>/lib/`). The recipe's own step (`repair_wheel`: RUNPATH with patchelf, build record, RECORD) is applied
to it, the wheels are installed with the installer's offline-venv code, and the ELF dynamic section, `ldd` and the
dynamic loader itself say whether the library finds the carried ones. This checks the recipe's linking, not a real
CUDA build; `scripts/gpu-check` builds the real engine on a GPU machine.
"""

from __future__ import annotations

import base64
import csv
import ctypes
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from sealbox.bundler.offline_venv import WheelFile, build_offline_venv
from sealbox.bundler.sources.cuda_engine import (
    RUNPATH,
    CudaEngineRecipe,
    CudaEngineSpec,
    engine_version,
    library_runpath,
    read_engine_record,
    repair_wheel,
    runpath_problems,
)

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and "CI" not in os.environ, reason="no C compiler (cc)")

SEALBOX = str(Path(sys.executable).parent / "sealbox")
HOST_PLATFORM = sysconfig.get_platform().replace("-", "_").replace(".", "_")  # linux_x86_64: what pip wheel tags
ENGINE_C = """
int cudaRuntimeGetVersion(int *version);
int cublasCreate_v2(void **handle);
int ggml_cuda_probe(void) {
    int version = 0;
    void *handle = 0;
    if (cublasCreate_v2(&handle) != 0) return -1;
    cudaRuntimeGetVersion(&version);
    return version;
}
"""
CUDART_C = "int cudaRuntimeGetVersion(int *version) { *version = 12090; return 0; }\n"
CUBLAS_C = "int cublasCreate_v2(void **handle) { *handle = (void *)0x1; return 0; }\n"


def _cc(*args: str) -> None:
    subprocess.run(["nice", "-n", "19", "cc", "-O0", "-fPIC", "-shared", *args], check=True, capture_output=True)


def _wheel(folder: Path, name: str, version: str, tag: str, files: dict[str, bytes]) -> Path:
    """A wheel as pip writes one: the files, METADATA, WHEEL and a RECORD with every file's sha256."""
    dist = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {**files, f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist}/WHEEL": f"Wheel-Version: 1.0\nGenerator: sealbox-test\nRoot-Is-Purelib: false\nTag: {tag}\n".encode()}  # fmt: skip
    rows = [[path, "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode(), str(len(data))]
            for path, data in files.items()]  # fmt: skip
    rows.append([f"{dist}/RECORD", "", ""])
    record = io.StringIO()
    csv.writer(record, lineterminator="\n").writerows(rows)
    path = folder / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for arcname, data in {**files, f"{dist}/RECORD": record.getvalue().encode()}.items():
            archive.writestr(arcname, data)
    return path


@dataclass(frozen=True)
class StandIns:
    engine: Path
    """llama_cpp_python wheel as pip would build it: libraries with RUNPATH $ORIGIN only, no build record."""
    cudart: Path
    cublas: Path


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> StandIns:
    build = tmp_path_factory.mktemp("stand-in-build")
    house = tmp_path_factory.mktemp("stand-in-wheels")
    for name, source in (("cudart", CUDART_C), ("cublas", CUBLAS_C), ("engine", ENGINE_C)):
        (build / f"{name}.c").write_text(source)
    _cc("-Wl,-soname,libcudart.so.12", "-o", str(build / "libcudart.so.12"), str(build / "cudart.c"))
    _cc("-Wl,-soname,libcublas.so.12", "-o", str(build / "libcublas.so.12"), str(build / "cublas.c"))
    # Linked as llama-cpp-python's CMake links: against the toolkit's libraries, with RUNPATH $ORIGIN only.
    _cc("-Wl,-soname,libggml-cuda.so", "-Wl,-rpath,$ORIGIN", "-o", str(build / "libggml-cuda.so"),
        str(build / "engine.c"), f"-L{build}", "-l:libcudart.so.12", "-l:libcublas.so.12")  # fmt: skip
    version = engine_version()
    engine = _wheel(house, "llama-cpp-python", version, f"py3-none-{HOST_PLATFORM}", {
        "llama_cpp/__init__.py": b"",
        "llama_cpp/lib/libggml-cuda.so": (build / "libggml-cuda.so").read_bytes(),
    })  # fmt: skip
    tag = f"py3-none-manylinux2014_{platform.machine()}"
    cudart = _wheel(house, "nvidia-cuda-runtime-cu12", "12.9.79", tag, {
        "nvidia/cuda_runtime/lib/libcudart.so.12": (build / "libcudart.so.12").read_bytes()})  # fmt: skip
    cublas = _wheel(house, "nvidia-cublas-cu12", "12.9.1.4", tag, {
        "nvidia/cublas/lib/libcublas.so.12": (build / "libcublas.so.12").read_bytes()})  # fmt: skip
    return StandIns(engine, cudart, cublas)


SPEC_90 = dict(cuda_version="12", archs="90")


def _install(wheels: list[Path], where: Path) -> Path:
    venv = where / "venv"
    files = [WheelFile(path.name, hashlib.sha256(path.read_bytes()).hexdigest(), path) for path in wheels]
    build_offline_venv(venv, final=venv, wheels=files, work=where / "venv-work")
    (site,) = venv.glob("lib/python3*/site-packages")
    return site


def test_the_dry_run_prints_the_exact_build_inputs_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    command = [SEALBOX, "bundle", "create", "--name", "gpu", "--version", "1", "--out", str(out), "--sign-key",
               str(tmp_path / "none.key"), "--accelerator", "cuda", "--cuda-archs", "80,90", "--dry-run"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    version = engine_version()
    assert f"engine: llama-cpp-python=={version} (sdist, pip wheel --no-binary llama-cpp-python --no-deps)" in lines
    assert "cuda: 12.9" in lines and "archs: 80;90" in lines
    (cmake,) = [line for line in lines if line.startswith("env CMAKE_ARGS=")]
    assert cmake.startswith("env CMAKE_ARGS=-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=80;90 -DGGML_NATIVE=off ")
    assert "runpath: $ORIGIN:$ORIGIN/../../nvidia/cuda_runtime/lib:$ORIGIN/../../nvidia/cublas/lib " \
        "(set on every library in llama_cpp/lib/ with patchelf, then checked)" in lines
    assert "carried: nvidia-cuda-runtime-cu12==12.9.* nvidia-cublas-cu12==12.9.*" in lines
    (cache,) = [line for line in lines if line.startswith("cache: ")]
    assert cache.endswith(f"llama-cpp-python-{version}-cuda12.9-sm80-90-{HOST_PLATFORM}")
    (source,) = [line for line in lines if line.startswith("source: ")]
    assert source.startswith("source: build ~") and "min on" in source
    assert not out.exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--cuda-archs", "sm_90", "give compute capabilities as numbers"), ("--cuda-version", "11", "pins CUDA 12"),
     ("--cuda-version", "12.4", "CUDA 12 is pinned at 12.9"), ("--accelerator", "rocm", "is not cpu or cuda")],
)  # fmt: skip
def test_a_bad_cuda_option_is_refused_naming_it(tmp_path: Path, option: str, value: str, message: str) -> None:
    command = [SEALBOX, "bundle", "create", "--name", "gpu", "--version", "1", "--out", str(tmp_path / "b"),
               "--sign-key", "k", "--accelerator", "cuda", option, value, "--dry-run"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and message in " ".join(done.stderr.split()), done.stderr


def test_the_cache_key_names_engine_version_cuda_version_and_architectures() -> None:
    spec = CudaEngineSpec.parse(cuda_version="12.9", archs="90;80;86")
    assert spec.archs == (80, 86, 90)
    assert spec.cache_key.startswith(f"llama-cpp-python-{engine_version()}-cuda12.9-sm80-86-90-")
    assert CudaEngineSpec.parse(cuda_version="12", archs="80").cache_key != spec.cache_key


def test_the_repaired_engine_finds_the_carried_cuda_libraries_after_an_offline_install(
    stand_ins: StandIns, tmp_path: Path
) -> None:
    spec = CudaEngineSpec.parse(**SPEC_90)
    (tmp_path / "repaired").mkdir()
    engine = repair_wheel(stand_ins.engine, tmp_path / "repaired", spec.record())
    assert runpath_problems(engine) == []
    assert read_engine_record(engine) == spec.record()

    site = _install([engine, stand_ins.cudart, stand_ins.cublas], tmp_path)
    library = site / "llama_cpp" / "lib" / "libggml-cuda.so"
    runpath, needed = library_runpath(library.read_bytes())
    assert runpath == RUNPATH
    assert {"libcudart.so.12", "libcublas.so.12"} <= set(needed)
    origin = library.parent
    resolved = {entry: (origin / entry.removeprefix("$ORIGIN/")).resolve() if entry != "$ORIGIN" else origin
                for entry in runpath}  # fmt: skip
    assert resolved[RUNPATH[1]] == site / "nvidia" / "cuda_runtime" / "lib"
    assert resolved[RUNPATH[2]] == site / "nvidia" / "cublas" / "lib"

    ldd = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=True).stdout
    found = {line.split()[0]: Path(line.split()[2]).resolve() for line in ldd.splitlines() if "=>" in line and "/" in line}
    assert found["libcudart.so.12"] == site / "nvidia" / "cuda_runtime" / "lib" / "libcudart.so.12"
    assert found["libcublas.so.12"] == site / "nvidia" / "cublas" / "lib" / "libcublas.so.12"
    assert ctypes.CDLL(str(library)).ggml_cuda_probe() == 12090  # the loader itself resolves and calls them


def test_without_the_recipes_runpath_the_installed_engine_does_not_find_them(stand_ins: StandIns, tmp_path: Path) -> None:
    """The check above can fail: pip's own build (RUNPATH $ORIGIN only) installed the same way finds nothing."""
    assert runpath_problems(stand_ins.engine) == [
        "llama_cpp/lib/libggml-cuda.so: RUNPATH $ORIGIN lacks $ORIGIN/../../nvidia/cuda_runtime/lib:"
        "$ORIGIN/../../nvidia/cublas/lib"
    ]
    site = _install([stand_ins.engine, stand_ins.cudart, stand_ins.cublas], tmp_path)
    ldd = subprocess.run(["ldd", str(site / "llama_cpp" / "lib" / "libggml-cuda.so")], capture_output=True, text=True).stdout
    assert "libcudart.so.12 => not found" in ldd and "libcublas.so.12 => not found" in ldd


def test_a_wheel_carrying_a_build_host_path_is_refused(stand_ins: StandIns, tmp_path: Path) -> None:
    from sealbox.bundler.sources.cuda_engine import patchelf_command

    (tmp_path / "repaired").mkdir()
    engine = repair_wheel(stand_ins.engine, tmp_path / "repaired", CudaEngineSpec.parse(**SPEC_90).record())
    tree = tmp_path / "tree"
    with zipfile.ZipFile(engine) as archive:
        archive.extractall(tree)
    library = tree / "llama_cpp" / "lib" / "libggml-cuda.so"
    subprocess.run([patchelf_command(), "--set-rpath", ":".join(RUNPATH) + ":/opt/build/cuda/lib64", str(library)], check=True)
    tampered = tmp_path / engine.name
    with zipfile.ZipFile(engine) as source, zipfile.ZipFile(tampered, "w") as target:
        for item in source.infolist():
            data = library.read_bytes() if item.filename == "llama_cpp/lib/libggml-cuda.so" else source.read(item)
            target.writestr(item, data)
    assert runpath_problems(tampered) == ["llama_cpp/lib/libggml-cuda.so: RUNPATH names build-host paths /opt/build/cuda/lib64"]


def test_a_cached_build_is_used_without_building(stand_ins: StandIns, tmp_path: Path) -> None:
    spec = CudaEngineSpec.parse(**SPEC_90)
    recipe = CudaEngineRecipe(spec, work=tmp_path / "work", cache_dir=tmp_path / "cache")
    recipe.cached_wheel_dir.mkdir(parents=True)
    cached = repair_wheel(stand_ins.engine, recipe.cached_wheel_dir, spec.record())
    from sealbox.bundler.progress import SilentProgress

    found = recipe.wheel(SilentProgress())
    assert found.path == cached and found.provenance == f"cached build of {spec.cache_key}"
    assert not (tmp_path / "work").exists()
    other = CudaEngineRecipe(CudaEngineSpec.parse(cuda_version="12", archs="80"), work=tmp_path / "w2",
                             cache_dir=tmp_path / "cache")  # fmt: skip
    assert other._supplied() is None  # another architecture list is another key


def test_a_cuda_bundle_records_the_build_in_manifest_and_sbom(
    stand_ins: StandIns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bundle create --accelerator cuda` with the engine from a --wheelhouse (built elsewhere by the recipe)."""
    from sealbox.bundler.create import CreateRequest, create_bundle
    from sealbox.bundler.keys import generate_key_pair
    from sealbox.bundler.cli.keys import open_signer

    monkeypatch.setenv("PIP_NO_INDEX", "1")  # only the wheelhouse: no index is asked
    spec = CudaEngineSpec.parse(**SPEC_90)
    house = tmp_path / "house"
    house.mkdir()
    repair_wheel(stand_ins.engine, house, spec.record())
    shutil.copy2(stand_ins.cudart, house)
    shutil.copy2(stand_ins.cublas, house)
    generate_key_pair("alice", tmp_path / "keys", passphrase=None)
    (key,) = (tmp_path / "keys").glob("*.key")
    result = create_bundle(CreateRequest(name="gpu", version=1, out=tmp_path / "bundle", signers=[open_signer(key)],
                                         wheelhouses=[house], include_sealbox=False, cuda=spec))  # fmt: skip
    manifest = result.manifest
    assert manifest.target.accelerator == spec.record()
    wheels = {entry.meta["name"]: entry for entry in manifest.blobs if entry.role == "wheel"}
    assert set(wheels) == {"llama-cpp-python", "nvidia-cuda-runtime-cu12", "nvidia-cublas-cu12"}
    engine = wheels["llama-cpp-python"]
    assert (engine.meta["accelerator"], engine.meta["cuda_version"], engine.meta["cuda_archs"]) == ("cuda", "12.9", [90])
    assert "CUDA engine built by sealbox elsewhere" in engine.provenance
    (sbom_entry,) = [entry for entry in manifest.blobs if entry.role == "sbom"]
    sbom = json.loads((tmp_path / "bundle" / "blobs" / "sha256" / sbom_entry.sha256).read_bytes())
    (component,) = [c for c in sbom["components"] if c["name"] == "llama-cpp-python"]
    properties = {p["name"]: p["value"] for p in component["properties"]}
    assert properties["sealbox:accelerator"] == "cuda"
    assert properties["sealbox:cuda_version"] == "12.9" and properties["sealbox:cuda_archs"] == "[90]"
    inspect = subprocess.run([SEALBOX, "bundle", "inspect", str(tmp_path / "bundle")], capture_output=True, text=True,
                             timeout=120, check=True)  # fmt: skip
    assert "accelerator: cuda 12.9 (sm_90)" in inspect.stdout
    (public,) = (tmp_path / "keys").glob("*.pub")
    verified = subprocess.run([SEALBOX, "bundle", "verify", str(tmp_path / "bundle"), "--trust", str(public)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert verified.returncode == 0, verified.stderr


def test_a_cpu_engine_wheel_in_the_wheelhouse_is_not_taken_for_the_cuda_one(stand_ins: StandIns, tmp_path: Path) -> None:
    house = tmp_path / "house"
    house.mkdir()
    shutil.copy2(stand_ins.engine, house)  # same version, no build record: a CPU build
    recipe = CudaEngineRecipe(CudaEngineSpec.parse(**SPEC_90), work=tmp_path / "w", wheelhouses=[house],
                              cache_dir=tmp_path / "cache")  # fmt: skip
    assert recipe._supplied() is None


def test_the_toolkit_wheels_are_assembled_into_one_tree_cmake_understands(tmp_path: Path) -> None:
    """NVIDIA's wheels split the toolkit over nvidia/<part>/ and ship only versioned libraries; CMake's FindCUDAToolkit
    wants one root with bin/, include/ and lib64/libcudart.so."""
    from sealbox.bundler.errors import InputError
    from sealbox.bundler.sources.cuda_engine import assemble_toolkit

    nvidia = tmp_path / "site" / "nvidia"
    files = ["cuda_nvcc/bin/nvcc", "cuda_nvcc/nvvm/bin/cicc", "cuda_nvcc/include/crt/host_config.h",
             "cuda_runtime/include/cuda_runtime.h", "cuda_runtime/lib/libcudart.so.12",
             "cublas/include/cublas_v2.h", "cublas/lib/libcublas.so.12", "cublas/lib/libcublasLt.so.12"]  # fmt: skip
    with pytest.raises(InputError, match="did not install nvcc"):
        assemble_toolkit(tmp_path / "site", tmp_path / "empty")
    for name in files:
        (nvidia / name).parent.mkdir(parents=True, exist_ok=True)
        (nvidia / name).write_text(name)
    toolkit = assemble_toolkit(tmp_path / "site", tmp_path / "toolkit")
    root = tmp_path / "toolkit"
    assert toolkit.root == root and toolkit.nvcc == root / "bin" / "nvcc" and toolkit.nvcc.read_text() == "cuda_nvcc/bin/nvcc"
    assert (root / "nvvm" / "bin" / "cicc").is_file()
    assert {p.name for p in (root / "include").iterdir()} == {"crt", "cuda_runtime.h", "cublas_v2.h"}
    for name in ("libcudart", "libcublas", "libcublasLt"):
        assert (root / "lib64" / f"{name}.so").resolve() == (nvidia / ("cuda_runtime" if name == "libcudart" else "cublas")
                                                              / "lib" / f"{name}.so.12")  # fmt: skip


def test_a_cuda_bundle_for_another_machine_is_refused_before_anything_is_written(
    stand_ins: StandIns, tmp_path: Path
) -> None:
    from sealbox.bundler.cli.keys import open_signer
    from sealbox.bundler.create import CreateRequest, create_bundle
    from sealbox.bundler.errors import InputError
    from sealbox.bundler.keys import generate_key_pair
    from sealbox.bundler.manifest import Target

    spec = CudaEngineSpec.parse(**SPEC_90)
    house = tmp_path / "house"
    house.mkdir()
    repair_wheel(stand_ins.engine, house, spec.record())
    generate_key_pair("alice", tmp_path / "keys", passphrase=None)
    (key,) = (tmp_path / "keys").glob("*.key")
    other = "aarch64" if platform.machine() != "aarch64" else "x86_64"
    arm = Target(python="3.11", implementation="cp", abi="cp311", platforms=(f"manylinux_2_28_{other}",))
    with pytest.raises(InputError, match=rf"built for {HOST_PLATFORM}; the target is linux {other}"):
        create_bundle(CreateRequest(name="gpu", version=1, out=tmp_path / "bundle", signers=[open_signer(key)],
                                    wheelhouses=[house], include_sealbox=False, cuda=spec, target=arm))  # fmt: skip
    assert not (tmp_path / "bundle" / "manifest.json").exists()
