"""Tampering with a closed log is detected, and the verifier names the sequence number where it happened.

The log under attack: 40 records in four segments of 10 (1-10, 11-20, 21-30, 31-40), a checkpoint every 5 records
and one at every segment boundary, verified against a copy of the public key kept apart from the log.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealbox.runtime.audit.checkpoint import AuditKey, Checkpoint
from sealbox.runtime.audit.errors import AuditUnavailableError
from sealbox.runtime.audit.log import AuditLog
from sealbox.runtime.audit.record import canonical, encode_record
from sealbox.runtime.audit.segment import list_segments
from sealbox.runtime.audit.verify import VerificationReport, verify_directory
from sealbox.runtime.policy import AuditPolicy

PRINCIPALS = ("alice", "bob", "carol", "dave")


def build_log(directory: Path, count: int = 40) -> None:
    with AuditLog.open(directory, AuditPolicy(checkpoint_every_records=5), segment_max_records=10) as log:
        for n in range(count):
            log.append("api.request", request_id=f"req-{n + 1}", principal=PRINCIPALS[n % 4], status=200)


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "audit"
    build_log(directory)
    return directory


@pytest.fixture
def pubkey(log_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "host-audit.pub"
    copy.write_bytes((log_dir / "audit-key.pub").read_bytes())
    return copy


def segment(directory: Path, index: int) -> Path:
    return list_segments(directory)[index].path


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def locate(directory: Path, seq: int) -> tuple[Path, int]:
    for found in list_segments(directory):
        for index, line in enumerate(read_lines(found.path)):
            if json.loads(line)["seq"] == seq:
                return found.path, index
    raise AssertionError(f"seq {seq} not in the log")


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


@contextmanager
def segment_lines(directory: Path, seq: int) -> Iterator[tuple[list[bytes], int]]:
    """The lines of the segment that holds record `seq` and its index there, for the block to edit as a forger would;
    the edited lines are written back when the block ends."""
    path, index = locate(directory, seq)
    lines = read_lines(path)
    yield lines, index
    rewrite(path, lines)


def forged_line(seq: int, prev: str, principal: str = "mallory") -> tuple[bytes, str]:
    fields = {"request_id": f"forged-{seq}", "principal": principal, "status": 200}
    return encode_record(
        seq=seq,
        time="2030-01-01T00:00:00.000000Z",
        event_json=canonical("api.request"),
        fields_json=canonical(fields),
        prev=prev,
        content_logged=False,
    )


def first_broken(report: VerificationReport) -> int:
    assert not report.ok, "tampering went unnoticed"
    assert report.first_problem is not None
    return report.first_problem.seq


def test_the_untouched_log_verifies(log_dir: Path, pubkey: Path) -> None:
    report = verify_directory(log_dir, pubkey=pubkey)
    assert report.ok, report.problems
    assert report.summary() == "40/40 records valid, 9/9 checkpoints valid"  # genesis, then every 5
    assert report.signed_through == 40 and report.warnings == []


def test_editing_a_field_names_the_edited_record(log_dir: Path, pubkey: Path) -> None:
    with segment_lines(log_dir, 17) as (lines, index):
        lines[index] = lines[index].replace(b'"principal":"alice"', b'"principal":"nobody"')
    report = verify_directory(log_dir, pubkey=pubkey)
    assert first_broken(report) == 17
    assert "changed after it was written" in report.first_problem.reason
    assert report.summary().startswith("39/40 records valid")


def test_editing_a_field_and_recomputing_its_hash_still_names_that_record(log_dir: Path, pubkey: Path) -> None:
    with segment_lines(log_dir, 17) as (lines, index):
        record = json.loads(lines[index])
        lines[index], _ = forged_line(17, record["prev"], principal="nobody")
    assert first_broken(verify_directory(log_dir, pubkey=pubkey)) == 17


def test_deleting_a_record_names_the_missing_seq(log_dir: Path, pubkey: Path) -> None:
    with segment_lines(log_dir, 23) as (lines, index):
        del lines[index]
    report = verify_directory(log_dir, pubkey=pubkey)
    assert first_broken(report) == 23
    assert "seq 23 missing" in report.first_problem.reason


def test_inserting_a_record_names_the_seq_it_took(log_dir: Path, pubkey: Path) -> None:
    with segment_lines(log_dir, 17) as (lines, index):
        # The forger links the new record to record 17 correctly and gives it the next seq.
        line, _ = forged_line(18, json.loads(lines[index])["hash"])
        lines.insert(index + 1, line)
    report = verify_directory(log_dir, pubkey=pubkey)
    assert first_broken(report) == 18
    assert "second record with seq 18" in report.first_problem.reason


def test_swapping_two_records_names_the_first_position_out_of_order(log_dir: Path, pubkey: Path) -> None:
    with segment_lines(log_dir, 26) as (lines, index):
        lines[index], lines[index + 1] = lines[index + 1], lines[index]
    report = verify_directory(log_dir, pubkey=pubkey)
    assert first_broken(report) == 26


def test_truncating_a_middle_segment_names_the_first_lost_seq(log_dir: Path, pubkey: Path) -> None:
    path = segment(log_dir, 1)  # seqs 11-20
    rewrite(path, read_lines(path)[:-3])
    report = verify_directory(log_dir, pubkey=pubkey)
    assert first_broken(report) == 18
    assert "18..20 missing" in report.first_problem.reason


def test_truncating_the_last_segment_is_caught_by_the_checkpoint_that_signed_the_lost_records(
    log_dir: Path, pubkey: Path
) -> None:
    path = segment(log_dir, 3)  # seqs 31-40
    rewrite(path, read_lines(path)[:-2])
    report = verify_directory(log_dir, pubkey=pubkey)
    assert first_broken(report) == 39
    assert "log ends at seq 38" in report.first_problem.reason


def test_cutting_the_last_segment_mid_record_names_that_record(log_dir: Path, pubkey: Path) -> None:
    path = segment(log_dir, 3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    report = verify_directory(log_dir, pubkey=pubkey)
    assert first_broken(report) == 40
    assert "incomplete last line" in report.first_problem.reason


def test_replacing_a_segment_with_one_from_another_log_names_its_first_seq(
    log_dir: Path, pubkey: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    build_log(other)
    shutil.copyfile(segment(other, 1), segment(log_dir, 1))
    report = verify_directory(log_dir, pubkey=pubkey)
    assert first_broken(report) == 11


def test_replacing_a_segment_with_a_consistently_rechained_forgery_names_its_first_seq(
    log_dir: Path, pubkey: Path
) -> None:
    path = segment(log_dir, 3)  # seqs 31-40: the forger rewrites every record and re-links the whole segment
    prev = json.loads(read_lines(segment(log_dir, 2))[-1])["hash"]
    forged = []
    for line in read_lines(path):
        line, prev = forged_line(json.loads(line)["seq"], prev)
        forged.append(line)
    rewrite(path, forged)
    report = verify_directory(log_dir, pubkey=pubkey)
    assert report.valid == 40  # every record is internally consistent: only the signatures catch this
    assert first_broken(report) == 31
    assert "rewritten or replaced" in report.first_problem.reason


def test_a_forged_checkpoint_over_appended_records_names_the_seq_it_claims(log_dir: Path, pubkey: Path) -> None:
    path = segment(log_dir, 3)
    last = json.loads(read_lines(path)[-1])
    line, head = forged_line(41, last["hash"])
    rewrite(path, [*read_lines(path), line])
    # The forger has no host key: they sign with their own and claim the host's key id.
    forger = AuditKey(Ed25519PrivateKey.generate()).sign(41, head, "2030-01-01T00:00:00.000000Z")
    host_id = Checkpoint.from_line((log_dir / "checkpoints.jsonl").read_bytes().splitlines()[0]).key
    forged = Checkpoint(forger.size, forger.head, forger.time, host_id, forger.sig)
    with (log_dir / "checkpoints.jsonl").open("ab") as handle:
        handle.write(forged.to_line())
    report = verify_directory(log_dir, pubkey=pubkey)
    assert first_broken(report) == 41
    assert "signature does not verify" in report.first_problem.reason


def test_altering_a_checkpoint_names_the_seq_it_covers(log_dir: Path, pubkey: Path) -> None:
    path = log_dir / "checkpoints.jsonl"
    lines = read_lines(path)
    index = next(i for i, line in enumerate(lines) if Checkpoint.from_line(line).size == 25)
    original = Checkpoint.from_line(lines[index])
    lines[index] = Checkpoint(original.size, "0" * 64, original.time, original.key, original.sig).to_line()
    rewrite(path, lines)
    report = verify_directory(log_dir, pubkey=pubkey)
    assert first_broken(report) == 25


def test_verifying_with_the_wrong_key_fails_at_the_genesis_checkpoint(log_dir: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pub"
    wrong.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    report = verify_directory(log_dir, pubkey=wrong)
    assert first_broken(report) == 0
    assert "wrong public key" in report.first_problem.reason
    assert report.checkpoints_valid == 0 and report.valid == 40


def test_a_log_whose_key_and_checkpoints_were_deleted_is_never_signed_again(log_dir: Path, pubkey: Path) -> None:
    # A root attacker who replaces key and checkpoints cannot have the next writer re-sign the log with a fresh key:
    # every log is signed at genesis, so records without any checkpoint lost theirs, and the writer refuses.
    (log_dir / "audit-key").unlink()
    (log_dir / "audit-key.pub").unlink()
    (log_dir / "checkpoints.jsonl").unlink()
    with pytest.raises(AuditUnavailableError, match="holds no checkpoint"):
        AuditLog.open(log_dir, AuditPolicy(), retention=False)
    assert first_broken(verify_directory(log_dir)) == 1
    assert first_broken(verify_directory(log_dir, pubkey=pubkey)) == 1
