"""Loaded by every Python process scripts/check-clients starts (on PYTHONPATH): refuses, and records, any name lookup
or connection beyond loopback, so a client or Open WebUI that tries to reach the internet shows up in the report
instead of passing silently. The network namespace the script runs in (when it can make one) is the wall; this is
the witness that says who knocked.

Records go, one JSON object a line, to $CHECK_EGRESS_LOG.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
import traceback

_LOG = os.environ.get("CHECK_EGRESS_LOG")
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


def _is_local(host: object) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    name = str(host).strip("[]").lower()
    if name in _LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(name.split("%")[0])
    except ValueError:
        return False  # a name: looking it up is a DNS query
    return address.is_loopback or address.is_unspecified


def _record(event: str, target: str) -> None:
    frames = [f"{f.filename.rsplit('site-packages/', 1)[-1]}:{f.lineno}" for f in traceback.extract_stack()[:-3]]
    entry = {"pid": os.getpid(), "argv0": sys.argv[0], "event": event, "target": target, "stack": frames[-6:]}
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as log:
            log.write(json.dumps(entry) + "\n")


def _hook(event: str, args: tuple[object, ...]) -> None:
    if event == "socket.getaddrinfo":
        host = args[0]
        if not _is_local(host):
            _record(event, f"{host}:{args[1]}")
            raise socket.gaierror(socket.EAI_NONAME, f"check-clients: no lookups beyond loopback ({host})")
    elif event in ("socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"):
        if not _is_local(args[0]):
            _record(event, str(args[0]))
            raise socket.gaierror(socket.EAI_NONAME, f"check-clients: no lookups beyond loopback ({args[0]})")
    elif event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        sock, address = args[0], args[1] if len(args) > 1 else None
        family = getattr(sock, "family", None)
        if family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple) and not _is_local(address[0]):
            _record(event, f"{address[0]}:{address[1]}")
            raise OSError(101, f"check-clients: no connections beyond loopback ({address[0]})")


sys.addaudithook(_hook)
