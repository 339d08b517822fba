"""Slow and idle clients cannot hold the server's connections: a head deadline, a keep-alive timeout and a
connection limit, all from the policy.

The attackers are raw sockets on loopback. Every wait below is a `select` on the attackers' sockets, and every
assertion is on what the server did to them (EOF or reset), never on a sleep.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server_support import ServerProcess

HEADER_TIMEOUT_S = 2
KEEP_ALIVE_S = 1
MAX_CONNECTIONS = 16
POLICY = f"""
[server]
header_timeout_seconds = {HEADER_TIMEOUT_S}
keep_alive_timeout_seconds = {KEEP_ALIVE_S}
max_connections = {MAX_CONNECTIONS}
[limits]
context = 512
"""
GIVE_UP_S = 20
"""Far beyond the deadlines: a server without them holds the attackers this long (the test then fails)."""
SLOW_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 4096 + b"\r\n\r\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("appliance")
    with ServerProcess(root, models=[tiny_model], policy_text=POLICY, no_auth=True) as process:
        yield process


def closed_by_server(sock: socket.socket) -> bool:
    """The server closed this connection (EOF or reset); only called once `select` says it is readable."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_ten_clients_sending_headers_a_byte_at_a_time_are_dropped_while_another_is_served(server: ServerProcess):
    attackers = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(10)]
    opened = time.monotonic()
    closed_after: dict[int, float] = {}
    sent = 0
    served = 0
    with httpx.Client(base_url=server.url, timeout=5) as client:
        while len(closed_after) < len(attackers) and time.monotonic() - opened < GIVE_UP_S:
            open_ones = [s for s in attackers if s.fileno() not in closed_after]
            for sock in open_ones:
                try:
                    sock.send(SLOW_HEAD[sent : sent + 1])
                except (BrokenPipeError, ConnectionResetError):
                    closed_after[sock.fileno()] = time.monotonic() - opened
            sent += 1
            readable, _, _ = select.select(open_ones, [], [], 0.1)  # the attack's pace: one byte per 100 ms
            for sock in readable:
                if sock.fileno() not in closed_after and closed_by_server(sock):
                    closed_after[sock.fileno()] = time.monotonic() - opened
            answer = client.get("/health")  # a normal client, served between the attackers' bytes
            assert answer.status_code == 200
            served += 1
    for sock in attackers:
        sock.close()
    assert len(closed_after) == 10, f"{10 - len(closed_after)} slow clients still held after {GIVE_UP_S} s"
    assert sent < len(SLOW_HEAD), "an attacker finished its head: the test did not play a slow client"
    assert min(closed_after.values()) >= HEADER_TIMEOUT_S * 0.9  # dropped by the deadline, not at once
    assert served >= 5


def test_an_idle_keep_alive_connection_is_closed_after_the_policys_timeout(server: ServerProcess):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answered = time.monotonic()
        received = b""
        while b'{"status":"ok"}' not in received:
            chunk = sock.recv(65536)
            assert chunk, "closed before the answer"
            received += chunk
        bound = KEEP_ALIVE_S + 3  # below uvicorn's own default (5 s): the policy's value is the one in force
        readable, _, _ = select.select([sock], [], [], bound)
        assert readable and closed_by_server(sock), f"an idle connection was held for {bound} s"
        assert time.monotonic() - answered >= KEEP_ALIVE_S * 0.9


def test_connections_beyond_the_limit_get_an_openai_shaped_503_and_the_rest_are_served(server: ServerProcess):
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        refused = httpx.get(f"{server.url}/v1/models", timeout=10)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "server_overloaded"
        assert refused.headers["retry-after"] == "1"
        # The idle ones never send a head: the deadline drops them, and then the server has room again.
        readable, _, _ = select.select(idle, [], [], GIVE_UP_S)
        while len(readable) < len(idle):
            more, _, _ = select.select([s for s in idle if s not in readable], [], [], GIVE_UP_S)
            assert more, "idle connections were held"
            readable += more
        assert all(closed_by_server(sock) for sock in idle)
    finally:
        for sock in idle:
            sock.close()
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 200
