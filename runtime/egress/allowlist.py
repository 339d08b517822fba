"""Where the serving process may send packets: networks from `[egress] allow`, optionally narrowed to ports.

Ports matter because the default allowlist is loopback, and loopback is not harmless in itself: another local
service (a database, a metadata proxy, an SSH agent forward) listens there too. `allow_ports` lets an operator
say "loopback, but only the ports this appliance uses" and lets a test prove a refusal without leaving the host.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from sealbox.runtime.egress.peers import PeerPorts
from sealbox.runtime.policy import EgressPolicy

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


EgressPolicyWithPorts = EgressPolicy
"""Kept as a name for callers written before `allow_ports` moved into `runtime.policy.EgressPolicy`."""


@dataclass(frozen=True)
class Allowlist:
    """The egress decision's data: a destination is allowed when its address lies in a network and its port is listed."""

    networks: tuple[IPNetwork, ...]
    ports: frozenset[int] = frozenset()
    peers: tuple[PeerPorts, ...] = ()
    """Single hosts on their own ports (mesh and Ray peers), allowed whatever `networks` and `ports` say."""

    @classmethod
    def from_policy(cls, egress: EgressPolicy) -> Allowlist:
        return cls(
            networks=tuple(egress.networks()),
            ports=frozenset(egress.allow_ports),
            peers=tuple(PeerPorts.parse(peer) for peer in egress.peers),
        )

    def permits_address(self, address: IPAddress) -> bool:
        address = unmapped(address)
        return any(address.version == net.version and address in net for net in self.networks)

    def permits(self, address: IPAddress, port: int) -> bool:
        """The allowlist alone; the rules add that port 53 is reachable only when listed by number."""
        if any(peer.permits(unmapped(address), port) for peer in self.peers):
            return True
        return self.permits_address(address) and (not self.ports or port in self.ports)

    def describe(self) -> str:
        """The allowlist as an operator wrote it, for error messages and the doctor's report."""
        networks = ", ".join(str(net) for net in self.networks) or "nothing"
        peers = f"; peers {', '.join(str(peer) for peer in self.peers)}" if self.peers else ""
        if not self.ports:
            return f"{networks} (any port but 53){peers}"
        return f"{networks} (ports {', '.join(str(p) for p in sorted(self.ports))}){peers}"


def unmapped(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (::ffff:a.b.c.d) reaches the IPv4 host, so it is judged as that host."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def literal_address(host: str) -> IPAddress | None:
    """The address when `host` is an IP literal (an IPv6 zone `%eth0` is dropped), else None: a name."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
