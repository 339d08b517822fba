"""The egress decision as a pure function: allowlist, ports, the /etc/hosts name rule, address families.

In-process and without the hook (audit hooks are permanent, so the pytest process never installs one); the hook
itself is exercised in a real guarded process in test_egress_guard_process.py. Sockets here are created, never used.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
from pydantic import ValidationError

from sealbox.runtime.egress.allowlist import Allowlist, EgressPolicyWithPorts
from sealbox.runtime.egress.local_names import LocalNames
from sealbox.runtime.egress.rules import EgressRules
from sealbox.runtime.policy import Policy

HOSTS = """\
127.0.0.1   localhost appliance  # the usual
::1         ip6-localhost
"""
FILES_FIRST = "passwd: files\nhosts:          files dns\n"


@pytest.fixture
def tcp4():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        yield sock


@pytest.fixture
def udp6():
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        yield sock


def rules(*, ports: tuple[int, ...] = (), hosts: str = HOSTS, nsswitch: str = FILES_FIRST,
          names: tuple[str, ...] = ("localhost", "appliance", "ip6-localhost")) -> EgressRules:  # fmt: skip
    policy = EgressPolicyWithPorts(allow_ports=ports)
    return EgressRules(Allowlist.from_policy(policy), LocalNames.parse(hosts, nsswitch).restricted_to(frozenset(names)))


def test_an_empty_port_list_allows_loopback_on_every_port_but_dns(tcp4, udp6):
    loopback = rules()
    assert loopback.decide("socket.connect", (tcp4, ("127.0.0.1", 8080))) is None
    assert loopback.decide("socket.connect", (tcp4, ("127.9.9.9", 1))) is None
    assert loopback.decide("socket.sendto", (udp6, ("::1", 5353, 0, 0))) is None
    dns = loopback.decide("socket.sendto", (udp6, ("::1", 53, 0, 0)))
    assert dns is not None and "port 53 (DNS)" in dns.reason
    assert loopback.decide("socket.connect", (tcp4, ("127.0.0.53", 53))) is not None
    assert rules(ports=(53,)).decide("socket.connect", (tcp4, ("127.0.0.53", 53))) is None  # listed by number
    refusal = loopback.decide("socket.connect", (tcp4, ("0.0.0.0", 80)))
    assert refusal is not None
    assert refusal.destination == "0.0.0.0:80"
    assert "127.0.0.0/8, ::1/128 (any port but 53)" in refusal.reason


def test_allow_ports_refuses_a_loopback_port_not_listed(tcp4, udp6):
    narrow = rules(ports=(8080,))
    assert narrow.decide("socket.connect", (tcp4, ("127.0.0.1", 8080))) is None
    refusal = narrow.decide("socket.connect", (tcp4, ("127.0.0.1", 5432)))
    assert refusal is not None and refusal.destination == "127.0.0.1:5432"
    assert "ports 8080" in refusal.reason
    refusal6 = narrow.decide("socket.sendto", (udp6, ("::1", 53, 0, 0)))
    assert refusal6 is not None and refusal6.destination == "[::1]:53"


def test_an_ipv4_mapped_ipv6_address_is_judged_as_the_ipv4_host(udp6):
    loopback = rules()
    assert loopback.decide("socket.sendto", (udp6, ("::ffff:127.0.0.1", 9, 0, 0))) is None
    assert loopback.decide("socket.sendto", (udp6, ("::ffff:0.0.0.0", 9, 0, 0))) is not None


def test_special_connect_hosts_are_judged_as_the_addresses_cpython_gives_them(tcp4):
    loopback = rules()
    assert loopback.decide("socket.connect", (tcp4, ("", 80))) is not None  # 0.0.0.0
    assert loopback.decide("socket.sendto", (tcp4, ("<broadcast>", 9))) is not None  # 255.255.255.255


def test_unix_sockets_are_local_and_allowed():
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        assert rules(ports=(1,)).decide("socket.connect", (unix, "/run/sealbox.sock")) is None


def test_other_address_families_are_refused_whatever_the_address():
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as netlink:
        refusal = rules().decide("socket.sendto", (netlink, (0, 0)))
    assert refusal is not None and "AF_NETLINK" in refusal.reason


def test_sendmsg_on_a_connected_socket_carries_no_address_and_is_allowed(udp6):
    assert rules(ports=(1,)).decide("socket.sendmsg", (udp6, None)) is None


def test_dns_names_are_refused_and_names_in_etc_hosts_are_not():
    loopback = rules()
    refusal = loopback.decide("socket.getaddrinfo", ("models.sealbox-test.invalid", 443, 0, 0, 0))
    assert refusal is not None and refusal.destination == "models.sealbox-test.invalid"
    assert "DNS is not allowed" in refusal.reason
    assert loopback.decide("socket.getaddrinfo", ("localhost", 80, 0, 0, 0)) is None
    assert loopback.decide("socket.getaddrinfo", ("LocalHost", 80, 0, 0, 0)) is None
    assert loopback.decide("socket.gethostbyname", ("appliance",)) is None
    # A trailing dot makes glibc skip /etc/hosts and ask DNS.
    assert loopback.decide("socket.gethostbyname", ("localhost.",)) is not None


def test_literal_addresses_and_passive_lookups_resolve_without_a_lookup():
    loopback = rules()
    assert loopback.decide("socket.getaddrinfo", ("127.0.0.1", 80, 0, 0, 0)) is None
    assert loopback.decide("socket.getaddrinfo", (b"::1", 80, 0, 0, 0)) is None
    assert loopback.decide("socket.getaddrinfo", (None, 80, 0, 0, 0)) is None
    assert loopback.decide("socket.getaddrinfo", ("", 80, 0, 0, 0)) is not None


def test_when_dns_comes_before_files_even_localhost_is_refused():
    dns_first = rules(nsswitch="hosts: dns files\n")
    assert dns_first.decide("socket.getaddrinfo", ("localhost", 80, 0, 0, 0)) is not None
    no_hosts_line = rules(nsswitch="passwd: files\n")
    assert no_hosts_line.decide("socket.getaddrinfo", ("localhost", 80, 0, 0, 0)) is not None


def test_reverse_lookups_are_allowed_only_for_addresses_etc_hosts_lists():
    loopback = rules()
    assert loopback.decide("socket.gethostbyaddr", ("127.0.0.1",)) is None
    assert loopback.decide("socket.getnameinfo", (("::1", 80),)) is None
    refusal = loopback.decide("socket.gethostbyaddr", ("127.0.0.2",))
    assert refusal is not None and "reverse" in refusal.reason


def test_a_name_in_a_connect_address_is_judged_before_the_call(tcp4):
    loopback = rules(ports=(8080,))
    assert loopback.name_in_address("socket.connect", ("localhost", 8080)) is None
    assert loopback.name_in_address("socket.connect", ("127.0.0.1", 1)) is None  # the audit event judges ports
    refusal = loopback.name_in_address("socket.connect", ("models.sealbox-test.invalid", 443))
    assert refusal is not None and refusal.destination == "models.sealbox-test.invalid"
    # After the C library answered from /etc/hosts, the audit event sees the name and judges its addresses.
    assert loopback.decide("socket.connect", (tcp4, ("localhost", 8080))) is None
    assert loopback.decide("socket.connect", (tcp4, ("localhost", 22))) is not None


def test_unreadable_arguments_are_refused_not_allowed(tcp4):
    refusal = rules().decide("socket.connect", (tcp4, "not-a-tuple"))
    assert refusal is not None and "unreadable" in refusal.reason


def test_allow_ports_must_be_real_ports_listed_once():
    with pytest.raises(ValidationError, match="outside 1..65535"):
        EgressPolicyWithPorts(allow_ports=(0,))
    with pytest.raises(ValidationError, match="listed twice"):
        EgressPolicyWithPorts(allow_ports=(80, 80))


def test_the_shipped_policy_allows_loopback_on_the_servers_own_port_only():
    egress = Policy.default().egress
    allowlist = Allowlist.from_policy(egress)
    assert allowlist.networks == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert allowlist.ports == frozenset({Policy.default().server.port})
    assert not allowlist.permits(ipaddress.ip_address("127.0.0.1"), 53)
    assert not allowlist.permits(ipaddress.ip_address("127.0.0.53"), 53)
    assert not allowlist.permits(ipaddress.ip_address("127.0.0.1"), 65535)
    assert egress.local_names == (("localhost", ("127.0.0.1", "::1")),)



def test_every_exported_name_resolves_and_the_error_is_an_oserror():
    import sealbox.runtime.egress as egress

    assert all(hasattr(egress, name) for name in egress.__all__)
    assert issubclass(egress.EgressBlockedError, PermissionError)


def test_a_refusal_survives_pickling_with_its_destination():
    import pickle

    from sealbox.runtime.egress.guard import EgressBlockedError
    from sealbox.runtime.egress.rules import Refusal

    error = pickle.loads(pickle.dumps(EgressBlockedError(Refusal("socket.connect", "127.0.0.1:22", "not allowed"))))
    assert (error.errno, error.destination, error.operation) == (13, "127.0.0.1:22", "socket.connect")


# --- DNS is a channel too (issue 13) -------------------------------------------------------------------------------


def test_a_name_in_etc_hosts_but_not_in_the_policys_local_names_is_refused(tcp4):
    only_localhost = rules(names=("localhost",))
    assert only_localhost.decide("socket.getaddrinfo", ("localhost", 80, 0, 0, 0)) is None
    refusal = only_localhost.decide("socket.getaddrinfo", ("appliance", 80, 0, 0, 0))
    assert refusal is not None and refusal.destination == "appliance"
    assert only_localhost.name_in_address("socket.connect", ("appliance", 8080), socket.AF_INET) is not None


def test_a_lookup_for_a_family_etc_hosts_does_not_list_is_refused_because_glibc_would_ask_dns_next():
    loopback = rules()  # localhost has 127.0.0.1 only; ip6-localhost has ::1 only
    assert loopback.decide("socket.getaddrinfo", ("localhost", 80, socket.AF_INET, 0, 0)) is None
    refusal = loopback.decide("socket.getaddrinfo", ("localhost", 80, socket.AF_INET6, 0, 0))
    assert refusal is not None and refusal.destination == "localhost"
    assert loopback.decide("socket.gethostbyname", ("ip6-localhost",)) is not None  # IPv4 only
    assert loopback.decide("socket.getaddrinfo", ("ip6-localhost", 80, socket.AF_UNSPEC, 0, 0)) is None


def test_binding_to_a_name_outside_the_local_names_is_refused_and_to_an_address_is_not(tcp4, udp6):
    loopback = rules(ports=(8080,))
    refusal = loopback.decide("socket.bind", (tcp4, ("data-to-leak.example", 0)))
    assert refusal is not None and refusal.operation == "socket.bind"
    assert refusal.destination == "data-to-leak.example" and "DNS is not allowed" in refusal.reason
    assert loopback.name_in_address("socket.bind", ("data-to-leak.example", 0), socket.AF_INET) is not None
    assert loopback.decide("socket.bind", (tcp4, ("127.0.0.1", 0))) is None
    assert loopback.decide("socket.bind", (tcp4, ("", 0))) is None
    assert loopback.decide("socket.bind", (udp6, ("::1", 0, 0, 0))) is None
    assert loopback.decide("socket.bind", (tcp4, ("localhost", 0))) is None


@pytest.mark.parametrize("family", [socket.AF_PACKET, socket.AF_NETLINK, socket.AF_VSOCK, socket.AF_CAN, 255])
def test_creating_a_socket_of_any_family_but_unix_inet_and_inet6_is_refused(family: int):
    refusal = rules().decide("socket.__new__", (None, family, socket.SOCK_RAW, 0))
    assert refusal is not None and refusal.operation == "socket.__new__"
    assert "is not allowed: only AF_UNIX, AF_INET and AF_INET6" in refusal.reason


@pytest.mark.parametrize("family", [socket.AF_UNIX, socket.AF_INET, socket.AF_INET6, -1])
def test_creating_unix_inet_and_inet6_sockets_is_allowed(family: int):
    assert rules().decide("socket.__new__", (None, family, socket.SOCK_STREAM, 0)) is None


def test_local_names_in_the_policy_must_be_plain_names_with_addresses():
    with pytest.raises(Exception, match="not a plain host name"):
        Policy.from_toml('[egress]\nlocal_names = { "evil\\nname" = ["127.0.0.1"] }\n')
    with pytest.raises(Exception, match="does not appear to be an IPv4 or IPv6 address"):
        Policy.from_toml('[egress]\nlocal_names = { gw = ["gw.example"] }\n')
    with pytest.raises(Exception, match="one or more addresses"):
        Policy.from_toml("[egress]\nlocal_names = { gw = [] }\n")
