"""Files that survive a crash whole: readers see the old content or the new, never a torn file, and the rename is
itself made durable.

One way to write them for the whole appliance (trust store, version floor, releases, audit checkpoints and exports,
API keys, the guard's status): a temporary file beside the target (or in `temp_dir`, on the same filesystem) with
its final mode set explicitly whatever the umask, fsync'd, renamed over the target, and the directory fsync'd.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make the names in `directory` durable (a rename is only on disk once its directory is)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(
    path: Path, data: bytes | Iterable[bytes], *, mode: int, owner: tuple[int, int] | None = None,
    temp_dir: Path | None = None,
) -> None:  # fmt: skip
    """Replace `path` with `data` (bytes, or chunks of them) atomically and durably.

    The file gets `mode` exactly, whatever the caller's umask (a umask of 000 must not make a trust store or a
    version floor world-writable), and `owner` (uid, gid) when given. The temporary file is opened with O_EXCL and
    O_NOFOLLOW: a symlink or FIFO planted under its name is never written through.
    """
    temp = (temp_dir or path.parent) / f".{path.name}.{os.getpid()}.tmp"
    temp.unlink(missing_ok=True)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with open(fd, "wb", closefd=True) as out:
            os.fchmod(fd, mode)
            if owner is not None:
                os.fchown(fd, *owner)
            for chunk in [data] if isinstance(data, bytes | bytearray) else data:
                out.write(chunk)
            out.flush()
            os.fsync(fd)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
