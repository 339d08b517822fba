"""Retention: drop whole segments older than the policy allows, without breaking what remains.

A segment is removed only when (1) its newest record is older than `retention_days`, (2) every segment before it
goes too (only a prefix of the log is ever removed, never the newest segment), and (3) a checkpoint signed by this
host's key commits to its last record: that checkpoint is the anchor the verifier starts the retained log from.
Before anything is deleted an `audit.retention` record (removed_through_seq, segments, cutoff) is made durable, so
the retained log itself says why it does not start at seq 1, and a log whose head was cut off any other way fails
verification. Checkpoints older than the anchor and set-aside `.torn` files past retention go with the segments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from sealbox.runtime.audit.checkpoint import CHECKPOINTS_NAME, Checkpoint
from sealbox.runtime.audit.record import RecordError, canonical, format_time, parse_record
from sealbox.runtime.audit.segment import Segment, list_segments, read_last_line, torn_files
from sealbox.runtime.durable_file import fsync_directory, write_atomically
from sealbox.runtime.audit.tail import ChainTail, PendingRecord


@dataclass(frozen=True)
class RetentionResult:
    removed: tuple[str, ...]
    removed_through_seq: int
    cutoff: str


def apply_retention(tail: ChainTail, *, days: int) -> list[RetentionResult]:
    """Remove the segments past retention that a signed checkpoint anchors; [] when nothing may go.

    The retention record may open a new segment (a new day), which leaves the old newest segment removable too:
    passes repeat until one removes nothing.

    Raises:
        AuditUnavailableError: a retention record cannot be written (then nothing more is removed).
    """
    results = []
    while (result := _apply_once(tail, days)) is not None:
        results.append(result)
    return results


def _apply_once(tail: ChainTail, days: int) -> RetentionResult | None:
    with tail.locked():
        cutoff = tail.clock() - timedelta(days=days)
        expired = _expired_prefix(list_segments(tail.directory), format_time(cutoff))
        anchors = _checkpoint_heads(tail)
        while expired and anchors.get(expired[-1][1]) != expired[-1][2]:
            expired.pop()  # no signed checkpoint at this boundary: keep it, or the rest would not verify
        if not expired:
            _remove_old_torn_files(tail, cutoff.timestamp())
            return None
        through = expired[-1][1]
        names = tuple(segment.name for segment, _, _ in expired)
        fields = {
            "removed_through_seq": through,
            "segments": list(names),
            "cutoff": format_time(cutoff),
            "retention_days": days,
        }
        tail.write([PendingRecord(canonical("audit.retention"), canonical(fields), False)])
        for segment, _, _ in expired:
            segment.path.unlink(missing_ok=True)
        _remove_old_torn_files(tail, cutoff.timestamp())
        _drop_checkpoints_before(tail, through)
        fsync_directory(tail.directory)
        tail.reload()
        return RetentionResult(names, through, format_time(cutoff))


def _expired_prefix(segments: list[Segment], cutoff: str) -> list[tuple[Segment, int, str]]:
    """(segment, last seq, last hash) for the leading segments whose newest record is before `cutoff`."""
    expired = []
    for segment in segments[:-1]:  # the newest segment holds the head: never removed
        try:
            fd = os.open(segment.path, os.O_RDONLY)
        except FileNotFoundError:
            break
        try:
            last = read_last_line(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        if last is None:
            break
        try:
            record = parse_record(last[0])
        except RecordError:
            break  # damaged: leave it for the verifier to report
        if record.time >= cutoff:
            break
        expired.append((segment, record.seq, record.hash))
    return expired


def _checkpoint_heads(tail: ChainTail) -> dict[int, str]:
    """size -> head for every checkpoint in the file that this host's key signed."""
    heads: dict[int, str] = {}
    try:
        data = (tail.directory / CHECKPOINTS_NAME).read_bytes()
    except FileNotFoundError:
        return heads
    for line in data.splitlines():
        try:
            checkpoint = Checkpoint.from_line(line)
        except ValueError:
            continue
        if checkpoint.key == tail.key.id and checkpoint.signature_holds(tail.key.public):
            heads[checkpoint.size] = checkpoint.head
    return heads


def _drop_checkpoints_before(tail: ChainTail, anchor: int) -> None:
    """Keep the checkpoints from the anchor on (the older ones cover removed records), replaced atomically."""
    path = tail.directory / CHECKPOINTS_NAME
    kept = []
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            if Checkpoint.from_line(line).size < anchor:
                continue
        except ValueError:
            pass
        kept.append(line)
    write_atomically(path, kept, mode=0o600, owner=tail.owner)


def _remove_old_torn_files(tail: ChainTail, cutoff: float) -> None:
    for path in torn_files(tail.directory):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except FileNotFoundError:
            continue
