"""Opening a path that must be a regular file: never following a symlink, never blocking on a FIFO or a device.

A plain `open()` of a FIFO waits for a writer forever, and of a symlink reads whatever it points at. Every file the
appliance trusts (manifests, release records, trust store keys, store blobs) is opened here: `lstat` first (a cheap
refusal with a clear name), then `open` with O_NOFOLLOW | O_NONBLOCK (the race between the two cannot block or follow),
then `fstat` of what was opened must be a regular file.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
from pathlib import Path

HASH_CHUNK = 1 << 20


class NotRegularFileError(OSError):
    """The path is a symlink, FIFO, socket, device or directory where a regular file belongs."""


def file_kind(mode: int) -> str:
    """How a refusal names what a path is: `a FIFO`, `a symlink`, `a device`..."""
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def open_regular(path: Path) -> tuple[int, os.stat_result]:
    """A read-only descriptor of `path` (blocking reads again) and its `fstat`.

    Raises:
        NotRegularFileError: `path` is anything but a regular file (named in the message).
        FileNotFoundError, PermissionError: as `open` would.
    """
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(errno.EINVAL, f"{path}: is {file_kind(mode)}, not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a symlink after the lstat
            raise NotRegularFileError(errno.ELOOP, f"{path}: is a symlink, not a regular file") from exc
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NotRegularFileError(errno.EINVAL, f"{path}: is {file_kind(info.st_mode)}, not a regular file")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd, info


def read_regular(path: Path, *, limit: int = 16 << 20) -> bytes:
    """The bytes of a regular file of at most `limit` bytes.

    Raises:
        NotRegularFileError: not a regular file, or larger than `limit`.
        FileNotFoundError, PermissionError.
    """
    fd, info = open_regular(path)
    with open(fd, "rb") as reader:
        if info.st_size > limit:
            raise NotRegularFileError(errno.EFBIG, f"{path}: {info.st_size} bytes is more than the {limit} expected")
        return reader.read(limit + 1)


def sha256_regular(path: Path) -> tuple[str, int]:
    """(sha256, size) of a regular file's bytes. Raises as `open_regular`."""
    fd, _ = open_regular(path)
    digest = hashlib.sha256()
    size = 0
    with open(fd, "rb", buffering=0) as reader:
        buffer = bytearray(HASH_CHUNK)
        with memoryview(buffer) as view:
            while got := reader.readinto(view):
                digest.update(view[:got])
                size += got
    return digest.hexdigest(), size
