"""vLLM (with Ray) as an engine kind, up to the process boundary: no machine of this project has vLLM's GPUs.

What is shown: the launch command, environment, `ray start` and unit rendered from the policy; the child started
from that command installs sealbox's egress guard and stops exactly at `import vllm`; and pip resolves a vLLM stack
for a Linux x86_64 CUDA target of another Python than this one, from a local wheel folder, with no index at all.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from sealbox.bundler.manifest import Target
from sealbox.bundler.sources.resolution import resolve
from sealbox.runtime.policy import Policy
from sealbox.runtime.vllm.launch import OFFLINE_ENVIRONMENT, VllmConfigError, render_launch

SINGLE = ('[service]\ngpu_devices = ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2", "/dev/nvidia3", "/dev/nvidiactl"]\n'
          '[egress]\nallow_ports = [8080, 8001]\n\n') + '[vllm]\nmodel_dir = "models/llama-70b"\nserved_name = "llama-70b"\ntensor_parallel_size = 4\nport = 8001\n'
CLUSTER = SINGLE + ('node_ip = "10.0.0.12"\nray_head = "10.0.0.11:6379"\nray_peers = ["10.0.0.11", "10.0.0.13"]\n'
                    "pipeline_parallel_size = 2\n")  # fmt: skip


def _launch(text: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    return render_launch(Policy.from_toml(text), release_dir=tmp_path / "release", python=Path(sys.executable))


def test_the_vllm_child_listens_on_loopback_with_the_policys_parallelism(tmp_path: Path) -> None:
    launch = _launch(SINGLE, tmp_path)
    argv = launch.argv
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "8001"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "4"
    assert argv[argv.index("--distributed-executor-backend") + 1] == "mp"  # one node: no Ray cluster
    assert argv[argv.index("--model") + 1] == str(tmp_path / "release" / "models" / "llama-70b")
    assert launch.ray_argv is None and launch.peers == () and launch.ports == ()


def test_the_environment_turns_off_every_phone_home_of_the_stack(tmp_path: Path) -> None:
    environment = _launch(SINGLE, tmp_path).environment
    for key, value in OFFLINE_ENVIRONMENT.items():
        assert environment[key] == value
    assert {"HF_HUB_OFFLINE", "VLLM_NO_USAGE_STATS", "RAY_USAGE_STATS_ENABLED"} <= set(environment)
    assert json.loads(environment["SEALBOX_VLLM_EGRESS"])["allow"] == ["127.0.0.0/8", "::1/128"]


def test_a_multi_node_policy_renders_ray_with_fixed_ports_and_lets_in_only_the_peers(tmp_path: Path) -> None:
    launch = _launch(CLUSTER, tmp_path)
    assert launch.argv[launch.argv.index("--distributed-executor-backend") + 1] == "ray"
    assert launch.environment["RAY_ADDRESS"] == "10.0.0.11:6379" and launch.environment["VLLM_HOST_IP"] == "10.0.0.12"
    assert launch.ray_argv is not None and "--address=10.0.0.11:6379" in launch.ray_argv
    assert "--disable-usage-stats" in launch.ray_argv and "--include-dashboard=false" in launch.ray_argv
    assert launch.peers == ("10.0.0.11", "10.0.0.13")
    assert {6379, 6380, 6381, 10002, 10100} <= set(launch.ports) and 10101 not in launch.ports
    egress = json.loads(launch.environment["SEALBOX_VLLM_EGRESS"])
    assert egress["allow"] == ["127.0.0.0/8", "::1/128"]  # the peers are opened on Ray's ports only, not on all
    assert egress["peers"] == [f"10.0.0.{n}:{port}" for n in (11, 13) for port in ("6379", "6380", "6381", "10002-10100")]
    unit = launch.unit(label="llm-7", user="sealbox", release_dir=tmp_path, devices=("/dev/nvidia0",))
    assert "IPAddressAllow=localhost 10.0.0.11 10.0.0.13\n" in unit and "IPAddressDeny=any\n" in unit
    assert 'Environment="HF_HUB_OFFLINE=1"\n' in unit and "DeviceAllow=/dev/nvidia0 rw\n" in unit
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    # systemd's quoting is the shell's double quoting plus %% and $$: read back, it is the command exactly. This node
    # (10.0.0.12) is a worker of the head 10.0.0.11: its unit runs Ray alone, never a second vLLM API server.
    assert launch.node == "worker"
    assert shlex.split(exec_start.removeprefix("ExecStart=").replace("%%", "%").replace("$$", "$")) == launch.ray_argv
    egress_line = next(line for line in unit.splitlines() if "SEALBOX_VLLM_EGRESS" in line)
    assert shlex.split(egress_line.removeprefix("Environment="))[0] == (
        "SEALBOX_VLLM_EGRESS=" + launch.environment["SEALBOX_VLLM_EGRESS"])


def test_the_head_node_starts_ray_as_head_on_its_fixed_port(tmp_path: Path) -> None:
    head = CLUSTER.replace('node_ip = "10.0.0.12"', 'node_ip = "10.0.0.11"').replace(
        'ray_peers = ["10.0.0.11", "10.0.0.13"]', 'ray_peers = ["10.0.0.12", "10.0.0.13"]')
    launch = _launch(head, tmp_path)
    assert launch.ray_argv is not None
    assert launch.ray_argv[5:8] == ["--head", "--port", "6379"]
    assert launch.peers == ("10.0.0.12", "10.0.0.13")
    # The head serves: its unit's command is the vLLM child's, on Ray's backend, joining the cluster at its own GCS.
    assert launch.node == "head" and launch.service_argv == launch.argv
    assert launch.argv[launch.argv.index("--distributed-executor-backend") + 1] == "ray"
    assert launch.environment["RAY_ADDRESS"] == "10.0.0.11:6379"


def test_a_cluster_without_a_head_or_a_policy_without_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VllmConfigError, match="model_dir"):
        _launch("[vllm]\n", tmp_path)
    with pytest.raises(VllmConfigError, match="ray_head"):
        _launch(SINGLE + 'node_ip = "10.0.0.12"\n', tmp_path)


def _run(argv: list[str], environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **environment}
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd="/")


def test_the_child_installs_the_egress_guard_then_stops_exactly_at_import_vllm(tmp_path: Path) -> None:
    launch = _launch(SINGLE, tmp_path)
    result = _run(launch.argv, launch.environment)
    assert result.returncode == 1
    assert "No module named 'vllm'" in result.stderr, result.stderr  # every step before vLLM ran
    broken = _run(launch.argv, {**launch.environment, "SEALBOX_VLLM_EGRESS": '{"allow": ["nowhere"]}'})
    assert broken.returncode == 1 and "vllm" not in broken.stderr.splitlines()[-1]  # the guard comes first
    assert "ValidationError" in broken.stderr


def _wheel(folder: Path, name: str, version: str, tag: str, requires: tuple[str, ...] = ()) -> None:
    """A real (tiny) wheel: dist-info with METADATA, WHEEL and RECORD, as pip reads them."""
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {item}\n" for item in requires)
    files = {f"{name}/__init__.py": "", f"{info}/METADATA": metadata,
             f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: sealbox-tests\nRoot-Is-Purelib: false\nTag: {tag}\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{name}-{version}-{tag}.whl", "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)


def test_pip_resolves_the_vllm_stack_for_a_linux_cuda_target_with_no_index(tmp_path: Path) -> None:
    """Target Python 3.12 on manylinux x86_64 (this host runs another Python): pip picks the target's wheels, skips
    the newer macOS-only vLLM, and reaches no index (`--no-index`, a local folder only)."""
    house = tmp_path / "wheels"
    house.mkdir()
    linux, mac = "cp312-cp312-manylinux_2_28_x86_64", "cp312-cp312-macosx_11_0_arm64"
    _wheel(house, "vllm", "0.9.0", linux, ("ray>=2.40", "torch==2.7.0"))
    _wheel(house, "vllm", "0.9.1", mac, ("ray>=2.40",))
    _wheel(house, "ray", "2.44.0", linux)
    _wheel(house, "torch", "2.7.0", linux, ("nvidia-cublas-cu12==12.6.4.1",))
    _wheel(house, "nvidia_cublas_cu12", "12.6.4.1", "py3-none-manylinux_2_28_x86_64")
    target = Target(python="3.12", platforms=("manylinux_2_28_x86_64",))
    resolved = {canonicalize_name(item.name): item for item in resolve(["vllm"], target, find_links=[house], no_index=True)}
    assert {name: item.version for name, item in resolved.items()} == {
        "vllm": "0.9.0", "ray": "2.44.0", "torch": "2.7.0", "nvidia-cublas-cu12": "12.6.4.1"}
    assert all(item.url.startswith("file://") for item in resolved.values())


def test_systemd_reads_the_rendered_unit_without_complaint(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must check the vLLM unit with systemd-analyze")
        pytest.skip("systemd-analyze is not installed here")
    unit = tmp_path / "sealbox-vllm.service"
    unit.write_text(_launch(CLUSTER, tmp_path).unit(label="llm-7", user="root", release_dir=tmp_path,
                                                    devices=("/dev/null",)))  # fmt: skip
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_a_vllm_policy_whose_child_port_the_egress_ports_do_not_list_is_refused() -> None:
    """The guard, the unit and the nftables rules open loopback ports from egress.allow_ports only: a child port
    outside it would be a front that cannot reach its engine (or a hole opened on the side)."""
    from sealbox.runtime.policy import PolicyError

    with pytest.raises(PolicyError, match="vllm.port"):
        Policy.from_toml(SINGLE.replace("allow_ports = [8080, 8001]", "allow_ports = [8080]"))
    assert Policy.from_toml(SINGLE.replace("allow_ports = [8080, 8001]", "allow_ports = []")).vllm.port == 8001


def test_a_vllm_policy_opening_fewer_gpus_to_the_unit_than_its_parallelism_needs_is_refused() -> None:
    """The child runs inside sealbox's unit (DevicePolicy=closed): tensor parallel 4 on one node needs 4 GPUs there."""
    from sealbox.runtime.policy import PolicyError

    with pytest.raises(PolicyError, match="needs 4"):
        Policy.from_toml(SINGLE.replace('"/dev/nvidia3", ', ""))
    assert Policy.from_toml(CLUSTER.replace('"/dev/nvidia3", ', "")).vllm.pipeline_parallel_size == 2  # 8 over 3 nodes


def test_the_release_unit_walls_in_the_vllm_child_with_the_front(tmp_path: Path) -> None:
    """On the node that serves, vLLM is `sealbox serve`'s child: the release's one unit (its cgroup: IPAddressDeny,
    the device policy, the syscall filter) holds both, opens the GPUs its parallelism needs, and its nftables rules
    let the account reach exactly the front's and the child's loopback ports."""
    from sealbox.bundler.service_files import ServiceContext, render_nft, render_unit

    context = ServiceContext.build(label="llm-1", root=tmp_path / "root", release_dir=tmp_path / "release",
                                   executable=tmp_path / "venv" / "bin" / "sealbox", policy=Policy.from_toml(SINGLE))  # fmt: skip
    unit = render_unit(context)
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.split()[1:2] == ["serve"]
    assert "IPAddressDeny=any\n" in unit and "DevicePolicy=closed\n" in unit
    assert [line for line in unit.splitlines() if line.startswith("DeviceAllow=")] == [
        f"DeviceAllow=/dev/nvidia{n} rw" for n in range(4)] + ["DeviceAllow=/dev/nvidiactl rw"]
    assert "MemoryDenyWriteExecute=yes" not in unit  # CUDA and Triton compile kernels at run time
    assert "th dport { 8080, 8001 } accept" in render_nft(context, nft_path="/x.nft")
