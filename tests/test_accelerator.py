"""The GPU decision: no driver (for real: this host has no libcuda), and the other facts fed to the pure function."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sealbox.runtime.engine.accelerator import (
    AcceleratorError,
    Driver,
    EngineBuild,
    Gpu,
    NoDriver,
    decide,
    probe_driver,
)
from sealbox.runtime.layer_split import split_layers
from sealbox.runtime.sizes import GiB, MiB

CUDA_12_9 = EngineBuild(accelerator="cuda", cuda_version=(12, 9), archs=(80, 86, 89, 90))
H200 = Gpu(index=0, name="NVIDIA H200", compute_capability=(9, 0), total_bytes=141 * GiB, free_bytes=140 * GiB)
L4 = Gpu(index=1, name="NVIDIA L4", compute_capability=(8, 9), total_bytes=24 * GiB)
V100 = Gpu(index=0, name="Tesla V100-SXM2-32GB", compute_capability=(7, 0), total_bytes=32 * GiB)
B200 = Gpu(index=0, name="NVIDIA B200", compute_capability=(10, 0), total_bytes=180 * GiB)

NO_LIBCUDA = ctypes.util.find_library("cuda") is None and not Path("/dev/nvidiactl").exists()


@pytest.mark.skipif(not NO_LIBCUDA, reason="this host has an NVIDIA driver; the no-driver path needs a host without one")
def test_probe_on_a_host_without_a_driver_says_libcuda_is_missing() -> None:
    assert probe_driver() == NoDriver("no NVIDIA driver (libcuda.so.1 not found)")


@pytest.mark.skipif(not NO_LIBCUDA, reason="this host has an NVIDIA driver; the no-driver path needs a host without one")
def test_a_cuda_engine_without_a_driver_is_refused_with_the_exact_reason() -> None:
    decision = decide(CUDA_12_9, probe_driver())
    assert decision.refused and decision.device == "cpu"
    with pytest.raises(AcceleratorError, match=r"^no NVIDIA driver \(libcuda\.so\.1 not found\)$"):
        decision.enforce()


def test_a_cpu_engine_serves_on_the_cpu_with_or_without_a_driver() -> None:
    assert decide(EngineBuild(), NoDriver("no NVIDIA driver (libcuda.so.1 not found)")).device == "cpu"
    with_gpu = decide(EngineBuild(), Driver(cuda_version=(12, 9), gpus=(H200,)))
    assert with_gpu.device == "cpu" and not with_gpu.refused
    assert "--accelerator cuda" in with_gpu.notes[0]


def test_a_cuda_engine_runs_on_a_hopper_gpu_with_a_driver_of_the_same_major() -> None:
    decision = decide(CUDA_12_9, Driver(cuda_version=(12, 2), gpus=(H200, L4)))
    assert decision.device == "cuda" and decision.gpus == (H200, L4) and decision.notes == ()


def test_a_driver_of_an_older_major_is_refused_naming_both_versions() -> None:
    decision = decide(CUDA_12_9, Driver(cuda_version=(11, 8), gpus=(H200,)))
    assert decision.problem == "driver supports CUDA 11.8, the bundle's engine needs ≥ 12.0: update the NVIDIA driver"


def test_a_gpu_that_needs_ptx_needs_a_driver_as_new_as_the_compiler() -> None:
    old = decide(CUDA_12_9, Driver(cuda_version=(12, 4), gpus=(B200,)))
    assert old.problem is not None
    assert old.problem.startswith("driver supports CUDA 12.4, the bundle's engine needs ≥ 12.9 (to compile its PTX")
    new = decide(CUDA_12_9, Driver(cuda_version=(12, 9), gpus=(B200,)))
    assert new.device == "cuda" and "PTX" in new.notes[0]


def test_a_gpu_older_than_every_built_architecture_is_refused_naming_it() -> None:
    decision = decide(CUDA_12_9, Driver(cuda_version=(12, 9), gpus=(V100,)))
    assert decision.problem == (
        "GPU 0 (Tesla V100-SXM2-32GB) is sm_70, not among the bundle's architectures "
        "(sm_80, sm_86, sm_89, sm_90): rebuild the bundle with --cuda-archs including 70"
    )


def test_an_unusable_gpu_beside_a_usable_one_is_left_out_with_a_note() -> None:
    other = Gpu(index=1, name="Tesla V100", compute_capability=(7, 0), total_bytes=16 * GiB)
    decision = decide(CUDA_12_9, Driver(cuda_version=(12, 9), gpus=(H200, other)))
    assert decision.device == "cuda" and decision.gpus == (H200,)
    assert decision.notes[0].startswith("GPU 1 (Tesla V100) is sm_70")


def test_a_driver_that_sees_no_gpu_is_refused() -> None:
    assert decide(CUDA_12_9, Driver(cuda_version=(12, 9), gpus=())).problem == "the NVIDIA driver sees no GPU"


def test_the_engine_build_record_is_read_without_importing_the_engine(tmp_path: Path) -> None:
    """A fake llama_cpp package whose import would fail: the record is read from beside it, the import never runs."""
    package = tmp_path / "llama_cpp"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('libcuda.so.1: cannot open shared object file')\n")
    (package / "sealbox-engine.json").write_text(json.dumps({"accelerator": "cuda", "cuda_version": "12.9",
                                                             "cuda_archs": [90, 80]}))  # fmt: skip
    code = "from sealbox.runtime.engine.accelerator import EngineBuild; print(EngineBuild.installed())"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "EngineBuild(accelerator='cuda', cuda_version=(12, 9), archs=(80, 90))"


def test_a_malformed_engine_build_record_is_named() -> None:
    with pytest.raises(ValueError, match="cuda_archs"):
        EngineBuild.from_dict({"accelerator": "cuda", "cuda_version": "12.9", "cuda_archs": ["sm_90"]})
    with pytest.raises(ValueError, match="accelerator 'rocm'"):
        EngineBuild.from_dict({"accelerator": "rocm"})


LAYER = 400 * MiB
KV = 100 * MiB


def _split(*gpus: int, layers: int = 80, output: int = 1 * GiB) -> object:
    return split_layers(layers=layers, layer_bytes=LAYER, kv_bytes_per_layer=KV, output_bytes=output,
                        compute_bytes=2 * GiB, gpu_memory_bytes=list(gpus))  # fmt: skip


def test_a_model_that_fits_one_gpu_goes_there_whole() -> None:
    split = _split(80 * GiB)
    assert split.gpu_layers == 81 and split.cpu_layers == 0 and split.note is None


def test_two_equal_gpus_take_half_the_layers_each_and_the_last_the_output_head() -> None:
    split = _split(40 * GiB, 40 * GiB)
    assert [s.layers for s in split.shares] == [40, 40]
    assert [s.output_head for s in split.shares] == [False, True]
    assert split.fractions == (0.5, 0.5) and split.note == "layer split over 2 GPUs in proportion to their memory"


def test_unequal_gpus_split_in_proportion_to_memory() -> None:
    split = _split(60 * GiB, 20 * GiB)
    assert [s.layers for s in split.shares] == [60, 20]


def test_layers_that_fit_on_no_gpu_stay_on_the_cpu_and_the_plan_says_so() -> None:
    split = _split(12 * GiB, 12 * GiB)  # (12 - 2) GiB / 500 MiB = 20 layers each
    assert [s.layers for s in split.shares] == [20, 20] and split.cpu_layers == 40 and split.gpu_layers == 40
    assert split.note == "40 of 80 layers do not fit in GPU memory and run on the CPU (slower)"


def test_a_gpu_too_small_for_the_compute_buffers_is_left_out_with_the_reason() -> None:
    split = _split(80 * GiB, 1 * GiB)
    assert split.shares[1].layers == 0 and "compute buffers" in (split.shares[1].why_unused or "")
    assert split.gpu_layers == 81 and split.note == "1 GPU(s) not used (see each line)"


def _fake_cuda_engine(where: Path) -> Path:
    """A llama_cpp package recorded as a CUDA build whose import fails as a CUDA-linked one does without a driver."""
    package = where / "llama_cpp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('libcuda.so.1: cannot open shared object file')\n")
    record = {"accelerator": "cuda", "cuda_version": "12.9", "cuda_archs": [80, 86, 89, 90]}
    (package / "sealbox-engine.json").write_text(json.dumps(record))
    return where


@pytest.mark.skipif(not NO_LIBCUDA, reason="this host has an NVIDIA driver; the no-driver path needs a host without one")
def test_serve_with_a_cuda_engine_and_no_driver_refuses_before_loading_it(tmp_path: Path, tiny_model: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(_fake_cuda_engine(tmp_path / "site"))}
    command = [str(Path(sys.executable).parent / "sealbox"), "serve", "--model", str(tiny_model), "--no-auth", "--no-audit",
               "--port", "1", "--root", str(tmp_path / "root")]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == AcceleratorError.exit_code, done.stderr
    message = " ".join(done.stderr.split())
    assert "the bundle's engine cannot run on this host: no NVIDIA driver (libcuda.so.1 not found)" in message


@pytest.mark.skipif(not NO_LIBCUDA, reason="this host has an NVIDIA driver; the no-driver path needs a host without one")
def test_the_doctor_reports_the_refusal_for_the_releases_cuda_engine(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from sealbox.runtime.doctor import CheckStatus, check_gpu

    release = tmp_path / "release"
    _fake_cuda_engine(release / "venv" / "lib" / "python3.11" / "site-packages")
    from sealbox.runtime.policy import Policy

    finding = check_gpu(SimpleNamespace(release_dir=release, policy=Policy()))  # type: ignore[arg-type]
    assert finding.status is CheckStatus.FAIL
    assert finding.summary == ("CUDA 12.9 engine for sm_80, sm_86, sm_89, sm_90: `sealbox serve` refuses: "
                               "no NVIDIA driver (libcuda.so.1 not found)")  # fmt: skip


def test_the_doctor_warns_when_the_policy_hides_a_gpu_from_the_unit() -> None:
    from sealbox.runtime.doctor import CheckStatus, gpu_finding
    from sealbox.runtime.engine.accelerator import cuda_device_nodes

    second = Gpu(index=1, name="NVIDIA H200", compute_capability=(9, 0), total_bytes=141 * GiB)
    driver = Driver(cuda_version=(12, 9), gpus=(H200, second))
    one_gpu = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm")
    finding = gpu_finding(CUDA_12_9, driver, one_gpu)
    assert finding.status is CheckStatus.WARN and "leave out /dev/nvidia1:" in finding.summary
    assert gpu_finding(CUDA_12_9, driver, cuda_device_nodes(2)).status is CheckStatus.PASS
    assert finding.details[0] == "GPU 0: NVIDIA H200, sm_90, 140.0 GiB free of 141.0 GiB"


def test_a_fifo_in_place_of_the_engine_build_record_is_refused_without_blocking(tmp_path: Path) -> None:
    package = tmp_path / "llama_cpp"
    package.mkdir()
    os.mkfifo(package / "sealbox-engine.json")
    with pytest.raises(AcceleratorError, match="sealbox-engine.json: unreadable engine build record"):
        EngineBuild.of_package(package)


def test_a_symlink_in_place_of_the_engine_build_record_is_not_followed(tmp_path: Path) -> None:
    package = tmp_path / "llama_cpp"
    package.mkdir()
    elsewhere = tmp_path / "cpu.json"
    elsewhere.write_text(json.dumps({"accelerator": "cpu"}))
    (package / "sealbox-engine.json").symlink_to(elsewhere)
    with pytest.raises(AcceleratorError, match="unreadable engine build record"):
        EngineBuild.of_package(package)
