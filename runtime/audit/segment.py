"""Segment files: the append-only JSON-lines files the chain is stored in, named so that they sort in chain order.

`segment-<first seq, 12 digits>-<UTC date of its first record>.jsonl`. A segment is closed (rotated) when it reaches
its size or record limit or the UTC day changes, so retention can drop whole days. A torn tail set aside at open is
kept next to it as `<segment name>.<UTC time>.torn`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

SEGMENT_MAX_BYTES = 64 << 20
"""A segment is closed once it holds this many bytes: keeps files easy to copy and retention granular."""
SEGMENT_MAX_RECORDS = 250_000
"""… or this many records."""

_NAME = re.compile(r"segment-(\d{12})-(\d{8})\.jsonl")


@dataclass(frozen=True, order=True)
class Segment:
    first_seq: int
    date: str  # YYYYMMDD
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @staticmethod
    def name_for(first_seq: int, date: str) -> str:
        return f"segment-{first_seq:012d}-{date}.jsonl"


def list_segments(directory: Path) -> list[Segment]:
    """The segments in `directory`, in chain order (by first seq)."""
    found = []
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return []
    for entry in entries:
        match = _NAME.fullmatch(entry)
        if match:
            found.append(Segment(int(match.group(1)), match.group(2), directory / entry))
    return sorted(found)


def torn_files(directory: Path) -> list[Path]:
    try:
        return sorted(directory / entry for entry in os.listdir(directory) if entry.endswith(".torn"))
    except FileNotFoundError:
        return []


def _rfind_newline(fd: int, end: int) -> int:
    """Offset of the last newline before `end`, or -1; reads backwards in growing chunks."""
    chunk = 4096
    while end > 0:
        start = max(0, end - chunk)
        data = os.pread(fd, end - start, start)
        cut = data.rfind(b"\n")
        if cut >= 0:
            return start + cut
        end = start
        chunk = min(chunk * 4, 1 << 24)
    return -1


def read_last_line(fd: int, size: int) -> tuple[bytes, int] | None:
    """The last newline-terminated line before `size` and its offset, or None when there is none.

    Bytes after the last newline (a torn write) are not a line. A record carrying long content costs what it is to
    read, not the file.
    """
    last = _rfind_newline(fd, size)
    if last < 0:
        return None
    start = _rfind_newline(fd, last) + 1
    return os.pread(fd, last + 1 - start, start), start
