"""A stranger's refused requests are counted, not written one by one: no disk-fill lever, and failures stay visible.

Before, every request without a valid key appended and fsynced its own ~700-byte record, so anyone who could reach the
port could fill the disk. Now the server keeps a count per client address and reason and records one `auth.failure`
per interval (and at shutdown) with that count. The log is read back through the real `sealbox audit export`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from audit_records import audit_records
from server_support import ServerProcess, create_api_key, sealbox

# One interval longer than any test: the records counted come from the flush at shutdown, not from a race with a timer.
POLICY = "[server]\nrefusal_summary_seconds = 3600\n[limits]\ncontext = 512\n"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def exported(root: Path, out: Path) -> list[dict[str, Any]]:
    """Every record of the log, as `sealbox audit export` writes them (line 1 is the export's header)."""
    sealbox("audit", "export", "--out", str(out), root=root)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["format"] == "sealbox-audit-export"
    return [json.loads(line) for line in lines[1:]]


def failures(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record["fields"] for record in records if record["event"] == "auth.failure"]


def test_500_bad_key_requests_from_one_client_leave_a_bounded_number_of_records_whose_counts_sum_to_500(
    tmp_path: Path, tiny_model: Path
) -> None:
    root = tmp_path / "root"
    key = create_api_key(root, "alice")
    with ServerProcess(root, models=[tiny_model], policy_text=POLICY) as server:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for i in range(500):
                wrong = {"Authorization": f"Bearer sbx-wrong-{i}"}
                answer = http.post("/v1/chat/completions", json=CHAT, headers=wrong)
                assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
            served = http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert served.status_code == 200  # the stranger's flood did not stop a client with a key
    records = exported(root, tmp_path / "export.jsonl")
    (summary,) = failures(records)  # one client address, one reason, one interval: one record
    assert summary["count"] == 500
    assert (summary["client"], summary["reason"], summary["status"]) == ("127.0.0.1", "invalid_api_key", 401)
    assert summary["endpoints"] == ["/v1/chat/completions"]
    assert summary["first_seen"] <= summary["last_seen"]
    assert len(records) < 10, [record["event"] for record in records]  # not one a request
    assert not any(b"sbx-wrong" in path.read_bytes() for path in (root / "audit").rglob("*") if path.is_file())


def test_missing_malformed_and_wrong_keys_from_one_client_are_one_summary_counting_them_all(
    tmp_path: Path, tiny_model: Path
) -> None:
    root = tmp_path / "root"
    create_api_key(root, "alice")
    with ServerProcess(root, models=[tiny_model], policy_text=POLICY) as server:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for _ in range(7):
                assert http.get("/v1/models").status_code == 401  # no key at all
            for _ in range(5):
                assert http.get("/v1/models", headers={"Authorization": "Basic dXNlcjpwYXNz"}).status_code == 401
            for _ in range(3):  # a malformed purpose from a stranger is one more 401, not a 400 recorded alone
                answer = http.get("/v1/models", headers={"Authorization": "Bearer sbx-x", "X-Sealbox-Purpose": "\x01"})
                assert answer.status_code == 401
    by_reason = {fields["reason"]: fields for fields in failures(exported(root, tmp_path / "export.jsonl"))}
    assert set(by_reason) == {"invalid_api_key"}  # OpenAI's code for a missing, non-Bearer or wrong key alike
    assert by_reason["invalid_api_key"]["count"] == 15


def test_a_wrong_key_sent_to_ready_is_counted_as_a_refusal_too(tmp_path: Path, tiny_model: Path) -> None:
    root = tmp_path / "root"
    create_api_key(root, "alice")
    with ServerProcess(root, models=[tiny_model], policy_text=POLICY) as server:
        for _ in range(4):
            answer = httpx.get(f"{server.url}/ready", headers={"Authorization": "Bearer sbx-guess"}, timeout=30)
            assert answer.status_code == 200 and "models" in answer.json()
    (summary,) = failures(exported(root, tmp_path / "export.jsonl"))
    assert (summary["count"], summary["endpoints"]) == (4, ["/ready"])


def test_counts_are_recorded_at_each_intervals_end_and_the_rest_at_shutdown(tmp_path: Path, tiny_model: Path) -> None:
    root = tmp_path / "root"
    create_api_key(root, "alice")
    policy = "[server]\nrefusal_summary_seconds = 1\n[limits]\ncontext = 512\n"
    with ServerProcess(root, models=[tiny_model], policy_text=policy) as server:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for _ in range(5):
                assert http.get("/v1/models").status_code == 401
            deadline = time.monotonic() + 30  # observing the log while the server runs: the intervals' own flushes
            while logged_count(root) < 5:
                assert time.monotonic() < deadline, "no summary was written at the end of the interval"
                time.sleep(0.05)
            for _ in range(3):
                assert http.get("/v1/models").status_code == 401
    counts = [fields["count"] for fields in failures(exported(root, tmp_path / "export.jsonl"))]
    assert sum(counts) == 8  # the 3 later ones: in a later interval's record, or the shutdown's
    assert len(counts) <= 4  # 8 refusals across at most a few 1-second intervals: one record per interval


def logged_count(root: Path) -> int:
    return sum(record.fields["count"] for record in audit_records(root / "audit") if record.event == "auth.failure")
