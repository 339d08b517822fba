"""Test launcher: `sealbox serve` with probe routes in front of sealbox's own app, so a test can run code that tries
to reach out from inside a real serving process. The shipped server has no hook for this (issue 13): this script
imports sealbox's app factory, wraps what it returns, and then runs the same start-up as `sealbox serve`
(`python tests/egress_probe_server.py serve --root …` takes the command's arguments).

`POST /_test/egress {"operation": …, "host": …, "port": …}` attempts the operation in the serving process and
answers what happened, with the process id, so a test can show that the refusal came from the server itself.
Outside `/v1/`: no key, no request record. A host name is only ever tried where no packet can leave the host:
inside a network namespace with nothing but loopback, or (`getaddrinfo` only) once the guard's self-test has
refused a probe name without looking it up.
"""

from __future__ import annotations

import _socket
import asyncio
import os
import socket
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from sealbox.runtime.egress.guard import active_guard
from sealbox.runtime.egress.routes import read_network
from sealbox.runtime.server import app as server_app

PROBE_PREFIX = "/_test/"


def _outcome(error: BaseException | None) -> dict[str, Any]:
    if error is None:
        return {"outcome": "allowed", "pid": os.getpid()}
    refused = type(error).__name__ == "EgressBlockedError"
    return {
        "outcome": "refused" if refused else "failed",
        "pid": os.getpid(),
        "type": type(error).__name__,
        "error": str(error),
        "errno": getattr(error, "errno", None),
        "permission_error": isinstance(error, PermissionError),
    }


def _only_loopback_here() -> None:
    if not read_network().loopback_only:
        raise RuntimeError("this process can reach beyond loopback: a host name is not tried here")


def _guard_holds() -> None:
    guard = active_guard()
    if guard is None or not guard.self_test():
        raise RuntimeError("no working egress guard in this process: the lookup is not attempted")


def _udp() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


# Operations on host names (only in a loopback-only namespace): the Python API, then the C methods underneath it.
_NAME_OPERATIONS = {
    "bind": lambda host, port: socket.socket().bind((host, port)),
    "connect_name": lambda host, port: socket.socket().connect((host, port)),
    "sendto_name": lambda host, port: _udp().sendto(b"x", (host, port)),
    "gethostbyname": lambda host, port: socket.gethostbyname(host),
    "gethostbyname_ex": lambda host, port: socket.gethostbyname_ex(host),
    "gethostbyaddr": lambda host, port: socket.gethostbyaddr(host),
    "getaddrinfo_inet6": lambda host, port: socket.getaddrinfo(host, port, socket.AF_INET6),
    "c_connect": lambda host, port: _socket.socket.connect(socket.socket(), (host, port)),
    "c_bind": lambda host, port: _socket.socket.bind(socket.socket(), (host, port)),
    "c_sendto": lambda host, port: _socket.socket.sendto(_udp(), b"x", (host, port)),
}
_FAMILIES = {"af_packet": (socket.AF_PACKET, socket.SOCK_RAW, 0), "af_netlink": (socket.AF_NETLINK, socket.SOCK_RAW, 0)}


def _attempt(operation: str, host: str, port: int) -> BaseException | None:
    try:
        if operation == "connect":
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect((host, port))
        elif operation == "sendto":
            with _udp() as sock:
                sock.sendto(b"from the server", (host, port))
        elif operation == "getaddrinfo":
            _guard_holds()
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        elif operation in _NAME_OPERATIONS:
            _only_loopback_here()
            _NAME_OPERATIONS[operation](host, port)
        elif operation in _FAMILIES:
            socket.socket(*_FAMILIES[operation]).close()
        elif operation == "c_af_netlink":
            _socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()
        else:
            raise ValueError(f"unknown operation {operation!r}")
    except Exception as exc:  # noqa: BLE001 - the outcome is the answer
        return exc
    return None


def probe_routes() -> FastAPI:
    probes = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @probes.post("/_test/egress")
    def egress(body: dict[str, Any]) -> dict[str, Any]:
        """Runs in a worker thread, as a blocking library call inside a request would."""
        if body["operation"] == "asyncio_connect":
            raise ValueError("asyncio_connect runs on the event loop: POST /_test/egress/async")
        return _outcome(_attempt(str(body["operation"]), str(body["host"]), int(body["port"])))

    @probes.post("/_test/egress/async")
    async def egress_on_the_loop(body: dict[str, Any]) -> dict[str, Any]:
        """Runs on the event loop, as an async client library inside the server would."""
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(str(body["host"]), int(body["port"])), 10)
        except Exception as exc:  # noqa: BLE001
            return _outcome(exc)
        writer.close()
        return _outcome(None)

    return probes


def in_front_of(app: ASGIApp) -> ASGIApp:
    """`/_test/…` to the probes, everything else (lifespan included) to sealbox's app, untouched."""
    probes = probe_routes()

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROBE_PREFIX):
            await probes(scope, receive, send)
        else:
            await app(scope, receive, send)

    return dispatch


def main() -> None:
    production = server_app.create_app
    server_app.create_app = lambda config: in_front_of(production(config))  # read by startup at run time
    from sealbox.cli import main as sealbox_main

    sealbox_main()


if __name__ == "__main__":
    main()
