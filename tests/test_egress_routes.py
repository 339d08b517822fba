"""The kernel's network tables, read from /proc: in namespaces this test builds, and on the test host itself.

No packet is sent: namespaces are made with `unshare -rn`, given a veth pair and routes by `ip`, and read.
The host case is checked against `ip -j route`, an independent reader of the same tables.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys

import pytest

from conftest import require_lockdown

from sealbox.runtime.egress.routes import parse_dev, parse_fib_trie, parse_ipv6_route, parse_route, read_network

READ = (
    "import json; from sealbox.runtime.egress.routes import read_network; v = read_network();"
    "print(json.dumps({'interfaces': v.interfaces, 'loopback_only': v.loopback_only,"
    " 'egress': [r.describe() for r in v.egress_routes], 'outside': [a.address for a in v.outside_addresses]}))"
)


def read_in_netns(setup: str) -> dict[str, object]:
    require_lockdown("unshare", "ip", netns=True)
    script = f'ip link set lo up && {setup} && exec "$@"'
    done = subprocess.run(
        ["unshare", "-rn", "sh", "-ec", script, "sh", sys.executable, "-c", READ],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_namespace_with_only_loopback_has_no_egress_route():
    view = read_in_netns("true")
    assert view == {"interfaces": ["lo"], "loopback_only": True, "egress": [], "outside": []}


def test_a_default_route_through_another_interface_is_an_egress_route():
    view = read_in_netns("ip link add v0 type veth peer name v1 && ip link set v0 up && ip route add default dev v0")
    assert view["loopback_only"] is False
    assert view["egress"] == ["default (0.0.0.0/0) dev v0"]
    assert set(view["interfaces"]) == {"lo", "v0", "v1"}


def test_a_route_in_a_policy_routing_table_is_found_and_reject_routes_are_not():
    view = read_in_netns(
        "ip link add v0 type veth peer name v1 && ip link set v0 up"
        " && ip route add default dev v0 table 100 && ip -6 route add blackhole default"
    )
    assert view["egress"] == ["default (0.0.0.0/0) dev ? table 100"]


def test_an_address_on_another_interface_is_reported():
    view = read_in_netns("ip link add v0 type veth peer name v1 && ip -6 addr add fd5e:a1b0::1/64 dev v0 nodad && ip link set v0 up")
    assert "fd5e:a1b0::1" in view["outside"]
    assert "fd5e:a1b0::/64 dev v0" in view["egress"]


def _ip_routes(*family: str) -> set[tuple[str, str]]:
    done = subprocess.run(["ip", "-j", *family, "route", "show", "table", "main"], capture_output=True, text=True, check=True)
    default = "::/0" if family else "0.0.0.0/0"
    routes = set()
    for route in json.loads(done.stdout or "[]"):
        if route.get("type", "unicast") != "unicast" or route.get("dev", "lo") == "lo":
            continue
        destination = default if route["dst"] == "default" else str(ipaddress.ip_network(route["dst"], strict=False))
        routes.add((destination, route["dev"]))
    return routes


def test_on_the_test_host_every_route_ip_lists_is_reported():
    require_lockdown("ip")  # nothing independent to compare with otherwise
    view = read_network()
    found = {(route.destination, route.device) for route in view.egress_routes}
    assert _ip_routes() <= found
    assert _ip_routes("-6") <= found
    assert view.loopback_only == (not found and not view.outside_addresses)


def test_the_parsers_read_the_kernels_formats():
    route = (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "v0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n"
        "*\t0000007F\t00000000\t0201\t0\t0\t0\t000000FF\t0\t0\t0\n"  # a blackhole: not a route out
    )
    assert [r.describe() for r in parse_route(route)] == ["default (0.0.0.0/0) dev v0"]
    ipv6 = (
        "fd5ea1b0000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001       v0\n"
        "00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n"
        "00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001       lo\n"
    )
    assert [r.describe() for r in parse_ipv6_route(ipv6)] == ["fd5e:a1b0::/64 dev v0"]
    trie = "Main:\n  +-- 127.0.0.0/8 2 0 2\n     |-- 127.0.0.1\n        /32 host LOCAL\nId 7:\n  |-- 0.0.0.0\n     /0 link UNICAST\n"
    routes, addresses = parse_fib_trie(trie)
    assert [(r.destination, r.table) for r in routes] == [("0.0.0.0/0", "7")]
    assert [a.address for a in addresses] == ["127.0.0.1"]
    dev = "Inter-|   Receive\n face |bytes\n    lo: 0 0\n    v0: 0 0\n"
    assert parse_dev(dev) == ("lo", "v0")
