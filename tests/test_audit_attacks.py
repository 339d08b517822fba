"""The attacks on the audit log, played through the real CLI: `sealbox audit verify | export | anchor`.

The attacker can write every file in `<root>/audit` but has no copy of the host audit key's private half that the
auditor trusts (the auditor pins the public key, and keeps an anchor off the host). The log under attack: 30 records,
20 s apart, a checkpoint every 10 records (and one at genesis).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sealbox.runtime.audit.errors import AuditUnavailableError
from sealbox.runtime.audit.log import AuditLog
from sealbox.runtime.audit.record import canonical, encode_record
from sealbox.runtime.audit.segment import list_segments
from sealbox.runtime.policy import AuditPolicy
from server_support import ServerProcess

SEALBOX = [sys.executable, "-c", "from sealbox.cli import main; main()"]
START = datetime(2025, 6, 2, 9, 0, tzinfo=UTC)
POLICY = AuditPolicy(checkpoint_every_records=10)


class Clock:
    """Stamps records 20 s apart, so 30 records span ten minutes: more than the default tail bound of 300 s."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def sealbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SEALBOX, "audit", *args], capture_output=True, text=True, timeout=120)


def append(directory: Path, clock: Clock, first: int, count: int) -> None:
    with AuditLog.open(directory, POLICY, clock=clock, retention=False) as log:
        for n in range(first, first + count):
            clock.now = START + timedelta(seconds=20 * n)
            log.append("api.request", request_id=f"req-{n}", principal="alice", status=200)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    append(tmp_path / "root" / "audit", Clock(), 1, 30)
    return tmp_path / "root"


@pytest.fixture
def pubkey(root: Path, tmp_path: Path) -> Path:
    """The auditor's own copy of the host's public key, taken before the attack."""
    copy = tmp_path / "host-audit.pub"
    copy.write_bytes((root / "audit" / "audit-key.pub").read_bytes())
    return copy


def log_lines(root: Path) -> tuple[Path, list[bytes]]:
    (segment,) = list_segments(root / "audit")  # one day, one segment
    return segment.path, segment.path.read_bytes().splitlines()


def rechain(lines: list[bytes], prev: str) -> list[bytes]:
    """Re-hash records from their content, each linked to the one before: what a forger does after an edit."""
    out = []
    for line in lines:
        record = json.loads(line)
        new, prev = encode_record(
            seq=record["seq"],
            time=record["time"],
            event_json=canonical(record["event"]),
            fields_json=canonical(record["fields"]),
            prev=prev,
            content_logged=bool(record.get("content_logged")),
        )
        out.append(new.rstrip(b"\n"))
    return out


def edit_and_rechain(lines: list[bytes], index: int, prev: str) -> list[bytes]:
    lines = list(lines)
    lines[index] = lines[index].replace(b'"principal":"alice"', b'"principal":"mallory"')
    return lines[:index] + rechain(lines[index:], json.loads(lines[index])["prev"] if index else prev)


def export(root: Path, out: Path) -> tuple[dict, list[bytes]]:
    done = sealbox("export", "--root", str(root), "--out", str(out))
    assert done.returncode == 0, done.stderr
    header, *records = out.read_bytes().splitlines()
    return json.loads(header), records


def export_cut_at_start(root: Path, out: Path, dropped: int) -> tuple[dict, list[bytes]]:
    """An export's header and records with its first `dropped` records gone and its anchor moved to the first kept
    record's predecessor (what a forger hiding the start would do; the statement is left as the host signed it)."""
    header, records = export(root, out)
    kept = records[dropped:]
    first = json.loads(kept[0])
    header["anchor"] = {"seq": first["seq"] - 1, "hash": first["prev"]}
    return header, kept


def write_export(out: Path, header: dict, records: list[bytes]) -> None:
    out.write_bytes(b"\n".join([canonical(header), *records]) + b"\n")


def assert_forged_export_invalid(out: Path, header: dict, records: list[bytes], pubkey: Path, reason: str) -> dict:
    """Write the forger's export and check that verifying it against the host key fails for `reason`."""
    write_export(out, header, records)
    return assert_invalid(verify(str(out), "--pubkey", str(pubkey)), reason)


def verify(*args: str) -> subprocess.CompletedProcess[str]:
    return sealbox("verify", "--json", *args)


def assert_invalid(done: subprocess.CompletedProcess[str], reason: str) -> dict:
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is False
    assert reason in report["first_broken_reason"], report["problems"]
    return report


def save_anchor(root: Path, tmp_path: Path) -> Path:
    """The log's anchor as `sealbox anchor` prints it, kept in a file the way an auditor keeps it off the host."""
    anchor = tmp_path / "anchor.txt"
    anchor.write_text(sealbox("anchor", "--root", str(root)).stdout)
    return anchor


def wipe(audit: Path) -> None:
    """Delete every segment and checkpoint: what an intruder restarting the log with the kept host key does first."""
    for path in [*audit.glob("segment-*"), audit / "checkpoints.jsonl"]:
        path.unlink()


def assert_only_the_anchor_refuses(source: list[str], pubkey: Path, anchor: Path, reason: str) -> dict:
    """The log or export verifies against the host key alone, and fails for `reason` against the anchor."""
    assert verify(*source, "--pubkey", str(pubkey)).returncode == 0
    return assert_invalid(verify(*source, "--pubkey", str(pubkey), "--anchor", str(anchor)), reason)


def test_the_untouched_log_its_export_and_its_anchor_verify(root: Path, pubkey: Path, tmp_path: Path) -> None:
    # The control for every attack below: the same commands on an honest log exit 0.
    anchor = save_anchor(root, tmp_path)
    assert verify("--root", str(root), "--pubkey", str(pubkey), "--anchor", str(anchor)).returncode == 0
    header, _ = export(root, tmp_path / "all.jsonl")
    done = verify(str(tmp_path / "all.jsonl"), "--pubkey", str(pubkey), "--anchor", str(anchor))
    assert done.returncode == 0, done.stdout
    assert json.loads(done.stdout)["statement"]["last_seq"] == header["last_seq"] == 31  # 30 + the export's own record


def test_the_anchor_is_a_c2sp_checkpoint_note_signed_with_an_ed25519_note_key(root: Path) -> None:
    done = sealbox("anchor", "--root", str(root))
    assert done.returncode == 0, done.stderr
    body, blank, signature = done.stdout.partition("\n\n")
    origin, size, root_hash, *extensions = body.split("\n")
    assert origin.startswith("sealbox.audit/") and size == "30" and len(base64.b64decode(root_hash)) == 32
    assert len(extensions) == 1  # the signing time
    dash, name, blob = signature.rstrip("\n").split(" ")
    assert dash == "\u2014" and name == origin and len(base64.b64decode(blob)) == 4 + 64
    _, lines = log_lines(root)
    assert base64.b64decode(root_hash).hex() == json.loads(lines[29])["hash"]


def test_a_rechained_edit_with_its_checkpoints_deleted_is_invalid_and_no_writer_signs_over_it(
    root: Path, pubkey: Path, tmp_path: Path
) -> None:
    path, lines = log_lines(root)
    path.write_bytes(b"\n".join(edit_and_rechain(lines, 4, "0" * 64)) + b"\n")
    (root / "audit" / "checkpoints.jsonl").unlink()
    assert_invalid(verify("--root", str(root), "--pubkey", str(pubkey)), "genesis checkpoint")
    # The next writer (here `audit export`, which records itself) refuses instead of signing the forged chain.
    done = sealbox("export", "--root", str(root), "--out", str(tmp_path / "x.jsonl"))
    assert done.returncode == 2 and "holds no checkpoint" in done.stderr, done.stderr
    with pytest.raises(AuditUnavailableError, match="holds no checkpoint"):
        AuditLog.open(root / "audit", POLICY)
    checkpoints = root / "audit" / "checkpoints.jsonl"
    assert not checkpoints.exists() or checkpoints.read_bytes() == b""  # nothing was signed over the forged chain


def test_a_rechained_export_with_its_checkpoint_list_emptied_is_invalid(
    root: Path, pubkey: Path, tmp_path: Path
) -> None:
    out = tmp_path / "all.jsonl"
    header, records = export(root, out)
    header["checkpoints"] = []
    forged = edit_and_rechain(records, 4, header["anchor"]["hash"])
    assert_forged_export_invalid(out, header, forged, pubkey, "not covered by a valid signed checkpoint")


def test_an_export_with_its_first_records_dropped_and_the_anchor_moved_is_invalid(
    root: Path, pubkey: Path, tmp_path: Path
) -> None:
    out = tmp_path / "all.jsonl"
    header, kept = export_cut_at_start(root, out, 3)
    first_seq = header["anchor"]["seq"] + 1
    header["first_seq"], header["records"] = first_seq, len(kept)
    # The forger edits the statement too; without the host key, the signature no longer holds.
    header["statement"] = {**header["statement"], "anchor": header["anchor"], "first_seq": first_seq,
                           "records": len(kept)}  # fmt: skip
    assert_forged_export_invalid(out, header, kept, pubkey, "statement's signature does not verify")


def test_an_export_cut_at_the_start_against_its_untouched_statement_names_the_first_missing_seq(
    root: Path, pubkey: Path, tmp_path: Path
) -> None:
    out = tmp_path / "all.jsonl"
    header, kept = export_cut_at_start(root, out, 3)
    report = assert_forged_export_invalid(out, header, kept, pubkey, "not what the host signed")
    assert report["first_broken_seq"] == 4


def test_an_export_with_its_last_records_and_their_checkpoints_dropped_is_invalid(
    root: Path, pubkey: Path, tmp_path: Path
) -> None:
    out = tmp_path / "all.jsonl"
    header, records = export(root, out)
    kept = records[:20]  # ends at seq 20, where a checkpoint signed the head: the chain alone still verifies
    header["checkpoints"] = [c for c in header["checkpoints"] if c["size"] <= 20]
    header["last_seq"] = header["window_last_seq"] = 20
    header["records"] = 20
    report = assert_forged_export_invalid(out, header, kept, pubkey, "not what the host signed")
    assert report["first_broken_seq"] == 21


def test_a_log_rolled_back_to_an_earlier_copy_is_invalid_against_its_anchor(
    root: Path, pubkey: Path, tmp_path: Path
) -> None:
    backup = tmp_path / "backup"
    shutil.copytree(root / "audit", backup)
    append(root / "audit", Clock(), 31, 10)
    anchor = save_anchor(root, tmp_path)
    shutil.rmtree(root / "audit")
    shutil.copytree(backup, root / "audit")  # every file consistent, signed by the host key: only the anchor knows
    assert_only_the_anchor_refuses(["--root", str(root)], pubkey, anchor, "rolled back")


def test_a_log_wiped_and_restarted_with_the_same_key_is_invalid_against_its_anchor(
    root: Path, pubkey: Path, tmp_path: Path
) -> None:
    anchor = save_anchor(root, tmp_path)
    audit = root / "audit"
    wipe(audit)
    append(audit, Clock(), 100, 40)  # a fresh log under the kept host key, longer than the anchor
    report = assert_only_the_anchor_refuses(["--root", str(root)], pubkey, anchor, "not the one the anchor signed")
    assert report["first_broken_seq"] == 31


def test_an_export_of_a_wiped_log_is_invalid_against_the_anchor_of_the_old_one(
    root: Path, pubkey: Path, tmp_path: Path
) -> None:
    anchor = save_anchor(root, tmp_path)
    audit = root / "audit"
    wipe(audit)
    append(audit, Clock(), 100, 5)
    out = tmp_path / "new.jsonl"
    export(root, out)
    assert_only_the_anchor_refuses([str(out)], pubkey, anchor, "rolled back")


def test_a_forged_anchor_is_refused(root: Path, pubkey: Path, tmp_path: Path) -> None:
    note = sealbox("anchor", "--root", str(root)).stdout
    origin, size, rest = note.split("\n", 2)
    anchor = tmp_path / "anchor.txt"
    anchor.write_text(f"{origin}\n{int(size) - 1}\n{rest}")  # a smaller size, the old signature
    assert_invalid(verify("--root", str(root), "--pubkey", str(pubkey), "--anchor", str(anchor)), "does not verify")


def test_an_unsigned_tail_beyond_the_bound_fails_verify_and_no_writer_signs_over_it(root: Path, pubkey: Path) -> None:
    # Every checkpoint but genesis deleted: the 30 records are all "tail", and span 580 s.
    checkpoints = root / "audit" / "checkpoints.jsonl"
    checkpoints.write_bytes(checkpoints.read_bytes().splitlines(keepends=True)[0])
    done = verify("--root", str(root), "--pubkey", str(pubkey))
    assert_invalid(done, "more than the 300 s allowed")
    by_count = verify("--root", str(root), "--pubkey", str(pubkey), "--max-unsigned-seconds", "3600",
                      "--max-unsigned-records", "20")  # fmt: skip
    assert json.loads(by_count.stdout)["first_broken_seq"] == 1
    assert_invalid(by_count, "more than the 20 allowed")
    with pytest.raises(AuditUnavailableError, match="more than a crashed writer leaves"):
        AuditLog.open(root / "audit", POLICY)
    assert len(checkpoints.read_bytes().splitlines()) == 1  # nothing was signed over them


def test_a_tail_within_the_bound_left_by_a_crashed_writer_verifies_and_is_signed_by_the_next(
    root: Path, pubkey: Path
) -> None:
    checkpoints = root / "audit" / "checkpoints.jsonl"
    lines = checkpoints.read_bytes().splitlines(keepends=True)
    checkpoints.write_bytes(b"".join(lines[:-1]))  # the checkpoint at 30 never made it: 21..30 span 180 s
    assert verify("--root", str(root), "--pubkey", str(pubkey)).returncode == 0
    AuditLog.open(root / "audit", POLICY, retention=False).close()
    assert json.loads(verify("--root", str(root), "--pubkey", str(pubkey)).stdout)["signed_through"] == 30


def test_sealbox_serve_refuses_to_start_over_a_log_whose_checkpoints_were_deleted(
    root: Path, tiny_model: Path
) -> None:
    path, lines = log_lines(root)
    path.write_bytes(b"\n".join(edit_and_rechain(lines, 4, "0" * 64)) + b"\n")
    (root / "audit" / "checkpoints.jsonl").unlink()
    done = ServerProcess(root=root, models=[tiny_model], no_auth=True).run_to_exit()
    assert done.returncode != 0, done.stderr
    assert "holds no checkpoint" in done.stderr and "sealbox serving" not in done.stderr
    assert (root / "audit" / "checkpoints.jsonl").read_bytes() == b""  # nothing signed over the forged chain
