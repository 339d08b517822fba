"""One TLS record and one `send` per forwarded request, instead of one for its head and one for its body.

httpcore writes a request's head and body separately. Over TLS each write is a record of its own and a system call,
and on loopback or a fast link the engine wakes on the first, parses the head, and waits for the second: two round
trips through both event loops where one does. The gateway's requests are whole before they are sent (the body is
read and checked first), so holding writes until the connection next reads loses nothing: an HTTP/1.1 client reads
only after its request is out.
"""

from __future__ import annotations

import ssl
import typing

import httpcore


class CoalescingStream(httpcore.AsyncNetworkStream):
    """A network stream whose writes are held and sent together before its next read (or TLS start, or close)."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self.inner = inner
        self.held: list[bytes] = []
        self.timeout: float | None = None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if buffer:
            self.held.append(buffer)
            self.timeout = timeout

    async def flush(self) -> None:
        if self.held:
            data = b"".join(self.held)
            self.held.clear()
            await self.inner.write(data, self.timeout)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        await self.flush()
        return await self.inner.read(max_bytes, timeout)

    async def aclose(self) -> None:
        self.held.clear()
        await self.inner.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:  # fmt: skip
        await self.flush()
        return CoalescingStream(await self.inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> typing.Any:
        return self.inner.get_extra_info(info)


class CoalescingBackend(httpcore.AsyncNetworkBackend):
    """httpcore's asyncio backend (anyio), its streams wrapped in CoalescingStream."""

    def __init__(self) -> None:
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: typing.Iterable[typing.Any] | None = None) -> httpcore.AsyncNetworkStream:  # fmt: skip
        return CoalescingStream(await self.inner.connect_tcp(host, port, timeout, local_address, socket_options))

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable[typing.Any] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:  # fmt: skip
        return CoalescingStream(await self.inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)
