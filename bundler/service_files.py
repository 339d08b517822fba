"""The locked-down service files of a release: a hardened systemd unit, an nftables egress fence, and the name files
(empty resolv.conf, the policy's hosts, files-only nsswitch) the unit binds over the system's.

The unit's command is the host's role (`ServiceRole`): `sealbox serve`, `sealbox gateway` on the mesh's gateway host,
or `ray start --block` on a vLLM worker node; the rest of the unit, the wall, is the same template for all.

Both are rendered from templates in `policies/` (data the operator can read and diff) by a sandboxed Jinja
environment with strict undefined variables. Every value that reaches a template is checked first, because a unit
file is a line-oriented language: a newline, a quote or a `%` specifier smuggled in through a path or a user name
would add directives. Rendering writes files only; enabling them (`systemctl`, `nft`) is a separate, explicit step.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from jinja2 import StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from sealbox.runtime.mesh.peer_set import MeshHostError, PeerSet, this_host
from sealbox.runtime.policy import Policy
from sealbox.runtime.exit_codes import ExitCode
from sealbox.runtime.release import POLICY_FILE
from sealbox.runtime.vllm.launch import CACHE_DIR, VllmConfigError, ray_node_role, render_launch, systemd_quote

UNIT_TEMPLATE = "sealbox.service.j2"
NFT_TEMPLATE = "sealbox-egress.nft.j2"
UNIT_NAME = "sealbox.service"
NFT_NAME = "sealbox-egress.nft"
SERVICE_DIR = "service"
DNS_PORT = 53
# The service's name files, rendered into <release>/service/ and bound over the system's by the unit.
NAME_FILES = (("resolv.conf", "/etc/resolv.conf"), ("hosts", "/etc/hosts"), ("nsswitch.conf", "/etc/nsswitch.conf"))
RESOLV_CONF = "# sealbox: no resolver. The service resolves only the names in /etc/hosts (the policy's local_names).\n"
NSSWITCH_CONF = "# sealbox: files only, so no lookup leaves the host.\npasswd: files\ngroup: files\nshadow: files\nhosts: files\n"

# Characters a path may hold to be written into a unit or nft file unquoted and unescaped.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._/@+,:=-]*")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,80}")


class ServiceRole(enum.Enum):
    """What the release's one unit runs on this host, under the same wall in every case."""

    SERVE = "serve"
    """`sealbox serve`: the models of the release (llama.cpp, or the vLLM front and its child on a Ray head)."""
    GATEWAY = "gateway"
    """`sealbox gateway`: the mesh's gateway host, fronting the engine hosts; it runs no engine and opens no GPU."""
    RAY_WORKER = "ray-worker"
    """`ray start --block`: a node of a vLLM cluster that only lends its GPUs to the head's Ray (no API, no front)."""


UNIT_WHAT = {ServiceRole.SERVE: "LLM server", ServiceRole.GATEWAY: "mesh gateway",
             ServiceRole.RAY_WORKER: "Ray worker node"}  # fmt: skip


def service_role(policy: Policy, mesh_host: str | None) -> ServiceRole:
    """The role from the policy and the host named at install (`--mesh-host`): the gateway is the mesh host whose
    role is `gateway`; a Ray worker is a vLLM node whose `ray_head` is another node. Raises MeshHostError when the
    policy names mesh hosts and not this one."""
    if policy.mesh.hosts and this_host(policy, mesh_host).role == "gateway":
        return ServiceRole.GATEWAY
    if policy.vllm.model_dir and ray_node_role(policy.vllm) == "worker":
        return ServiceRole.RAY_WORKER
    return ServiceRole.SERVE


class ServiceFileError(Exception):
    """A value cannot be written safely into the unit or rule file, or enabling them failed."""

    exit_code = ExitCode.SERVICE_FILES


def _path(value: Path | str, what: str) -> str:
    text = os.path.normpath(value)
    if not _SAFE_PATH.fullmatch(text) or "/../" in f"{text}/":
        raise ServiceFileError(
            f"{what} {text!r} cannot go into a systemd unit: use an absolute path of letters, digits and ._/@+,:=-"
        )
    return text


def _networks(values: tuple[str, ...] | list[str], what: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    try:
        return [ipaddress.ip_network(value, strict=False) for value in values]
    except ValueError as exc:
        raise ServiceFileError(f"{what}: {exc}") from exc


@dataclass(frozen=True, kw_only=True)
class ServiceContext:
    """Everything the templates may use, each value checked on construction."""

    label: str
    root: str
    release_dir: str
    exec_start: str
    user: str
    ip_allow: tuple[str, ...]
    """Non-loopback networks the unit may talk to: client networks and the egress allowlist (loopback always)."""
    client_networks: tuple[str, ...]
    allow_v4: tuple[str, ...]
    allow_v6: tuple[str, ...]
    allow_ports: tuple[int, ...]
    loopback_ports: tuple[int, ...]
    """Loopback ports the account may send to: the policy's allow_ports, checked for loopback (empty = any but 53)."""
    local_names: tuple[tuple[str, tuple[str, ...]], ...]
    gpu_devices: tuple[str, ...]
    role: ServiceRole = ServiceRole.SERVE
    environment: tuple[str, ...] = ()
    """Extra `Environment=` assignments, each one quoted word (the Ray worker's offline variables and guard)."""
    netlink: bool = False
    """AF_NETLINK for a node of a multi-node vLLM cluster (NCCL and Ray read the interfaces through it)."""
    peers: tuple[tuple[int, str, str, str], ...] = ()
    """(IP version, address, port or range, what for): the mesh and Ray peers this host sends to (runtime.mesh)."""

    @classmethod
    def build(cls, *, label: str, root: Path, release_dir: Path, executable: Path, policy: Policy,
              mesh_host: str | None = None) -> ServiceContext:  # fmt: skip
        """Raises ServiceFileError naming the value that cannot be written safely, or a mesh host the policy lacks."""
        if not _LABEL.fullmatch(label):
            raise ServiceFileError(f"release label {label!r} cannot go into a unit file")
        if not _USER.fullmatch(policy.service.user):
            raise ServiceFileError(f"service.user {policy.service.user!r} is not a plain system user name")
        root_text = _path(root, "root")
        release_text = _path(release_dir, "release directory")
        try:
            role = service_role(policy, mesh_host)
            peer_set = PeerSet.for_host(policy, mesh_host)
        except MeshHostError as exc:
            raise ServiceFileError(str(exc)) from exc
        exec_start, environment = _command(role, _path(executable, "executable"), root_text, release_text, policy)
        clients = _networks(policy.service.client_networks, "service.client_networks")
        egress = [net for net in _networks(policy.egress.allow, "egress.allow") if not net.is_loopback]
        devices = tuple(_path(device, "service.gpu_devices entry") for device in policy.service.gpu_devices)
        if any(not device.startswith("/dev/") for device in devices):
            raise ServiceFileError(f"service.gpu_devices must be device nodes under /dev/: {list(devices)}")
        if role is ServiceRole.GATEWAY:
            devices = ()  # the policy is the whole mesh's; the gateway runs no engine, so it opens no GPU
        ip_allow = tuple(dict.fromkeys([*(str(net) for net in [*clients, *egress]), *peer_set.addresses]))
        if ":" in release_text:
            raise ServiceFileError(f"release directory {release_text!r} cannot go into BindReadOnlyPaths (it holds ':')")
        return cls(
            label=label,
            root=root_text,
            release_dir=release_text,
            exec_start=exec_start,
            user=policy.service.user,
            ip_allow=ip_allow,
            client_networks=tuple(str(net) for net in clients),
            allow_v4=tuple(str(net) for net in egress if net.version == 4),
            allow_v6=tuple(str(net) for net in egress if net.version == 6),
            allow_ports=tuple(policy.egress.allow_ports),
            loopback_ports=tuple(policy.egress.allow_ports),
            local_names=policy.egress.local_names,
            gpu_devices=devices,
            role=role,
            environment=environment,
            netlink=role is not ServiceRole.GATEWAY and bool(policy.vllm.model_dir) and policy.vllm.multi_node,
            peers=tuple((p.ports.address.version, str(p.ports.address), p.ports.ports, p.why)
                        for p in peer_set.outbound),  # fmt: skip
        )


def _command(role: ServiceRole, executable: str, root: str, release_dir: str,
             policy: Policy) -> tuple[str, tuple[str, ...]]:  # fmt: skip
    """ExecStart and the extra environment of the role. The gateway runs the release's own policy (the one its wall
    was rendered from); a Ray worker runs `ray start` in the release's interpreter behind sealbox's egress guard."""
    if role is ServiceRole.GATEWAY:
        return f"{executable} gateway --root {root} --policy {release_dir}/{POLICY_FILE}", ()
    if role is ServiceRole.RAY_WORKER:
        try:
            launch = render_launch(policy, release_dir=Path(release_dir), python=Path(executable).parent / "python",
                                   cache_dir=Path(root) / "run" / CACHE_DIR)  # fmt: skip
            assert launch.ray_argv is not None  # a worker is a multi-node cluster's node
            environment = tuple(systemd_quote(f"{key}={value}") for key, value in sorted(launch.environment.items()))
            return " ".join(systemd_quote(word) for word in launch.ray_argv), environment
        except VllmConfigError as exc:
            raise ServiceFileError(str(exc)) from exc
    return f"{executable} serve --root {root}", ()


@dataclass(frozen=True)
class ServiceFiles:
    unit: Path
    nft: Path


def _environment() -> SandboxedEnvironment:
    templates = resources.files("sealbox.policies")

    def load(name: str) -> str:
        return templates.joinpath(name).read_text(encoding="utf-8")

    from jinja2 import FunctionLoader

    return SandboxedEnvironment(
        loader=FunctionLoader(load),
        undefined=StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render_unit(context: ServiceContext) -> str:
    return _environment().get_template(UNIT_TEMPLATE).render(
        label=context.label,
        root=context.root,
        release_dir=context.release_dir,
        exec_start=context.exec_start,
        environment=context.environment,
        what=UNIT_WHAT[context.role],
        netlink=context.netlink,
        user=context.user,
        ip_allow=context.ip_allow,
        gpu_devices=context.gpu_devices,
        name_files=NAME_FILES,
    )


def render_nft(context: ServiceContext, *, nft_path: str) -> str:
    return _environment().get_template(NFT_TEMPLATE).render(
        label=context.label,
        user=context.user,
        client_networks=context.client_networks,
        allow_v4=context.allow_v4,
        allow_v6=context.allow_v6,
        allow_ports=context.allow_ports,
        loopback_ports=context.loopback_ports,
        dns_allowed=DNS_PORT in context.allow_ports,
        peers=context.peers,
        nft_path=nft_path,
    )


def render_hosts(context: ServiceContext) -> str:
    """The service's /etc/hosts: the policy's local names and nothing else (values checked by the policy)."""
    lines = ["# sealbox: the policy's [egress] local_names, the only names the service can resolve."]
    lines += [f"{address} {name}" for name, addresses in context.local_names for address in addresses]
    return "\n".join(lines) + "\n"


def write_service_files(release_dir: Path, context: ServiceContext) -> ServiceFiles:
    """Render both files into `<release_dir>/service/` (the release is still in staging: plain writes suffice)."""
    directory = release_dir / SERVICE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    unit = directory / UNIT_NAME
    nft = directory / NFT_NAME
    unit.write_text(render_unit(context), encoding="utf-8")
    (directory / "resolv.conf").write_text(RESOLV_CONF, encoding="utf-8")
    (directory / "hosts").write_text(render_hosts(context), encoding="utf-8")
    (directory / "nsswitch.conf").write_text(NSSWITCH_CONF, encoding="utf-8")
    nft.write_text(render_nft(context, nft_path=f"{context.release_dir}/{SERVICE_DIR}/{NFT_NAME}"), encoding="utf-8")
    return ServiceFiles(unit, nft)


def enable(root: Path) -> list[str]:
    """Load the current release's egress rules and enable and start its unit. Only on `--enable`.

    The unit is linked through `<root>/current`, so a rollback plus `systemctl daemon-reload` and restart moves the
    service with it. Returns the commands run.

    Raises:
        ServiceFileError: `systemctl` or `nft` is missing, or a command failed (its output is in the message).
    """
    service = root / "current" / SERVICE_DIR
    commands = [
        ["nft", "-f", str(service / NFT_NAME)],
        ["systemctl", "link", str(service / UNIT_NAME)],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", UNIT_NAME],
    ]
    for tool in ("nft", "systemctl"):
        if shutil.which(tool) is None:
            raise ServiceFileError(f"--enable needs `{tool}`, which is not installed on this host; nothing was enabled")
    done = []
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            output = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ServiceFileError(f"`{' '.join(command)}` failed ({result.returncode}): {output[0]}")
        done.append(" ".join(command))
    return done
