"""Can this host run the bundle's engine on its GPUs? Three facts, one pure decision.

The facts: what the installed engine was built for (`EngineBuild`, read from the `sealbox-engine.json` the bundler
writes into a CUDA-built llama-cpp-python wheel; absent means a CPU build), what the NVIDIA driver says
(`probe_driver`: libcuda and NVML through ctypes, no Python binding needed), and `decide`, which takes both and says
`cuda`, `cpu` or refuses with the exact reason. `serve` refuses before importing llama.cpp (a CUDA-linked engine cannot
even be imported without libcuda.so.1) and the doctor reports the same decision before anyone starts the server.

Why refuse rather than fall back to the CPU: the CUDA engine links its CUDA backend into libggml, so without a driver
the library does not load at all. llama.cpp's dynamically loaded backends (GGML_BACKEND_DL) would allow a fallback, but
llama-cpp-python does not load backends from its own directory; a CPU bundle is the way to serve on a host without
a GPU.

Compatibility rules (NVIDIA's): a cubin for sm_XY runs on a GPU of the same major X and minor >= Y; PTX for
compute_XY is compiled by the driver for any GPU >= XY, and only by a driver at least as new as the toolkit that
wrote it. Without PTX JIT, a driver of the same CUDA major runs the engine (minor version compatibility).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sealbox.runtime.regular_file import read_regular
from sealbox.runtime.exit_codes import ExitCode

ENGINE_BUILD_FILE = "sealbox-engine.json"
"""Written into the llama_cpp package by the bundler's CUDA recipe; read here without importing llama_cpp."""
LIBCUDA = "libcuda.so.1"
LIBNVML = "libnvidia-ml.so.1"
_CU_DEVICE_ATTRIBUTE_CC_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_CC_MINOR = 76
_CUDA_ERROR_NO_DEVICE = 100
_NAME_BYTES = 256
_RECORD_LIMIT = 64 << 10

Device = Literal["cpu", "cuda"]


class AcceleratorError(Exception):
    """The engine cannot run on this host as built: the message says exactly why (driver, version, architecture)."""

    exit_code = ExitCode.REFUSED


@dataclass(frozen=True, kw_only=True)
class EngineBuild:
    """What the installed engine was built for."""

    accelerator: Device = "cpu"
    cuda_version: tuple[int, int] | None = None
    """The toolkit (nvcc) major.minor the engine was compiled with."""
    archs: tuple[int, ...] = ()
    """CMAKE_CUDA_ARCHITECTURES as numbers (80 = sm_80 cubin + compute_80 PTX)."""

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> EngineBuild:
        """Raises ValueError naming the field that is wrong."""
        accelerator = data.get("accelerator")
        if accelerator == "cpu":
            return cls()
        if accelerator != "cuda":
            raise ValueError(f"accelerator {accelerator!r} is not 'cpu' or 'cuda'")
        version, archs = data.get("cuda_version"), data.get("cuda_archs")
        if not isinstance(version, str) or not _is_version(version):
            raise ValueError(f"cuda_version {version!r} is not like '12.9'")
        if not isinstance(archs, list) or not archs or not all(isinstance(a, int) and a > 0 for a in archs):
            raise ValueError(f"cuda_archs {archs!r} is not a list of numbers like [80, 90]")
        major, minor = (int(part) for part in version.split("."))
        return cls(accelerator="cuda", cuda_version=(major, minor), archs=tuple(sorted(archs)))

    @classmethod
    def installed(cls) -> EngineBuild:
        """The build of the llama_cpp package this interpreter would import (found, not imported).

        Raises:
            AcceleratorError: the package's build record is unreadable or malformed.
        """
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or not spec.submodule_search_locations:
            return cls()
        return cls.of_package(Path(next(iter(spec.submodule_search_locations))))

    @classmethod
    def in_venv(cls, venv: Path) -> EngineBuild:
        """The build of the llama_cpp package in a release's venv (what `serve` from that release will import).

        Raises:
            AcceleratorError: the package's build record is unreadable or malformed.
        """
        for package in sorted(venv.glob("lib/python3*/site-packages/llama_cpp")):
            return cls.of_package(package)
        return cls()

    @classmethod
    def of_package(cls, package: Path) -> EngineBuild:
        """Raises AcceleratorError: the record is unreadable or malformed (a missing one means a CPU build)."""
        path = package / ENGINE_BUILD_FILE
        try:
            data = json.loads(read_regular(path, limit=_RECORD_LIMIT))  # a FIFO or symlink there is refused, not read
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise AcceleratorError(f"{path}: unreadable engine build record: {exc}") from exc
        try:
            return cls.from_dict(data if isinstance(data, dict) else {})
        except ValueError as exc:
            raise AcceleratorError(f"{path}: {exc}") from exc

    def describe(self) -> str:
        if self.accelerator == "cpu" or self.cuda_version is None:
            return "CPU engine"
        return f"CUDA {_version(self.cuda_version)} engine for {sm_names(self.archs)}"


@dataclass(frozen=True, kw_only=True)
class Gpu:
    index: int
    name: str
    compute_capability: tuple[int, int]
    total_bytes: int
    free_bytes: int | None = None
    """From NVML when it answers; None otherwise (plan with `total_bytes` then)."""

    @property
    def sm(self) -> int:
        return self.compute_capability[0] * 10 + self.compute_capability[1]

    @property
    def available_bytes(self) -> int:
        return self.free_bytes if self.free_bytes is not None else self.total_bytes


@dataclass(frozen=True, kw_only=True)
class Driver:
    cuda_version: tuple[int, int]
    """The newest CUDA version the driver supports (cuDriverGetVersion)."""
    gpus: tuple[Gpu, ...]


@dataclass(frozen=True)
class NoDriver:
    reason: str


@dataclass(frozen=True, kw_only=True)
class AcceleratorDecision:
    device: Device
    gpus: tuple[Gpu, ...] = ()
    """The GPUs the engine will use (those whose architecture the build covers)."""
    problem: str | None = None
    """Why a CUDA engine cannot run here (the decision is then a refusal)."""
    notes: tuple[str, ...] = field(default=())

    @property
    def refused(self) -> bool:
        return self.problem is not None

    def enforce(self) -> AcceleratorDecision:
        """Raises AcceleratorError with `problem` when refused; else returns self."""
        if self.problem is not None:
            raise AcceleratorError(self.problem)
        return self


def sm_names(archs: tuple[int, ...]) -> str:
    return ", ".join(f"sm_{arch}" for arch in archs)


def _version(pair: tuple[int, int]) -> str:
    return f"{pair[0]}.{pair[1]}"


def _is_version(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 2 and all(part.isdigit() for part in parts)


def runs_on(archs: tuple[int, ...], gpu_sm: int) -> Literal["cubin", "ptx", None]:
    """How a build for `archs` runs on a GPU of `gpu_sm`: its own cubin, PTX compiled by the driver, or not at all."""
    if any(arch // 10 == gpu_sm // 10 and arch <= gpu_sm for arch in archs):
        return "cubin"
    if any(arch <= gpu_sm for arch in archs):
        return "ptx"
    return None


def decide(build: EngineBuild, driver: Driver | NoDriver) -> AcceleratorDecision:
    """Where the engine runs. Pure: the tests feed it the facts a host would report."""
    if build.accelerator == "cpu":
        if isinstance(driver, Driver) and driver.gpus:
            return AcceleratorDecision(device="cpu", notes=(
                f"{len(driver.gpus)} GPU(s) present, but this bundle's engine is built for the CPU: create the bundle "
                "with --accelerator cuda to use them",))  # fmt: skip
        return AcceleratorDecision(device="cpu")
    assert build.cuda_version is not None  # from_dict guarantees it for a cuda build
    if isinstance(driver, NoDriver):
        return AcceleratorDecision(device="cpu", problem=driver.reason)
    if not driver.gpus:
        return AcceleratorDecision(device="cpu", problem="the NVIDIA driver sees no GPU")
    usable: list[Gpu] = []
    notes: list[str] = []
    needs_ptx = False
    for gpu in driver.gpus:
        how = runs_on(build.archs, gpu.sm)
        if how is None:
            notes.append(
                f"GPU {gpu.index} ({gpu.name}) is sm_{gpu.sm}, not among the bundle's architectures "
                f"({sm_names(build.archs)}): rebuild the bundle with --cuda-archs including {gpu.sm}"
            )
            continue
        if how == "ptx":
            needs_ptx = True
            notes.append(f"GPU {gpu.index} ({gpu.name}) is sm_{gpu.sm}: no cubin for it, the driver compiles the "
                         "engine's PTX at load (slower first start)")  # fmt: skip
        usable.append(gpu)
    if not usable:
        return AcceleratorDecision(device="cpu", problem="; ".join(notes), notes=tuple(notes))
    # Minor version compatibility covers cubins; PTX needs a driver at least as new as the compiler that wrote it.
    needed = build.cuda_version if needs_ptx else (build.cuda_version[0], 0)
    if driver.cuda_version < needed:
        return AcceleratorDecision(device="cpu", notes=tuple(notes), problem=(
            f"driver supports CUDA {_version(driver.cuda_version)}, the bundle's engine needs ≥ {_version(needed)}"
            f"{' (to compile its PTX for this GPU)' if needs_ptx else ''}: update the NVIDIA driver"))  # fmt: skip
    return AcceleratorDecision(device="cuda", gpus=tuple(usable), notes=tuple(notes))


def probe_driver(libcuda: str = LIBCUDA, libnvml: str = LIBNVML) -> Driver | NoDriver:
    """Ask the NVIDIA driver (libcuda through ctypes) for its CUDA version and GPUs; free memory from NVML if it
    answers. Never raises: every failure is a `NoDriver` saying which call failed."""
    try:
        cuda = ctypes.CDLL(libcuda)
    except OSError:
        return NoDriver(f"no NVIDIA driver ({libcuda} not found)")
    try:
        return _read_driver(cuda, libnvml)
    except (AttributeError, _CudaCallError) as exc:
        return NoDriver(f"the NVIDIA driver does not answer: {exc}")


class _CudaCallError(Exception):
    pass


def _check(cuda: ctypes.CDLL, call: str, result: int) -> None:
    if result == 0:
        return
    name = ctypes.c_char_p()
    if cuda.cuGetErrorName(result, ctypes.byref(name)) == 0 and name.value:
        label = name.value.decode(errors="replace")
    else:
        label = "unknown error"
    if result == _CUDA_ERROR_NO_DEVICE:
        raise _CudaCallError(f"{call}: {label}: the driver is loaded but sees no GPU (device nodes hidden?)")
    raise _CudaCallError(f"{call}: {label} ({result})")


def _read_driver(cuda: ctypes.CDLL, libnvml: str) -> Driver:
    _check(cuda, "cuInit", cuda.cuInit(0))
    version, count = ctypes.c_int(), ctypes.c_int()
    _check(cuda, "cuDriverGetVersion", cuda.cuDriverGetVersion(ctypes.byref(version)))
    _check(cuda, "cuDeviceGetCount", cuda.cuDeviceGetCount(ctypes.byref(count)))
    nvml = _Nvml.open(libnvml)
    gpus = []
    try:
        for index in range(count.value):
            device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
            total = ctypes.c_size_t()
            name, bus = ctypes.create_string_buffer(_NAME_BYTES), ctypes.create_string_buffer(_NAME_BYTES)
            _check(cuda, "cuDeviceGet", cuda.cuDeviceGet(ctypes.byref(device), index))
            for attribute, out in ((_CU_DEVICE_ATTRIBUTE_CC_MAJOR, major), (_CU_DEVICE_ATTRIBUTE_CC_MINOR, minor)):
                _check(cuda, "cuDeviceGetAttribute", cuda.cuDeviceGetAttribute(ctypes.byref(out), attribute, device))
            _check(cuda, "cuDeviceGetName", cuda.cuDeviceGetName(name, _NAME_BYTES, device))
            _check(cuda, "cuDeviceTotalMem_v2", cuda.cuDeviceTotalMem_v2(ctypes.byref(total), device))
            free = None
            if nvml is not None and cuda.cuDeviceGetPCIBusId(bus, _NAME_BYTES, device) == 0:
                free = nvml.free_bytes(bus.value)
            gpus.append(Gpu(index=index, name=name.value.decode(errors="replace"), compute_capability=(major.value, minor.value),
                            total_bytes=total.value, free_bytes=free))  # fmt: skip
    finally:
        if nvml is not None:
            nvml.close()
    return Driver(cuda_version=(version.value // 1000, version.value % 1000 // 10), gpus=tuple(gpus))


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _Nvml:
    """Free memory per GPU from NVML, matched to CUDA's devices by PCI bus id (the two number GPUs differently)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.library = library

    @classmethod
    def open(cls, name: str) -> _Nvml | None:
        try:
            library = ctypes.CDLL(name)
        except OSError:
            return None
        return cls(library) if library.nvmlInit_v2() == 0 else None

    def free_bytes(self, pci_bus_id: bytes) -> int | None:
        handle, memory = ctypes.c_void_p(), _NvmlMemory()
        if self.library.nvmlDeviceGetHandleByPciBusId_v2(pci_bus_id, ctypes.byref(handle)) != 0:
            return None
        if self.library.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0:
            return None
        return int(memory.free)

    def close(self) -> None:
        self.library.nvmlShutdown()


CUDA_CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm")
"""Opened by every CUDA process: the driver's control node, and unified memory (cuInit fails without it)."""
CUDA_UNNEEDED_NODES = ("/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")
"""Not opened for inference: uvm-tools serves profilers (CUPTI, Nsight), modeset serves display (X, DRM KMS)."""


def cuda_device_nodes(gpus: int) -> tuple[str, ...]:
    """The device nodes a CUDA engine on `gpus` GPUs opens: one /dev/nvidiaN per GPU, the control nodes. With MIG,
    the instance's /dev/nvidia-caps/nvidia-capN nodes come on top (see docs/lockdown.md)."""
    return (*(f"/dev/nvidia{index}" for index in range(gpus)), *CUDA_CONTROL_NODES)


def host_decision() -> AcceleratorDecision:
    """`decide` for the installed engine on this host. The driver is asked only for a CUDA build: a CPU engine's
    server never loads libcuda (under its unit it could not open the GPU nodes anyway).

    Raises:
        AcceleratorError: the engine's build record is malformed.
    """
    build = EngineBuild.installed()
    if build.accelerator == "cpu":
        return AcceleratorDecision(device="cpu")
    return decide(build, probe_driver())
