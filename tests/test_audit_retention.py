"""Retention removes whole segments past the policy's days, only where a signed checkpoint anchors what remains,
and the retained log still verifies from its first record. The log's clock is moved, not the machine's."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sealbox.runtime.audit.log import AuditLog
from sealbox.runtime.audit.segment import list_segments
from sealbox.runtime.audit.verify import verify_directory
from sealbox.runtime.policy import AuditPolicy

START = datetime(2025, 1, 10, 9, 0, tzinfo=UTC)


class Clock:
    """The time the log stamps records with; a test moves it forward."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def open_log(directory: Path, clock: Clock, days: int = 365) -> AuditLog:
    return AuditLog.open(directory, AuditPolicy(retention_days=days), clock=clock, segment_max_records=5)


def fill(directory: Path, clock: Clock, count: int) -> None:
    with open_log(directory, clock) as log:
        for n in range(count):
            log.append("api.request", request_id=f"req-{n}", principal="alice")


def first_seqs(directory: Path) -> list[int]:
    return [segment.first_seq for segment in list_segments(directory)]


def records(directory: Path) -> list[dict]:
    return [json.loads(line) for s in list_segments(directory) for line in s.path.read_bytes().splitlines()]


def test_segments_past_retention_go_and_the_rest_verifies_from_a_signed_anchor(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    clock = Clock(START)
    fill(directory, clock, 12)  # segments 1-5, 6-10, 11-12, all on 2025-01-10
    clock.now = START + timedelta(days=100)
    fill(directory, clock, 3)  # a new day: segment 13-15
    assert first_seqs(directory) == [1, 6, 11, 13]

    clock.now = START + timedelta(days=366)  # the January records are past one year; the April ones are not
    open_log(directory, clock).close()

    assert first_seqs(directory)[0] == 13
    kept = records(directory)
    retention = [r for r in kept if r["event"] == "audit.retention"]
    assert [r["fields"]["removed_through_seq"] for r in retention] == [12]
    assert retention[0]["fields"]["segments"] == [
        "segment-000000000001-20250110.jsonl",
        "segment-000000000006-20250110.jsonl",
        "segment-000000000011-20250110.jsonl",
    ]
    report = verify_directory(directory)
    assert report.ok, report.problems
    assert report.first_seq == 13 and "seq 12" in report.anchor


def test_a_segment_that_becomes_old_by_the_retention_record_itself_goes_in_the_same_pass(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    clock = Clock(START)
    fill(directory, clock, 12)  # 1-5, 6-10, 11-12: the newest segment is never removed while it holds the head
    clock.now = START + timedelta(days=400)
    open_log(directory, clock).close()
    # The retention record opened a new segment, so 11-12 was no longer the newest and went too.
    assert [r["fields"]["removed_through_seq"] for r in records(directory) if r["event"] == "audit.retention"] == [
        10,
        12,
    ]
    assert first_seqs(directory) == [13]
    assert verify_directory(directory).ok


def test_nothing_is_removed_where_no_signed_checkpoint_anchors_the_boundary(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    clock = Clock(START)
    fill(directory, clock, 12)
    genesis = (directory / "checkpoints.jsonl").read_bytes().splitlines(keepends=True)[0]
    (directory / "checkpoints.jsonl").write_bytes(genesis)  # no anchor for any boundary
    clock.now = START + timedelta(days=400)
    open_log(directory, clock).close()
    assert first_seqs(directory)[0] == 1
    assert not any(r["event"] == "audit.retention" for r in records(directory))
    assert verify_directory(directory).ok


def test_records_within_retention_are_kept(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    clock = Clock(START)
    fill(directory, clock, 12)
    clock.now = START + timedelta(days=364)
    open_log(directory, clock).close()
    assert first_seqs(directory)[:3] == [1, 6, 11]


def test_leading_segments_deleted_by_hand_fail_verification_although_a_checkpoint_anchors_them(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    clock = Clock(START)
    fill(directory, clock, 12)
    list_segments(directory)[0].path.unlink()  # seqs 1-5 gone, without an audit.retention record
    report = verify_directory(directory)
    assert report.first_problem is not None and report.first_problem.seq == 6
    assert "no audit.retention record" in report.first_problem.reason
