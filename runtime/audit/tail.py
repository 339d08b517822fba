"""The writing end of the chain on disk: the newest segment, the head (seq, hash) and the checkpoints file.

Several processes may write one log (the server, and `bundle install` or `audit export` run beside it), so every
step that writes takes an exclusive `flock` on `<audit>/.lock` and first catches up with what the others wrote (a
generation counter in the lock file, bumped by every holder, says whether anyone did). No process holds the lock
between groups, so another waits at most one group.

Recovery lives here too, because any step may meet it: a writer that died mid-write leaves bytes after its last
newline (or lines that are not intact records). Those bytes are moved to `<segment>.<time>.torn`, never deleted,
the segment is truncated to its last intact record, and the next group begins with an `audit.torn_tail` record that
names the file, offset, length and SHA-256 of what was set aside. A tail that would take a checkpointed record with
it is not a torn write: the log refuses to open rather than move signed records aside.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sealbox.runtime.audit.checkpoint import CHECKPOINTS_NAME, AuditKey, Checkpoint
from sealbox.runtime.audit.errors import AuditUnavailableError
from sealbox.runtime.audit.record import (
    GENESIS,
    Record,
    RecordError,
    canonical,
    encode_record,
    format_time,
    parse_record,
    stated_hash,
)
from sealbox.runtime.audit.segment import SEGMENT_MAX_BYTES, SEGMENT_MAX_RECORDS, Segment, list_segments, read_last_line
from sealbox.runtime.durable_file import fsync_directory
from sealbox.runtime.audit.verify import ChainVerifier, TailBound

LOCK_NAME = ".lock"


@dataclass(frozen=True, slots=True)
class PendingRecord:
    """An append waiting for its group: event and fields already canonical, so a bad field fails its caller only."""

    event_json: bytes
    fields_json: bytes
    content_logged: bool


@dataclass(frozen=True)
class TornTail:
    """Bytes set aside at recovery: what the `audit.torn_tail` record says."""

    file: str
    offset: int
    length: int
    sha256: str
    set_aside: str
    lines: int

    def record(self) -> PendingRecord:
        fields = {
            "file": self.file,
            "offset": self.offset,
            "bytes": self.length,
            "sha256": self.sha256,
            "set_aside": self.set_aside,
            "lines": self.lines,
        }
        return PendingRecord(canonical("audit.torn_tail"), canonical(fields), False)


@dataclass
class _Head:
    seq: int = 0
    hash: str = GENESIS


@dataclass
class ChainTail:
    directory: Path
    key: AuditKey
    clock: Callable[[], datetime]
    segment_max_bytes: int = SEGMENT_MAX_BYTES
    segment_max_records: int = SEGMENT_MAX_RECORDS
    owner: tuple[int, int] | None = None
    head: _Head = field(default_factory=_Head)
    checkpointed: int = 0  # size of the newest checkpoint
    rotated: bool = False  # set when a segment was closed; the log runs retention then and clears it
    _lock_fd: int = -1
    _depth: int = 0
    _thread_lock: threading.RLock = field(default_factory=threading.RLock)
    _segment: Segment | None = None
    _fd: int = -1
    _offset: int = 0
    _cp_fd: int = -1
    _cp_offset: int = 0
    _generation: bytes = b""
    _torn: list[TornTail] = field(default_factory=list)
    _newest_checkpoint: Checkpoint | None = None
    bound: TailBound = field(default_factory=TailBound)

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        clock: Callable[[], datetime],
        segment_max_bytes: int = SEGMENT_MAX_BYTES,
        segment_max_records: int = SEGMENT_MAX_RECORDS,
        bound: TailBound | None = None,
    ) -> "ChainTail":
        """Create the directory, lock file and host key if missing, then recover and load the head; sign a new log at
        genesis, and a tail a crashed writer left unsigned once it checks out (so each writer starts covered).

        Raises:
            AuditUnavailableError: the directory, lock, key or a segment cannot be opened or recovered, or records
                lie beyond the newest checkpoint that no writer may sign (see `_check_unsigned_tail`).
        """
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            status = directory.stat()
            owner = (status.st_uid, status.st_gid) if os.geteuid() == 0 and status.st_uid != 0 else None
            lock_fd = _open_owned(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, owner)
        except OSError as exc:
            raise AuditUnavailableError(f"audit log {directory}: cannot open: {exc.strerror or exc}") from exc
        tail = cls(directory, None, clock, segment_max_bytes, segment_max_records, owner)  # type: ignore[arg-type]
        tail.bound = bound or TailBound()
        tail._lock_fd = lock_fd
        try:
            with tail.locked():
                # Under the lock, so two processes opening a new log at once agree on one key.
                has_checkpoints = (directory / CHECKPOINTS_NAME).exists() and (
                    (directory / CHECKPOINTS_NAME).stat().st_size > 0
                )
                tail.key = AuditKey.load_or_create(directory, may_create=not has_checkpoints, owner=owner)
                tail._reload()
                tail._check_unsigned_tail()
                if tail._newest_checkpoint is None:
                    tail._sign_genesis()
                elif tail.head.seq > tail.checkpointed:
                    tail._checkpoint_locked()
                tail._claim()
        except OSError as exc:
            tail.close()
            raise AuditUnavailableError(f"audit log {directory}: cannot open: {exc.strerror or exc}") from exc
        except BaseException:
            tail.close()
            raise
        return tail

    # -- locking -------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the cross-process writer lock (re-entrant within this object) and catch up with other writers."""
        with self._thread_lock:
            if self._depth == 0:
                try:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                except OSError as exc:
                    raise AuditUnavailableError(f"audit log {self.directory}: cannot lock: {exc.strerror}") from exc
            self._depth += 1
            try:
                if self._depth == 1 and self.key is not None:
                    self._refresh()
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _refresh(self) -> None:
        """Catch up with other writers, then claim the log: every holder of the lock bumps a generation counter in the
        lock file before it writes, so a changed counter means another process wrote (or died writing) since."""
        try:
            if self._fd < 0 or os.pread(self._lock_fd, 8, 0) != self._generation:
                self._reload()
            self._claim()
        except OSError as exc:
            raise AuditUnavailableError(f"audit log {self.directory}: cannot read its tail: {exc.strerror}") from exc

    def _claim(self) -> None:
        current = int.from_bytes(os.pread(self._lock_fd, 8, 0).ljust(8, b"\0"), "big")
        self._generation = ((current + 1) % (1 << 64)).to_bytes(8, "big")
        os.pwrite(self._lock_fd, self._generation, 0)

    # -- loading and recovery ------------------------------------------------------------------------------------

    def _reload(self) -> None:
        """Read the head from disk, setting aside torn tails (a crashed writer's half-written group)."""
        self._close_files()
        cp_path = self.directory / CHECKPOINTS_NAME
        self._cp_fd = _open_owned(cp_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, self.owner)
        self._recover_checkpoints(cp_path)
        while True:
            segments = list_segments(self.directory)
            if not segments:
                self.head = _Head()
                self._segment, self._fd, self._offset = None, -1, 0
                break
            segment = segments[-1]
            fd = os.open(segment.path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW)
            size = os.fstat(fd).st_size
            last = self._recover_segment(segment, fd, size)
            if last is None:
                # Empty (a rotation that died before its first write, or nothing intact): it holds no record.
                os.close(fd)
                os.unlink(segment.path)
                fsync_directory(self.directory)
                continue
            self.head = _Head(last.seq, last.hash)
            self._segment, self._fd, self._offset = segment, fd, os.fstat(fd).st_size
            break
        if self.head.seq < self.checkpointed:
            raise AuditUnavailableError(
                f"audit log {self.directory}: the log ends at seq {self.head.seq} but a checkpoint signed "
                f"{self.checkpointed} records: segments were removed or truncated; run `sealbox audit verify`"
            )

    def reload(self) -> None:
        """Read the head again from disk (after retention rewrote files); call with the lock held."""
        try:
            self._reload()
        except OSError as exc:
            raise AuditUnavailableError(f"audit log {self.directory}: cannot read its tail: {exc.strerror}") from exc

    def _recover_checkpoints(self, path: Path) -> None:
        size = os.fstat(self._cp_fd).st_size
        cut, lines, newest = size, 0, None
        last = read_last_line(self._cp_fd, size)
        cut = last[1] + len(last[0]) if last else 0
        while last is not None:
            try:
                newest = Checkpoint.from_line(last[0])
                break
            except ValueError:
                cut, lines = last[1], lines + 1
                last = read_last_line(self._cp_fd, last[1])
        if cut < size:
            self._set_aside(path, self._cp_fd, cut, size, lines)
        self.checkpointed = newest.size if newest else 0
        self._newest_checkpoint = newest
        self._cp_offset = os.fstat(self._cp_fd).st_size

    def _recover_segment(self, segment: Segment, fd: int, size: int) -> Record | None:
        last = read_last_line(fd, size)
        cut = last[1] + len(last[0]) if last else 0
        lines, record = 0, None
        while last is not None:
            try:
                record = parse_record(last[0])
                break
            except RecordError:
                cut, lines = last[1], lines + 1
                last = read_last_line(fd, last[1])
        if cut < size:
            if record is not None and record.seq < self.checkpointed:
                raise AuditUnavailableError(
                    f"audit log {segment.path}: {size - cut} byte(s) after seq {record.seq} are not intact records, "
                    f"but a checkpoint covers seq {self.checkpointed}: this is damage, not a torn write; "
                    "run `sealbox audit verify` and restore the segment from backup"
                )
            self._set_aside(segment.path, fd, cut, size, lines)
        return record

    def _set_aside(self, path: Path, fd: int, cut: int, size: int, lines: int) -> None:
        torn = os.pread(fd, size - cut, cut)
        name = f"{path.name}.{self.clock().strftime('%Y%m%dT%H%M%S%fZ')}.torn"
        torn_fd = _open_owned(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.owner)
        try:
            write_all(torn_fd, torn)
            os.fsync(torn_fd)
        finally:
            os.close(torn_fd)
        fsync_directory(self.directory)
        os.ftruncate(fd, cut)
        os.fsync(fd)
        self._torn.append(TornTail(path.name, cut, len(torn), hashlib.sha256(torn).hexdigest(), name, lines))

    def _check_unsigned_tail(self) -> None:
        """Refuse to sign what no signature covers yet unless it chains from the newest checkpoint and is no more than
        a crashed writer can leave (the policy's tail bound): otherwise an edit made while the service was down, with
        the checkpoints after it deleted, would be signed, and so laundered, by the next checkpoint."""
        newest = self._newest_checkpoint
        where = f"audit log {self.directory}"
        if newest is None and self.head.seq > 0:
            # A log is signed at genesis before its first record: records with no checkpoint at all lost theirs.
            raise AuditUnavailableError(
                f"{where}: records 1..{self.head.seq} exist but {CHECKPOINTS_NAME} holds no checkpoint, and every log "
                "is signed at genesis before its first record: its checkpoints were deleted; nothing will be signed "
                "over these records (restore checkpoints.jsonl from backup; run `sealbox audit verify`)"
            )
        anchor_seq, anchor_hash = (newest.size, newest.head) if newest else (0, GENESIS)
        if self.head.seq <= anchor_seq:
            return
        if newest is not None and not (newest.key == self.key.id and newest.signature_holds(self.key.public)):
            raise AuditUnavailableError(
                f"{where}: the newest checkpoint (seq {anchor_seq}) is not signed by this host's audit key; "
                "run `sealbox audit verify`"
            )
        segments = list_segments(self.directory)
        start = max((i for i, s in enumerate(segments) if s.first_seq <= anchor_seq + 1), default=0)
        chain = ChainVerifier(anchor_seq=anchor_seq, anchor_hash=anchor_hash)
        for segment in segments[start:]:
            lines = segment.path.read_bytes().split(b"\n")[:-1]
            skip = max(0, anchor_seq - segment.first_seq + 1)
            if skip and (len(lines) < skip or stated_hash(lines[skip - 1]) != anchor_hash):
                raise AuditUnavailableError(
                    f"{where}: record {anchor_seq} in {segment.name} is not the one the newest checkpoint signed; "
                    "run `sealbox audit verify`"
                )
            chain.feed_lines(lines[skip:], segment.name, first_number=skip + 1)
        chain.settle_link_breaks(set())
        if chain.problems:
            first = min(chain.problems, key=lambda problem: problem.seq)
            raise AuditUnavailableError(
                f"{where}: the records after the newest checkpoint (seq {anchor_seq}) do not verify, so none will be "
                f"signed: {first}; run `sealbox audit verify`"
            )
        # Torn records are set aside before this check, so they do not count against the bound.
        why = self.bound.excess(self.head.seq - anchor_seq, chain.time_after.get(anchor_seq), chain.last_time)
        if why is not None:
            raise AuditUnavailableError(
                f"{where}: records {anchor_seq + 1}..{self.head.seq} are not covered by a checkpoint and are more than "
                f"a crashed writer leaves: {why}; the checkpoints that must have covered them are missing, so none "
                "will be signed (restore checkpoints.jsonl from backup; run `sealbox audit verify`)"
            )

    def _sign_genesis(self) -> None:
        """A new log's first checkpoint: size 0 over the genesis hash, written before any record."""
        checkpoint = self.key.sign(0, GENESIS, format_time(self.clock()))
        line = checkpoint.to_line()
        write_all(self._cp_fd, line)
        os.fsync(self._cp_fd)
        self._cp_offset += len(line)
        self.checkpointed = 0
        self._newest_checkpoint = checkpoint

    # -- writing -------------------------------------------------------------------------------------------------

    def write(self, items: Sequence[PendingRecord]) -> list[int]:
        """Append records as one group: one write and one fsync per segment touched. Returns their seqs.

        Raises:
            AuditUnavailableError: a write or fsync failed; the segment is cut back to its last durable record
                where the disk still allows it (else the next open sets the rest aside).
        """
        with self.locked():
            try:
                return self._write_locked(items)
            except OSError as exc:
                where = self._segment.path if self._segment else self.directory
                raise AuditUnavailableError(
                    f"audit log {where}: cannot write: {exc.strerror or exc} (errno {exc.errno}); "
                    "no record of this group is durable and the log refuses further appends (fail closed)"
                ) from exc

    def _write_locked(self, items: Sequence[PendingRecord]) -> list[int]:
        time = format_time(self.clock())
        date = time[:10].replace("-", "")
        torn = [t.record() for t in self._torn]
        seq, prev = self.head.seq, self.head.hash
        lines: list[bytes] = []
        pending_bytes = 0
        seqs: list[int] = []
        for index, item in enumerate((*torn, *items)):
            if self._must_rotate(date, seq, pending_bytes):
                self._flush(lines, seq, prev)
                lines, pending_bytes = [], 0
                self._open_segment(seq + 1, date)
            seq += 1
            line, prev = encode_record(
                seq=seq,
                time=time,
                event_json=item.event_json,
                fields_json=item.fields_json,
                prev=prev,
                content_logged=item.content_logged,
            )
            lines.append(line)
            pending_bytes += len(line)
            if index >= len(torn):
                seqs.append(seq)
        self._flush(lines, seq, prev)
        self._torn.clear()  # recorded: only now, so a failed group leaves them for the next
        return seqs

    def _must_rotate(self, date: str, seq: int, pending_bytes: int) -> bool:
        segment = self._segment
        if segment is None:
            return True
        if seq < segment.first_seq:  # the segment holds no record yet: write into it whatever the date
            return False
        return (
            segment.date != date
            or self._offset + pending_bytes >= self.segment_max_bytes
            or seq - segment.first_seq + 1 >= self.segment_max_records
        )

    def _flush(self, lines: list[bytes], seq: int, prev: str) -> None:
        if not lines:
            return
        data = b"".join(lines)
        try:
            write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._offset)  # the group is not acknowledged: leave no part of it behind
            raise
        self._offset += len(data)
        self.head = _Head(seq, prev)

    def _open_segment(self, first_seq: int, date: str) -> None:
        """Close the current segment under a checkpoint at its last record (the anchor retention needs), open the next."""
        if self._segment is not None and self.head.seq >= self._segment.first_seq:
            self._checkpoint_locked()
            self.rotated = True
        path = self.directory / Segment.name_for(first_seq, date)
        fd = _open_owned(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW, self.owner)
        if self._fd >= 0:
            os.close(self._fd)
        self._segment, self._fd, self._offset = Segment(first_seq, date, path), fd, 0
        fsync_directory(self.directory)

    def checkpoint(self) -> Checkpoint | None:
        """Sign the head now, unless a checkpoint already covers it. Returns the new checkpoint or None.

        Raises:
            AuditUnavailableError: the checkpoint cannot be written.
        """
        with self.locked():
            try:
                return self._checkpoint_locked()
            except OSError as exc:
                raise AuditUnavailableError(
                    f"audit log {self.directory / CHECKPOINTS_NAME}: cannot write a checkpoint: {exc.strerror}"
                ) from exc

    def _checkpoint_locked(self) -> Checkpoint | None:
        if self.head.seq == 0 or self.head.seq <= self.checkpointed:
            return None
        checkpoint = self.key.sign(self.head.seq, self.head.hash, format_time(self.clock()))
        line = checkpoint.to_line()
        try:
            write_all(self._cp_fd, line)
            os.fsync(self._cp_fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._cp_fd, self._cp_offset)
            raise
        self._cp_offset += len(line)
        self.checkpointed = checkpoint.size
        return checkpoint

    # -- closing -------------------------------------------------------------------------------------------------

    def _close_files(self) -> None:
        for fd in (self._fd, self._cp_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._cp_fd = -1

    def close(self) -> None:
        self._close_files()
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = -1


def _open_owned(path: Path, flags: int, owner: tuple[int, int] | None) -> int:
    """Open (creating 0600) a file in the audit directory; a file root creates there belongs to the directory's owner,
    so the service keeps writing a log that a root-run command touched."""
    fd = os.open(path, flags | os.O_NOFOLLOW, 0o600)
    if owner is not None and flags & os.O_CREAT:
        try:
            os.fchown(fd, *owner)
        except OSError:
            os.close(fd)
            raise
    return fd


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a regular file may take fewer on a nearly full disk)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
