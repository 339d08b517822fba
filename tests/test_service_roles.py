"""The release's one unit runs what this host is for, under the same wall: `sealbox serve` on an engine host or a
single host, `sealbox gateway` on the mesh's gateway host (named at install by `--mesh-host`), `ray start --block` on
a vLLM cluster's worker node. Rendered per role, read by `systemd-analyze verify`, and, for the gateway, installed
from a signed bundle and started from the unit's own command line."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import require_lockdown
from install_support import Item, Publisher, make_keys, trust
from mesh_support import Mesh, MeshHost, host_entry, mesh_policy_text
from server_support import REPO, create_api_key, free_port
from sealbox.bundler.service_files import (
    ServiceContext,
    ServiceFileError,
    ServiceRole,
    render_nft,
    render_unit,
    write_service_files,
)
from sealbox.runtime.policy import Policy
from sealbox.runtime.staging_server import stop_child, wait_for_ready_line
from sealbox.runtime.vllm.launch import RAY_BOOTSTRAP

ROOT = Path("/var/lib/sealbox")
RELEASE = ROOT / "releases" / "mesh-2"
EXECUTABLE = RELEASE / "venv" / "bin" / "sealbox"
HOSTS = [MeshHost("gw", "gateway", "10.0.0.10", 8090), MeshHost("gpu-1", "engine", "10.0.0.11", 8443),
         MeshHost("gpu-2", "engine", "10.0.0.12", 8443)]  # fmt: skip
CLIENT_NETWORKS = 'client_networks = ["10.20.0.0/16"]\n'
CLIENTS = "[service]\n" + CLIENT_NETWORKS
RAY_WORKER = ('[service]\ngpu_devices = ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl"]\n'
              '[egress]\nallow_ports = [8080, 8001]\n'
              '[vllm]\nmodel_dir = "models/llama-70b"\nport = 8001\ntensor_parallel_size = 2\n'
              'pipeline_parallel_size = 2\nnode_ip = "10.0.0.12"\nray_head = "10.0.0.11:6379"\n'
              'ray_peers = ["10.0.0.11"]\n')  # fmt: skip


def mesh_text(extra: str = "") -> str:
    """The mesh's one policy (its `[service]` table is open: `extra` may add to it first)."""
    return mesh_policy_text(Path("/etc/sealbox/mesh"), HOSTS, extra=CLIENT_NETWORKS + extra)


def context(text: str, mesh_host: str | None = None, *, release: Path = RELEASE,
            executable: Path = EXECUTABLE) -> ServiceContext:  # fmt: skip
    return ServiceContext.build(label="mesh-2", root=ROOT, release_dir=release, executable=executable,
                                policy=Policy.from_toml(text), mesh_host=mesh_host)  # fmt: skip


def service_lines(unit: str) -> list[str]:
    lines = unit.splitlines()
    section = lines[lines.index("[Service]") + 1 : lines.index("[Install]")]
    return [line for line in section if line.strip() and not line.startswith("#")]


def values(unit: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in service_lines(unit) if line.startswith(f"{key}=")]


def exec_start(unit: str) -> list[str]:
    """ExecStart read back as systemd reads it (shell-like quoting, `%%` and `$$` undoubled)."""
    (line,) = values(unit, "ExecStart")
    return shlex.split(line.replace("%%", "%").replace("$$", "$"))


# --- which command: from the policy and the host named at install ---------------------------------------------------


def test_the_gateway_host_gets_a_unit_that_runs_sealbox_gateway_on_its_releases_policy() -> None:
    gateway = context(mesh_text(), "gw")
    assert gateway.role is ServiceRole.GATEWAY
    unit = render_unit(gateway)
    assert exec_start(unit) == [str(EXECUTABLE), "gateway", "--root", str(ROOT), "--policy", f"{RELEASE}/policy.toml"]
    assert "Description=sealbox mesh gateway (mesh-2)" in unit.splitlines()


@pytest.mark.parametrize(("text", "mesh_host"), [(mesh_text(), "gpu-1"), (CLIENTS, None), (CLIENTS, "gw")],
                         ids=["mesh-engine", "single-host", "no-mesh-in-the-policy"])  # fmt: skip
def test_an_engine_host_and_a_host_outside_any_mesh_get_the_serve_unit(text: str, mesh_host: str | None) -> None:
    served = context(text, mesh_host)
    assert served.role is ServiceRole.SERVE
    assert exec_start(render_unit(served)) == [str(EXECUTABLE), "serve", "--root", str(ROOT)]


def test_a_mesh_policy_renders_no_unit_for_a_host_it_does_not_name() -> None:
    """Without the host's name the role is unknown: guessing `serve` would start an engine on the gateway host."""
    with pytest.raises(ServiceFileError, match=r"--mesh-host NAME"):
        context(mesh_text(), None)
    with pytest.raises(ServiceFileError, match="names no host 'gpu-9'"):
        context(mesh_text(), "gpu-9")


# --- the same wall for every role -----------------------------------------------------------------------------------


def test_the_gateway_unit_keeps_every_hardening_line_of_the_serve_unit_and_opens_no_gpu() -> None:
    """Line for line the engine's unit but for the command (and the devices: the policy is the whole mesh's, with
    the engines' GPUs in it, but the gateway runs no engine, so it gets no device and no W^X memory)."""
    text = mesh_text()
    gateway_unit, engine_unit = render_unit(context(text, "gw")), render_unit(context(text, "gpu-1"))
    assert values(engine_unit, "DeviceAllow")  # the default policy opens a GPU to an engine
    gateway, engine = service_lines(gateway_unit), service_lines(engine_unit)
    differ = ("ExecStart=", "DevicePolicy=", "DeviceAllow=", "IPAddressAllow=", "PrivateDevices=",
              "MemoryDenyWriteExecute=")  # fmt: skip
    same = [line for line in gateway if not line.startswith(differ)]
    assert same == [line for line in engine if not line.startswith(differ)]
    assert [line for line in gateway if line.startswith(differ[1:])] == [
        "IPAddressAllow=localhost 10.20.0.0/16 10.0.0.11/32 10.0.0.12/32", "PrivateDevices=yes",
        "MemoryDenyWriteExecute=yes"]  # fmt: skip


def test_the_gateways_walls_let_through_its_clients_side_and_its_engines_on_their_ports_only() -> None:
    """Even where the mesh's policy also names a Ray cluster: the gateway is no Ray node, so Ray's ports stay shut."""
    ray = '[vllm]\nnode_ip = "10.0.0.11"\nray_head = "10.0.0.11:6379"\nray_peers = ["10.0.0.12"]\n'
    gateway = context(mesh_text(ray), "gw")
    assert values(render_unit(gateway), "IPAddressAllow") == ["localhost 10.20.0.0/16 10.0.0.11/32 10.0.0.12/32"]
    assert values(render_unit(gateway), "IPAddressDeny") == ["any"]
    accepts = [line.strip() for line in render_nft(gateway, nft_path="/x.nft").splitlines() if "daddr" in line]
    assert accepts == [
        'ip daddr 10.0.0.11 meta l4proto { tcp, udp } th dport 8443 accept comment "sealbox: engine gpu-1"',
        'ip daddr 10.0.0.12 meta l4proto { tcp, udp } th dport 8443 accept comment "sealbox: engine gpu-2"',
    ]
    engine = context(mesh_text(ray), "gpu-1")  # the engine that is the Ray head keeps Ray's ports
    assert any("Ray GCS 10.0.0.12" in line for line in render_nft(engine, nft_path="/x.nft").splitlines())


def test_a_ray_worker_nodes_unit_runs_ray_start_block_behind_the_guard_with_the_offline_variables() -> None:
    worker = context(RAY_WORKER)
    assert worker.role is ServiceRole.RAY_WORKER
    unit = render_unit(worker)
    python = str(EXECUTABLE.parent / "python")
    assert exec_start(unit) == [
        python, "-I", "-c", RAY_BOOTSTRAP, "start", "--address=10.0.0.11:6379", "--node-ip-address", "10.0.0.12",
        "--node-manager-port", "6380", "--object-manager-port", "6381", "--min-worker-port", "10002",
        "--max-worker-port", "10100", "--include-dashboard=false", "--disable-usage-stats", "--block"]  # fmt: skip
    environment = dict(shlex.split(value)[0].split("=", 1) for value in values(unit, "Environment") if value.startswith('"'))
    assert environment["HF_HUB_OFFLINE"] == "1" and environment["RAY_USAGE_STATS_ENABLED"] == "0"
    assert environment["VLLM_HOST_IP"] == "10.0.0.12" and environment["VLLM_CACHE_ROOT"] == f"{ROOT}/run/vllm-cache"
    assert json.loads(environment["SEALBOX_VLLM_EGRESS"])["peers"] == [
        "10.0.0.11:6379", "10.0.0.11:6380", "10.0.0.11:6381", "10.0.0.11:10002-10100"]
    assert values(unit, "IPAddressAllow") == ["localhost 10.0.0.11/32"]
    assert values(unit, "Restart") == ["on-failure"]  # systemd is the supervisor: `ray start --block` fails, it restarts
    assert values(unit, "DeviceAllow") == ["/dev/nvidia0 rw", "/dev/nvidia1 rw", "/dev/nvidiactl rw"]
    assert values(unit, "ProtectSystem") == ["strict"] and values(unit, "SystemCallFilter")
    assert values(unit, "RestrictAddressFamilies") == ["AF_INET AF_INET6 AF_UNIX AF_NETLINK"]  # NCCL's getifaddrs


def test_only_a_node_of_a_vllm_cluster_gets_netlink() -> None:
    for text, host in [(mesh_text(), "gw"), (mesh_text(), "gpu-1"), (CLIENTS, None),
                       (mesh_text('[vllm]\nnode_ip = "10.0.0.11"\nray_head = "10.0.0.11:6379"\n'), "gw")]:  # fmt: skip
        assert values(render_unit(context(text, host)), "RestrictAddressFamilies") == ["AF_INET AF_INET6 AF_UNIX"]


def test_the_head_node_keeps_the_serve_unit_its_vllm_child_joins_ray_there() -> None:
    head = RAY_WORKER.replace('node_ip = "10.0.0.12"', 'node_ip = "10.0.0.11"').replace('ray_peers = ["10.0.0.11"]',
                                                                                          'ray_peers = ["10.0.0.12"]')
    assert context(head).role is ServiceRole.SERVE
    assert values(render_unit(context(head)), "RestrictAddressFamilies") == ["AF_INET AF_INET6 AF_UNIX AF_NETLINK"]


@pytest.mark.parametrize("role", ["gateway", "engine", "ray-worker"])
def test_systemd_reads_each_roles_unit_without_complaint(role: str, tmp_path: Path) -> None:
    require_lockdown("systemd-analyze")
    release = tmp_path / "release"
    executable = release / "venv" / "bin" / "sealbox"
    executable.parent.mkdir(parents=True)
    executable.symlink_to(shutil.which("true") or "/bin/true")  # verify checks that ExecStart's program exists
    (executable.parent / "python").symlink_to(sys.executable)
    text, host = {"gateway": (mesh_text(), "gw"), "engine": (mesh_text(), "gpu-1"), "ray-worker": (RAY_WORKER, None)}[role]
    # an account systemd knows and does not warn about (it calls `nobody` unsafe); the user is not what is checked
    text = re.sub(r'(?m)^user = "[^"]*"\n', "", text).replace("[service]\n", '[service]\nuser = "root"\n', 1)
    files = write_service_files(release, context(text, host, release=release, executable=executable))
    result = subprocess.run(["systemd-analyze", "verify", str(files.unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("role", ["gateway", "ray-worker"])
def test_the_gateway_and_ray_worker_units_score_at_most_2_0_like_the_serve_unit(role: str, tmp_path: Path) -> None:
    require_lockdown("systemd-analyze")
    text, host = {"gateway": (mesh_text(), "gw"), "ray-worker": (RAY_WORKER, None)}[role]
    files = write_service_files(tmp_path, context(text, host))
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(files.unit)], capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match and float(match.group(1)) <= 2.0, result.stdout + result.stderr


# --- installed from a signed bundle, then started from the unit's own command line ---------------------------------


def test_bundle_install_on_the_gateway_host_writes_a_unit_whose_command_starts_the_gateway(tmp_path: Path) -> None:
    """The whole path: `bundle install --mesh-host gw` of a signed bundle, then the unit's ExecStart and SEALBOX_ROOT
    run as systemd would run them. What starts is a gateway: its engine (not running here) tried over mutual TLS
    with the installed mesh key and left out of rotation, its status answering a client's key. Had the host been
    given the serve unit, this fails."""
    gateway_port = free_port()
    hosts = [MeshHost("gw", "gateway", "127.0.0.1", gateway_port), MeshHost("gpu-1", "engine", "127.0.0.2", free_port())]
    mesh = Mesh(tmp_path / "mesh", hosts).create()
    root = tmp_path / "root"
    engine_key = tmp_path / "gpu-1.key"
    engine_key.write_text("sk-not-used-engine-is-down\n")
    engine_key.chmod(0o600)
    extra = (f'[gateway]\nhost = "127.0.0.1"\nport = {gateway_port}\n[[gateway.engines]]\nname = "gpu-1"\n'
             f'url = "{host_entry(hosts[1]).url}"\napi_key_file = "{engine_key}"\n')  # fmt: skip
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(mesh.policy_path.read_text().replace(str(mesh.key_dir), str(root / "mesh")) + extra)
    keys = make_keys(tmp_path / "keys", "publisher")
    bundle = Publisher(keys).publish(tmp_path / "bundle", [Item("policy", "policy.toml", policy_file)], name="mesh",
                                     version=1, signers=("publisher",))  # fmt: skip
    trust(root, keys / "publisher.pub")
    sealbox_cli = [sys.executable, "-c", "from sealbox.cli import main; main()"]
    done = subprocess.run([*sealbox_cli, "bundle", "install", str(bundle), "--root", str(root), "--mesh-host", "gw",
                           "--mesh-keys", str(mesh.package("gw")), "--skip-eval", "--yes"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr
    unit = (root / "current" / "service" / "sealbox.service").read_text()
    command = exec_start(unit)
    assert command[1] == "gateway", command
    key = create_api_key(root, "ward-7")
    environment = dict(value.split("=", 1) for value in values(unit, "Environment"))
    process = subprocess.Popen(command, env={**os.environ, "SEALBOX_ROOT": environment["SEALBOX_ROOT"]},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd="/")  # fmt: skip
    lines: list[str] = []
    try:
        assert wait_for_ready_line(process, lines, 120), "".join(lines)
        assert f"through the gateway (0/1 engine hosts in rotation) on http://127.0.0.1:{gateway_port}/v1" in "".join(lines)
        with httpx.Client(trust_env=False) as client:
            status = client.get(f"http://127.0.0.1:{gateway_port}/v1/gateway/status",
                                headers={"Authorization": f"Bearer {key}"}, timeout=30)  # fmt: skip
        assert status.status_code == 200, status.text
        assert [engine["name"] for engine in status.json()["engines"]] == ["gpu-1"]
    finally:
        stop_child(process, timeout_s=30)
