"""The service files a release carries: a hardened systemd unit, an nftables egress fence and the name files (no
resolver), rendered from sealbox.policies/. The fence is loaded into a network namespace each test creates and shown
to drop the service user's packets on loopback (port 53 included) and to pass those to an allowed port."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_lockdown
from sealbox.bundler.service_files import ServiceContext, ServiceFileError, render_nft, render_unit, write_service_files
from sealbox.runtime.policy import Policy

ROOT = Path("/var/lib/sealbox")
RELEASE = ROOT / "releases" / "demo-3"


def context(policy_toml: str = "", *, root: Path = ROOT, executable: Path = RELEASE / "venv/bin/sealbox") -> ServiceContext:
    return ServiceContext.build(
        label="demo-3",
        root=root,
        release_dir=RELEASE,
        executable=executable,
        policy=Policy.from_toml(policy_toml),
    )


def directives(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def exposure(unit: Path) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True, check=False
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@pytest.mark.parametrize(
    "policy_toml",
    ["", '[service]\ngpu_devices = []\nclient_networks = ["10.20.0.0/16", "fd00:1::/64"]\n'],
    ids=["gpu-defaults", "cpu-with-client-networks"],
)
def test_the_unit_scores_at_most_2_0_in_systemd_analyze_security(policy_toml: str, tmp_path: Path) -> None:
    require_lockdown("systemd-analyze")
    files = write_service_files(tmp_path, context(policy_toml))
    score = exposure(files.unit)
    assert score <= 2.0, f"exposure {score}"


def test_the_unit_carries_the_hardening_the_issue_names() -> None:
    unit = directives(render_unit(context('[service]\nclient_networks = ["10.20.0.0/16"]\n')))
    assert unit["IPAddressDeny"] == ["any"]
    assert unit["IPAddressAllow"] == ["localhost 10.20.0.0/16"]
    assert unit["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "",
        "SystemCallArchitectures": "native",
        "DevicePolicy": "closed",
        "User": "sealbox",
    }.items():
        assert unit[key] == [value], key
    assert "@system-service" in unit["SystemCallFilter"]
    assert unit["DeviceAllow"] == ["/dev/nvidia0 rw", "/dev/nvidiactl rw", "/dev/nvidia-uvm rw"]
    assert unit["ExecStart"] == [f"{RELEASE}/venv/bin/sealbox serve --root {ROOT}"]
    assert unit["ReadWritePaths"] == [f"-{ROOT}/audit -{ROOT}/run"]


def test_without_gpu_devices_the_unit_gets_no_devices_at_all() -> None:
    unit = directives(render_unit(context("[service]\ngpu_devices = []\n")))
    assert unit["PrivateDevices"] == ["yes"] and unit["MemoryDenyWriteExecute"] == ["yes"]
    assert "DeviceAllow" not in unit


def test_the_nft_rules_drop_the_service_users_traffic_except_replies_and_the_allowed_loopback_ports() -> None:
    rules = render_nft(context('[service]\nuser = "llm"\n'), nft_path="/x.nft")
    body = [line.strip() for line in rules.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    output = body[body.index("chain output {") + 1 : body.index("}")]
    assert output == ["type filter hook output priority filter; policy accept;", 'meta skuid "llm" jump service_user']
    start = body.index("chain service_user {") + 1
    assert body[start : body.index("}", start)] == [
        'meta l4proto { tcp, udp } th dport 53 counter drop comment "sealbox: no name lookups, not even on loopback"',
        "ct state established,related accept",
        'oifname "lo" meta l4proto { tcp, udp } th dport { 8080 } accept',
        'counter drop comment "sealbox: egress denied"',
    ]


def test_port_53_is_let_through_only_when_the_policy_lists_it_by_number() -> None:
    assert "th dport 53 counter drop" in render_nft(context("[egress]\nallow_ports = []\n"), nft_path="/x.nft")
    listed = render_nft(context("[egress]\nallow_ports = [8080, 53]\n"), nft_path="/x.nft")
    assert "th dport 53 counter drop" not in listed and "th dport { 8080, 53 } accept" in listed


def test_client_networks_get_replies_and_the_egress_allowlist_its_destinations() -> None:
    policy = (
        '[service]\nclient_networks = ["10.20.0.0/16"]\n'
        '[egress]\nallow = ["127.0.0.0/8", "::1/128", "10.9.9.9/32", "fd00::/8"]\nallow_ports = [443]\n'
    )
    rules = render_nft(context(policy), nft_path="/x.nft")
    assert "ct state established,related accept" in rules
    assert "ip daddr 10.9.9.9/32 meta l4proto { tcp, udp } th dport { 443 } accept" in rules
    assert "ip6 daddr fd00::/8 meta l4proto { tcp, udp } th dport { 443 } accept" in rules
    assert "127.0.0.0/8" not in rules, "loopback is judged by its own rule, on lo"
    assert directives(render_unit(context(policy)))["IPAddressAllow"] == ["localhost 10.20.0.0/16 10.9.9.9/32 fd00::/8"]


def test_the_nft_rules_parse(tmp_path: Path) -> None:
    require_lockdown("nft")
    files = write_service_files(tmp_path, context('[service]\nuser = "nobody"\nclient_networks = ["10.20.0.0/16"]\n'))
    result = subprocess.run(["nft", "-c", "-f", str(files.nft)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_the_service_gets_no_resolver_only_the_policys_local_names(tmp_path: Path) -> None:
    policy = '[egress]\nlocal_names = { localhost = ["127.0.0.1", "::1"], gateway = ["10.9.9.9"] }\n'
    write_service_files(RELEASE_IN(tmp_path), context(policy))
    service = RELEASE_IN(tmp_path) / "service"
    resolv = service.joinpath("resolv.conf").read_text()
    assert [line for line in resolv.splitlines() if line and not line.startswith("#")] == []
    hosts = [line for line in service.joinpath("hosts").read_text().splitlines() if not line.startswith("#")]
    assert hosts == ["127.0.0.1 localhost", "::1 localhost", "10.9.9.9 gateway"]
    nsswitch = dict(line.split(":", 1) for line in service.joinpath("nsswitch.conf").read_text().splitlines()
                    if ":" in line and not line.startswith("#"))  # fmt: skip
    assert nsswitch["hosts"].split() == ["files"]
    unit = directives(render_unit(context(policy)))
    assert unit["BindReadOnlyPaths"] == [
        f"{RELEASE}/service/resolv.conf:/etc/resolv.conf {RELEASE}/service/hosts:/etc/hosts "
        f"{RELEASE}/service/nsswitch.conf:/etc/nsswitch.conf"
    ]
    assert "RES_OPTIONS=attempts:0" in unit["Environment"]


def RELEASE_IN(tmp_path: Path) -> Path:  # noqa: N802 - reads as the release directory of this test
    return tmp_path / "release"


# Every line of the rendered [Service] section, pinned: dropping or weakening any one (say
# `SystemCallFilter=~@privileged @resources`, which leaves the exposure score under 2.0) fails here.
PINNED_SERVICE = [
    "Type=exec",
    "User=sealbox",
    "Group=sealbox",
    f"Environment=SEALBOX_ROOT={ROOT}",
    f"WorkingDirectory={RELEASE}",
    f"ExecStart={RELEASE}/venv/bin/sealbox serve --root {ROOT}",
    "Restart=on-failure",
    "RestartSec=5s",
    "UMask=0077",
    "IPAddressDeny=any",
    "IPAddressAllow=localhost",
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    f"BindReadOnlyPaths={RELEASE}/service/resolv.conf:/etc/resolv.conf {RELEASE}/service/hosts:/etc/hosts "
    f"{RELEASE}/service/nsswitch.conf:/etc/nsswitch.conf",
    "Environment=RES_OPTIONS=attempts:0",
    "ProtectSystem=strict",
    f"ReadWritePaths=-{ROOT}/audit -{ROOT}/run",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "PrivateMounts=yes",
    "ProtectProc=invisible",
    "NoNewPrivileges=yes",
    "CapabilityBoundingSet=",
    "AmbientCapabilities=",
    "PrivateUsers=yes",
    "RestrictSUIDSGID=yes",
    "RemoveIPC=yes",
    "KeyringMode=private",
    "SystemCallFilter=@system-service",
    "SystemCallFilter=~@privileged @resources",
    "SystemCallErrorNumber=EPERM",
    "SystemCallArchitectures=native",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "RestrictNamespaces=yes",
    "RestrictRealtime=yes",
    "LockPersonality=yes",
]
PINNED_GPU = ["DevicePolicy=closed", "DeviceAllow=/dev/nvidia0 rw", "DeviceAllow=/dev/nvidiactl rw",
              "DeviceAllow=/dev/nvidia-uvm rw"]  # fmt: skip
PINNED_CPU = ["PrivateDevices=yes", "MemoryDenyWriteExecute=yes"]


def service_section(unit: str) -> list[str]:
    lines = unit.splitlines()
    section = lines[lines.index("[Service]") + 1 : lines.index("[Install]")]
    return [line for line in section if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize(("policy_toml", "devices"), [("", PINNED_GPU), ("[service]\ngpu_devices = []\n", PINNED_CPU)],
                         ids=["gpu-defaults", "cpu"])  # fmt: skip
def test_every_hardening_directive_of_the_unit_is_pinned_with_its_value(policy_toml: str, devices: list[str]) -> None:
    assert service_section(render_unit(context(policy_toml))) == PINNED_SERVICE + devices


# --- the fence, loaded in a network namespace of the test's own -----------------------------------------------------

ALLOWED_PORT = 8080
FORBIDDEN_PORT = 9090
NAMESPACE_DRIVER = """
import json, socket, subprocess, sys
def tcp(port):
    s = socket.create_server(("127.0.0.1", port)); s.setblocking(False); return s
def udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", port)); s.setblocking(False); return s
def pending(read):
    try:
        read()
    except BlockingIOError:
        return False
    return True
listeners = {"tcp_allowed": tcp(%(allowed)d), "udp_allowed": udp(%(allowed)d), "tcp_forbidden": tcp(%(forbidden)d),
             "tcp_dns": tcp(53), "udp_dns": udp(53)}
def arrived():
    return {name: pending((lambda s=s: s.accept()[0].close()) if s.type == socket.SOCK_STREAM else (lambda s=s: s.recv(64)))
            for name, s in listeners.items()}
client = sys.argv[1]
def run(*prefix):
    done = subprocess.run([*prefix, sys.executable, "-c", client], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), arrived()
as_root = run()
as_service = run("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
counters = subprocess.run(["nft", "list", "chain", "inet", "sealbox_egress", "service_user"], capture_output=True, text=True).stdout
print(json.dumps({"root": as_root, "service": as_service, "counters": counters}))
"""
CLIENT = """
import json, socket
outcomes = {}
def attempt(name, kind, port):
    try:
        if kind == "tcp":
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"x")
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"x", ("127.0.0.1", port))
        outcomes[name] = "sent"
    except OSError as exc:
        outcomes[name] = type(exc).__name__
for name, kind, port in [("tcp_allowed", "tcp", %(allowed)d), ("udp_allowed", "udp", %(allowed)d),
                         ("tcp_forbidden", "tcp", %(forbidden)d), ("tcp_dns", "tcp", 53), ("udp_dns", "udp", 53)]:
    attempt(name, kind, port)
print(json.dumps(outcomes))
"""


def test_loaded_in_a_namespace_the_fence_drops_the_service_users_packets_to_53_and_other_ports_and_passes_allowed(
    tmp_path: Path,
) -> None:
    require_lockdown("unshare", "ip", "nft", "setpriv", root=True)
    files = write_service_files(RELEASE_IN(tmp_path), context(f'[service]\nuser = "nobody"\n[egress]\nallow_ports = [{ALLOWED_PORT}]\n'))
    ports = {"allowed": ALLOWED_PORT, "forbidden": FORBIDDEN_PORT}
    script = f'ip link set lo up && nft -f {files.nft} && exec "$@"'
    command = ["unshare", "--net", "sh", "-c", script, "sh", sys.executable, "-c", NAMESPACE_DRIVER % ports, CLIENT % ports]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    everything = {"tcp_allowed": True, "udp_allowed": True, "tcp_forbidden": True, "tcp_dns": True, "udp_dns": True}
    sent, arrived = result["root"]
    assert arrived == everything, "another user's packets are not the fence's business: all of them arrive"
    sent, arrived = result["service"]
    assert arrived == {**everything, "tcp_forbidden": False, "tcp_dns": False, "udp_dns": False}
    assert sent["tcp_allowed"] == "sent" and sent["udp_allowed"] == "sent"
    assert sent["udp_dns"] == "PermissionError"  # dropped on output: the sender is told, nothing leaves
    assert re.search(r"th dport 53 counter packets [1-9]", result["counters"]), result["counters"]
    assert re.search(r"counter packets [1-9]\d* bytes \d+ drop comment \"sealbox: egress denied\"", result["counters"])


@pytest.mark.parametrize(
    "root",
    [Path("/srv/seal box"), Path("/srv/sealbox\nExecStartPre=/bin/sh"), Path("/srv/%h"), Path("relative/root")],
    ids=["space", "newline", "specifier", "relative"],
)
def test_a_root_that_would_inject_into_the_unit_is_refused(root: Path) -> None:
    with pytest.raises(ServiceFileError, match="cannot go into a systemd unit"):
        context(root=root)


def test_a_user_name_that_is_not_a_plain_account_is_refused() -> None:
    with pytest.raises(ServiceFileError, match="not a plain system user name"):
        context('[service]\nuser = "root\\nExecStartPre=/bin/sh"\n')


def test_the_default_unit_allows_exactly_the_nodes_cuda_opens_for_one_gpu() -> None:
    from sealbox.runtime.engine.accelerator import CUDA_UNNEEDED_NODES, cuda_device_nodes

    unit = directives(render_unit(context()))
    assert sorted(unit["DeviceAllow"]) == sorted(f"{node} rw" for node in cuda_device_nodes(1))
    assert not [line for line in unit["DeviceAllow"] if line.split()[0] in CUDA_UNNEEDED_NODES]
    assert unit["DevicePolicy"] == ["closed"] and "PrivateDevices" not in unit


def test_a_policy_for_four_gpus_renders_each_gpu_node_and_the_control_nodes_only() -> None:
    from sealbox.runtime.engine.accelerator import cuda_device_nodes

    devices = list(cuda_device_nodes(4))
    unit = directives(render_unit(context(f"[service]\ngpu_devices = {json.dumps(devices)}\n")))
    assert unit["DeviceAllow"] == [f"{node} rw" for node in devices]
    assert devices == ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2", "/dev/nvidia3", "/dev/nvidiactl", "/dev/nvidia-uvm"]
