"""Named points where a test may kill the installer outright, to prove a crash there leaves the host consistent.

`SEALBOX_TEST_CRASH_AT=<point>` makes the process SIGKILL itself on reaching that point: no exception handler, no
`finally`, no buffered write runs, exactly like a power cut or `kill -9`. Unset (always, in production) it costs one
dictionary lookup. The points are listed here so a test can assert it named a real one.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "SEALBOX_TEST_CRASH_AT"

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


def crash_point(name: str) -> None:
    """Die here, by SIGKILL, when the environment names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
