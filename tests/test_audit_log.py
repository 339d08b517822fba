"""The audit log writer: durable appends with group commit, content minimisation, signed checkpoints, rotation,
several writers on one log, and failing closed on a full disk (a real 64 KiB tmpfs)."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sealbox.runtime.audit.checkpoint import PRIVATE_KEY_NAME, Checkpoint
from sealbox.runtime.audit.errors import AuditFieldError, AuditKeyError, AuditUnavailableError
from sealbox.runtime.audit.log import AuditLog
from sealbox.runtime.audit.segment import list_segments
from sealbox.runtime.audit.verify import verify_directory
from sealbox.runtime.policy import AuditPolicy

REQUEST = {
    "request_id": "req-1",
    "principal": "alice",
    "client": "127.0.0.1:50000",
    "purpose": "support-triage",
    "model": "tiny",
    "model_sha256": "ab" * 32,
    "prompt_tokens": 12,
    "completion_tokens": 3,
    "latency_ms": 41.5,
    "status": 200,
}


def records(directory: Path) -> list[dict]:
    lines = []
    for segment in list_segments(directory):
        lines += [json.loads(line) for line in segment.path.read_bytes().splitlines()]
    return lines


def checkpoints(directory: Path) -> list[Checkpoint]:
    return [Checkpoint.from_line(line) for line in (directory / "checkpoints.jsonl").read_bytes().splitlines()]


def pinned(directory: Path, tmp_path: Path) -> Path:
    """A copy of the public key kept apart from the log, as an auditor would."""
    copy = tmp_path / "pinned.pub"
    copy.write_bytes((directory / "audit-key.pub").read_bytes())
    return copy


def test_append_returns_consecutive_seqs_of_records_already_on_disk(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    with AuditLog.open(directory, AuditPolicy()) as log:
        first = log.append("server.start", config_digest="c" * 64, models=["tiny"])
        second = log.append("api.request", **REQUEST)
        # Durable means on disk before append returned: another reader sees it while the log is still open.
        on_disk = records(directory)
    assert (first, second) == (1, 2)
    assert [(r["seq"], r["event"]) for r in on_disk] == [(1, "server.start"), (2, "api.request")]
    assert on_disk[1]["fields"] == REQUEST
    assert on_disk[1]["prev"] == on_disk[0]["hash"]
    assert on_disk[0]["prev"] == "0" * 64
    assert on_disk[0]["time"].endswith("Z")
    assert verify_directory(directory, pubkey=pinned(directory, tmp_path)).ok


def test_content_is_dropped_unless_the_policy_logs_it_and_then_every_record_says_so(tmp_path: Path) -> None:
    with AuditLog.open(tmp_path / "off", AuditPolicy()) as log:
        log.append("api.request", **REQUEST, content={"prompt": "my IBAN is DE89…", "completion": "noted"})
    with AuditLog.open(tmp_path / "on", AuditPolicy(log_content=True)) as log:
        log.append("api.request", **REQUEST, content={"prompt": "hello", "completion": "hi"})
        log.append("server.stop")
    (off,) = records(tmp_path / "off")
    assert "content" not in off["fields"] and "content_logged" not in off
    assert b"IBAN" not in b"".join(p.read_bytes() for p in (tmp_path / "off").iterdir() if p.is_file())
    on = records(tmp_path / "on")
    assert on[0]["fields"]["content"] == {"prompt": "hello", "completion": "hi"}
    assert [r.get("content_logged") for r in on] == [True, True]
    assert verify_directory(tmp_path / "on").ok


def test_a_field_json_cannot_carry_is_refused_to_its_caller_and_writes_nothing(tmp_path: Path) -> None:
    with AuditLog.open(tmp_path / "audit", AuditPolicy()) as log:
        with pytest.raises(AuditFieldError, match="cannot be recorded as JSON"):
            log.append("api.request", latency_ms=float("nan"))
        with pytest.raises(AuditFieldError, match="dotted lower case"):
            log.append("API Request")
        assert log.append("server.stop") == 1


def test_sixteen_threads_get_distinct_seqs_and_the_chain_holds(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    seqs: list[int] = []
    lock = threading.Lock()
    with AuditLog.open(directory, AuditPolicy(checkpoint_every_records=50)) as log:

        def work(thread: int) -> None:
            for index in range(40):
                seq = log.append("api.request", request_id=f"{thread}-{index}")
                with lock:
                    seqs.append(seq)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(seqs) == list(range(1, 641))
    report = verify_directory(directory, pubkey=pinned(directory, tmp_path))
    assert report.ok and report.summary().startswith("640/640 records valid")
    assert report.signed_through == 640  # the close checkpoint covers the head


def test_append_async_does_not_block_the_loop_and_returns_durable_seqs(tmp_path: Path) -> None:
    directory = tmp_path / "audit"

    async def main() -> tuple[list[int], int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        with AuditLog.open(directory, AuditPolicy()) as log:
            task = asyncio.create_task(ticker())
            seqs = await asyncio.gather(*(log.append_async("api.request", request_id=str(n)) for n in range(100)))
            stop.set()
            await task
        return list(seqs), ticks

    seqs, ticks = asyncio.run(main())
    assert sorted(seqs) == list(range(1, 101))
    assert len(records(directory)) == 100
    assert ticks > 1  # the loop kept running other tasks while the groups were fsynced


def test_checkpoints_are_signed_every_n_records_and_at_close(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    with AuditLog.open(directory, AuditPolicy(checkpoint_every_records=10)) as log:
        for _ in range(25):
            log.append("api.request")  # the writer signs after a group crosses 10, before it takes the next
        log.checkpoint()
    sizes = [c.size for c in checkpoints(directory)]
    assert sizes[-1] == 25
    assert any(10 <= size < 25 for size in sizes[:-1])
    assert sizes == sorted(sizes)


def test_an_idle_log_signs_its_head_once_checkpoint_every_seconds_has_passed(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    with AuditLog.open(directory, AuditPolicy(checkpoint_every_seconds=0.2)) as log:
        log.append("server.start")
        log.append("api.request")
        deadline = time.monotonic() + 10
        while 2 not in {c.size for c in checkpoints(directory)} and time.monotonic() < deadline:
            time.sleep(0.01)  # polling the file for the writer's timed checkpoint, with a deadline
        # Signed with no append and no close to prompt it: only the timer can have done that.
        assert max(c.size for c in checkpoints(directory)) == 2


def test_segments_rotate_by_records_with_a_checkpoint_at_every_boundary(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    with AuditLog.open(directory, AuditPolicy(), segment_max_records=10) as log:
        for _ in range(35):
            log.append("api.request")
    assert [s.first_seq for s in list_segments(directory)] == [1, 11, 21, 31]
    sizes = {c.size for c in checkpoints(directory)}
    assert {10, 20, 30, 35} <= sizes
    assert verify_directory(directory).ok


def test_the_host_key_is_created_readable_only_by_its_owner_and_refused_when_others_can_read_it(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    AuditLog.open(directory, AuditPolicy()).close()
    key = directory / PRIVATE_KEY_NAME
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    key.chmod(0o644)
    with pytest.raises(AuditKeyError, match="chmod 600"):
        AuditLog.open(directory, AuditPolicy())


def test_a_lost_key_is_not_silently_replaced_once_checkpoints_exist(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    with AuditLog.open(directory, AuditPolicy()) as log:
        log.append("server.start")
    (directory / PRIVATE_KEY_NAME).unlink()
    with pytest.raises(AuditKeyError, match="restore the host audit key"):
        AuditLog.open(directory, AuditPolicy())


WRITER = """
import sys
from pathlib import Path
from sealbox.runtime.audit.log import AuditLog
from sealbox.runtime.policy import AuditPolicy
with AuditLog.open(Path(sys.argv[1]), AuditPolicy(), retention=False) as log:
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    sys.stdin.readline()
    for n in range(int(sys.argv[2])):
        log.append("bundle.install", n=n)
"""


def test_two_processes_writing_one_log_interleave_into_one_valid_chain(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    with AuditLog.open(directory, AuditPolicy()) as log:
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(directory), "150"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "ready\n"
        child.stdin.write("go\n")
        child.stdin.flush()
        mine = [log.append("api.request", n=n) for n in range(150)]
        assert child.wait(timeout=60) == 0
    written = records(directory)
    assert [r["seq"] for r in written] == list(range(1, 301))
    assert len(set(mine)) == 150
    assert sum(r["event"] == "bundle.install" for r in written) == 150
    assert verify_directory(directory).ok


def test_the_package_exports_exactly_its_public_names() -> None:
    import sealbox.runtime.audit

    assert sorted(sealbox.runtime.audit.__all__) == [
        "AuditError",
        "AuditFieldError",
        "AuditFormatError",
        "AuditKeyError",
        "AuditLog",
        "AuditUnavailableError",
        "VerificationReport",
        "build_report",
        "export_log",
        "verify_directory",
        "verify_export",
        "verify_path",
    ]
    assert all(hasattr(sealbox.runtime.audit, name) for name in sealbox.runtime.audit.__all__)


def test_a_closed_log_refuses_appends(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path / "audit", AuditPolicy())
    log.close()
    with pytest.raises(AuditUnavailableError, match="closed"):
        log.append("api.request")


@pytest.fixture
def small_filesystem(tmp_path: Path):
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a 64 KiB tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_fails_closed_with_a_clear_error_and_keeps_every_acknowledged_record(small_filesystem: Path) -> None:
    directory = small_filesystem / "audit"
    log = AuditLog.open(directory, AuditPolicy())
    acknowledged = []
    with pytest.raises(AuditUnavailableError) as caught:
        for n in range(10_000):
            acknowledged.append(log.append("api.request", **REQUEST, note="x" * 200, n=n))
    message = str(caught.value)
    assert "No space left on device" in message and "segment-" in message and "fail closed" in message
    assert log.failure is caught.value
    # Fail closed: nothing more is accepted, sync or async, even a record that would now fit.
    with pytest.raises(AuditUnavailableError, match="earlier failure"):
        log.append("server.stop")
    with pytest.raises(AuditUnavailableError, match="earlier failure"):
        asyncio.run(log.append_async("server.stop"))
    log.close()
    on_disk = records(directory)
    assert [r["seq"] for r in on_disk] == acknowledged  # the failed group left no partial record behind
    report = verify_directory(directory)
    assert report.ok, report.problems
    assert len(acknowledged) > 10
