"""The validator: does this log (a host's audit directory, or an export) still hold what was written?

Checking and deciding are separate: `verify_directory` and `verify_export` return a `VerificationReport` (truthy
when everything holds) listing each problem with the sequence number it names; the CLI turns that into an exit code.
`ChainVerifier` is the pure part: fed lines in order, it checks each record's own hash, that seqs run 1, 2, … with
no gap, and that each record's `prev` is its predecessor's hash. `check_checkpoints` then checks signatures and
that each signed (size, head) matches the record at that seq.

Which seq a problem names:
- a record whose content was edited: its own seq (its hash no longer matches);
- a deleted record: the missing seq; a record found where another belongs (reordering): the seq that belongs there;
- an inserted record carrying a seq already taken: that seq;
- a record edited and re-hashed: its seq (its successor no longer links to it), unless a checkpoint vouches for it
  as it stands, and then the successor is the one replaced or inserted;
- records rewritten consistently (a replaced segment): the first seq after the last checkpoint that still matches;
- a truncated log: the first seq a checkpoint signed but that is gone;
- a forged checkpoint, or one checked with the wrong key: the seq it claims to cover.

The start of a log that does not begin at seq 1 (retention removed its head) is accepted only when a checkpoint
signed at the seq before it commits to the first record's `prev` and an `audit.retention` record in the log declares
that removal. An export starts from the anchor hash in its header, authenticated by the checkpoints that cover it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sealbox.runtime.audit.anchor import Anchor
from sealbox.runtime.audit.checkpoint import (
    CHECKPOINTS_NAME,
    PUBLIC_KEY_NAME,
    Checkpoint,
    key_id,
    load_public_key,
    read_public_key,
    statement_holds,
)
from sealbox.runtime.audit.errors import AuditFormatError
from sealbox.runtime.audit.record import (
    GENESIS,
    HASH_MEMBER,
    RecordError,
    canonical,
    encode_record,
    parse_record,
    parse_time,
    stated_hash,
)
from sealbox.runtime.audit.segment import list_segments

EXPORT_FORMAT = "sealbox-audit-export"
MAX_PROBLEMS = 100
_SEQ = re.compile(rb'"seq":(\d+)')
_SCAN = json.JSONDecoder().scan_once  # the C scanner itself: json.loads' wrappers cost a third of verification


@dataclass(frozen=True)
class TailBound:
    """How far the live tail (records after the newest valid checkpoint) may run: the `[audit]` policy's
    `max_unsigned_records` and `max_unsigned_seconds` (these defaults are the policy's)."""

    records: int = 2000
    seconds: float = 300.0

    def excess(self, count: int, first_time: str | None, last_time: str | None) -> str | None:
        """Why a tail of `count` records spanning first..last time is beyond the bound, or None."""
        if count > self.records:
            return f"{count} records follow the last valid checkpoint, more than the {self.records} allowed"
        if first_time is not None and last_time is not None:
            try:
                span = (parse_time(last_time) - parse_time(first_time)).total_seconds()
            except ValueError:
                return None  # the record itself is reported as not intact
            if span > self.seconds:
                return (
                    f"the records after the last valid checkpoint span {span:.0f} s ({first_time} to {last_time}), "
                    f"more than the {self.seconds:g} s allowed"
                )
        return None


@dataclass(frozen=True)
class Problem:
    seq: int
    reason: str
    where: str

    def __str__(self) -> str:
        return f"seq {self.seq}: {self.reason} ({self.where})"


@dataclass
class VerificationReport:
    """What a verification found. Truthy only when every record and every checkpoint holds."""

    source: str
    records: int = 0
    valid: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    anchor: str = ""
    anchor_checked: str = ""
    statement: dict[str, Any] | None = None
    checkpoints: int = 0
    checkpoints_valid: int = 0
    signed_through: int = 0
    key_id: str = ""
    key_source: str = ""
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        return self.ok

    @property
    def first_problem(self) -> Problem | None:
        return min(self.problems, key=lambda problem: problem.seq, default=None)

    def summary(self) -> str:
        """One line, like a log validator: counts, then the first broken seq and why."""
        text = f"{self.valid}/{self.records} records valid, {self.checkpoints_valid}/{self.checkpoints} checkpoints valid"
        first = self.first_problem
        if first is not None:
            text += f"; first broken seq {first.seq}: {first.reason}"
        return text

    def to_dict(self) -> dict[str, Any]:
        first = self.first_problem
        return {
            "source": self.source,
            "ok": self.ok,
            "records": self.records,
            "valid": self.valid,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "anchor": self.anchor,
            "anchor_checked": self.anchor_checked or None,
            "statement": self.statement,
            "checkpoints": self.checkpoints,
            "checkpoints_valid": self.checkpoints_valid,
            "signed_through": self.signed_through,
            "key_id": self.key_id,
            "key_source": self.key_source,
            "first_broken_seq": first.seq if first else None,
            "first_broken_reason": first.reason if first else None,
            "problems": [{"seq": p.seq, "reason": p.reason, "where": p.where} for p in self.problems],
            "warnings": self.warnings,
        }


class ChainVerifier:
    """Checks records fed in order, from an anchor (the seq and hash just before the first record). No I/O."""

    def __init__(self, *, anchor_seq: int, anchor_hash: str, keep_hashes: Iterable[int] = ()) -> None:
        self.anchor_seq = anchor_seq
        self.anchor_hash = anchor_hash
        self._expected = anchor_seq + 1
        self._prev: str | None = anchor_hash
        self._prev_seq = anchor_seq
        self._keep = set(keep_hashes)
        self.hashes: dict[int, str] = {}  # seq -> stored hash, for the seqs checkpoints sign
        self.retention_through: set[int] = set()
        self.records = 0
        self.valid = 0
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.last_time: str | None = None
        # seq -> time of the record after it, for the anchor and the kept seqs: where an unsigned tail starts.
        self.time_after: dict[int, str] = {}
        self._mark = True  # the next record follows the anchor or a kept seq
        self.problems: list[Problem] = []
        self._link_breaks: list[tuple[int, str]] = []

    @property
    def head(self) -> str | None:
        """The stated hash of the last record fed (the anchor hash before any)."""
        return self._prev

    def _problem(self, seq: int, reason: str, where: str) -> None:
        self.problems.append(Problem(seq, reason, where))

    def feed_lines(self, lines: list[bytes], source: str, first_number: int = 1) -> None:
        """Check many lines (without newlines) from `source`, numbered from `first_number`.

        The common case, an intact record in its place, takes the fast path: one hash over the line's own bytes, one
        JSON parse, a few comparisons. Anything else goes through `feed`, which says what is wrong.
        """
        sha256, scan, keep, member = hashlib.sha256, _SCAN, self._keep, HASH_MEMBER
        expected, prev, mark, time_after = self._expected, self._prev, self._mark, self.time_after
        fast = 0
        last_data = None
        for offset, line in enumerate(lines):
            data = None
            if line[-75:-66] == member and line[-2:] == b'"}':
                claimed = line[-66:-2]
                if sha256(line[:-75] + b"}").hexdigest().encode() == claimed:
                    try:
                        text = line.decode("utf-8")
                        data, end = scan(text, 0)
                        if end != len(text):
                            data = None
                    except (ValueError, StopIteration):
                        data = None
            try:
                intact = (
                    data["seq"] == expected
                    and type(data["seq"]) is int
                    and data["prev"] == prev
                    and type(data["fields"]) is dict
                    and type(data["time"]) is str
                    and type(data["event"]) is str
                    and (len(data) == 6 or (len(data) == 7 and data.get("content_logged") is True))
                )
            except (TypeError, KeyError):
                intact = False
            if intact:
                fast += 1
                last_data = data
                prev = data["hash"]  # type: ignore[index]
                if mark:
                    time_after[expected - 1] = data["time"]  # type: ignore[index]
                    mark = False
                if expected in keep:
                    self.hashes[expected] = prev
                    mark = True
                if data["event"] == "audit.retention":  # type: ignore[index]
                    through = data["fields"].get("removed_through_seq")  # type: ignore[index]
                    if type(through) is int:
                        self.retention_through.add(through)
                expected += 1
                continue
            # Not the common case: hand the state to the careful path and take it back.
            self._mark = mark
            self._sync(expected, prev, fast, last_data)
            fast = 0
            self.feed(line, f"{source}:{first_number + offset}")
            expected, prev, mark = self._expected, self._prev, self._mark
        self._mark = mark
        self._sync(expected, prev, fast, last_data)

    def _sync(self, expected: int, prev: str | None, fast: int, last: Any) -> None:
        if fast:
            self.last_time = last["time"]
            if self.first_seq is None:
                self.first_seq = expected - fast  # a fast run is consecutive seqs ending at expected - 1
            self.records += fast
            self.valid += fast
            self._expected, self._prev, self._prev_seq = expected, prev, expected - 1
            self.last_seq = max(self.last_seq or 0, expected - 1)

    def feed(self, line: bytes, where: str) -> None:
        """Check one complete line (newline optional)."""
        self.records += 1
        expected = self._expected
        try:
            record = parse_record(line)
        except RecordError as exc:
            seq = exc.seq if exc.seq is not None else _claimed_seq(line, expected)
            self._problem(seq, f"record {seq} is not intact: {exc}", where)
            # Carry on from what the line claims, so one bad record does not condemn the rest.
            self._prev, self._prev_seq, self._expected = stated_hash(line), seq, seq + 1
            if seq in self._keep and self._prev is not None:
                self.hashes[seq] = self._prev
            if self.first_seq is None:
                self.first_seq = seq
            self.last_seq = max(self.last_seq or 0, seq)
            return
        seq = record.seq
        if self.first_seq is None:
            self.first_seq = seq
        self.last_time = record.time
        if self._mark:
            self.time_after[seq - 1] = record.time
            self._mark = False
        if seq != expected:
            if seq == self._prev_seq:
                self._problem(seq, f"a second record with seq {seq}: a record was inserted or duplicated", where)
            elif seq > expected:
                missing = f"{expected}" if seq == expected + 1 else f"{expected}..{seq - 1}"
                self._problem(
                    expected,
                    f"seq {missing} missing, found seq {seq} next: deleted record(s), a truncated segment, "
                    "or records out of order",
                    where,
                )
            else:
                self._problem(
                    expected, f"found seq {seq} where seq {expected} belongs: records reordered or inserted", where
                )
        elif self._prev is not None and record.prev != self._prev:
            if self._prev_seq == self.anchor_seq:
                self._problem(
                    seq,
                    f"record {seq} does not link to the anchor hash before it (prev {record.prev[:16]}…, "
                    f"anchor {self.anchor_hash[:16]}…)",
                    where,
                )
            else:
                self._link_breaks.append((seq, where))  # which side is at fault is decided by the checkpoints
        else:
            self.valid += 1
        self._prev, self._prev_seq, self._expected = record.hash, seq, seq + 1
        self.last_seq = max(self.last_seq or 0, seq)
        if seq in self._keep:
            self.hashes[seq] = record.hash
            self._mark = True
        if record.event == "audit.retention":
            through = record.fields.get("removed_through_seq")
            if type(through) is int:
                self.retention_through.add(through)

    def settle_link_breaks(self, vouched: set[int]) -> None:
        """Name the record at fault where record k+1 does not link to record k: k+1 when a checkpoint vouches for
        record k as it stands (so k+1 was replaced or inserted), else k (changed and re-hashed, or k+1 replaced)."""
        for seq, where in self._link_breaks:
            if seq - 1 in vouched:
                self._problem(
                    seq,
                    f"record {seq} does not link to record {seq - 1}, which a signed checkpoint vouches for: "
                    f"record {seq} was replaced or inserted",
                    where,
                )
            else:
                self._problem(
                    seq - 1,
                    f"record {seq} does not link to record {seq - 1} as it stands: record {seq - 1} was changed "
                    f"and re-hashed, or record {seq} was replaced",
                    where,
                )
        self._link_breaks.clear()

    def incomplete(self, length: int, where: str) -> None:
        """Bytes after the last newline: a torn write not yet set aside, or a segment cut mid-record."""
        seq = self._expected
        self._problem(
            seq,
            f"incomplete last line ({length} bytes without a newline): a torn write not yet set aside "
            "(`sealbox serve` does that at start) or a truncated segment",
            where,
        )


def _claimed_seq(line: bytes, default: int) -> int:
    match = _SEQ.search(line)
    return int(match.group(1)) if match else default


@dataclass(frozen=True)
class _LoadedCheckpoint:
    where: str
    checkpoint: Checkpoint | None
    error: str = ""


def check_checkpoints(
    report: VerificationReport,
    chain: ChainVerifier,
    checkpoints: list[_LoadedCheckpoint],
    public: Ed25519PublicKey,
) -> set[int]:
    """Signatures first, then each signed (size, head) against the records; results go into `report`.

    Returns the seqs whose stored hash a valid checkpoint (or a signed anchor) vouches for."""
    expected_key = key_id(public)
    vouched: set[int] = set()
    matched = chain.anchor_seq  # the newest seq a valid checkpoint (or the anchor) vouches for
    last = chain.last_seq if chain.last_seq is not None else chain.anchor_seq
    ordered = sorted(checkpoints, key=lambda item: item.checkpoint.size if item.checkpoint else -1)
    for item in ordered:
        report.checkpoints += 1
        checkpoint = item.checkpoint
        if checkpoint is None:
            report.problems.append(Problem(matched + 1, f"unreadable checkpoint: {item.error}", item.where))
            continue
        size = checkpoint.size
        if checkpoint.key != expected_key:
            report.problems.append(
                Problem(
                    size,
                    f"checkpoint at seq {size} names key {checkpoint.key[:16]}…, not the key checked "
                    f"({expected_key[:16]}…): the wrong public key, or a checkpoint forged with another key",
                    item.where,
                )
            )
            continue
        if not checkpoint.signature_holds(public):
            report.problems.append(
                Problem(size, f"checkpoint at seq {size}: signature does not verify (forged or altered)", item.where)
            )
            continue
        if size < chain.anchor_seq:
            report.checkpoints_valid += 1  # signs records before this log or export begins: nothing to match
            continue
        if size == chain.anchor_seq:
            if checkpoint.head != chain.anchor_hash:
                report.problems.append(
                    Problem(
                        size + 1,
                        f"the anchor hash before seq {size + 1} differs from the head signed at seq {size}",
                        item.where,
                    )
                )
                continue
        elif size > last:
            report.problems.append(
                Problem(
                    last + 1,
                    f"checkpoint signed {size} records but the log ends at seq {last}: records {last + 1}..{size} "
                    "were removed (truncated)",
                    item.where,
                )
            )
            continue
        elif size not in chain.hashes:
            report.problems.append(
                Problem(size, f"record {size}, signed by the checkpoint at seq {size}, is missing", item.where)
            )
            continue
        elif chain.hashes[size] != checkpoint.head:
            report.problems.append(
                Problem(
                    matched + 1,
                    f"records {matched + 1}..{size} do not hash to the head signed at seq {size}: "
                    "rewritten or replaced after they were signed",
                    item.where,
                )
            )
            continue
        report.checkpoints_valid += 1
        vouched.add(size)
        matched = max(matched, size)
    report.signed_through = matched
    return vouched


def check_start(report: VerificationReport, chain: ChainVerifier, vouched: set[int], where: str) -> None:
    """The first record must hang from a signed checkpoint: genesis (size 0) for a log from seq 1. A new log is
    signed at genesis before its first record, so a log without that checkpoint had its checkpoints removed."""
    if chain.anchor_seq == 0 and 0 not in vouched and chain.last_seq is not None:
        report.problems.append(
            Problem(
                1,
                "no valid signed genesis checkpoint (size 0) anchors the log: every log is signed at genesis before "
                "its first record, so its checkpoints were deleted or forged",
                where,
            )
        )


def check_coverage(
    report: VerificationReport, chain: ChainVerifier, bound: TailBound | None, where: str
) -> None:
    """Every record must be covered by a valid checkpoint, but for a live tail within `bound`; with no bound
    (an export), to the very last record."""
    last = chain.last_seq
    signed = report.signed_through
    if last is None or last <= signed:
        return
    if bound is None:
        report.problems.append(
            Problem(
                signed + 1,
                f"records {signed + 1}..{last} are not covered by a valid signed checkpoint: an export is covered to "
                "its last record, so its checkpoints were removed or the records were changed",
                where,
            )
        )
        return
    why = bound.excess(last - signed, chain.time_after.get(signed), chain.last_time)
    if why is not None:
        report.problems.append(
            Problem(
                signed + 1,
                f"records {signed + 1}..{last} are not covered by a valid signed checkpoint and are no live tail: "
                f"{why} (checkpoints that must have existed are missing)",
                where,
            )
        )


def check_anchor(
    report: VerificationReport,
    chain: ChainVerifier,
    checkpoints: list[_LoadedCheckpoint],
    anchor: Anchor,
    public: Ed25519PublicKey,
    where: str,
) -> None:
    """The log (or export) must extend `anchor`: hold, at its size, the record whose hash it signed."""
    report.anchor_checked = f"size {anchor.size} head {anchor.head}"
    why = anchor.check(public)
    size, head = anchor.size, anchor.head
    if why is None:
        last = chain.last_seq if chain.last_seq is not None else chain.anchor_seq
        if size > last:
            why = (
                f"the anchor covers {size} records but the log ends at seq {last}: the log was rolled back or wiped "
                "and restarted"
            )
        elif size == chain.anchor_seq:
            if chain.anchor_hash != head:
                why = f"the hash before seq {size + 1} is not the one the anchor signed: not the log anchored"
        elif size > chain.anchor_seq:
            if chain.hashes.get(size) != head:
                why = (
                    f"record {size} is not the one the anchor signed: the log was rewritten, or wiped and restarted"
                )
        elif not any(
            item.checkpoint is not None
            and item.checkpoint.size == size
            and item.checkpoint.head == head
            and item.checkpoint.signature_holds(public)
            for item in checkpoints
        ):
            why = (
                f"the log starts after seq {size} and no checkpoint in it matches the anchor: cannot show it extends it"
            )
    if why is not None:
        report.problems.append(Problem(min(size + 1, (chain.last_seq or 0) + 1), f"anchor: {why}", where))


def _finish(report: VerificationReport, chain: ChainVerifier) -> VerificationReport:
    report.records, report.valid = chain.records, chain.valid
    report.first_seq, report.last_seq = chain.first_seq, chain.last_seq
    report.problems = sorted(chain.problems + report.problems, key=lambda problem: problem.seq)
    if len(report.problems) > MAX_PROBLEMS:
        report.warnings.append(f"{len(report.problems) - MAX_PROBLEMS} further problem(s) not listed")
        report.problems = report.problems[:MAX_PROBLEMS]
    if chain.last_seq is not None and report.signed_through < chain.last_seq:
        report.warnings.append(
            f"records {report.signed_through + 1}..{chain.last_seq} follow the last valid checkpoint: "
            "chained but not yet signed"
        )
    if report.records == 0:
        report.warnings.append("no records")
    return report


def _resolve_key(
    pinned: Path | None, fallback_pem: bytes | None, fallback_source: str
) -> tuple[Ed25519PublicKey, str, list[str]]:
    if pinned is not None:
        return read_public_key(pinned), f"pinned: {pinned}", []
    if fallback_pem is None:
        raise AuditFormatError(f"no public key: {fallback_source} is missing; pass --pubkey")
    warning = (
        f"the public key was taken from {fallback_source}: pass --pubkey with a copy obtained independently "
        "to rule out a log re-signed with another key"
    )
    return load_public_key(fallback_pem, source=fallback_source), fallback_source, [warning]


def _load_checkpoints(lines: Iterable[tuple[str, bytes]]) -> list[_LoadedCheckpoint]:
    loaded = []
    for where, line in lines:
        try:
            loaded.append(_LoadedCheckpoint(where, Checkpoint.from_line(line)))
        except ValueError as exc:
            loaded.append(_LoadedCheckpoint(where, None, str(exc)))
    return loaded


def _segment_lines(path: Path) -> tuple[list[bytes], bytes]:
    data = path.read_bytes()
    lines = data.split(b"\n")
    return lines[:-1], lines[-1]


def verify_directory(
    directory: Path, *, pubkey: Path | None = None, bound: TailBound | None = None, anchor: Path | None = None
) -> VerificationReport:
    """Verify a host's audit directory: every segment, every checkpoint, from seq 1 or the retention anchor; every
    record but a live tail within `bound` covered by a valid checkpoint; and, given an `anchor` note, that the log
    extends it.

    Raises:
        AuditFormatError: the directory, a file in it, the public key or the anchor cannot be read.
    """
    try:
        return _verify_directory(directory, pubkey, bound or TailBound(), _read_anchor(anchor))
    except OSError as exc:
        raise AuditFormatError(f"{exc.filename or directory}: cannot read: {exc.strerror or exc}") from exc


def _read_anchor(path: Path | None) -> Anchor | None:
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditFormatError(f"{path}: cannot read the anchor: {exc}") from exc
    return Anchor.parse(text, source=str(path))


def _verify_directory(
    directory: Path, pubkey: Path | None, bound: TailBound, anchor: Anchor | None
) -> VerificationReport:
    if not directory.is_dir():
        raise AuditFormatError(f"{directory}: not an audit directory")
    report = VerificationReport(source=str(directory))
    pub_path = directory / PUBLIC_KEY_NAME
    public, report.key_source, report.warnings = _resolve_key(
        pubkey, pub_path.read_bytes() if pub_path.exists() else None, str(pub_path)
    )
    report.key_id = key_id(public)
    cp_data = (directory / CHECKPOINTS_NAME).read_bytes() if (directory / CHECKPOINTS_NAME).exists() else b""
    cp_lines = cp_data.split(b"\n")
    checkpoints = _load_checkpoints(
        (f"{CHECKPOINTS_NAME}:{number}", line) for number, line in enumerate(cp_lines[:-1], start=1)
    )
    if cp_lines[-1]:
        checkpoints.append(_LoadedCheckpoint(f"{CHECKPOINTS_NAME}:{len(cp_lines)}", None, "incomplete last line"))
    segments = list_segments(directory)
    anchor_seq, anchor_hash = 0, GENESIS
    if segments:
        with segments[0].path.open("rb") as handle:
            first_line = handle.readline()
        try:
            first = parse_record(first_line)
        except RecordError:
            first = None
        if first is not None and first.seq > 1:
            anchor_seq, anchor_hash = first.seq - 1, first.prev
    sizes = {item.checkpoint.size for item in checkpoints if item.checkpoint}
    if anchor is not None:
        sizes.add(anchor.size)
    chain = ChainVerifier(anchor_seq=anchor_seq, anchor_hash=anchor_hash, keep_hashes=sizes)
    for segment in segments:
        lines, rest = _segment_lines(segment.path)
        name = segment.name
        chain.feed_lines(lines, name)
        if rest:
            chain.incomplete(len(rest), f"{name}:{len(lines) + 1}")
    vouched = check_checkpoints(report, chain, checkpoints, public)
    chain.settle_link_breaks(vouched)
    check_start(report, chain, vouched, CHECKPOINTS_NAME)
    check_coverage(report, chain, bound, CHECKPOINTS_NAME)
    if anchor is not None:
        check_anchor(report, chain, checkpoints, anchor, public, "--anchor")
    if anchor_seq == 0:
        report.anchor = "genesis (the log starts at seq 1)"
    else:
        report.anchor = f"seq {anchor_seq} hash {anchor_hash} (earlier records removed by retention)"
        anchored = any(
            item.checkpoint is not None
            and item.checkpoint.size == anchor_seq
            and item.checkpoint.head == anchor_hash
            and item.checkpoint.key == report.key_id
            and item.checkpoint.signature_holds(public)
            for item in checkpoints
        )
        if not anchored:
            report.problems.append(
                Problem(
                    anchor_seq + 1,
                    f"the log starts at seq {anchor_seq + 1} but no valid checkpoint signed at seq {anchor_seq} "
                    "commits to its prev hash: its leading segments were removed without an anchor",
                    segments[0].name,
                )
            )
        elif anchor_seq not in chain.retention_through:
            report.problems.append(
                Problem(
                    anchor_seq + 1,
                    f"the log starts at seq {anchor_seq + 1} but no audit.retention record declares the removal "
                    f"of records 1..{anchor_seq}: leading segments were deleted outside retention",
                    segments[0].name,
                )
            )
    return _finish(report, chain)


# -- exports ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportHeader:
    """The first line of a JSONL export (or the CSV's `.verify.json` companion): what verifying offline needs."""

    data: dict[str, Any]

    @property
    def anchor(self) -> tuple[int, str]:
        anchor = self.data["anchor"]
        return anchor["seq"], anchor["hash"]

    @classmethod
    def parse(cls, raw: bytes, *, source: str) -> "ExportHeader":
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise AuditFormatError(f"{source}: the export header is not JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise AuditFormatError(f"{source}: not a sealbox audit export (no '{EXPORT_FORMAT}' header)")
        anchor = data.get("anchor")
        if (
            not isinstance(anchor, dict)
            or type(anchor.get("seq")) is not int
            or not isinstance(anchor.get("hash"), str)
            or not isinstance(data.get("checkpoints"), list)
            or not isinstance(data.get("public_key"), str)
        ):
            raise AuditFormatError(f"{source}: the export header lacks anchor, checkpoints or public_key")
        return cls(data)


def companion_path(csv_path: Path) -> Path:
    """Where a CSV export's header lives: `<file>.verify.json` next to it."""
    return csv_path.with_name(csv_path.name + ".verify.json")


def verify_export(path: Path, *, pubkey: Path | None = None, anchor: Path | None = None) -> VerificationReport:
    """Verify a JSONL export, or a CSV export with its `.verify.json` companion, offline: the chain, its checkpoints
    to the last record, the signed statement of what the export is, and, given an `anchor` note, that it extends it.

    Raises:
        AuditFormatError: the file is not an export, its companion is missing, or the key or anchor cannot be read.
    """
    note = _read_anchor(anchor)
    try:
        if path.suffix.lower() == ".csv":
            companion = companion_path(path)
            if not companion.exists():
                raise AuditFormatError(f"{path}: its companion {companion.name} (anchor, checkpoints, key) is missing")
            header = ExportHeader.parse(companion.read_bytes(), source=str(companion))
            lines: Iterator[tuple[str, bytes]] | None = _csv_lines(path)
            rest, parts = b"", []
        else:
            with path.open("rb") as handle:
                header = ExportHeader.parse(handle.readline(), source=str(path))
                body = handle.read()
            parts = body.split(b"\n")
            rest = parts[-1]
            lines = None
    except OSError as exc:
        raise AuditFormatError(f"{path}: cannot read: {exc.strerror}") from exc
    report = VerificationReport(source=str(path))
    public, report.key_source, report.warnings = _resolve_key(
        pubkey, header.data["public_key"].encode(), f"the export's own public_key ({path.name})"
    )
    report.key_id = key_id(public)
    checkpoints = _load_checkpoints(
        (f"header checkpoint #{number}", canonical(item)) for number, item in enumerate(header.data["checkpoints"], 1)
    )
    anchor_seq, anchor_hash = header.anchor
    sizes = {item.checkpoint.size for item in checkpoints if item.checkpoint}
    if note is not None:
        sizes.add(note.size)
    chain = ChainVerifier(anchor_seq=anchor_seq, anchor_hash=anchor_hash, keep_hashes=sizes)
    if lines is None:
        chain.feed_lines(parts[:-1], path.name, first_number=2)
    else:
        for where, line in lines:
            chain.feed(line, where)
    if rest:
        chain.incomplete(len(rest), f"{path.name}: end of file")
    chain.settle_link_breaks(check_checkpoints(report, chain, checkpoints, public))
    report.anchor = "genesis (the export starts at seq 1)" if anchor_seq == 0 else f"seq {anchor_seq} hash {anchor_hash}"
    check_coverage(report, chain, None, path.name)
    check_statement(report, chain, header, public, path.name)
    if note is not None:
        check_anchor(report, chain, checkpoints, note, public, "--anchor")
    return _finish(report, chain)


STATEMENT_FIELDS = ("anchor", "first_seq", "head", "key", "last_seq", "records", "window")


def export_statement(
    *, window: dict[str, Any], anchor: tuple[int, str], first_seq: int | None, last_seq: int | None, records: int,
    head: str, key: str,
) -> dict[str, Any]:
    """What an export is, as the host signs it: the window asked for, the anchor it hangs from, the first and last
    seq, the record count and the hash of its last record. Cutting either end changes one of them."""
    return {
        "anchor": {"seq": anchor[0], "hash": anchor[1]},
        "first_seq": first_seq,
        "head": head,
        "key": key,
        "last_seq": last_seq,
        "records": records,
        "window": window,
    }


def check_statement(
    report: VerificationReport, chain: ChainVerifier, header: ExportHeader, public: Ed25519PublicKey, where: str
) -> None:
    """The export must be what the host signed it to be: a valid statement, matched by the records themselves."""
    statement = header.data.get("statement")
    first = chain.first_seq if chain.first_seq is not None else chain.anchor_seq + 1
    if not isinstance(statement, dict) or set(statement) != set(STATEMENT_FIELDS):
        report.problems.append(Problem(first, "the export carries no signed statement of what it is", where))
        return
    if not statement_holds(statement, header.data.get("statement_sig"), public):
        report.problems.append(
            Problem(first, "the export statement's signature does not verify (forged or altered)", where)
        )
        return
    report.statement = statement
    anchor_seq, anchor_hash = header.anchor
    found = {
        "anchor": {"seq": anchor_seq, "hash": anchor_hash},
        "first_seq": chain.first_seq,
        "last_seq": chain.last_seq,
        "records": chain.records,
        "head": chain.head,
    }
    for name, value in found.items():
        if statement[name] != value:
            # Name the end that was cut: the first seq signed for a change at the start, the one after the end else.
            seq = first if name in ("anchor", "first_seq") else (chain.last_seq or anchor_seq) + 1
            report.problems.append(
                Problem(
                    seq,
                    f"the export is not what the host signed: {name} is {value!r} in the file but {statement[name]!r} "
                    "in the signed statement (records cut at either end, or changed)",
                    where,
                )
            )
            return


CSV_COLUMNS = (
    "seq", "time", "event", "principal", "purpose", "model", "model_sha256", "client", "status", "prompt_tokens",
    "completion_tokens", "latency_ms", "request_id", "content_logged", "fields", "prev", "hash",
)  # fmt: skip


def _csv_lines(path: Path) -> Iterator[tuple[str, bytes]]:
    """Rebuild each record's canonical line from its CSV row: seq, time, event, fields, prev, content_logged and hash
    are authoritative; the other columns are conveniences for spreadsheets and are not checked."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or ()
        missing = [name for name in ("seq", "time", "event", "fields", "prev", "hash") if name not in columns]
        if missing:
            raise AuditFormatError(f"{path}: not a sealbox audit CSV export: missing column(s) {', '.join(missing)}")
        for number, row in enumerate(reader, start=2):
            try:
                seq = int(row["seq"])
            except ValueError:
                seq = 0
            line, _ = encode_record(
                seq=seq,
                time=row["time"],
                event_json=canonical(row["event"]),
                fields_json=row["fields"].encode("utf-8"),
                prev=row["prev"],
                content_logged=row.get("content_logged") == "true",
            )
            # Put the row's own hash in place of the recomputed one: the verifier checks it against the content.
            yield f"{path.name}:{number}", line[:-67] + row["hash"].encode("ascii", "replace") + b'"}\n'


def verify_path(
    target: Path, *, pubkey: Path | None = None, bound: TailBound | None = None, anchor: Path | None = None
) -> VerificationReport:
    """A directory is a host's log; a file is an export (which has no live tail: `bound` does not apply)."""
    if target.is_dir():
        return verify_directory(target, pubkey=pubkey, bound=bound, anchor=anchor)
    return verify_export(target, pubkey=pubkey, anchor=anchor)

