"""One HTTP connection as uvicorn serves it, with a deadline for the request head and a connection limit.

uvicorn closes idle keep-alive connections and caps connections, but has no limit on how long a client may take to
send its request line and headers: a client sending them a byte at a time (slowloris) holds its connection, and a
slot of the connection limit, for as long as it likes. This protocol arms a timer when a request starts (the
connection opens, or the first byte after a finished request arrives) and closes the connection if h11 has not parsed
a complete head when it fires. Parsing stays h11's; only the timer is added.

The connection limit is checked here too (rather than with uvicorn's `limit_concurrency`, whose refusal is a plain
text body): a request on a connection opened beyond `max_connections` is answered with an OpenAI-shaped 503 and the
connection is closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from sealbox.runtime.server.errors import ApiError


async def _overloaded(scope: Scope, receive: Receive, send: Send) -> None:
    error = ApiError(503, "too many open connections; retry shortly", code="server_overloaded",
                     headers={"Retry-After": "1", "Connection": "close"})  # fmt: skip
    await error.response()(scope, receive, send)


class BoundedConnection(H11Protocol):
    header_timeout_s: float = 10.0
    max_connections: int = 256

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    @classmethod
    def configured(cls, *, header_timeout_s: float, max_connections: int) -> type[BoundedConnection]:
        """A protocol class for uvicorn's `http=` setting with these limits."""
        return type(cls.__name__, (cls,), {"header_timeout_s": header_timeout_s, "max_connections": max_connections})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.app = _overloaded  # this connection's requests only; uvicorn reads `self.app` per request
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        if self._head_deadline is None and self._awaiting_head():
            self._arm_head_deadline()  # the first byte of the next request on a keep-alive connection
        super().data_received(data)
        if not self._awaiting_head():
            self._disarm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _awaiting_head(self) -> bool:
        """h11 leaves the client in IDLE until a whole request line and header block has been parsed."""
        return self.conn.their_state is h11.IDLE

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self._awaiting_head() and not self.transport.is_closing():
            self.logger.info("closing a connection from %s: no complete request head within %.0f s",
                             self.client, self.header_timeout_s)  # fmt: skip
            self.transport.close()
