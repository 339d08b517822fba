"""Exports carry what an auditor needs to verify offline; `sealbox audit export | verify | report` run as real
processes against a real log."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from collections.abc import Callable
from pathlib import Path

import pytest

from sealbox.runtime.audit.checkpoint import AuditKey
from sealbox.runtime.audit.export import export_log
from sealbox.runtime.audit.log import AuditLog
from sealbox.runtime.audit.verify import companion_path, verify_directory, verify_export
from sealbox.runtime.policy import AuditPolicy

DAY1 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
SEALBOX = Path(sys.executable).with_name("sealbox")


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def request(log: AuditLog, n: int, purpose: str, principal: str, model: str = "tiny") -> None:
    log.append(
        "api.request",
        request_id=f"req-{n}",
        principal=principal,
        client="127.0.0.1:40000",
        purpose=purpose,
        model=model,
        model_sha256="ab" * 32,
        prompt_tokens=10,
        completion_tokens=5,
        latency_ms=20.5,
        status=200,
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An appliance root whose log spans three days: 5 records a day, the second day at 09:00 and 15:00."""
    clock = Clock(DAY1)
    with AuditLog.open(tmp_path / "root" / "audit", AuditPolicy(), clock=clock) as log:
        for n in range(1, 16):
            day = (n - 1) // 5
            clock.now = DAY1 + timedelta(days=day, hours=6 if day == 1 and n > 8 else 0)
            request(log, n, purpose="triage" if n % 2 else "=HYPERLINK(\"x\")", principal=f"user{day}")
        log.append("auth.failure", client="127.0.0.1:40001", reason="unknown key")
    return tmp_path / "root"


def pinned(root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "host-audit.pub"
    copy.write_bytes((root / "audit" / "audit-key.pub").read_bytes())
    return copy


def host_signer(root: Path) -> Callable[[dict[str, object]], str]:
    return AuditKey.load_or_create(root / "audit", may_create=False, owner=None).sign_statement


def sealbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SEALBOX), "audit", *args], capture_output=True, text=True, timeout=120)


def test_an_export_of_a_window_runs_on_to_the_next_checkpoint_and_verifies_alone(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "day2-morning.jsonl"
    result = export_log(
        root / "audit", out, sign=host_signer(root), since=DAY1 + timedelta(days=1), until=DAY1 + timedelta(days=1, hours=3)
    )
    header = json.loads(out.read_bytes().splitlines()[0])
    # Records 6-8 are in the window; the day's segment closed under a checkpoint at 10, so 9-10 ride along.
    assert (result.first_seq, result.window_last_seq, result.last_seq) == (6, 8, 10)
    assert header["anchor"]["seq"] == 5
    assert [c["size"] for c in header["checkpoints"]] == [5, 10]
    assert "BEGIN PUBLIC KEY" in header["public_key"]
    assert out.stat().st_mode & 0o077 == 0  # personal data: readable by the owner only
    report = verify_export(out, pubkey=pinned(root, tmp_path))
    assert report.ok, report.problems
    assert report.summary() == "5/5 records valid, 2/2 checkpoints valid" and report.signed_through == 10


def test_cli_export_records_itself_signs_the_head_and_the_jsonl_verifies_offline(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "all.jsonl"
    exported = sealbox("export", "--root", str(root), "--format", "jsonl", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    assert "exported 17 record(s), seq 1..17" in exported.stderr
    events = [json.loads(line)["event"] for line in out.read_bytes().splitlines()[1:]]
    assert events[-1] == "audit.export"  # the export is itself on the record, and covered by a signature

    verified = sealbox("verify", str(out), "--pubkey", str(pinned(root, tmp_path)))
    assert verified.returncode == 0, verified.stdout
    assert "17/17 records valid" in verified.stdout and "VALID" in verified.stdout

    lines = out.read_bytes().splitlines(keepends=True)
    lines[4] = lines[4].replace(b'"principal":"user0"', b'"principal":"userX"')
    out.write_bytes(b"".join(lines))
    broken = sealbox("verify", str(out), "--pubkey", str(pinned(root, tmp_path)), "--json")
    assert broken.returncode == 1
    result = json.loads(broken.stdout)
    assert (result["ok"], result["first_broken_seq"], result["valid"], result["records"]) == (False, 4, 16, 17)


def test_csv_export_with_its_companion_verifies_and_an_edited_cell_is_named(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "march.csv"
    exported = sealbox("export", "--root", str(root), "--format", "csv", "--out", str(out), "--until", "2025-03-04")
    assert exported.returncode == 0, exported.stderr
    assert companion_path(out).exists()
    rows = list(csv.DictReader(out.open(newline="")))
    assert [row["seq"] for row in rows] == [str(n) for n in range(1, 17)]
    # A purpose a spreadsheet would run as a formula is defused in the convenience column, kept exact in `fields`.
    assert rows[1]["purpose"] == "'=HYPERLINK(\"x\")"
    assert json.loads(rows[1]["fields"])["purpose"] == '=HYPERLINK("x")'
    assert verify_export(out, pubkey=pinned(root, tmp_path)).ok

    rows[6]["fields"] = rows[6]["fields"].replace('"prompt_tokens":10', '"prompt_tokens":99')
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    verified = sealbox("verify", str(out), "--pubkey", str(pinned(root, tmp_path)))
    assert verified.returncode == 1
    assert "first broken seq 7" in verified.stdout


def test_cli_verify_of_a_root_reports_counts_and_the_first_broken_seq(root: Path, tmp_path: Path) -> None:
    ok = sealbox("verify", "--root", str(root), "--pubkey", str(pinned(root, tmp_path)))
    assert ok.returncode == 0, ok.stdout
    assert "16/16 records valid" in ok.stdout
    segment = sorted((root / "audit").glob("segment-*"))[0]
    lines = segment.read_bytes().splitlines(keepends=True)
    del lines[2]
    segment.write_bytes(b"".join(lines))
    broken = sealbox("verify", "--root", str(root), "--pubkey", str(pinned(root, tmp_path)))
    assert broken.returncode == 1
    assert "15/15 records valid" not in broken.stdout
    assert "first broken seq 3: seq 3 missing" in broken.stdout


def test_cli_verify_refuses_a_file_that_is_not_an_export(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.jsonl"
    bogus.write_text('{"hello": "world"}\n')
    result = sealbox("verify", str(bogus))
    assert result.returncode == 2
    assert "not a sealbox audit export" in result.stderr


def test_cli_report_counts_requests_by_purpose_principal_model_and_day(root: Path) -> None:
    result = sealbox("report", "--root", str(root), "--since", "2025-03-02", "--until", "2025-03-03", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["requests"] == {"requests": 5, "prompt_tokens": 50, "completion_tokens": 25}
    assert summary["by_principal"] == {"user1": {"requests": 5, "prompt_tokens": 50, "completion_tokens": 25}}
    assert {key: value["requests"] for key, value in summary["by_purpose"].items()} == {
        "=HYPERLINK(\"x\")": 3,
        "triage": 2,
    }
    assert list(summary["by_model"]) == [f"tiny ({'ab' * 32})"]
    assert list(summary["by_day"]) == ["2025-03-02"]
    assert summary["integrity"]["ok"] is True

    table = sealbox("report", "--root", str(root))
    assert table.returncode == 0
    assert "Requests by purpose" in table.stdout and "auth.failure" in table.stdout and "chain VALID" in table.stdout


def test_verify_directory_and_a_full_export_agree_on_the_signed_head(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.jsonl"
    export_log(root / "audit", out, sign=host_signer(root))
    assert verify_export(out).signed_through == verify_directory(root / "audit").signed_through == 16


def test_a_segment_the_verifier_cannot_read_is_a_clear_error_naming_the_file(root: Path) -> None:
    segment = sorted((root / "audit").glob("segment-*"))[0]
    segment.unlink()
    segment.mkdir()  # the name of a segment, but nothing that can be read as one
    result = sealbox("verify", "--root", str(root))
    assert result.returncode == 2
    assert segment.name in result.stderr and "cannot read" in result.stderr
