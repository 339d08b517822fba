"""The walls let the mesh's peers through on their ports and nothing else: the rendered nftables fence and unit
(for the gateway, an engine, a Ray node), the in-process egress guard of the gateway, and the fence loaded in a
network namespace of the test's own, where a loopback address the policy does not name stays blocked."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import require_lockdown
from mesh_support import MeshHost, mesh_policy_text
from sealbox.bundler.service_files import ServiceContext, ServiceFileError, render_nft, render_unit, write_service_files
from sealbox.runtime.egress.allowlist import Allowlist
from sealbox.runtime.egress.peers import PeerPorts
from sealbox.runtime.gateway.startup import engine_egress
from sealbox.runtime.policy import EgressPolicy, Policy, PolicyError

REPO = Path(__file__).resolve().parents[1]
ENGINE_PORT, OTHER_PORT, OWN_PORT = 18443, 18444, 18080
HOSTS = [MeshHost("gw", "gateway", "127.0.0.1", 18090), MeshHost("gpu-1", "engine", "127.0.0.2", ENGINE_PORT),
         MeshHost("gpu-2", "engine", "127.0.0.3", ENGINE_PORT)]  # fmt: skip
STRANGER = "127.0.0.4"  # a loopback address the policy does not name
RAY = ('[vllm]\nnode_ip = "127.0.0.2"\nray_head = "127.0.0.5:6379"\nray_peers = ["127.0.0.5", "127.0.0.2"]\n'
       "ray_min_worker_port = 10002\nray_max_worker_port = 10100\n")  # fmt: skip
ENGINES = ('[[gateway.engines]]\nname = "gpu-1"\nurl = "https://127.0.0.2:18443"\n'
           '[[gateway.engines]]\nname = "gpu-2"\nurl = "https://127.0.0.3:18443"\n')  # fmt: skip


def policy(extra: str = "", *, engines: str = ENGINES) -> Policy:
    egress = f"[egress]\nallow_ports = [{OWN_PORT}]\n"
    return Policy.from_toml(mesh_policy_text(Path("/srv/mesh"), HOSTS, extra=egress + extra) + engines)


def context(mesh_host: str | None, extra: str = "", release: Path = Path("/srv/sealbox/releases/demo-1")) -> ServiceContext:
    return ServiceContext.build(label="demo-1", root=Path("/srv/sealbox"), release_dir=release,
                                executable=release / "venv/bin/sealbox", policy=policy(extra), mesh_host=mesh_host)  # fmt: skip


def accepts(nft: str) -> list[str]:
    return [line.strip() for line in nft.splitlines() if "daddr" in line and line.strip().endswith('"') and " accept " in line]


def ip_allow(unit: str) -> list[str]:
    return next(line for line in unit.splitlines() if line.startswith("IPAddressAllow=")).split("=", 1)[1].split()


def test_the_gateways_fence_opens_each_engine_on_its_port_and_nothing_else() -> None:
    gateway = context("gw")
    assert accepts(render_nft(gateway, nft_path="/x.nft")) == [
        'ip daddr 127.0.0.2 meta l4proto { tcp, udp } th dport 18443 accept comment "sealbox: engine gpu-1"',
        'ip daddr 127.0.0.3 meta l4proto { tcp, udp } th dport 18443 accept comment "sealbox: engine gpu-2"',
    ]
    assert ip_allow(render_unit(gateway)) == ["localhost", "127.0.0.2/32", "127.0.0.3/32"]


def test_an_engines_fence_opens_nothing_and_its_unit_lets_in_the_gateway_only() -> None:
    engine = context("gpu-1")
    assert accepts(render_nft(engine, nft_path="/x.nft")) == []  # it only answers, on connections the gateway opened
    assert ip_allow(render_unit(engine)) == ["localhost", "127.0.0.1/32"]  # not gpu-2, not anyone else


def test_a_ray_node_opens_exactly_rays_ports_to_the_other_nodes() -> None:
    node = context("gpu-1", RAY)
    assert accepts(render_nft(node, nft_path="/x.nft")) == [
        f'ip daddr 127.0.0.5 meta l4proto {{ tcp, udp }} th dport {port} accept comment "sealbox: {what} 127.0.0.5"'
        for port, what in (("6379", "Ray GCS"), ("6380", "Ray node manager"), ("6381", "Ray object manager"),
                           ("10002-10100", "Ray workers"))  # fmt: skip
    ]  # its own node_ip (127.0.0.2, also listed as a peer) is not a peer of itself
    assert ip_allow(render_unit(node)) == ["localhost", "127.0.0.1/32", "127.0.0.5/32"]


def test_a_mesh_policy_without_this_hosts_name_renders_no_walls() -> None:
    with pytest.raises(ServiceFileError, match=r"say which one this is \(--mesh-host NAME\)"):
        context(None)
    with pytest.raises(ServiceFileError, match="names no host 'gpu-9'"):
        context("gpu-9")


def test_the_gateways_guard_allows_each_engine_on_its_own_port_only() -> None:
    gateway = policy()
    allowlist = Allowlist.from_policy(engine_egress(gateway.egress, gateway.gateway))
    address = ipaddress.ip_address
    assert allowlist.permits(address("127.0.0.2"), ENGINE_PORT)
    assert allowlist.permits(address("::ffff:127.0.0.3"), ENGINE_PORT)  # mapped: the same host
    assert not allowlist.permits(address("127.0.0.2"), OTHER_PORT)  # the engine's other ports stay closed
    assert not allowlist.permits(address(STRANGER), ENGINE_PORT)
    assert "peers 127.0.0.2:18443, 127.0.0.3:18443" in allowlist.describe()


def test_a_peer_range_holds_its_ends_and_nothing_beyond() -> None:
    peer = PeerPorts.parse("127.0.0.5:10002-10100")
    assert peer.permits(ipaddress.ip_address("127.0.0.5"), 10002) and peer.permits(ipaddress.ip_address("127.0.0.5"), 10100)
    assert not peer.permits(ipaddress.ip_address("127.0.0.5"), 10101)
    assert str(PeerPorts.parse("[fd00::2]:8443")) == "[fd00::2]:8443"


@pytest.mark.parametrize("spec", ["127.0.0.5", "127.0.0.5:0", "127.0.0.5:9-3", "127.0.0.5:50-60", "fd00::2:8443", "host:1"])
def test_a_peer_that_is_not_one_host_on_named_ports_is_refused(spec: str) -> None:
    with pytest.raises(PolicyError, match="egress.peers"):
        Policy.from_toml(f'[egress]\npeers = ["{spec}"]\n')
    assert EgressPolicy().peers == ()


GUARDED_CLIENT = textwrap.dedent("""
    import json, socket, sys
    from sealbox.runtime.egress.guard import EgressBlockedError, install_egress_guard
    from sealbox.runtime.gateway.startup import engine_egress
    from sealbox.runtime.policy import Policy
    policy = Policy.from_toml(sys.stdin.read())
    install_egress_guard(engine_egress(policy.egress, policy.gateway))
    outcomes = {}
    for name, address, port in json.loads(sys.argv[1]):
        try:
            socket.create_connection((address, port), timeout=2).close()
            outcomes[name] = "connected"
        except EgressBlockedError:
            outcomes[name] = "blocked"
        except OSError as exc:
            outcomes[name] = type(exc).__name__
    print(json.dumps(outcomes))
""")


def test_in_a_real_process_the_gateways_guard_reaches_the_engine_and_blocks_a_stranger_and_the_engines_other_port() -> None:
    import socket

    with socket.create_server(("127.0.0.2", 0)) as engine:
        port = engine.getsockname()[1]
        text = mesh_policy_text(Path("/srv/mesh"), [HOSTS[0], MeshHost("gpu-1", "engine", "127.0.0.2", port)],
                                extra=f"[egress]\nallow_ports = [{OWN_PORT}]\n")  # fmt: skip
        text += f'[[gateway.engines]]\nname = "gpu-1"\nurl = "https://127.0.0.2:{port}"\n'
        targets = [("engine", "127.0.0.2", port), ("stranger", STRANGER, port), ("other_port", "127.0.0.2", port + 1)]
        done = subprocess.run([sys.executable, "-c", GUARDED_CLIENT, json.dumps(targets)], input=text, capture_output=True,
                              text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"engine": "connected", "stranger": "blocked", "other_port": "blocked"}


NAMESPACE_DRIVER = textwrap.dedent("""
    import json, socket, subprocess, sys
    ports = json.loads(sys.argv[2])
    listeners = [socket.create_server(("0.0.0.0", port)) for port in sorted(set(p for _, _, p in ports))]
    def run(*prefix):
        done = subprocess.run([*prefix, sys.executable, "-c", sys.argv[1], sys.argv[2]], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)
    as_root = run()
    as_service = run("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
    counters = subprocess.run(["nft", "list", "chain", "inet", "sealbox_egress", "service_user"], capture_output=True,
                              text=True).stdout
    print(json.dumps({"root": as_root, "service": as_service, "counters": counters}))
""")
NAMESPACE_CLIENT = textwrap.dedent("""
    import json, socket, sys
    outcomes = {}
    for name, address, port in json.loads(sys.argv[1]):
        try:
            socket.create_connection((address, port), timeout=1).close()
            outcomes[name] = "connected"
        except OSError as exc:
            outcomes[name] = type(exc).__name__
    print(json.dumps(outcomes))
""")


@pytest.mark.parametrize("host", ["gw", "gpu-1"])
def test_loaded_in_a_namespace_the_fence_passes_the_peers_ports_and_drops_a_stranger_and_other_ports(
    host: str, tmp_path: Path
) -> None:
    require_lockdown("unshare", "ip", "nft", "setpriv", root=True)
    release = tmp_path / "release"
    files = write_service_files(release, context(host, RAY, release=release))
    targets = [("engine", "127.0.0.2", ENGINE_PORT), ("engine_other_port", "127.0.0.2", OTHER_PORT),
               ("stranger", STRANGER, ENGINE_PORT), ("ray_worker", "127.0.0.5", 10050),
               ("ray_beyond_range", "127.0.0.5", 10101), ("own_port", "127.0.0.1", OWN_PORT)]  # fmt: skip
    script = f'ip link set lo up && nft -f {files.nft} && exec "$@"'
    command = ["unshare", "--net", "sh", "-c", script, "sh", sys.executable, "-c", NAMESPACE_DRIVER, NAMESPACE_CLIENT,
               json.dumps(targets)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result["root"].values()) == {"connected"}, "every listener is there: the fence is the user's only"
    dropped = "TimeoutError"  # the SYN is dropped on output and counted; no answer ever comes
    assert re.search(r"counter packets [1-9]\d* bytes \d+ drop comment \"sealbox: egress denied\"", result["counters"])
    assert result["service"] == {
        "engine": "connected" if host == "gw" else dropped,  # only the gateway opens connections to an engine
        "engine_other_port": dropped,
        "stranger": dropped,
        "ray_worker": dropped if host == "gw" else "connected",  # the gateway runs no engine: it is no Ray node
        "ray_beyond_range": dropped,
        "own_port": "connected",
    }
