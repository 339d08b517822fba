"""Whether some process listens on a TCP address, read from the kernel's socket tables (`/proc/net/tcp`, `tcp6`).

The supervisor asks this of the Ray head it started rather than connecting: sealbox's own egress guard allows only
the policy's ports, and a probe connection to Ray's GCS would be one more client for it to log.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

TABLES = {4: Path("/proc/net/tcp"), 6: Path("/proc/net/tcp6")}
LISTEN = "0A"


def is_listening(address: str, port: int) -> bool:
    """True when a TCP socket listens on `address`:`port`, or on the wildcard address of its family."""
    ip = ipaddress.ip_address(address)
    wanted = {ip, ipaddress.ip_address("0.0.0.0" if ip.version == 4 else "::")}
    for version, table in TABLES.items():
        try:
            lines = table.read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            hex_address, _, hex_port = local.partition(":")
            if state == LISTEN and int(hex_port, 16) == port and _address(hex_address, version) in wanted:
                return True
    return False


def _address(hex_address: str, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The kernel prints each 32-bit word of the address in host byte order."""
    words = b"".join(int(hex_address[i:i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hex_address), 8))
    address = ipaddress.ip_address(words)
    if version == 6 and isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address
