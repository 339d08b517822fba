"""The egress guard inside a real process: refusals on loopback, proven by listeners that receive nothing.

The guarded process is this file run as a script: it opens its own listeners, installs the guard with a
loopback-only policy narrowed to one port, attempts each operation, and prints the outcomes as JSON.
It runs in a fresh network namespace when one can be made, so that even a broken guard could not send a DNS
query anywhere; the cases that need that (host names) skip without one. Every address here is loopback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import lockdown_gap, require_lockdown

from sealbox.runtime.audit.segment import list_segments
from sealbox.runtime.audit.verify import verify_directory
from sealbox.runtime.egress.local_names import LocalNames

DNS_NAME = "sealbox-probe.invalid"


def netns_available() -> bool:
    return lockdown_gap("unshare", "ip", netns=True) is None


@dataclass(frozen=True)
class GuardedRun:
    outcomes: dict[str, dict[str, object]]
    reported: list[list[str]]
    detected: dict[str, bool]  # before the guard: the same probes do arrive
    arrived: dict[str, bool]  # under the guard
    ports: dict[str, int]
    self_test: bool
    in_netns: bool
    audit_dir: Path


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> GuardedRun:
    in_netns = netns_available()
    scratch = tmp_path_factory.mktemp("guarded")
    config = {"dns": in_netns, "unix_path": str(scratch / "s.sock"), "audit_dir": str(scratch / "audit")}
    command = [sys.executable, str(Path(__file__).resolve()), json.dumps(config)]
    if in_netns:
        command = ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    return GuardedRun(in_netns=in_netns, audit_dir=scratch / "audit", **result)


def refused(run: GuardedRun, name: str) -> dict[str, object]:
    outcome = run.outcomes[name]
    assert outcome["outcome"] == "refused", outcome
    return outcome


def needs_netns(run: GuardedRun) -> None:
    if not run.in_netns:
        require_lockdown("unshare", "ip", netns=True)  # host-name cases run only inside a network namespace


def test_guarded_process_connects_to_the_loopback_port_the_policy_allows(guarded: GuardedRun):
    assert guarded.outcomes["tcp_allowed_port"] == {"outcome": "allowed"}
    assert guarded.outcomes["resolve_loopback_literal"] == {"outcome": "allowed"}


def test_guarded_process_is_refused_a_loopback_tcp_port_the_policy_does_not_allow(guarded: GuardedRun):
    outcome = refused(guarded, "tcp_forbidden_port")
    assert f"127.0.0.1:{guarded.ports['forbidden']}" in str(outcome["error"])
    assert "not in the egress allowlist" in str(outcome["error"])
    refused(guarded, "tcp6_forbidden_port")
    refused(guarded, "connect_ex_forbidden_port")
    refused(guarded, "asyncio_forbidden_port")
    assert guarded.detected["tcp"] is True
    assert guarded.arrived["tcp"] is False, "a refused connect reached the listener"


def test_guarded_process_is_refused_udp_to_a_loopback_port_the_policy_does_not_allow(guarded: GuardedRun):
    for name in ("udp_sendto_forbidden_port", "udp_sendmsg_forbidden_port", "udp_connect_forbidden_port"):
        outcome = refused(guarded, name)
        assert f"127.0.0.1:{guarded.ports['udp']}" in str(outcome["error"])
    assert guarded.detected["udp"] is True
    assert guarded.arrived["udp"] is False, "a refused datagram reached the receiver"


def test_guarded_process_is_refused_resolving_a_dns_name(guarded: GuardedRun):
    needs_netns(guarded)
    for name in ("getaddrinfo_dns_name", "gethostbyname_dns_name", "gethostbyname_ex_dns_name", "asyncio_dns_name"):
        outcome = refused(guarded, name)
        assert f"{DNS_NAME}: names resolve only from /etc/hosts" in str(outcome["error"])


def test_guarded_process_refuses_a_dns_name_inside_an_address_before_looking_it_up(guarded: GuardedRun):
    needs_netns(guarded)
    # Without the check in front of connect/sendto, CPython would look the name up before the audit event and,
    # in this namespace, fail with gaierror instead.
    for name in ("tcp_connect_dns_name", "udp_sendto_dns_name"):
        assert refused(guarded, name)["type"] == "EgressBlockedError"


def test_guarded_process_refuses_reverse_lookups_etc_hosts_cannot_answer(guarded: GuardedRun):
    needs_netns(guarded)
    assert "reverse lookups" in str(refused(guarded, "gethostbyaddr_unlisted")["error"])


def test_guarded_process_resolves_localhost_exactly_when_etc_hosts_answers_it(guarded: GuardedRun):
    expected = "allowed" if LocalNames.load().lookup("localhost") else "refused"
    assert guarded.outcomes["getaddrinfo_localhost"]["outcome"] == expected


def test_unix_sockets_stay_allowed_under_the_guard(guarded: GuardedRun):
    assert guarded.outcomes["unix_connect"] == {"outcome": "allowed"}


def test_other_address_families_are_refused(guarded: GuardedRun):
    assert "address family AF_NETLINK is not allowed" in str(refused(guarded, "netlink_sendto")["error"])


def test_a_refusal_is_a_permission_error_with_eacces_so_libraries_treat_it_as_an_oserror(guarded: GuardedRun):
    outcome = refused(guarded, "tcp_forbidden_port")
    assert outcome["type"] == "EgressBlockedError"
    assert outcome["permission_error"] is True
    assert outcome["errno"] == 13


def test_every_refusal_reaches_on_block_with_destination_and_operation(guarded: GuardedRun):
    refusals = [name for name, outcome in guarded.outcomes.items() if outcome["outcome"] == "refused" and name != "widen_guard"]
    assert len(guarded.reported) == sum(int(guarded.outcomes[n]["refusals"]) for n in refusals)
    forbidden = f"127.0.0.1:{guarded.ports['forbidden']}"
    assert [forbidden, "socket.connect"] in guarded.reported
    assert [f"127.0.0.1:{guarded.ports['udp']}", "socket.sendto"] in guarded.reported
    assert [f"127.0.0.1:{guarded.ports['udp']}", "socket.sendmsg"] in guarded.reported
    if guarded.in_netns:
        assert [DNS_NAME, "socket.getaddrinfo"] in guarded.reported


def test_every_refusal_is_in_the_audit_log_as_egress_blocked_and_the_chain_verifies(guarded: GuardedRun):
    records = [json.loads(line) for segment in list_segments(guarded.audit_dir) for line in segment.path.read_bytes().splitlines()]
    blocked = [[r["fields"]["destination"], r["fields"]["operation"]] for r in records if r["event"] == "egress.blocked"]
    assert blocked == guarded.reported
    assert [f"127.0.0.1:{guarded.ports['forbidden']}", "socket.connect"] in blocked
    verification = verify_directory(guarded.audit_dir)
    assert verification.ok, verification.summary()
    assert verification.records == len(records)


def test_the_guard_cannot_be_widened_once_installed(guarded: GuardedRun):
    outcome = guarded.outcomes["widen_guard"]
    assert outcome["type"] == "EgressGuardError"
    assert "cannot be changed to 0.0.0.0/0" in str(outcome["error"])


def test_the_guard_self_test_passes_in_the_guarded_process_and_is_not_reported(guarded: GuardedRun):
    assert guarded.self_test is True
    assert ["sealbox-egress-probe.invalid", "socket.getaddrinfo"] not in guarded.reported


# --- the guarded process ---------------------------------------------------------------------------------------


def _guarded_process(config: dict[str, object]) -> dict[str, object]:
    import asyncio
    import socket

    from sealbox.runtime.audit.log import AuditLog
    from sealbox.runtime.egress.allowlist import EgressPolicyWithPorts
    from sealbox.runtime.egress.guard import EgressBlockedError, audit_log_reporter, install_egress_guard
    from sealbox.runtime.policy import AuditPolicy

    allowed = socket.create_server(("127.0.0.1", 0))
    forbidden = socket.create_server(("127.0.0.1", 0))
    forbidden.setblocking(False)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    unix_server = socket.socket(socket.AF_UNIX)
    unix_server.bind(str(config["unix_path"]))
    unix_server.listen()
    ports = {"allowed": allowed.getsockname()[1], "forbidden": forbidden.getsockname()[1], "udp": receiver.getsockname()[1]}

    # The detectors work: before the guard, a connect and a datagram do arrive (and are drained).
    with socket.create_connection(("127.0.0.1", ports["forbidden"]), timeout=5):
        detected = {"tcp": _pending(lambda: forbidden.accept()[0].close())}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(b"x", ("127.0.0.1", ports["udp"]))
    detected["udp"] = _pending(lambda: receiver.recv(16))

    # As the server does it: the guard first, the audit log's reporter attached once the log is open.
    policy = EgressPolicyWithPorts(allow=("127.0.0.0/8", "::1/128"), allow_ports=(ports["allowed"],))
    guard = install_egress_guard(policy)
    log = AuditLog.open(Path(str(config["audit_dir"])), AuditPolicy())
    to_audit = audit_log_reporter(log)
    reported: list[list[str]] = []

    def on_block(destination: str, operation: str) -> None:
        reported.append([destination, operation])
        to_audit(destination, operation)

    guard.set_on_block(on_block)

    def udp() -> socket.socket:
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def asyncio_connect(host: str, port: int) -> None:
        await asyncio.open_connection(host, port)

    forbidden_address = ("127.0.0.1", ports["forbidden"])
    udp_address = ("127.0.0.1", ports["udp"])
    operations = {
        "tcp_allowed_port": lambda: socket.create_connection(("127.0.0.1", ports["allowed"]), timeout=5).close(),
        "tcp_forbidden_port": lambda: socket.create_connection(forbidden_address, timeout=5),
        "tcp6_forbidden_port": lambda: socket.socket(socket.AF_INET6).connect(("::1", ports["forbidden"])),
        "connect_ex_forbidden_port": lambda: socket.socket().connect_ex(forbidden_address),
        "asyncio_forbidden_port": lambda: asyncio.run(asyncio_connect(*forbidden_address)),
        "udp_sendto_forbidden_port": lambda: udp().sendto(b"x", udp_address),
        "udp_sendmsg_forbidden_port": lambda: udp().sendmsg([b"x"], [], 0, udp_address),
        "udp_connect_forbidden_port": lambda: udp().connect(udp_address),
        "netlink_sendto": lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).sendto(b"", (0, 0)),
        "unix_connect": lambda: socket.socket(socket.AF_UNIX).connect(str(config["unix_path"])),
        "resolve_loopback_literal": lambda: socket.getaddrinfo("127.0.0.1", ports["allowed"]),
        "getaddrinfo_localhost": lambda: socket.getaddrinfo("localhost", ports["allowed"]),
        "widen_guard": lambda: install_egress_guard(EgressPolicyWithPorts(allow=("0.0.0.0/0",))),
    }
    if config["dns"]:
        operations |= {
            "getaddrinfo_dns_name": lambda: socket.getaddrinfo(DNS_NAME, 443),
            "gethostbyname_dns_name": lambda: socket.gethostbyname(DNS_NAME),
            "gethostbyname_ex_dns_name": lambda: socket.gethostbyname_ex(DNS_NAME),
            "asyncio_dns_name": lambda: asyncio.run(asyncio_connect(DNS_NAME, 443)),
            "tcp_connect_dns_name": lambda: socket.socket().connect((DNS_NAME, ports["allowed"])),
            "udp_sendto_dns_name": lambda: udp().sendto(b"x", (DNS_NAME, 53)),
            "gethostbyaddr_unlisted": lambda: socket.gethostbyaddr("127.0.0.2"),
        }

    outcomes: dict[str, dict[str, object]] = {}
    for name, operation in operations.items():
        before = guard.refused
        try:
            operation()
        except Exception as exc:  # noqa: BLE001 - the outcome is the point
            kind = "refused" if isinstance(exc, EgressBlockedError) or type(exc).__name__ == "EgressGuardError" else "failed"
            outcomes[name] = {
                "outcome": kind,
                "type": type(exc).__name__,
                "error": str(exc),
                "errno": getattr(exc, "errno", None),
                "permission_error": isinstance(exc, PermissionError),
                "refusals": guard.refused - before,
            }
        else:
            outcomes[name] = {"outcome": "allowed"}

    arrived = {"tcp": _pending(forbidden.accept), "udp": _pending(lambda: receiver.recv(16))}
    log.close()
    return {
        "outcomes": outcomes,
        "reported": reported,
        "detected": detected,
        "arrived": arrived,
        "ports": ports,
        "self_test": guard.self_test(),
    }


def _pending(read: object) -> bool:
    # Loopback delivers within the sending call, so by now anything sent is queued.
    try:
        read()  # type: ignore[operator]
    except BlockingIOError:
        return False
    return True


if __name__ == "__main__":
    print(json.dumps(_guarded_process(json.loads(sys.argv[1]))))
