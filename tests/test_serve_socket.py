"""The socket `sealbox serve` listens on: bound before the models load, and TCP in the way asyncio recognises.

uvicorn serves a pre-bound socket through `loop.create_server(sock=...)`; asyncio turns Nagle off (TCP_NODELAY) on a
connection only when its socket says `IPPROTO_TCP`. Without that, a keep-alive client's answer stalls between the
headers and the body until the client's delayed ACK (about 40 ms on Linux): found by scripts/bench-audit.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from sealbox.runtime.server.startup import listen as _listen


def nodelay_of_a_connection_served_from(listener: socket.socket) -> int:
    """Serve `listener` as uvicorn does and connect to it: the TCP_NODELAY of the server's side of the connection."""

    async def main() -> int:
        loop = asyncio.get_running_loop()
        seen: asyncio.Future[int] = loop.create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await loop.create_server(Probe, sock=listener)
        host, port = listener.getsockname()[:2]
        _reader, writer = await asyncio.open_connection(host, port)
        try:
            return await asyncio.wait_for(seen, 30)
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    return asyncio.run(main())


def test_connections_to_the_ipv4_listener_have_nagle_off():
    listener = _listen("127.0.0.1", 0)
    assert listener.proto == socket.IPPROTO_TCP
    assert nodelay_of_a_connection_served_from(listener) != 0


def test_connections_to_the_ipv6_listener_have_nagle_off():
    try:
        listener = _listen("::1", 0)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    assert nodelay_of_a_connection_served_from(listener) != 0


def test_a_taken_port_fails_at_once():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        with pytest.raises(OSError):
            _listen("127.0.0.1", taken.getsockname()[1])
