"""Test-only plugin for `sealbox serve` ($SEALBOX_TEST_PLUGIN): routes that try to reach out from inside the server.

`POST /_test/egress {"operation": "connect" | "sendto" | "getaddrinfo" | "asyncio_connect", "host": ..., "port": ...}`
attempts the operation in the serving process and answers what happened, with the process id, so a test can show
that the refusal came from the server itself. Outside `/v1/`: no key, no request record; only loaded in tests.

A host-name lookup is attempted only once the guard is seen in place (its self-test refuses a probe name without
looking it up), so even a broken server could not send a DNS query from here.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from fastapi import FastAPI

from sealbox.runtime.egress.guard import active_guard


def _outcome(error: BaseException | None) -> dict[str, Any]:
    if error is None:
        return {"outcome": "allowed", "pid": os.getpid()}
    return {
        "outcome": "refused",
        "pid": os.getpid(),
        "type": type(error).__name__,
        "error": str(error),
        "errno": getattr(error, "errno", None),
        "permission_error": isinstance(error, PermissionError),
    }


def _attempt(operation: str, host: str, port: int) -> BaseException | None:
    try:
        if operation == "connect":
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect((host, port))
        elif operation == "sendto":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"from the server", (host, port))
        elif operation == "getaddrinfo":
            guard = active_guard()
            if guard is None or not guard.self_test():
                raise RuntimeError("no working egress guard in this process: the lookup is not attempted")
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        else:
            raise ValueError(f"unknown operation {operation!r}")
    except Exception as exc:  # noqa: BLE001 - the outcome is the answer
        return exc
    return None


def register(app: FastAPI) -> None:
    @app.post("/_test/egress")
    def egress(body: dict[str, Any]) -> dict[str, Any]:
        """Runs in a worker thread, as a blocking library call inside a request would."""
        if body["operation"] == "asyncio_connect":
            raise ValueError("asyncio_connect runs on the event loop: POST /_test/egress/async")
        return _outcome(_attempt(str(body["operation"]), str(body["host"]), int(body["port"])))

    @app.post("/_test/egress/async")
    async def egress_on_the_loop(body: dict[str, Any]) -> dict[str, Any]:
        """Runs on the event loop, as an async client library inside the server would."""
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(str(body["host"]), int(body["port"])), 10)
        except Exception as exc:  # noqa: BLE001
            return _outcome(exc)
        writer.close()
        return _outcome(None)
