"""The walls outside the in-process guard, and whether each is in force for one process.

The guard is an audit hook: it sees what Python asks for. It cannot see a child process, native code (ctypes, a C
extension) calling libc itself, or the name lookup CPython's C socket methods do before their audit event. Each
of those is closed by a wall below the process; this module says which wall closes what and reads whether it
holds, from /proc and the loaded nftables table. Nothing here sends a packet or changes anything.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sealbox.runtime.egress.offline_env import OFFLINE_VARIABLES

UNIT_NAME = "sealbox.service"
NFT_TABLE = ("inet", "sealbox_egress")
_TIMEOUT_S = 20


@dataclass(frozen=True)
class WallState:
    wall: str
    closes: str
    in_force: bool | None  # None: cannot be told from here (the evidence says why)
    evidence: str

    def line(self) -> str:
        verdict = {True: "in force", False: "NOT in force", None: "unknown"}[self.in_force]
        return f"{self.wall} [{verdict}] closes: {self.closes}; {self.evidence}"


LOOKUPS = "name lookups the guard cannot see first (C socket methods, ctypes, subprocesses)"
SOCKETS = "sockets the guard never sees (subprocesses, native code)"


def read_walls(pid: int, *, proc: Path = Path("/proc")) -> tuple[WallState, ...]:
    """Every wall for process `pid`, in the order docs/lockdown.md lists them."""
    nft = _nft_table()
    return (
        _resolver_attempts(proc / str(pid)),
        _no_nameserver(proc / str(pid)),
        _nft_dns_drop(nft),
        _in_the_unit(proc / str(pid)),
        _nft_loaded(nft),
    )


def _resolver_attempts(process: Path) -> WallState:
    wall, wanted = "resolver makes zero attempts (RES_OPTIONS)", OFFLINE_VARIABLES["RES_OPTIONS"][0]
    try:
        environ = dict(item.split(b"=", 1) for item in (process / "environ").read_bytes().split(b"\0") if b"=" in item)
    except OSError as exc:
        return WallState(wall, LOOKUPS, None, f"{process}/environ unreadable: {exc.strerror}")
    value = environ.get(b"RES_OPTIONS", b"").decode(errors="replace")
    return WallState(wall, LOOKUPS, value == wanted, f"RES_OPTIONS={value!r} at the process's start")


def _no_nameserver(process: Path) -> WallState:
    wall = "no resolver configured (the unit's empty resolv.conf)"
    path = process / "root" / "etc" / "resolv.conf"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return WallState(wall, LOOKUPS, True, f"{path} does not exist")
    except OSError as exc:
        return WallState(wall, LOOKUPS, None, f"{path} unreadable: {exc.strerror}")
    servers = [line.split()[1] for line in text.splitlines() if line.split()[:1] == ["nameserver"] and len(line.split()) > 1]
    if servers:
        return WallState(wall, LOOKUPS, False, f"its resolv.conf names {', '.join(servers)}")
    return WallState(wall, LOOKUPS, True, "its resolv.conf names no nameserver (glibc would ask 127.0.0.1:53, dropped below)")


def _in_the_unit(process: Path) -> WallState:
    wall = f"runs in {UNIT_NAME} (IPAddressDeny, RestrictAddressFamilies, no resolver)"
    try:
        cgroup = (process / "cgroup").read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return WallState(wall, SOCKETS, None, f"{process}/cgroup unreadable: {exc.strerror}")
    inside = any(line.rstrip().endswith(f"/{UNIT_NAME}") for line in cgroup.splitlines())
    return WallState(wall, SOCKETS, inside, "cgroup " + (cgroup.strip().splitlines() or ["?"])[-1].split(":", 2)[-1])


def _nft_table() -> tuple[bool | None, str]:
    """(loaded?, the table or why unknown)."""
    nft = shutil.which("nft")
    if nft is None:
        return None, "nft is not installed here"
    try:
        done = subprocess.run([nft, "list", "table", *NFT_TABLE], capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return None, "nft list timed out"
    if done.returncode == 0:
        return True, done.stdout
    if "Operation not permitted" in done.stderr:
        return None, "nft list is not permitted here (needs root or CAP_NET_ADMIN)"
    return False, f"table {' '.join(NFT_TABLE)} is not loaded"


def _nft_dns_drop(nft: tuple[bool | None, str]) -> WallState:
    wall = "nftables drop the service user's port 53, loopback too"
    loaded, text = nft
    if not loaded:
        return WallState(wall, LOOKUPS, loaded, text)
    drops = any("th dport 53" in line and " drop" in line for line in text.splitlines())
    return WallState(wall, LOOKUPS, drops, "rule loaded" if drops else "the loaded table has no port-53 drop")


def _nft_loaded(nft: tuple[bool | None, str]) -> WallState:
    wall = "nftables fence for the service user"
    loaded, text = nft
    return WallState(wall, SOCKETS, loaded, f"table {' '.join(NFT_TABLE)} loaded" if loaded else text)
