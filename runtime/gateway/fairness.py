"""Per-principal fairness at the gateway: each API key may have a bounded number of requests in flight, so one
busy client fills its own share and gets 429, never the whole cluster.

It sits between authentication and the body limit: a request counts from the moment its key is known, before its
body is read, so a key's slow uploads hold its own share and nobody else's; it counts until its answer's last byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.types import ASGIApp, Receive, Scope, Send

from sealbox.runtime.server.errors import ApiError
from sealbox.runtime.server.request_record import current_record


@dataclass
class InFlightLimit:
    limit: int
    _counts: dict[str, int] = field(default_factory=dict)

    def try_acquire(self, principal: str) -> bool:
        count = self._counts.get(principal, 0)
        if count >= self.limit:
            return False
        self._counts[principal] = count + 1
        return True

    def release(self, principal: str) -> None:
        count = self._counts.get(principal, 0) - 1
        if count > 0:
            self._counts[principal] = count
        else:
            self._counts.pop(principal, None)


class PrincipalFairness:
    def __init__(self, app: ASGIApp, *, limit: InFlightLimit) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = current_record(scope) if scope["type"] == "http" and scope["method"] == "POST" else None
        if record is None:
            await self.app(scope, receive, send)
            return
        principal = record.principal
        if not self.limit.try_acquire(principal):
            error = ApiError(429, f"{principal} has {self.limit.limit} requests in flight, the most one key may have "
                                  "through the gateway; retry when one finishes",
                             code="rate_limit_exceeded", headers={"Retry-After": "1"})  # fmt: skip
            await error.response()(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.limit.release(principal)
