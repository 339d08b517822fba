"""The network under the gateway's engine connections: asyncio's own TLS streams, and a request's head and body sent
in one TLS record.

httpcore's default backend (anyio) wraps asyncio's sockets in its own stream, TLS through a Python loop over a
memory BIO, and a cancel scope around every read: on a 2-core host that was about half of the gateway's CPU per
streamed token, against asyncio's TLS transport reading the same bytes for half the cost. HTTP parsing and the pool
stay httpcore's.

Writes are held until the connection next reads: httpcore writes a request's head and body separately, and over
TLS each write is a record and a system call of its own, on which the engine wakes, parses the head, and waits for
the body. The gateway's requests are whole before they are sent, and an HTTP/1.1 client reads only after its
request is out, so holding them loses nothing.
"""

from __future__ import annotations

import asyncio
import ssl
import typing

import httpcore

READ_ERRORS = (OSError, EOFError)


class EngineStream(httpcore.AsyncNetworkStream):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.held: list[bytes] = []
        self.write_timeout: float | None = None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if buffer:
            self.held.append(buffer)
            self.write_timeout = timeout

    async def flush(self) -> None:
        if not self.held:
            return
        data = b"".join(self.held)
        self.held.clear()
        try:
            self.writer.write(data)
            if self.writer.transport.get_write_buffer_size():  # not all sent at once: wait for room
                await asyncio.wait_for(self.writer.drain(), self.write_timeout)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc)) from exc
        except READ_ERRORS as exc:
            raise httpcore.WriteError(f"{type(exc).__name__}: {exc}") from exc

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        await self.flush()
        try:
            if timeout is None:
                return await self.reader.read(max_bytes)
            return await asyncio.wait_for(self.reader.read(max_bytes), timeout)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc)) from exc
        except READ_ERRORS as exc:
            raise httpcore.ReadError(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        self.held.clear()
        self.writer.close()  # not awaited: a TLS shutdown with a dead peer would wait for its timeout

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:  # fmt: skip
        await self.flush()
        try:
            await asyncio.wait_for(self.writer.start_tls(ssl_context, server_hostname=server_hostname), timeout)
        except TimeoutError as exc:
            self.writer.transport.abort()
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except READ_ERRORS as exc:
            self.writer.transport.abort()
            raise httpcore.ConnectError(f"{type(exc).__name__}: {exc}") from exc
        return self

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable":
            # The event loop reads the socket as data arrives: a peer's close shows as end of stream, not as bytes.
            return self.reader.at_eof() or self.writer.transport.is_closing()
        name = {"client_addr": "sockname", "server_addr": "peername"}.get(info, info)
        return self.writer.get_extra_info(name) if name in ("ssl_object", "sockname", "peername", "socket") else None


class EngineNetwork(httpcore.AsyncNetworkBackend):
    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: typing.Iterable[typing.Any] | None = None,
                          ) -> httpcore.AsyncNetworkStream:  # fmt: skip
        local = (local_address, 0) if local_address else None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=local), timeout)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ConnectError(f"{type(exc).__name__}: {exc}") from exc
        return EngineStream(reader, writer)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable[typing.Any] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:  # fmt: skip
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ConnectError(f"{type(exc).__name__}: {exc}") from exc
        return EngineStream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
