"""Named points in the installer's order of steps, where a crash must leave the host consistent.

Each step's end is a point (`crash_point(name)`). In production a point does nothing: no environment variable or
file can make the installer stop there. A test that proves crash safety runs the installer through its own launcher
(`tests/crash_launcher.py`), which calls `die_at(point)` in that process before the command starts: the process then
SIGKILLs itself on reaching the point, so no exception handler, no `finally` and no buffered write runs, exactly like
a power cut or `kill -9`. The points are listed here so a test can assert it named a real one.
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "verified",  # the bundle's signatures, expiry, layout and rollback rules passed; nothing written yet
    "blob-copy",  # mid-copy of a blob into staging: its temporary file is partly written
    "blobs-staged",  # every new blob is hashed and complete in staging
    "venv-built",  # the offline virtualenv is installed in the staged release
    "release-staged",  # the whole release is built in staging
    "store-partial",  # the first new blob has been renamed into the store, the others not yet
    "store-filled",  # every new blob is in the store
    "release-placed",  # the release directory is renamed into releases/, `current` not switched
    "current-link",  # the new `current` link exists under its temporary name, not yet renamed over `current`
    "activated",  # `current` points at the new release; old releases not yet pruned
)

_fatal: str | None = None


def die_at(point: str) -> None:
    """Make this process SIGKILL itself on reaching `point` (for crash tests, called by their launcher)."""
    global _fatal
    if point not in POINTS:
        raise ValueError(f"{point!r} is not a crash point; the points are {', '.join(POINTS)}")
    _fatal = point


def crash_point(name: str) -> None:
    """The installer reached `name`; dies here only in a process whose launcher asked for it."""
    if _fatal == name:
        os.kill(os.getpid(), signal.SIGKILL)
