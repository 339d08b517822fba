"""The egress guard inside a real `sealbox serve` (issues 7, 13): code running in the serving process cannot reach out.

tests/test_egress_guard_process.py proves the guard in a plain process that installs it itself. Here the server
installs it (`sealbox serve`, policy `[egress] allow_ports`), wires refusals to its own audit log, and the code that
tries to get out runs in the serving process through probe routes that a test-side launcher puts in front of
sealbox's app (tests/egress_probe_server.py; the shipped server has no hook for it, and ignores the old
$SEALBOX_TEST_PLUGIN). The test's own listeners on loopback show what arrived: a refused connect or datagram never
does, an allowed one does. Every address is loopback; the host name is refused before any lookup (and only tried
once the guard is seen). Host names on the other paths are tried in tests/test_egress_dns.py, inside a namespace.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from audit_records import audit_records
from server_support import ServerProcess, create_api_key

LAUNCHER = [sys.executable, str(Path(__file__).with_name("egress_probe_server.py"))]
HOST_NAME = "example.com"


@dataclass
class Listeners:
    """The test's own sockets on loopback: one the policy allows, one it does not, for TCP and for UDP."""

    tcp_allowed: socket.socket
    tcp_forbidden: socket.socket
    udp_allowed: socket.socket
    udp_forbidden: socket.socket

    @staticmethod
    def open() -> Listeners:
        def udp() -> socket.socket:
            receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            receiver.bind(("127.0.0.1", 0))
            receiver.settimeout(30)
            return receiver

        tcp = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
        for listener in tcp:
            listener.settimeout(30)
        return Listeners(tcp[0], tcp[1], udp(), udp())

    def close(self) -> None:
        for sock in (self.tcp_allowed, self.tcp_forbidden, self.udp_allowed, self.udp_forbidden):
            sock.close()


def port(sock: socket.socket) -> int:
    return sock.getsockname()[1]


@dataclass
class Guarded:
    server: ServerProcess
    listeners: Listeners

    def attempt(self, operation: str, host: str, port: int, *, on_the_loop: bool = False) -> dict[str, object]:
        path = "/_test/egress/async" if on_the_loop else "/_test/egress"
        answer = httpx.post(f"{self.server.url}{path}", json={"operation": operation, "host": host, "port": port},
                            timeout=60)  # fmt: skip
        assert answer.status_code == 200, answer.text
        outcome = answer.json()
        assert self.server.process is not None and outcome["pid"] == self.server.process.pid  # inside the server
        return outcome

    def blocked(self) -> list[tuple[str, str]]:
        return [(r.fields["destination"], r.fields["operation"]) for r in audit_records(self.server.audit)
                if r.event == "egress.blocked"]  # fmt: skip


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Guarded]:
    root = tmp_path_factory.mktemp("root")
    create_api_key(root, "alice")
    listeners = Listeners.open()
    server = ServerProcess(root=root, models=[tiny_model], executable=LAUNCHER)
    allowed = [server.port, port(listeners.tcp_allowed), port(listeners.udp_allowed)]
    policy = root.parent / f"{root.name}-policy.toml"
    policy.write_text(f'[egress]\nallow = ["127.0.0.0/8", "::1/128"]\nallow_ports = {json.dumps(allowed)}\n')
    server.policy = policy
    try:
        with server:
            yield Guarded(server, listeners)
    finally:
        listeners.close()


def first_connection_is_the_tests_own(listener: socket.socket) -> bool:
    """Connect to `listener` from the test, then accept: True when that connection is the first in its queue, i.e.
    nothing else had connected (a connect from the server would have completed before its answer came back)."""
    with socket.create_connection(listener.getsockname(), timeout=30) as own:
        accepted, peer = listener.accept()
        accepted.close()
        return peer == own.getsockname()


def first_datagram_is_the_tests_own(receiver: socket.socket) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as own:
        own.sendto(b"the test's own marker", receiver.getsockname())
    return receiver.recv(64) == b"the test's own marker"


def refused(outcome: dict[str, object]) -> dict[str, object]:
    assert outcome["outcome"] == "refused", outcome
    assert (outcome["type"], outcome["errno"], outcome["permission_error"]) == ("EgressBlockedError", 13, True)
    return outcome


# --- what the server process may do: the controls ----------------------------------------------------------------


def test_the_server_wrote_its_guard_status_with_the_policys_ports(guarded: Guarded):
    status = json.loads((guarded.server.root / "run" / "egress-guard.json").read_text())
    assert guarded.server.process is not None and status["pid"] == guarded.server.process.pid
    assert status["self_test"] is True
    assert guarded.server.port in status["ports"]


def test_a_connect_to_a_loopback_port_the_policy_allows_arrives(guarded: Guarded):
    listener = guarded.listeners.tcp_allowed
    assert guarded.attempt("connect", "127.0.0.1", port(listener))["outcome"] == "allowed"
    assert not first_connection_is_the_tests_own(listener)  # the server's connection was there first


def test_a_datagram_to_a_loopback_port_the_policy_allows_arrives(guarded: Guarded):
    receiver = guarded.listeners.udp_allowed
    assert guarded.attempt("sendto", "127.0.0.1", port(receiver))["outcome"] == "allowed"
    assert receiver.recv(64) == b"from the server"


# --- what it may not -------------------------------------------------------------------------------------------


def assert_refused_once(guarded: Guarded, call: str, loopback_port: int) -> None:
    """The server process's `socket.<call>` to a loopback port outside the policy fails with the guard's reason and is
    recorded as one block."""
    destination = f"127.0.0.1:{loopback_port}"
    outcome = refused(guarded.attempt(call, "127.0.0.1", loopback_port))
    assert f"socket.{call} to {destination}: not in the egress allowlist" in str(outcome["error"])
    assert guarded.blocked().count((destination, f"socket.{call}")) == 1


def test_the_server_process_is_refused_a_loopback_port_the_policy_does_not_allow(guarded: Guarded):
    listener = guarded.listeners.tcp_forbidden
    assert_refused_once(guarded, "connect", port(listener))
    assert first_connection_is_the_tests_own(listener), "a refused connect reached the test's listener"


def test_the_server_process_is_refused_on_its_event_loop_too(guarded: Guarded):
    listener = guarded.listeners.tcp_forbidden
    destination = f"127.0.0.1:{port(listener)}"
    before = guarded.blocked().count((destination, "socket.connect"))
    refused(guarded.attempt("asyncio_connect", "127.0.0.1", port(listener), on_the_loop=True))
    assert first_connection_is_the_tests_own(listener)
    assert guarded.blocked().count((destination, "socket.connect")) == before + 1


def test_the_server_process_is_refused_resolving_a_host_name_before_any_lookup(guarded: Guarded):
    outcome = refused(guarded.attempt("getaddrinfo", HOST_NAME, 443))
    assert f"{HOST_NAME}: names resolve only from /etc/hosts; DNS is not allowed" in str(outcome["error"])
    assert guarded.blocked().count((HOST_NAME, "socket.getaddrinfo")) == 1


def test_the_server_process_is_refused_udp_to_a_loopback_port_the_policy_does_not_allow(guarded: Guarded):
    receiver = guarded.listeners.udp_forbidden
    assert_refused_once(guarded, "sendto", port(receiver))
    assert first_datagram_is_the_tests_own(receiver), "a refused datagram reached the test's receiver"


def test_every_refusal_is_an_egress_blocked_record_in_the_servers_chain_and_only_refusals_are(guarded: Guarded):
    refused(guarded.attempt("connect", "127.0.0.1", port(guarded.listeners.tcp_forbidden)))
    records = audit_records(guarded.server.audit)
    assert [r.seq for r in records] == list(range(1, len(records) + 1))  # one chain: the server's
    blocked = [r.fields for r in records if r.event == "egress.blocked"]
    assert blocked and all(set(fields) == {"destination", "operation"} for fields in blocked)
    allowed = {f"127.0.0.1:{port(guarded.listeners.tcp_allowed)}", f"127.0.0.1:{port(guarded.listeners.udp_allowed)}"}
    assert not allowed & {fields["destination"] for fields in blocked}
    assert records[0].event == "server.start"


@pytest.mark.parametrize(("operation", "family"), [("af_packet", "AF_PACKET"), ("af_netlink", "AF_NETLINK"),
                                                   ("c_af_netlink", "AF_NETLINK")])  # fmt: skip
def test_the_server_process_is_refused_creating_a_packet_or_netlink_socket_and_it_is_recorded(
    guarded: Guarded, operation: str, family: str
):
    before = [d for d, op in guarded.blocked() if op == "socket.__new__" and d.startswith(family)]
    outcome = refused(guarded.attempt(operation, "", 0))
    assert f"address family {family} is not allowed" in str(outcome["error"])
    after = [d for d, op in guarded.blocked() if op == "socket.__new__" and d.startswith(family)]
    assert len(after) == len(before) + 1


# --- no test hook ships in the server ----------------------------------------------------------------------------

PLUGIN = """
from pathlib import Path
Path(__file__).with_suffix(".loaded").write_text("the server ran this file")
def register(app):
    @app.get("/_test/plugin")
    def plugin():
        return {"loaded": True}
"""


def test_the_shipped_server_ignores_sealbox_test_plugin(tmp_path: Path, tiny_model: Path):
    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN)
    root = tmp_path / "root"
    root.mkdir()
    create_api_key(root, "alice")
    with ServerProcess(root=root, models=[tiny_model], env={"SEALBOX_TEST_PLUGIN": str(plugin)}) as server:
        answer = httpx.get(f"{server.url}/_test/plugin", timeout=30)
        assert answer.status_code == 404
    assert not plugin.with_suffix(".loaded").exists(), "the server imported the file $SEALBOX_TEST_PLUGIN named"
