"""The vLLM child's launch, rendered from the policy: its command, its environment, the Ray node command for
multi-node clusters, and a unit for a node that runs Ray alone (on the node that serves, vLLM is `sealbox serve`'s
child, `supervisor.py`, inside sealbox's own unit and wall).

On a worker node (`ray_head` names another node) the unit runs `ray start --address=HEAD --block` instead, behind
the same guard and offline variables, and systemd restarts it when it fails (see `VllmLaunch.service_argv`).

The command starts sealbox's egress guard in vLLM's own interpreter before vLLM is imported (`BOOTSTRAP`), with the
policy's allowlist widened by exactly the Ray peers; the API listens on loopback only, so the sealbox front (or a
gateway through it) is its one client. The environment turns off every phone-home the stack has (Hugging Face Hub,
vLLM usage stats, Ray usage stats and dashboard). Ray's ports are fixed in the policy, so the unit's
`IPAddressAllow` and the nftables rules can name them.

Nothing here has run on a GPU or with the real vLLM: the tests carry the command up to the process boundary (the
child starts, installs the guard, and runs a stand-in `vllm` package's API server; see README).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jinja2.sandbox import SandboxedEnvironment

from sealbox.runtime.mesh.peer_set import ray_peers
from sealbox.runtime.policy import EgressPolicy, Policy, VllmPolicy

BOOTSTRAP = "from sealbox.runtime.vllm.bootstrap import main; main()"
"""One line (systemd's ExecStart takes no newlines); `bootstrap.main` installs the guard, then runs vLLM's API server."""
RAY_BOOTSTRAP = "from sealbox.runtime.vllm.bootstrap import ray; ray()"
"""The same for `ray start` on a worker node: the guard, then Ray's own CLI with the arguments that follow."""

OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
}

CACHE_DIR = "vllm-cache"
"""Under the root's `run/` (the unit's one writable place besides the audit log)."""

CACHE_VARIABLES = ("VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME")
"""Where the stack writes its compiled kernels; pointed into the one writable directory of the unit."""

UNIT_TEMPLATE = """\
# sealbox: vLLM engine of release {{ label }}, rendered from the policy by sealbox.runtime.vllm. Do not edit here.
[Unit]
Description=sealbox vLLM engine ({{ label }})
After=network-online.target nftables.service
Wants=network-online.target

[Service]
Type=exec
User={{ user }}
Group={{ user }}
WorkingDirectory={{ release_dir }}
{% for assignment in environment %}Environment={{ assignment }}
{% endfor %}ExecStart={{ exec_start }}
Restart=on-failure
RestartSec=5s
UMask=0077
IPAddressDeny=any
IPAddressAllow=localhost{% for peer in peers %} {{ peer }}{% endfor %}
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
NoNewPrivileges=yes
CapabilityBoundingSet=
DevicePolicy=closed
{% for device in devices %}DeviceAllow={{ device }} rw
{% endfor %}ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes

[Install]
WantedBy=multi-user.target
"""


class VllmConfigError(Exception):
    """The policy does not describe a vLLM engine that can be launched (no model, a Ray cluster without a head)."""


@dataclass(frozen=True)
class VllmLaunch:
    argv: list[str]
    environment: dict[str, str]
    ray_argv: list[str] | None
    """`ray start ... --block` for this node (multi-node only), in the release's interpreter behind the guard."""
    node: Literal["single", "head", "worker"]
    """A worker node runs Ray alone (its unit's command is `ray_argv`); the head and a single node run vLLM."""
    peers: tuple[str, ...]
    ports: tuple[int, ...]
    """Ray's ports that the peers may reach (the nftables rules open exactly these to exactly the peers)."""

    @property
    def service_argv(self) -> list[str]:
        """What this node's unit runs: `ray start --block` on a worker node, vLLM's API server otherwise."""
        return self.ray_argv if self.node == "worker" and self.ray_argv is not None else self.argv

    def unit(self, *, label: str, user: str, release_dir: Path, devices: tuple[str, ...]) -> str:
        environment = [systemd_quote(f"{key}={value}") for key, value in sorted(self.environment.items())]
        return SandboxedEnvironment(autoescape=False, keep_trailing_newline=True).from_string(UNIT_TEMPLATE).render(
            label=label, user=user, release_dir=str(release_dir), environment=environment,
            exec_start=" ".join(systemd_quote(arg) for arg in self.service_argv), peers=self.peers, devices=devices,
        )  # fmt: skip


def systemd_quote(word: str) -> str:
    """One word for a unit file: double-quoted with C escapes, `%` and `$` doubled (no specifier or variable
    expansion can change it). Raises VllmConfigError for a control character: a newline would start a directive."""
    if any(ord(character) < 0x20 or character == "\x7f" for character in word):
        raise VllmConfigError(f"{word!r} holds a control character: it cannot be one word of a unit file")
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def engine_egress(egress: EgressPolicy, vllm: VllmPolicy) -> EgressPolicy:
    """The child's allowlist: the policy's, plus exactly the Ray peers (and the head) on Ray's fixed ports only."""
    peers = [str(peer.ports) for peer in ray_peers(vllm)]
    return egress.model_copy(update={"peers": tuple(dict.fromkeys([*egress.peers, *peers]))})


def ray_node_role(vllm: VllmPolicy) -> Literal["single", "head", "worker"]:
    """`head` when `ray_head` is this node's `node_ip` on `ray_port`, `worker` when it is another node."""
    if not vllm.multi_node or not vllm.ray_head:
        return "single"
    address, _, port = vllm.ray_head.rpartition(":")
    try:
        same = ipaddress.ip_address(address.strip("[]")) == ipaddress.ip_address(vllm.node_ip)
    except ValueError:
        return "worker"
    return "head" if same and port == str(vllm.ray_port) else "worker"


def _peers(vllm: VllmPolicy) -> tuple[str, ...]:
    peers = list(vllm.ray_peers)
    if vllm.ray_head:
        head = vllm.ray_head.rpartition(":")[0]
        if head != vllm.node_ip:
            peers.append(head)
    return tuple(dict.fromkeys(peers))


def render_launch(policy: Policy, *, release_dir: Path, python: Path, cache_dir: Path | None = None) -> VllmLaunch:
    """The vLLM child's command and environment, and `ray start` for multi-node clusters.

    `cache_dir` is where vLLM, Triton and torch may write their compile caches (the unit leaves only the root's
    `run/` writable); without it they use their defaults.

    Raises:
        VllmConfigError: no model directory, or a multi-node cluster without a Ray head.
    """
    vllm = policy.vllm
    if not vllm.model_dir:
        raise VllmConfigError("vllm.model_dir: name the model's safetensors directory in the release")
    if vllm.multi_node and not vllm.ray_head:
        raise VllmConfigError("vllm.ray_head: a multi-node cluster needs the Ray head's IP:PORT")
    model = (release_dir / vllm.model_dir).absolute()
    argv = [str(python), "-I", "-c", BOOTSTRAP, "--model", str(model),
            "--served-model-name", vllm.served_name or model.name, "--host", "127.0.0.1", "--port", str(vllm.port),
            "--tensor-parallel-size", str(vllm.tensor_parallel_size),
            "--pipeline-parallel-size", str(vllm.pipeline_parallel_size),
            "--gpu-memory-utilization", str(vllm.gpu_memory_utilization),
            "--distributed-executor-backend", "ray" if vllm.multi_node else "mp",
            "--max-num-seqs", str(vllm.max_num_seqs), "--disable-log-requests"]  # fmt: skip
    if vllm.max_model_len:
        argv += ["--max-model-len", str(vllm.max_model_len)]
    environment = dict(OFFLINE_ENVIRONMENT)
    environment["SEALBOX_VLLM_EGRESS"] = engine_egress(policy.egress, vllm).model_dump_json()
    if cache_dir is not None:
        for key in CACHE_VARIABLES:
            environment[key] = str(cache_dir)
    ray_argv = None
    ports: tuple[int, ...] = ()
    if not vllm.multi_node:
        # vLLM finds its own address by "connecting" a UDP socket to a public address; the guard refuses that.
        environment["VLLM_HOST_IP"] = "127.0.0.1"
    if vllm.multi_node:
        environment["RAY_ADDRESS"] = vllm.ray_head
        environment["VLLM_HOST_IP"] = vllm.node_ip
        head = ray_node_role(vllm) == "head"
        ray_argv = [str(python), "-I", "-c", RAY_BOOTSTRAP, "start", "--head" if head else f"--address={vllm.ray_head}",
                    "--node-ip-address", vllm.node_ip, "--node-manager-port", str(vllm.ray_node_manager_port),
                    "--object-manager-port", str(vllm.ray_object_manager_port),
                    "--min-worker-port", str(vllm.ray_min_worker_port),
                    "--max-worker-port", str(vllm.ray_max_worker_port),
                    "--include-dashboard=false", "--disable-usage-stats", "--block"]  # fmt: skip
        if head:
            ray_argv[6:6] = ["--port", str(vllm.ray_port)]
        ports = (vllm.ray_port, vllm.ray_node_manager_port, vllm.ray_object_manager_port,
                 *range(vllm.ray_min_worker_port, vllm.ray_max_worker_port + 1))  # fmt: skip
    return VllmLaunch(argv=argv, environment=environment, ray_argv=ray_argv, node=ray_node_role(vllm),
                      peers=_peers(vllm), ports=ports)  # fmt: skip
