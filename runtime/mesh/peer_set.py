"""The peers one host of the mesh may exchange packets with, derived from the policy and nothing else.

One derivation feeds three walls, so they cannot disagree: the in-process egress guard (`[egress] peers`), the
nftables fence (an accept per peer and port, before the final drop) and the unit's `IPAddressAllow`. The gateway
sends to each engine on that engine's port; an engine sends to nobody (it only answers the gateway, on connections
the gateway opened) and lets in the gateway's address only; a Ray node sends to each other node on Ray's fixed ports.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from sealbox.runtime.egress.peers import PeerPorts
from sealbox.runtime.policy import MeshHostPolicy, Policy, VllmPolicy


class MeshHostError(ValueError):
    """The policy names mesh hosts but not this one, or this host was not said."""


@dataclass(frozen=True)
class Peer:
    ports: PeerPorts
    why: str
    """Written as the nftables rule's comment: which host or service this opening is for."""


@dataclass(frozen=True)
class PeerSet:
    outbound: tuple[Peer, ...]
    """Address and ports this host opens connections to."""
    addresses: tuple[str, ...]
    """Addresses the unit lets packets to and from (IPAddressAllow), as /32 or /128 networks."""

    @classmethod
    def for_host(cls, policy: Policy, mesh_host: str | None) -> PeerSet:
        """Raises MeshHostError when the policy names mesh hosts and `mesh_host` is not one of them."""
        outbound: list[Peer] = []
        remote: list[str] = []
        if policy.mesh.hosts:
            me = this_host(policy, mesh_host)
            if me.role == "gateway":
                for engine in (host for host in policy.mesh.hosts if host.role == "engine"):
                    outbound.append(Peer(PeerPorts.parse(_spec(engine.address, engine.port)), f"engine {engine.name}"))
                    remote.append(engine.address)
            else:
                gateway = next(host for host in policy.mesh.hosts if host.role == "gateway")
                remote.append(gateway.address)
        gateway_host = bool(policy.mesh.hosts) and this_host(policy, mesh_host).role == "gateway"
        for peer in () if gateway_host else ray_peers(policy.vllm):  # the gateway runs no engine: no Ray node
            outbound.append(peer)
            remote.append(str(peer.ports.address))
        addresses = tuple(str(ipaddress.ip_network(address)) for address in dict.fromkeys(remote))
        return cls(tuple(outbound), addresses)

    def egress_specs(self) -> tuple[str, ...]:
        """For `[egress] peers`."""
        return tuple(dict.fromkeys(str(peer.ports) for peer in self.outbound))


def this_host(policy: Policy, mesh_host: str | None) -> MeshHostPolicy:
    """The policy's entry for this host. Raises MeshHostError naming the hosts when it has none."""
    names = ", ".join(host.name for host in policy.mesh.hosts)
    if not mesh_host:
        raise MeshHostError(f"the policy names mesh hosts ({names}): say which one this is (--mesh-host NAME)")
    entry = policy.mesh.host(mesh_host)
    if entry is None:
        raise MeshHostError(f"the policy's mesh names no host {mesh_host!r} (it names {names})")
    return entry


def ray_peers(vllm: VllmPolicy) -> tuple[Peer, ...]:
    """Every other node of the Ray cluster on Ray's fixed ports: GCS, node manager, object manager, worker range."""
    if not vllm.multi_node:
        return ()
    nodes = list(vllm.ray_peers)
    if vllm.ray_head:
        nodes.append(vllm.ray_head.rpartition(":")[0].strip("[]"))
    ports = [(vllm.ray_port, "Ray GCS"), (vllm.ray_node_manager_port, "Ray node manager"),
             (vllm.ray_object_manager_port, "Ray object manager")]  # fmt: skip
    peers: list[Peer] = []
    for node in dict.fromkeys(str(ipaddress.ip_address(n)) for n in nodes):
        if node == str(ipaddress.ip_address(vllm.node_ip)):
            continue
        peers += [Peer(PeerPorts.parse(_spec(node, port)), f"{what} {node}") for port, what in ports]
        worker = f"{_spec(node, vllm.ray_min_worker_port)}-{vllm.ray_max_worker_port}"
        peers.append(Peer(PeerPorts.parse(worker), f"Ray workers {node}"))
    return tuple(peers)


def _spec(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
