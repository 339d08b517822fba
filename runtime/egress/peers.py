"""One host reachable on named ports only: how the egress guard, the nftables rules and the unit name a mesh peer.

`[egress] allow` x `allow_ports` is a cross product (every listed network on every listed port); a gateway must reach
engine A on A's port and nothing else of A, so a peer is a single address with its own ports.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

DNS_PORT = 53
_SPEC = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<v4>[0-9.]+)):(?P<low>\d{1,5})(?:-(?P<high>\d{1,5}))?")


@dataclass(frozen=True)
class PeerPorts:
    """`address` on ports `low`..`high` (inclusive), TCP and UDP."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> PeerPorts:
        """`10.0.0.11:8443`, `[fd00::2]:8443` or `10.0.0.12:10002-10100`.

        Raises:
            ValueError: not that shape, a port outside 1..65535, an empty range, or a range that holds DNS's 53.
        """
        match = _SPEC.fullmatch(text)
        if match is None:
            raise ValueError(f"peer {text!r} is not ADDRESS:PORT or ADDRESS:LOW-HIGH (IPv6 in brackets)")
        address = ipaddress.ip_address(match["v6"] or match["v4"])
        low = int(match["low"])
        high = int(match["high"] or low)
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"peer {text!r}: ports must be 1..65535, low to high")
        if low <= DNS_PORT <= high:
            raise ValueError(f"peer {text!r}: port 53 (DNS) is never a peer port")
        return cls(address, low, high)

    def permits(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        return address == self.address and self.low <= port <= self.high

    @property
    def ports(self) -> str:
        """As nftables writes a port or a range: `8443`, `10002-10100`."""
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.ports}"
