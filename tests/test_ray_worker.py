"""A vLLM cluster's worker node runs Ray alone: its unit's command is `ray start --address=HEAD --block` in the
release's interpreter behind sealbox's egress guard, with the offline variables, Ray's fixed ports and peers from
the policy, and `Restart=on-failure`. Run here up to the process boundary against a stand-in `ray` package
(tests/ray_standin) and a stand-in head's GCS on another loopback address: the command the unit names starts,
joins the head, has a phone-home blocked, blocks; a stop ends it cleanly, the head's loss ends it as a failure
(what makes systemd start it again), and started again it joins again."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sealbox.bundler.service_files import ServiceContext, ServiceRole, render_nft, render_unit
from sealbox.runtime.policy import Policy, PolicyError
from sealbox.runtime.staging_server import free_loopback_port
from sealbox.runtime.vllm.launch import RAY_BOOTSTRAP, VllmConfigError, systemd_quote

STANDIN = Path(__file__).resolve().parent / "ray_standin"
HEAD_ADDRESS, NODE_ADDRESS = "127.0.0.2", "127.0.0.1"
STOP_S = 30


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A release whose venv's python reaches this project's environment and the stand-in `ray` (under -I too)."""
    release = tmp_path_factory.mktemp("release")
    venv = release / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = (venv / "lib").glob("python*/site-packages")
    ours = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (site / "sealbox-test.pth").write_text(f"import site; site.addsitedir({str(ours)!r})\n{STANDIN}\n")
    return release


class Head:
    """The head's GCS port, on its own loopback address: accepts the worker's connection, and can drop it."""

    def __init__(self) -> None:
        self.listener = socket.create_server((HEAD_ADDRESS, 0))
        self.port = int(self.listener.getsockname()[1])

    def accept(self) -> socket.socket:
        self.listener.settimeout(STOP_S)
        connection, _ = self.listener.accept()
        return connection


@pytest.fixture
def head() -> Iterator[Head]:
    head = Head()
    yield head
    head.listener.close()


def worker_policy(head: Head, node_manager_port: int) -> Policy:
    return Policy.from_toml(
        '[egress]\nallow_ports = [8080, 8001]\n'
        f'[vllm]\nmodel_dir = "models/llama-70b"\nport = 8001\nnode_ip = "{NODE_ADDRESS}"\n'
        f'ray_head = "{HEAD_ADDRESS}:{head.port}"\nray_port = {head.port}\nray_peers = ["{HEAD_ADDRESS}"]\n'
        f"ray_node_manager_port = {node_manager_port}\nray_object_manager_port = {free_loopback_port()}\n"
        "ray_min_worker_port = 20002\nray_max_worker_port = 20010\n")  # fmt: skip


def unit_for(release: Path, policy: Policy) -> str:
    context = ServiceContext.build(label="llm-2", root=release.parent / "root", release_dir=release,
                                   executable=release / "venv" / "bin" / "sealbox", policy=policy)  # fmt: skip
    assert context.role is ServiceRole.RAY_WORKER
    return render_unit(context)


def service_values(unit: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith(f"{key}=")]


def unit_command(unit: str) -> tuple[list[str], dict[str, str]]:
    """ExecStart and the Environment= assignments, read back as systemd reads them."""
    (line,) = service_values(unit, "ExecStart")
    argv = shlex.split(line.replace("%%", "%").replace("$$", "$"))
    environment = {}
    for value in service_values(unit, "Environment"):
        key, _, text = shlex.split(value.replace("%%", "%").replace("$$", "$"))[0].partition("=")
        environment[key] = text
    return argv, environment


@dataclass
class Node:
    """The unit's command running as systemd would start it (its environment, plus PATH and the probe's port)."""

    argv: list[str]
    environment: dict[str, str]
    process: subprocess.Popen[str] = field(init=False)
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.environment, cwd="/", stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def read_until(self, text: str) -> str:
        """Stderr up to the line holding `text` (the process's own report is the synchronisation)."""
        assert self.process.stderr is not None
        while line := self.process.stderr.readline():
            self.lines.append(line)
            if text in line:
                return line
        pytest.fail(f"the node exited ({self.process.wait()}) before {text!r}:\n{''.join(self.lines)}")

    def rest(self) -> str:
        """All of stderr: only once the process has exited (until then, reading to the end would wait for it)."""
        assert self.process.stderr is not None and self.process.poll() is not None
        self.lines.append(self.process.stderr.read())
        return "".join(self.lines)

    def end(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(STOP_S)


@pytest.fixture
def probe() -> Iterator[socket.socket]:
    """A loopback port the policy allows nobody (not in allow_ports, not a Ray peer's): where a phone-home goes."""
    listener = socket.create_server(("127.0.0.1", 0))
    yield listener
    listener.close()


def start_node(release: Path, head: Head, probe: socket.socket) -> tuple[Node, str, int]:
    node_manager_port = free_loopback_port()
    unit = unit_for(release, worker_policy(head, node_manager_port))
    argv, environment = unit_command(unit)
    extra = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "STANDIN_RAY_PHONE_HOME_PORT": str(probe.getsockname()[1])}
    return Node(argv, {**environment, **extra}), unit, node_manager_port


def nothing_arrived(listener: socket.socket) -> bool:
    listener.setblocking(False)
    try:
        listener.accept()[0].close()
    except BlockingIOError:
        return True
    return False


def test_the_worker_units_command_joins_the_head_behind_the_guard_and_a_stop_ends_it_cleanly(
    release: Path, head: Head, probe: socket.socket
) -> None:
    node, unit, node_manager_port = start_node(release, head, probe)
    try:
        started = json.loads(node.read_until("standin ray: started ").split("started ", 1)[1])
        assert node.argv[:4] == [str(release / "venv" / "bin" / "python"), "-I", "-c", RAY_BOOTSTRAP]
        assert started["argv"] == node.argv[4:]
        assert started["argv"][:2] == ["start", f"--address={HEAD_ADDRESS}:{head.port}"]
        assert started["argv"][-1] == "--block" and "--disable-usage-stats" in started["argv"]
        assert started["env"] == {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "VLLM_HOST_IP": NODE_ADDRESS,
                                  "VLLM_NO_USAGE_STATS": "1", "RAY_ADDRESS": f"{HEAD_ADDRESS}:{head.port}"}  # fmt: skip
        assert "refused: EgressBlockedError" in node.read_until("phone-home"), "".join(node.lines)
        assert f"sealbox egress guard (ray {node.process.pid}): blocked" in "".join(node.lines)
        assert nothing_arrived(probe)
        node.read_until("standin ray: joined")
        gcs = head.accept()  # the worker's connection to the GCS, on the head's Ray port (a Ray peer's); held open
        with socket.create_connection((NODE_ADDRESS, node_manager_port), timeout=STOP_S):
            pass  # its node manager listens on node_ip at the policy's fixed port
        assert node.process.poll() is None  # --block: it stays
        node.process.send_signal(signal.SIGTERM)  # what `systemctl stop` sends
        assert node.process.wait(STOP_S) == 0, node.rest()  # a clean stop: Restart=on-failure leaves it stopped
        assert "standin ray: stopped" in node.rest()
        gcs.close()
    finally:
        node.end()


def test_a_worker_that_loses_the_head_exits_as_a_failure_and_started_again_rejoins(
    release: Path, head: Head, probe: socket.socket
) -> None:
    node, unit, _ = start_node(release, head, probe)
    assert service_values(unit, "Restart") == ["on-failure"] and service_values(unit, "RestartSec") == ["5s"]
    again = None
    try:
        node.read_until("standin ray: joined")
        head.accept().close()  # the head goes away: the node is no longer in the cluster
        assert node.process.wait(STOP_S) == 1, node.rest()  # a failure: systemd starts the unit's command again
        again = Node(node.argv, node.environment)
        again.read_until("standin ray: joined")
        connection = head.accept()  # it is back in the cluster
        connection.close()
        assert again.process.wait(STOP_S) == 1
    finally:
        node.end()
        if again is not None:
            again.end()


def test_the_worker_node_lets_through_the_head_on_rays_ports_only(release: Path, head: Head) -> None:
    context = ServiceContext.build(label="llm-2", root=release.parent / "root", release_dir=release,
                                   executable=release / "venv" / "bin" / "sealbox",
                                   policy=worker_policy(head, 6380))  # fmt: skip
    assert service_values(render_unit(context), "IPAddressAllow") == [f"localhost {HEAD_ADDRESS}/32"]
    ports = sorted(line.split("th dport ")[1].split()[0] for line in render_nft(context, nft_path="/x.nft").splitlines()
                   if f"daddr {HEAD_ADDRESS}" in line)  # fmt: skip
    assert ports == sorted([str(head.port), "6380", str(context.peers[2][2]), "20002-20010"])


@pytest.mark.parametrize("ray_head", ["10.0.0.11:6379\\nExecStartPre=/bin/sh -c id", "10.0.0.11", "fd00::1:6379",
                                      "head.local:6379", "10.0.0.11:0"])  # fmt: skip
def test_a_ray_head_that_is_not_ip_and_port_is_refused_before_it_reaches_the_command_line(ray_head: str) -> None:
    with pytest.raises(PolicyError, match="vllm.ray_head"):
        Policy.from_toml(f'[vllm]\nnode_ip = "10.0.0.12"\nray_head = "{ray_head}"\n')
    assert Policy.from_toml('[vllm]\nnode_ip = "fd00::2"\nray_head = "[fd00::1]:6379"\n').vllm.ray_head == "[fd00::1]:6379"


@pytest.mark.parametrize("word", ["a\nExecStartPre=/bin/sh", "a\rb", "a\x00b", "a\x7fb"])
def test_a_word_with_a_control_character_never_becomes_part_of_a_unit(word: str) -> None:
    """Quoting stops `"`, `%` and `$`; a newline would end the line and start a directive of the attacker's."""
    with pytest.raises(VllmConfigError, match="control character"):
        systemd_quote(word)
    assert systemd_quote('50% of "$HOME"') == '"50%% of \\"$$HOME\\""'
