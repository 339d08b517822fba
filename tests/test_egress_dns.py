"""DNS is a channel too (issue 13): inside a real `sealbox serve`, no name lookup reaches a resolver.

The test makes its own "host": a network and mount namespace with loopback only, whose /etc/resolv.conf names
127.0.0.1 and whose /etc/hosts lists localhost (IPv4 only) and one name the policy does not list. A resolver
stand-in listens on 127.0.0.1:53 (UDP and TCP) there. A control child, without sealbox, shows that a lookup does
reach the stand-in. Then the server (with probe routes, tests/egress_probe_server.py) tries every way to have a
name looked up: the Python socket API, which the guard refuses and records in the audit log, and the C socket
methods underneath, where the lookup happens before any hook and glibc's resolver, told to make zero attempts,
sends nothing. The stand-in must have received nothing at all.

This file is also the driver: run as a script inside the namespace, it prints what happened as JSON.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require_lockdown

HERE = Path(__file__).resolve().parent
HOSTS = "127.0.0.1 localhost\n127.0.0.1 lan-only-name\n"
RESOLV = "nameserver 127.0.0.1\n"
# Each operation gets its own name, so a query that did arrive names the path it came from.
REFUSED_AND_RECORDED = {
    "getaddrinfo": "socket.getaddrinfo",
    "bind": "socket.bind",
    "connect_name": "socket.connect",
    "sendto_name": "socket.sendto",
    "gethostbyname": "socket.gethostbyname",
    "gethostbyname_ex": "socket.gethostbyname",
    "gethostbyaddr": "socket.gethostbyaddr",
}
BELOW_THE_HOOK = ("c_connect", "c_bind", "c_sendto")


def name_for(operation: str) -> str:
    return f"leak-{operation.replace('_', '-')}.sealbox-test.invalid"


@dataclass(frozen=True)
class Run:
    control: list[str]
    outcomes: dict[str, dict[str, object]]
    received: list[str]
    blocked: list[list[str]]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Run:
    require_lockdown("unshare", "ip", "mount", netns=True)
    scratch = tmp_path_factory.mktemp("dns")
    (scratch / "hosts").write_text(HOSTS)
    (scratch / "resolv.conf").write_text(RESOLV)
    setup = (f"ip link set lo up && mount --bind {scratch / 'resolv.conf'} /etc/resolv.conf && "
             f"mount --bind {scratch / 'hosts'} /etc/hosts && exec \"$@\"")  # fmt: skip
    config = json.dumps({"root": str(scratch / "root"), "model": str(tiny_model)})
    command = ["unshare", "-rnm", "sh", "-c", setup, "sh", sys.executable, str(Path(__file__)), config]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, cwd=HERE.parent)
    assert done.returncode == 0, done.stderr[-5000:]
    return Run(**json.loads(done.stdout))


def test_the_stand_in_resolver_does_receive_a_lookup_from_a_process_without_sealbox(run: Run):
    assert name_for("control") in run.control


def test_no_lookup_from_the_server_reaches_the_resolver_by_any_path(run: Run):
    assert run.received == []


@pytest.mark.parametrize("operation", sorted(REFUSED_AND_RECORDED))
def test_the_server_refuses_a_name_lookup_and_records_it(run: Run, operation: str):
    outcome = run.outcomes[operation]
    assert (outcome["outcome"], outcome["type"]) == ("refused", "EgressBlockedError"), outcome
    assert [name_for(operation), REFUSED_AND_RECORDED[operation]] in run.blocked


@pytest.mark.parametrize("operation", BELOW_THE_HOOK)
def test_a_name_in_the_c_socket_methods_fails_without_a_query(run: Run, operation: str):
    outcome = run.outcomes[operation]
    assert (outcome["outcome"], outcome["type"]) == ("failed", "gaierror"), outcome  # nothing resolved, nothing sent


def test_a_name_in_etc_hosts_that_the_policy_does_not_list_is_refused_and_recorded(run: Run):
    outcome = run.outcomes["lan_only_name"]
    assert outcome["outcome"] == "refused", outcome
    assert ["lan-only-name", "socket.getaddrinfo"] in run.blocked


def test_an_ipv6_lookup_of_a_name_etc_hosts_lists_for_ipv4_only_is_refused_and_recorded(run: Run):
    # glibc's files module says "not found" for it, and the next module (dns) would be asked.
    outcome = run.outcomes["localhost_inet6"]
    assert outcome["outcome"] == "refused", outcome
    assert ["localhost", "socket.getaddrinfo"] in run.blocked


def test_localhost_still_resolves_for_the_server(run: Run):
    assert run.outcomes["localhost_inet"]["outcome"] == "allowed"


# --- the driver, inside the namespace ------------------------------------------------------------------------------


class StandIn:
    """A resolver that listens and never answers: whatever reaches 127.0.0.1:53 is kept, by its query name."""

    def __init__(self) -> None:
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 53))
        self.udp.setblocking(False)
        self.tcp = socket.create_server(("127.0.0.1", 53))
        self.tcp.setblocking(False)

    def received(self) -> list[str]:
        """Every query name that arrived since the last call (loopback delivers within the sending call)."""
        names = []
        while True:
            try:
                names.append(_query_name(self.udp.recv(4096)))
            except BlockingIOError:
                break
        while True:
            try:
                connection, _peer = self.tcp.accept()
            except BlockingIOError:
                break
            connection.settimeout(5)
            names.append(_query_name(connection.recv(4096)[2:]))  # TCP: a two-byte length first
            connection.close()
        return names


def _query_name(message: bytes) -> str:
    labels, at = [], 12
    while at < len(message) and message[at]:
        length = message[at]
        labels.append(message[at + 1 : at + 1 + length].decode("ascii", "replace"))
        at += 1 + length
    return ".".join(labels) or repr(message[:40])


def _driver(config: dict[str, str]) -> dict[str, object]:
    sys.path.insert(0, str(HERE))
    import httpx

    from audit_records import audit_records
    from server_support import ServerProcess, create_api_key

    stand_in = StandIn()
    control_env = {**os.environ, "RES_OPTIONS": "attempts:1 timeout:1"}
    subprocess.run([sys.executable, "-c", f"import socket\ntry: socket.getaddrinfo({name_for('control')!r}, 80)\n"
                    "except OSError: pass"], env=control_env, timeout=60, check=True)  # fmt: skip
    control = stand_in.received()

    root = Path(config["root"])
    root.mkdir()
    create_api_key(root, "alice")
    launcher = [sys.executable, str(HERE / "egress_probe_server.py")]
    server = ServerProcess(root=root, models=[Path(config["model"])], executable=launcher)
    server.policy_text = f"[egress]\nallow_ports = [{server.port}]\n"
    attempts = {op: (op, name_for(op), 80) for op in [*REFUSED_AND_RECORDED, *BELOW_THE_HOOK]}
    attempts["lan_only_name"] = ("getaddrinfo", "lan-only-name", 80)
    attempts["localhost_inet6"] = ("getaddrinfo_inet6", "localhost", 80)
    attempts["localhost_inet"] = ("getaddrinfo", "localhost", 80)
    outcomes = {}
    with server:
        for key, (operation, host, port) in attempts.items():
            answer = httpx.post(f"{server.url}/_test/egress", json={"operation": operation, "host": host, "port": port},
                                timeout=120)  # fmt: skip
            answer.raise_for_status()
            outcomes[key] = answer.json()
    received = stand_in.received()
    blocked = [[r.fields["destination"], r.fields["operation"]] for r in audit_records(root / "audit")
               if r.event == "egress.blocked"]  # fmt: skip
    return {"control": control, "outcomes": outcomes, "received": received, "blocked": blocked}


if __name__ == "__main__":
    print(json.dumps(_driver(json.loads(sys.argv[1]))))
