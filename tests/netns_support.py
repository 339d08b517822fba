"""Several "hosts" on one machine: network namespaces joined by veth pairs, created (as root) and removed by tests.

Only addresses inside these namespaces are ever used (10.200.<n>.0/24 on the veths created here). A thread of the
test process can enter a namespace (`setns`), so the official clients run "on" a host without a helper process.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import uuid
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def namespaces_unavailable() -> str | None:
    """Why this machine cannot create named network namespaces, or None when it can."""
    if os.geteuid() != 0:
        return "creating named network namespaces and veth pairs needs root"
    probe = f"sbprobe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "set", "lo", "up")
    except (OSError, RuntimeError) as exc:
        return f"no network namespaces here: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


def enter_namespace(name: str) -> None:
    """Move the calling thread into network namespace `name`; sockets it opens from now on live there."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    descriptor = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(descriptor, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {name}: {os.strerror(errno)}")
    finally:
        os.close(descriptor)


@dataclass
class Star:
    """A hub namespace and `spokes` namespaces, each spoke joined to the hub by its own veth pair:
    hub 10.200.<i>.1/24 <-> spoke i 10.200.<i>.2/24."""

    spokes: int
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    created: list[str] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return f"sbhub{self.tag}"

    def spoke(self, i: int) -> str:
        return f"sbsp{i}{self.tag}"

    @staticmethod
    def spoke_address(i: int) -> str:
        return f"10.200.{i}.2"

    def create(self) -> Star:
        try:
            for name in [self.hub, *(self.spoke(i) for i in range(1, self.spokes + 1))]:
                _ip("netns", "add", name)
                self.created.append(name)
                _ip("-n", name, "link", "set", "lo", "up")
            for i in range(1, self.spokes + 1):
                hub_end, spoke_end = f"h{i}{self.tag}", f"s{i}{self.tag}"
                _ip("link", "add", hub_end, "netns", self.hub, "type", "veth", "peer", "name", spoke_end,
                    "netns", self.spoke(i))  # fmt: skip
                _ip("-n", self.hub, "addr", "add", f"10.200.{i}.1/24", "dev", hub_end)
                _ip("-n", self.spoke(i), "addr", "add", f"10.200.{i}.2/24", "dev", spoke_end)
                _ip("-n", self.hub, "link", "set", hub_end, "up")
                _ip("-n", self.spoke(i), "link", "set", spoke_end, "up")
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.created.clear()

    def __enter__(self) -> Star:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()
