"""Reading a real server's audit log back in tests: every line parsed, its own hash checked (runtime.audit.record)."""

from __future__ import annotations

from pathlib import Path

from sealbox.runtime.audit.record import Record, parse_record
from sealbox.runtime.audit.segment import list_segments


def audit_records(audit_dir: Path) -> list[Record]:
    """Every record in the log's segments, in chain order; a line that is not an intact record fails the test."""
    lines = [line for segment in list_segments(audit_dir) for line in segment.path.read_bytes().splitlines()]
    return [parse_record(line) for line in lines]


def records_of(audit_dir: Path, request_id: str) -> list[Record]:
    return [record for record in audit_records(audit_dir) if record.fields.get("request_id") == request_id]


def the_record_of(audit_dir: Path, request_id: str) -> Record:
    """The one record of a request; fails when there is none or more than one."""
    found = records_of(audit_dir, request_id)
    assert len(found) == 1, f"{len(found)} records of {request_id}: {found}"
    return found[0]


def audit_bytes(audit_dir: Path) -> bytes:
    """Every byte of every file in the audit directory (segments, checkpoints, keys, set-aside tails)."""
    return b"".join(path.read_bytes() for path in sorted(audit_dir.rglob("*")) if path.is_file())
