"""The egress decision, without the hook around it: given an audit event and its arguments, allow or refuse.

Pure and side-effect free, so it is tested in-process; `guard.py` only wires it into `sys.addaudithook`.
The rules:
- creating a socket (`socket.__new__`): only AF_UNIX, AF_INET and AF_INET6. AF_PACKET, AF_NETLINK, AF_VSOCK, … are
  refused before the kernel is asked (family -1 is CPython's "AF_INET, or whatever the fd given is": allowed, and
  what such a socket sends is judged below).
- `connect`, `sendto`, `sendmsg`: AF_UNIX is local and allowed; AF_INET/AF_INET6 go only to the allowlist
  (address and, when `allow_ports` is set, port; port 53 only when listed by number); other families are refused.
  A host name in the address is judged by the name rule, then each address /etc/hosts gives it by the allowlist.
- `bind`: an address is local by definition, but a host name in it is a lookup: judged by the name rule.
- name resolution (`getaddrinfo`, `gethostbyname[_ex]`): IP literals are parsed, not looked up, and pass (the
  connect that follows is judged); names pass only when they are the policy's `local_names` and /etc/hosts answers
  them for the family asked (see `local_names.py`).
- reverse lookups (`gethostbyaddr`, `getnameinfo`): only for addresses /etc/hosts lists.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from sealbox.runtime.egress.allowlist import Allowlist, IPAddress, literal_address
from sealbox.runtime.egress.local_names import LocalNames

SEND_EVENTS = frozenset({"socket.connect", "socket.sendto", "socket.sendmsg"})
BIND_EVENT = "socket.bind"
CREATE_EVENT = "socket.__new__"
FORWARD_LOOKUP_EVENTS = frozenset({"socket.getaddrinfo", "socket.gethostbyname"})
REVERSE_LOOKUP_EVENTS = frozenset({"socket.gethostbyaddr", "socket.getnameinfo"})
WATCHED_EVENTS = SEND_EVENTS | FORWARD_LOOKUP_EVENTS | REVERSE_LOOKUP_EVENTS | {BIND_EVENT, CREATE_EVENT}
ALLOWED_FAMILIES = frozenset({socket.AF_UNIX, socket.AF_INET, socket.AF_INET6})
_FAMILY_FROM_FD = -1
DNS_PORT = 53

# What CPython's connect/sendto address parser turns these host strings into (getaddrinfo does not: there they are names).
_SPECIAL_HOSTS = {"": "0.0.0.0", "<broadcast>": "255.255.255.255"}
_NAME_RULE = "names resolve only from /etc/hosts; DNS is not allowed"


@dataclass(frozen=True)
class Refusal:
    operation: str
    destination: str
    reason: str


@dataclass(frozen=True)
class EgressRules:
    allowlist: Allowlist
    local_names: LocalNames

    def decide(self, event: str, args: tuple[object, ...]) -> Refusal | None:
        """None to allow; a Refusal naming the destination and the rule otherwise. Unreadable arguments are refused."""
        try:
            if event == CREATE_EVENT:
                return self._create(args[1], args[2], args[3])
            if event in SEND_EVENTS:
                return self._send(event, args[0], args[1])
            if event == BIND_EVENT:
                return self._bind(args[0], args[1])
            if event == "socket.getaddrinfo":
                return self.resolve(event, args[0], int(args[2]))
            if event in FORWARD_LOOKUP_EVENTS:
                return self.resolve(event, args[0], socket.AF_INET)  # gethostbyname[_ex] ask for IPv4 only
            if event in REVERSE_LOOKUP_EVENTS:
                return self._reverse(event, args[0])
        except (IndexError, TypeError, ValueError, UnicodeError) as exc:
            socket_event = event in SEND_EVENTS or event in (BIND_EVENT, CREATE_EVENT)
            return Refusal(event, repr(args[1:] if socket_event else args)[:200], f"unreadable address ({exc})")
        return None

    def resolve(self, event: str, host: object, family: int = 0) -> Refusal | None:
        """The name rule, also used for a host name passed straight to connect/sendto/bind."""
        if host is None:
            return None  # a passive or loopback lookup: no name to ask anyone about
        name = _text(host)
        if literal_address(name) is not None or self.local_names.lookup(name, family):
            return None
        return Refusal(event, name, _NAME_RULE)

    def name_in_address(self, event: str, address: object, family: int = 0) -> Refusal | None:
        """Judge a host name inside a connect/sendto address *before* the call: CPython resolves it before the
        audit event fires, so the hook alone would see a DNS lookup only after it had gone out."""
        if not isinstance(address, tuple) or not address or not isinstance(address[0], (str, bytes)):
            return None  # nothing to resolve here; the audit event judges the rest
        host = _text(address[0])
        if host in _SPECIAL_HOSTS or literal_address(host) is not None or self.local_names.lookup(host, family):
            return None
        return Refusal(event, host, _NAME_RULE)

    def _create(self, family: object, kind: object, proto: object) -> Refusal | None:
        family = int(family)  # type: ignore[call-overload]
        if family in ALLOWED_FAMILIES or family == _FAMILY_FROM_FD:
            return None
        name = _family_name(family)
        return Refusal(CREATE_EVENT, f"{name} (type {int(kind)}, protocol {int(proto)})",  # type: ignore[call-overload]
                       f"address family {name} is not allowed: only AF_UNIX, AF_INET and AF_INET6")  # fmt: skip

    def _bind(self, sock: object, address: object) -> Refusal | None:
        if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
            return None  # a path, or a socket judged when it was made
        if not isinstance(address, tuple):
            raise TypeError(f"an inet address is a tuple, not {type(address).__name__}")
        return self.name_in_address(BIND_EVENT, address, sock.family)  # type: ignore[attr-defined]

    def _send(self, event: str, sock: object, address: object) -> Refusal | None:
        family = getattr(sock, "family", None)
        if family == socket.AF_UNIX or address is None:
            # A path on this host; or sendmsg on a connected socket, whose connect was judged already.
            return None
        if family not in (socket.AF_INET, socket.AF_INET6):
            name = getattr(family, "name", str(family))
            return Refusal(event, f"{name} {address!r}"[:200], f"address family {name} is not allowed")
        if not isinstance(address, tuple):  # CPython has parsed it before the event: (host, port[, flow, scope])
            raise TypeError(f"an {family.name} address is a tuple, not {type(address).__name__}")
        host, port = _text(address[0]), int(address[1])
        destination = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        for candidate in self._addresses(host, family):
            if candidate is None:
                return Refusal(event, destination, _NAME_RULE)
            if port == DNS_PORT and DNS_PORT not in self.allowlist.ports:
                return Refusal(event, destination, "port 53 (DNS) is reachable only when allow_ports lists it")
            if not self.allowlist.permits(candidate, port):
                return Refusal(event, destination, f"not in the egress allowlist: {self.allowlist.describe()}")
        return None

    def _addresses(self, host: str, family: int) -> tuple[IPAddress | None, ...]:
        literal = literal_address(_SPECIAL_HOSTS.get(host, host))
        if literal is not None:
            return (literal,)
        return self.local_names.lookup(host, family) or (None,)

    def _reverse(self, event: str, target: object) -> Refusal | None:
        host = _text(target[0] if isinstance(target, tuple) else target)
        address = literal_address(host)
        if address is not None and self.local_names.has_address(address):
            return None
        if address is None and self.local_names.lookup(host):
            return None  # gethostbyaddr(name): forward from /etc/hosts, then back from it
        return Refusal(event, host, "reverse lookups are answered only from /etc/hosts")


def _family_name(family: int) -> str:
    try:
        return socket.AddressFamily(family).name
    except ValueError:
        return f"family {family}"


def _text(host: object) -> str:
    if isinstance(host, bytes):
        return host.decode("ascii")
    if isinstance(host, str):
        return host
    if isinstance(host, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(host)
    raise TypeError(f"host must be str or bytes, not {type(host).__name__}")
