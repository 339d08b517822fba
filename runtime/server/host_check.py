"""The `Host:` check of `--no-auth`: only names of the loopback listen address are served.

Without API keys, a loopback server trusts whoever can reach 127.0.0.1, and a web page can: DNS rebinding points a
name the attacker controls at 127.0.0.1, and the victim's browser then sends the page's requests (and hands it the
answers) with `Host: attacker.example:PORT`. Refusing every `Host` that is not a loopback name of this listen address
closes that door; a local client (curl, the openai client) sends one of those names anyway.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from sealbox.runtime.server.errors import ApiError
from sealbox.runtime.server.request_record import current_record

REASON = "host_not_allowed"


def loopback_hosts(host: str, port: int) -> frozenset[str]:
    """The `Host:` values a local client sends for this listen address, lower case. A loopback name without the port
    is accepted too: a rebinding page's requests carry the attacker's name, never a loopback one."""
    names = {"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host.lower()}
    return frozenset(names | {f"{name}:{port}" for name in names})


class HostCheck:
    def __init__(self, app: ASGIApp, *, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hosts = Headers(scope=scope).getlist("host")
        if len(hosts) == 1 and hosts[0].strip().lower() in self.allowed:
            await self.app(scope, receive, send)
            return
        record = current_record(scope)
        if record is not None:
            record.refusal = REASON
        shown = hosts[0][:100] if hosts else "none"
        error = ApiError(403, f"Host {shown!r} is not this server's loopback address; without API keys (--no-auth) "
                         f"only {', '.join(sorted(self.allowed))} are served", code=REASON)  # fmt: skip
        await error.response()(scope, receive, send)
