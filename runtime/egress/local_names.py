"""Host names the C library answers from /etc/hosts, without a packet.

The guard's rule for name resolution: a name may be resolved only when no lookup can leave the host, that is
when nsswitch consults `files` first and /etc/hosts lists the name. `localhost` passes on any sane host; a DNS
name never does (a lookup is itself a packet to a resolver, and a label can carry data out). Reverse lookups
follow the same rule from the other side: only for addresses /etc/hosts lists.
Both files are read once, when the guard is installed: ProtectSystem=strict keeps them fixed for the service, whose
/etc/hosts is rendered from the policy's `local_names` (which also narrow what this module answers).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from sealbox.runtime.egress.allowlist import IPAddress, literal_address, unmapped

HOSTS = Path("/etc/hosts")
NSSWITCH = Path("/etc/nsswitch.conf")


@dataclass(frozen=True)
class LocalNames:
    names: dict[str, tuple[IPAddress, ...]] = field(default_factory=dict)
    files_first: bool = False

    @classmethod
    def load(cls, hosts: Path = HOSTS, nsswitch: Path = NSSWITCH) -> LocalNames:
        """Unreadable files mean no local names: the rule then refuses every name, which is the safe side."""
        try:
            switch = nsswitch.read_text(encoding="utf-8", errors="replace")
            table = hosts.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return cls()
        return cls.parse(table, switch)

    @classmethod
    def parse(cls, hosts_text: str, nsswitch_text: str) -> LocalNames:
        if not _files_first(nsswitch_text):
            return cls()
        names: dict[str, list[IPAddress]] = {}
        for line in hosts_text.splitlines():
            fields = line.split("#", 1)[0].split()
            if len(fields) < 2 or (address := literal_address(fields[0])) is None:
                continue
            for name in fields[1:]:
                names.setdefault(_normal(name), []).append(unmapped(address))
        return cls({name: tuple(addresses) for name, addresses in names.items()}, files_first=True)

    def lookup(self, name: str, family: int = 0) -> tuple[IPAddress, ...]:
        """The addresses /etc/hosts gives `name` for `family` (0: any); empty when resolving it would ask the network.

        Per family because glibc's files module answers "not found" for an IPv6 lookup of a name it lists with an
        IPv4 address only, and the next module in nsswitch (dns) is then asked.
        """
        addresses = self.names.get(_normal(name), ())
        version = {socket.AF_INET: 4, socket.AF_INET6: 6}.get(family)
        return addresses if version is None else tuple(a for a in addresses if a.version == version)

    def restricted_to(self, allowed: frozenset[str]) -> LocalNames:
        """Only the names the policy lists (`[egress] local_names`): the rest of /etc/hosts is not the appliance's."""
        wanted = {_normal(name) for name in allowed}
        return LocalNames({n: a for n, a in self.names.items() if n in wanted}, files_first=self.files_first)

    def has_address(self, address: IPAddress) -> bool:
        address = unmapped(address)
        return any(address in addresses for addresses in self.names.values())


def _normal(name: str) -> str:
    # Case folds as glibc's files module compares; a trailing dot does not ("localhost." misses and goes to DNS).
    return name.lower()


def _files_first(nsswitch_text: str) -> bool:
    """True when the `hosts:` line starts with `files`. With no such line glibc asks DNS first."""
    for line in nsswitch_text.splitlines():
        fields = line.split("#", 1)[0].split()
        if fields and fields[0] == "hosts:":
            return len(fields) > 1 and fields[1] == "files"
    return False
