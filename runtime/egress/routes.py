"""The network namespace as the kernel describes it: interfaces, addresses and routes, read from /proc. No packet is sent.

`/proc/<pid>/net` shows the namespace of that process, so the doctor can read the server's namespace, not only
its own. Sources: `route` (IPv4, main table, with devices), `fib_trie` (IPv4, every table, and the local
addresses), `ipv6_route` (IPv6, every table), `if_inet6` (IPv6 addresses), `dev` (interfaces).
A route is an egress route when it is usable (up, not reject/blackhole), is not a local-address route, and
leaves through an interface other than `lo`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

PROC_NET = Path("/proc/net")

# linux/route.h and linux/ipv6_route.h flags as printed in /proc.
RTF_UP = 0x0001
RTF_GATEWAY = 0x0002
RTF_REJECT = 0x0200
RTF_LOCAL = 0x80000000
LOOPBACK_DEVICE = "lo"
# fib_trie tables that are not routing decisions of their own: `Local` holds this host's addresses.
_LOCAL_TABLE = "Local"


class NetworkTablesError(Exception):
    """A kernel table could not be read; the message names the file."""


@dataclass(frozen=True)
class Route:
    destination: str  # CIDR; "default" routes are 0.0.0.0/0 and ::/0
    device: str  # "?" when the table does not say (fib_trie)
    gateway: str = ""
    table: str = "main"  # "" where the kernel does not say (ipv6_route lists every table together)

    @property
    def is_egress(self) -> bool:
        return self.device != LOOPBACK_DEVICE

    def describe(self) -> str:
        text = self.destination
        if text in ("0.0.0.0/0", "::/0"):
            text = f"default ({text})"
        if self.gateway:
            text += f" via {self.gateway}"
        text += f" dev {self.device}"
        return text if self.table in ("main", "") else f"{text} table {self.table}"


@dataclass(frozen=True)
class Address:
    address: str
    device: str  # "?" for IPv4 (fib_trie does not say)

    @property
    def is_loopback(self) -> bool:
        return self.device == LOOPBACK_DEVICE or ipaddress.ip_address(self.address).is_loopback


@dataclass(frozen=True)
class NetworkView:
    interfaces: tuple[str, ...]
    addresses: tuple[Address, ...]
    routes: tuple[Route, ...]

    @property
    def egress_routes(self) -> tuple[Route, ...]:
        return tuple(route for route in self.routes if route.is_egress)

    @property
    def outside_addresses(self) -> tuple[Address, ...]:
        return tuple(address for address in self.addresses if not address.is_loopback)

    @property
    def loopback_only(self) -> bool:
        return not self.egress_routes and not self.outside_addresses


def read_network(proc_net: Path = PROC_NET) -> NetworkView:
    """Read one namespace's tables (`/proc/net` for this process, `/proc/<pid>/net` for another).

    Raises:
        NetworkTablesError: a table that every Linux kernel has is missing or unreadable.
    """
    v4_routes, v4_addresses = parse_fib_trie(_read(proc_net / "fib_trie"))
    main = parse_route(_read(proc_net / "route"))
    # fib_trie has every table but no devices; `route` has devices for the main table. Prefer the latter.
    main_prefixes = {route.destination for route in main}
    others = tuple(r for r in v4_routes if r.table != "Main" or r.destination not in main_prefixes)
    routes = main + tuple(Route(r.destination, r.device, table=r.table.lower()) for r in others)
    v6_addresses: tuple[Address, ...] = ()
    v6_routes: tuple[Route, ...] = ()
    if (proc_net / "if_inet6").exists():  # absent when IPv6 is disabled
        v6_addresses = parse_if_inet6(_read(proc_net / "if_inet6"))
        v6_routes = parse_ipv6_route(_read(proc_net / "ipv6_route"))
    return NetworkView(
        interfaces=parse_dev(_read(proc_net / "dev")),
        addresses=v4_addresses + v6_addresses,
        routes=routes + v6_routes,
    )


def parse_route(text: str) -> tuple[Route, ...]:
    """/proc/net/route: hex little-endian IPv4 fields, one route per line after the header."""
    routes = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        device, destination, gateway, flags, mask = fields[0], fields[1], fields[2], int(fields[3], 16), fields[7]
        if not flags & RTF_UP or flags & RTF_REJECT:
            continue
        network = ipaddress.IPv4Network(f"{_ipv4(destination)}/{_ipv4(mask)}", strict=False)
        via = str(_ipv4(gateway)) if flags & RTF_GATEWAY else ""
        routes.append(Route(str(network), device, via))
    return tuple(routes)


def parse_fib_trie(text: str) -> tuple[tuple[Route, ...], tuple[Address, ...]]:
    """/proc/net/fib_trie: per table, leaves `|-- A.B.C.D` followed by `/LEN scope TYPE` lines.

    UNICAST entries are routes (device unknown here); `/32 host LOCAL` entries are this host's addresses.
    """
    routes: list[Route] = []
    addresses: dict[str, Address] = {}
    table = ""
    leaf = ""
    for line in text.splitlines():
        stripped = line.strip()
        if line and not line[0].isspace() and stripped.endswith(":"):
            table = stripped[:-1].removeprefix("Id ").strip()
        elif stripped.startswith("|-- "):
            leaf = stripped[4:]
        elif stripped.startswith("/") and leaf:
            fields = stripped.split()
            length, kind = fields[0][1:], fields[-1]
            if kind == "UNICAST" and table != _LOCAL_TABLE:
                route = Route(str(ipaddress.IPv4Network(f"{leaf}/{length}", strict=False)), "?", table=table)
                if route not in routes:
                    routes.append(route)
            elif kind == "LOCAL" and length == "32":
                addresses.setdefault(leaf, Address(leaf, "?"))
    return tuple(routes), tuple(addresses.values())


def parse_ipv6_route(text: str) -> tuple[Route, ...]:
    """/proc/net/ipv6_route: dest, dest_len, src, src_len, next_hop, metric, refcnt, use, flags, device (hex)."""
    routes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10:
            continue
        flags = int(fields[8], 16)
        if not flags & RTF_UP or flags & RTF_REJECT or flags & RTF_LOCAL:
            continue
        network = ipaddress.IPv6Network((_ipv6(fields[0]), int(fields[1], 16)), strict=False)
        via = str(_ipv6(fields[4])) if flags & RTF_GATEWAY else ""
        route = Route(str(network), fields[9], via, table="")
        if route not in routes:
            routes.append(route)
    return tuple(routes)


def parse_if_inet6(text: str) -> tuple[Address, ...]:
    """/proc/net/if_inet6: address (hex), ifindex, prefix length, scope, flags, device."""
    return tuple(Address(str(_ipv6(f[0])), f[5]) for f in (line.split() for line in text.splitlines()) if len(f) >= 6)


def parse_dev(text: str) -> tuple[str, ...]:
    """/proc/net/dev: two header lines, then `name: counters…` (this namespace's interfaces, unlike /sys/class/net)."""
    return tuple(line.split(":", 1)[0].strip() for line in text.splitlines()[2:] if ":" in line)


def _ipv4(hex_le: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int.from_bytes(bytes.fromhex(hex_le), "little"))


def _ipv6(hex_be: str) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(int(hex_be, 16))


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise NetworkTablesError(f"{path}: cannot read the kernel table: {exc.strerror}") from exc
