"""The in-process egress guard: an audit hook that refuses sockets and lookups the allowlist does not allow.

`sealbox serve` installs it before anything else. Audit hooks cannot be removed, so the guard is process state:
installed once, never loosened (a second install with a different allowlist is refused), and its reporting
callback may be attached later, when the audit log is open; refusals before that are kept and delivered then.

What it cannot see: native code that opens sockets itself (ctypes, C extensions, child processes), and the name
lookup the C socket methods do before their audit event. The resolver's zero attempts (RES_OPTIONS), the systemd
unit (no resolver, IPAddressDeny, RestrictAddressFamilies) and the nftables rules are the wall for those; see
docs/lockdown.md, and `sealbox doctor` for which are in force.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from sealbox.runtime.egress.allowlist import Allowlist
from sealbox.runtime.egress.local_names import LocalNames
from sealbox.runtime.egress.rules import WATCHED_EVENTS, EgressRules, Refusal
from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.durable_file import write_atomically
from sealbox.runtime.policy import EgressPolicy

OnBlock = Callable[[str, str], None]
"""Called as on_block(destination, operation) for each refusal, in the refused thread, before the error is raised."""

PENDING_LIMIT = 256
# Never in /etc/hosts, and `.invalid` can never be a real name; only ever raised with sys.audit, never looked up.
PROBE_NAME = "sealbox-egress-probe.invalid"
_PATCHED_METHODS = ("connect", "connect_ex", "sendto", "sendmsg", "bind")


class EgressBlockedError(PermissionError):
    """A socket operation or lookup the egress policy does not allow. An OSError, so libraries handle it as one."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(errno.EACCES, f"egress blocked: {refusal.operation} to {refusal.destination}: {refusal.reason}")
        self.refusal = refusal

    def __reduce__(self) -> tuple[type[EgressBlockedError], tuple[Refusal]]:
        return (type(self), (self.refusal,))  # survives pickling (a process pool hands errors back that way)

    @property
    def destination(self) -> str:
        return self.refusal.destination

    @property
    def operation(self) -> str:
        return self.refusal.operation


class EgressGuardError(Exception):
    """The guard cannot be installed as asked (it is already installed with another allowlist)."""


class AuditAppender(Protocol):
    def append(self, event: str, **fields: object) -> object: ...


@dataclass
class _GuardState:
    rules: EgressRules
    installed_at: datetime
    on_block: OnBlock | None = None
    pending: deque[Refusal] = field(default_factory=lambda: deque(maxlen=PENDING_LIMIT))
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_state: _GuardState | None = None
_install_lock = threading.Lock()
_thread = threading.local()  # .reporting: inside on_block; .probing: inside self_test


def install_egress_guard(egress: EgressPolicy, *, on_block: OnBlock | None = None) -> EgressGuard:
    """Install the guard once per process; installing again with the same allowlist returns it (and attaches on_block).

    Raises:
        EgressGuardError: the guard is already installed with a different allowlist; it can never be widened.
    """
    global _state
    allowlist = Allowlist.from_policy(egress)
    with _install_lock:
        if _state is None:
            names = LocalNames.load().restricted_to(egress.local_name_set())
            _state = _GuardState(EgressRules(allowlist, names), datetime.now(timezone.utc))
            _patch_socket_methods()
            sys.addaudithook(_audit_hook)
        elif _state.rules.allowlist != allowlist:
            raise EgressGuardError(
                f"the egress guard is already installed with allowlist {_state.rules.allowlist.describe()}; "
                f"it cannot be changed to {allowlist.describe()} in a running process"
            )
        guard = EgressGuard(_state)
    if on_block is not None:
        guard.set_on_block(on_block)
    return guard


def active_guard() -> EgressGuard | None:
    """The guard installed in this process, or None."""
    return EgressGuard(_state) if _state is not None else None


def audit_log_reporter(log: AuditAppender) -> OnBlock:
    """The on_block the server wires: one `egress.blocked` audit record per refusal.

    Synchronous on purpose: the record is durable before the caller sees the error. On the event loop that costs
    one group commit (the bound every request record has); a refusal is rare, and a log that cannot write raises
    AuditUnavailableError, which the guard reports on stderr while still refusing.
    """

    def report(destination: str, operation: str) -> None:
        log.append("egress.blocked", destination=destination, operation=operation)

    return report


@dataclass(frozen=True)
class GuardStatus:
    """What a process says about its guard; the server writes it to `guard_status_path(root)` for `sealbox doctor`."""

    pid: int
    started: int  # the process's start time in clock ticks since boot: a reused pid does not match it
    installed_at: str
    allowlist: str
    networks: tuple[str, ...]
    ports: tuple[int, ...]
    self_test: bool

    def is_live(self) -> bool:
        """True while the process that wrote this is still running (same pid, same start time)."""
        return _start_ticks(self.pid) == self.started

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, (json.dumps(asdict(self), indent=2) + "\n").encode("utf-8"), mode=0o644)

    @classmethod
    def read(cls, path: Path) -> GuardStatus:
        """Raises OSError when unreadable, ValueError when not a status file."""
        data = json.loads(path.read_text(encoding="utf-8"))
        try:
            return cls(
                pid=int(data["pid"]),
                started=int(data["started"]),
                installed_at=str(data["installed_at"]),
                allowlist=str(data["allowlist"]),
                networks=tuple(str(n) for n in data["networks"]),
                ports=tuple(int(p) for p in data["ports"]),
                self_test=bool(data["self_test"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not an egress guard status file: {exc!r}") from exc


def guard_status_path(root: HostRoot) -> Path:
    return root.path / "run" / "egress-guard.json"


class EgressGuard:
    """A handle on the process's guard (there is only ever one)."""

    def __init__(self, state: _GuardState) -> None:
        self._state = state

    @property
    def allowlist(self) -> Allowlist:
        return self._state.rules.allowlist

    @property
    def installed_at(self) -> datetime:
        return self._state.installed_at

    @property
    def refused(self) -> int:
        """Refusals since install (self-tests not counted)."""
        return self._state.refused

    def set_on_block(self, on_block: OnBlock) -> None:
        """Attach the reporter and hand it the refusals that happened before it existed, oldest first."""
        with self._state.lock:
            self._state.on_block = on_block
            backlog = list(self._state.pending)
            self._state.pending.clear()
        for refusal in backlog:
            _deliver(on_block, refusal)

    def self_test(self) -> bool:
        """True when the hook is in place and refuses a DNS name. Raised with sys.audit: nothing is looked up or sent."""
        _thread.probing = True
        try:
            sys.audit("socket.getaddrinfo", PROBE_NAME, None, 0, 0, 0)
        except EgressBlockedError:
            return all(getattr(socket.socket, name).__module__ == __name__ for name in _PATCHED_METHODS)
        finally:
            _thread.probing = False
        return False

    def status(self) -> GuardStatus:
        allowlist = self.allowlist
        return GuardStatus(
            pid=os.getpid(),
            started=_start_ticks(os.getpid()) or 0,
            installed_at=self.installed_at.isoformat(),
            allowlist=allowlist.describe(),
            networks=tuple(str(net) for net in allowlist.networks),
            ports=tuple(sorted(allowlist.ports)),
            self_test=self.self_test(),
        )


def _start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat; None when no such process. The name field may hold spaces and parentheses."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def _audit_hook(event: str, args: tuple[object, ...]) -> None:
    # Runs for every audit event in the process: the membership test is the whole cost for the rest.
    if event not in WATCHED_EVENTS or _state is None:
        return
    refusal = _state.rules.decide(event, args)
    if refusal is not None:
        _refuse(_state, refusal)


def _refuse(state: _GuardState, refusal: Refusal) -> None:
    if not getattr(_thread, "probing", False):
        _report(state, refusal)
    raise EgressBlockedError(refusal)


def _report(state: _GuardState, refusal: Refusal) -> None:
    if getattr(_thread, "reporting", False):
        return  # the reporter itself tried to reach out: refused (by the caller), but never reported recursively
    with state.lock:
        state.refused += 1
        on_block = state.on_block
        if on_block is None:
            state.pending.append(refusal)
            return
    _deliver(on_block, refusal)


def _deliver(on_block: OnBlock, refusal: Refusal) -> None:
    _thread.reporting = True
    try:
        on_block(refusal.destination, refusal.operation)
    except Exception as exc:  # noqa: BLE001 - a failing reporter must not turn a refusal into an allowance
        sys.stderr.write(f"sealbox: egress refusal not reported ({refusal.operation} to {refusal.destination}): {exc!r}\n")
    finally:
        _thread.reporting = False


def _patch_socket_methods() -> None:
    """Put a name check in front of connect/sendto/sendmsg/bind: CPython resolves a host name inside the address
    before it raises the audit event, so only a check before the call keeps that lookup from leaving.

    The C methods themselves (`_socket.socket.connect(sock, (name, port))`) cannot be patched; there the lookup
    happens before any hook. The resolver's zero attempts (RES_OPTIONS, offline_env.py) keep it from sending a
    query; the unit's empty resolv.conf and the nftables rule on port 53 hold the same from outside."""
    for name in _PATCHED_METHODS:
        setattr(socket.socket, name, _checked_method(name, getattr(socket.socket, name)))


def _checked_method(name: str, original: Callable[..., object]) -> Callable[..., object]:
    event = f"socket.{name.removesuffix('_ex')}"

    def checked(self: socket.socket, *args: object) -> object:
        address = _address_argument(name, args)
        if _state is not None and self.family in (socket.AF_INET, socket.AF_INET6):
            try:
                refusal = _state.rules.name_in_address(event, address, self.family)
            except (TypeError, UnicodeError) as exc:
                refusal = Refusal(event, repr(address)[:200], f"unreadable address ({exc})")
            if refusal is not None:
                _refuse(_state, refusal)
        return original(self, *args)

    checked.__name__ = checked.__qualname__ = name
    checked.__doc__ = original.__doc__
    return checked


def _address_argument(name: str, args: tuple[object, ...]) -> object:
    if name in ("connect", "connect_ex", "bind"):
        return args[0] if args else None
    if name == "sendto":
        return args[-1] if len(args) >= 2 else None
    return args[3] if len(args) > 3 else None  # sendmsg(buffers, ancdata, flags, address)
