"""When the audit log cannot write, a real `sealbox serve` fails closed: 503, and nothing is served unrecorded; once
the disk has room again it returns to service by itself, with a record of the outage.

The disk fails for real, two ways, each after the server has started and written its `server.start` record:
- file-size-limit: the server runs under RLIMIT_FSIZE of one page, so the write that would take the segment past it
  fails with EFBIG (CPython ignores SIGXFSZ, so the write fails instead of the signal killing the process). The limit
  binds every file the process and its children write, bytecode caches included: they write none
  (PYTHONDONTWRITEBYTECODE), or they would leave truncated `.pyc` files that break every later server test.
  Room comes back by raising the running process's limit (prlimit);
- full-disk: `<root>/audit` is a 64 KiB tmpfs, and once the server is up a filler file takes every free page, so the
  segment can grow only within the page it already has; then ENOSPC. Needs the right to mount (else skipped).
  Room comes back by deleting the filler.
Either way the log has room for a few records; the test then sends requests until one is refused.
"""

from __future__ import annotations

import hashlib
import json
import resource
import subprocess
import time
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from audit_records import audit_records, records_of
from server_support import SEALBOX, KeyedServer, ServerProcess, create_api_key, sealbox

PAGE = 4096
MAX_ATTEMPTS = 64  # the log has room for fewer than a dozen records: far fewer requests than this reach the failure
LIMITED = (
    "import resource, sys; sys.dont_write_bytecode = True; "  # the limit would truncate the checkout's .pyc files
    # Soft limit only: the hard one stays open, so the test can give room back without privileges (prlimit).
    f"resource.setrlimit(resource.RLIMIT_FSIZE, ({PAGE}, resource.RLIM_INFINITY)); " + SEALBOX[2]
)
RECOVERY_DEADLINE_S = 60


@dataclass
class FileSizeLimitedServer(ServerProcess):
    """`sealbox serve` whose process may not make any file larger than one page (and no child may either).

    Nor it nor its children (the model probe) write bytecode: the limit would cut the checkout's `.pyc` files to
    one page, and every later process importing them would fail."""

    env: dict[str, str] = field(default_factory=lambda: {"PYTHONDONTWRITEBYTECODE": "1"})

    def command(self) -> list[str]:
        return [sys.executable, "-c", LIMITED, *super().command()[len(SEALBOX):]]


@dataclass
class FailingDisk(KeyedServer):
    mode: str

    def make_room(self) -> None:
        """Give the disk room again, without touching the server: what an operator freeing space does."""
        if self.mode == "full-disk":
            (self.audit / "filler").unlink()
        else:
            assert self.server.process is not None
            unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
            resource.prlimit(self.server.process.pid, resource.RLIMIT_FSIZE, unlimited)  # raising soft to hard


def _mount_tmpfs(where: Path) -> str | None:
    """Mount a 64 KiB tmpfs at `where`; the reason it cannot be done, or None."""
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(where)],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
    except OSError as exc:
        return str(exc)
    return None if done.returncode == 0 else (done.stderr.strip() or f"mount exited {done.returncode}")


def _file_size_limit(server: ServerProcess) -> int:
    assert server.process is not None
    limits = Path(f"/proc/{server.process.pid}/limits").read_text(encoding="ascii")
    (line,) = [line for line in limits.splitlines() if line.startswith("Max file size")]
    soft = line.split()[3]
    return int(soft)


def _take_every_free_page(directory: Path) -> None:
    with open(directory / "filler", "wb", buffering=0) as filler:
        while True:
            try:
                filler.write(b"\0" * PAGE)
            except OSError:
                return


@pytest.fixture(params=["file-size-limit", "full-disk"])
def failing(request: pytest.FixtureRequest, tmp_path: Path, tiny_model: Path) -> Iterator[FailingDisk]:
    root = tmp_path / "root"
    root.mkdir()
    key = create_api_key(root, "alice", purpose="testing")
    mounted = False
    if request.param == "full-disk":
        (root / "audit").mkdir()
        why = _mount_tmpfs(root / "audit")
        if why is not None:
            pytest.skip(f"cannot mount a 64 KiB tmpfs for the audit log here ({why}); file-size-limit still runs")
        mounted = True
        server: ServerProcess = ServerProcess(root=root, models=[tiny_model])
    else:
        server = FileSizeLimitedServer(root=root, models=[tiny_model])
    try:
        server.start()
        if mounted:
            _take_every_free_page(root / "audit")
        else:
            assert _file_size_limit(server) == PAGE, "the server process itself (not a wrapper) carries the limit"
        yield FailingDisk(server, key, request.param)
    finally:
        server.stop()
        if mounted:
            subprocess.run(["umount", str(root / "audit")], check=True, timeout=30)


def chat(**extra: object) -> dict[str, object]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4,
            "temperature": 0, **extra}  # fmt: skip


def is_audit_refusal(answer: httpx.Response) -> bool:
    return answer.status_code == 503 and answer.json()["error"]["code"] == "audit_unavailable"


def assert_everything_is_refused(disk: FailingDisk) -> dict[str, object]:
    """After the failure: every API request, of any kind, with or without a key, is a 503 and records nothing.
    Returns the first refusal's error body."""
    before = len(audit_records(disk.audit))
    with disk.http() as http:
        answers = [
            http.post("/v1/chat/completions", json=chat()),
            http.post("/v1/chat/completions", json=chat(stream=True)),
            http.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 4}),
            http.get("/v1/models"),
            http.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer sbx-wrong"}),
        ]
        ready = http.get("/ready")
        health = http.get("/health")
    assert all(is_audit_refusal(answer) for answer in answers), [(a.status_code, a.text) for a in answers]
    assert all("choices" not in answer.text for answer in answers)
    assert ready.status_code == 503 and ready.json()["audit"] != "ok"
    assert health.status_code == 200 and disk.server.alive  # refusing, not crashed
    assert len(audit_records(disk.audit)) == before
    return answers[0].json()["error"]


def test_an_answer_whose_record_cannot_be_written_is_withheld_and_then_every_request_is_503(failing: FailingDisk):
    answered: list[str] = []
    with failing.http() as http:
        for _ in range(MAX_ATTEMPTS):
            answer = http.post("/v1/chat/completions", json=chat())
            if answer.status_code != 200:
                break
            answered.append(answer.headers["x-request-id"])
    assert answered, "the log had room for the first requests"
    assert is_audit_refusal(answer), answer.text
    assert "choices" not in answer.text  # the completion was generated, but it is not served unrecorded
    withheld = answer.headers["x-request-id"]
    assert records_of(failing.audit, withheld) == []
    # Every answer that went out has its one record; nothing else is in the log but the start.
    recorded = [r.fields["request_id"] for r in audit_records(failing.audit) if r.event == "api.request"]
    assert recorded == answered
    refusal = assert_everything_is_refused(failing)
    cause = "File too large" if failing.mode == "file-size-limit" else "No space left on device"
    assert cause in refusal["message"], refusal  # the disk's own reason, passed on


def test_a_stream_whose_record_cannot_be_written_ends_with_an_error_instead_of_done(failing: FailingDisk):
    completed: list[str] = []
    with failing.http() as http:
        for _ in range(MAX_ATTEMPTS):
            with http.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as answer:
                assert answer.status_code == 200
                events = [line.removeprefix("data: ") for line in answer.iter_lines() if line]
                request_id = answer.headers["x-request-id"]
            if events[-1] != "[DONE]":
                break
            completed.append(request_id)
    assert completed, "the log had room for the first streams"
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == "audit_unavailable"
    assert records_of(failing.audit, request_id) == []
    recorded = [r.fields["request_id"] for r in audit_records(failing.audit) if r.event == "api.request"]
    assert recorded == completed  # every stream that ended with [DONE] is recorded, and only those
    assert_everything_is_refused(failing)


def test_the_records_written_before_the_failure_verify_after_the_server_stops(failing: FailingDisk):
    with failing.http() as http:
        for _ in range(MAX_ATTEMPTS):
            if http.post("/v1/chat/completions", json=chat()).status_code != 200:
                break
    kept = [hashlib.sha256(line).hexdigest() for line in _segment_lines(failing.audit)]
    failing.server.stop()
    assert [hashlib.sha256(line).hexdigest() for line in _segment_lines(failing.audit)] == kept
    done = sealbox("audit", "verify", "--json", root=failing.server.root, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True and report["records"] == len(kept) and report["valid"] == len(kept)


def _segment_lines(audit: Path) -> list[bytes]:
    return [line for path in sorted(audit.glob("segment-*.jsonl")) for line in path.read_bytes().splitlines()]


def _wait_until_ready(http: httpx.Client) -> httpx.Response:
    """Poll /ready (the condition itself, not a guessed delay) until it answers 200 or the deadline passes."""
    deadline = time.monotonic() + RECOVERY_DEADLINE_S
    while True:
        ready = http.get("/ready")
        if ready.status_code == 200 or time.monotonic() > deadline:
            return ready
        time.sleep(0.05)


def test_the_server_returns_to_service_by_itself_once_the_disk_has_room_and_records_the_outage(failing: FailingDisk):
    refused = 0
    with failing.http() as http:
        for _ in range(MAX_ATTEMPTS):
            answer = http.post("/v1/chat/completions", json=chat())
            if answer.status_code != 200:
                break
        assert is_audit_refusal(answer), answer.text
        refused += 1
        failed_at = len(audit_records(failing.audit))
        for _ in range(3):  # still full: still refused, however long it lasts
            assert is_audit_refusal(http.post("/v1/chat/completions", json=chat()))
            refused += 1
        assert http.get("/ready").status_code == 503
        failing.make_room()
        ready = _wait_until_ready(http)
        assert ready.status_code == 200 and ready.json()["audit"] == "ok", ready.text
        answer = http.post("/v1/chat/completions", json=chat())
        assert answer.status_code == 200, answer.text
        assert failing.server.alive
    records = audit_records(failing.audit)
    assert len(records) == failed_at + 2  # the outage, then the request served after it
    outage, served = records[-2:]
    assert outage.event == "audit.outage"
    assert outage.fields["refused_requests"] == refused
    assert outage.fields["started"] <= outage.fields["ended"]
    cause = "File too large" if failing.mode == "file-size-limit" else "No space left on device"
    assert cause in outage.fields["error"]
    assert served.event == "api.request" and served.fields["request_id"] == answer.headers["x-request-id"]
    failing.server.stop()
    done = sealbox("audit", "verify", "--json", root=failing.server.root, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
