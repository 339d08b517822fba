"""Every request a real `sealbox serve` answers leaves exactly one audit record, and that record is true.

One server per module, on loopback, over the generated tiny model, with a policy of one sequence and no queue (so a
second request while a stream holds the sequence is a 429) and a 64 KiB body limit. Records are read back from the
segments with each line's own hash checked; the request is found by the `x-request-id` the server answered with.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from audit_records import audit_bytes, audit_records, records_of, the_record_of
from server_support import KeyedServer, ServerProcess, create_api_key, sealbox

MAX_TOKENS_CAP = 800
BODY_LIMIT = 65536
POLICY = f"""
[server]
max_body_bytes = {BODY_LIMIT}

[limits]
max_sequences = 1
queue_size = 0
max_tokens = {MAX_TOKENS_CAP}
"""
PURPOSE = "support-triage"
MARKER = "quokka-tangerine-4711"  # a prompt word that must never reach the log unless content logging is on


@dataclass
class Served(KeyedServer):
    model_sha256: str


def serve(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, policy_text: str) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("root")
    policy = root.parent / f"{root.name}-policy.toml"
    policy.write_text(policy_text)
    key = create_api_key(root, "alice", purpose=PURPOSE)
    with ServerProcess(root=root, models=[tiny_model], policy=policy) as server:
        yield Served(server, key, hashlib.sha256(tiny_model.read_bytes()).hexdigest())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Served]:
    yield from serve(tmp_path_factory, tiny_model, POLICY)


@pytest.fixture(scope="module")
def served_with_content(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Served]:
    yield from serve(tmp_path_factory, tiny_model, POLICY + "\n[audit]\nlog_content = true\n")


def chat(content: str = "Say hello.", **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0,
            **extra}  # fmt: skip


# --- answered requests: 200, stream -------------------------------------------------------------------------------


def test_a_200_chat_completion_is_recorded_once_with_who_what_and_how_many_tokens(served: Served):
    raw = served.client().chat.completions.with_raw_response.create(**chat())
    completion = raw.parse()
    record = the_record_of(served.audit, raw.headers["x-request-id"])
    assert record.event == "api.request"
    fields = record.fields
    assert (fields["status"], fields["method"], fields["endpoint"]) == (200, "POST", "/v1/chat/completions")
    assert (fields["principal"], fields["purpose"]) == ("alice", PURPOSE)
    assert (fields["model"], fields["model_sha256"]) == ("tiny", served.model_sha256)
    assert completion.usage is not None
    assert (fields["prompt_tokens"], fields["completion_tokens"]) == (
        completion.usage.prompt_tokens, completion.usage.completion_tokens)  # fmt: skip
    assert fields["completion_tokens"] > 0 and fields["stream"] is False
    assert fields["finish_reason"] == completion.choices[0].finish_reason == "length"
    assert fields["client"].startswith("127.0.0.1:") and fields["latency_ms"] > 0
    assert "content" not in fields and record.content_logged is False


def test_a_200_stream_is_recorded_once_with_the_usage_it_reported(served: Served):
    with served.client().chat.completions.with_streaming_response.create(
        **chat(stream=True, stream_options={"include_usage": True})
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = list(response.parse())
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0
    fields = the_record_of(served.audit, request_id).fields
    assert (fields["status"], fields["stream"], fields["principal"], fields["model_sha256"]) == (
        200, True, "alice", served.model_sha256)  # fmt: skip
    assert (fields["prompt_tokens"], fields["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)


def test_x_sealbox_purpose_overrides_the_keys_purpose_for_that_request_only(served: Served):
    client = served.client()
    purpose = {"X-Sealbox-Purpose": "fraud-review"}
    named = client.chat.completions.with_raw_response.create(**chat(), extra_headers=purpose)
    plain = client.chat.completions.with_raw_response.create(**chat())
    assert the_record_of(served.audit, named.headers["x-request-id"]).fields["purpose"] == "fraud-review"
    assert the_record_of(served.audit, plain.headers["x-request-id"]).fields["purpose"] == PURPOSE


def test_every_answer_has_its_own_request_id(served: Served):
    with served.http() as http:
        ids = [http.get("/v1/models").headers["x-request-id"] for _ in range(3)]
    assert len(set(ids)) == 3
    for request_id in ids:
        fields = the_record_of(served.audit, request_id).fields
        assert (fields["status"], fields["endpoint"], fields["principal"]) == (200, "/v1/models", "alice")


# --- refused requests: 429, 400, 404, 413 (a stranger's 401s: test_serve_refusals.py) -----------------------------


def test_a_429_is_recorded_once_as_rate_limited_while_a_stream_holds_the_only_sequence(served: Served):
    with served.http() as http:
        held_request = chat("Tell me a long story.", stream=True, max_tokens=MAX_TOKENS_CAP)
        with http.stream("POST", "/v1/chat/completions", json=held_request) as held:
            lines = held.iter_lines()
            assert next(lines).startswith("data: ")  # the handler admitted it before the first chunk went out
            refused = http.post("/v1/chat/completions", json=chat())
            rest = [line for line in lines if line]
        held_id = held.headers["x-request-id"]
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    record = the_record_of(served.audit, refused.headers["x-request-id"])
    assert record.event == "api.rate_limited"
    assert (record.fields["status"], record.fields["principal"], record.fields["model"]) == (429, "alice", "tiny")
    assert record.fields["completion_tokens"] == 0
    assert rest[-1] == "data: [DONE]"  # the held stream was not disturbed, and it has its own one record
    held_record = the_record_of(served.audit, held_id)
    assert (held_record.fields["status"], held_record.fields["stream"]) == (200, True)
    assert held_record.fields["completion_tokens"] == MAX_TOKENS_CAP  # it held the sequence all along


def test_a_400_is_recorded_once_with_the_model_it_named(served: Served):
    with served.http() as http:
        answer = http.post("/v1/chat/completions", json=chat(max_tokens=MAX_TOKENS_CAP + 1))
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "max_tokens_exceeded"
    fields = the_record_of(served.audit, answer.headers["x-request-id"]).fields
    assert (fields["status"], fields["principal"], fields["model"], fields["model_sha256"]) == (
        400, "alice", "tiny", served.model_sha256)  # fmt: skip
    assert fields["completion_tokens"] == 0


def test_a_400_for_a_body_that_is_not_a_chat_request_is_recorded_once(served: Served):
    with served.http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "tiny"})
    assert answer.status_code == 400
    fields = the_record_of(served.audit, answer.headers["x-request-id"]).fields
    assert (fields["status"], fields["principal"], fields["model"]) == (400, "alice", None)


def test_a_404_for_an_unknown_model_is_recorded_once_naming_the_model_asked_for(served: Served):
    with served.http() as http:
        answer = http.post("/v1/chat/completions", json={**chat(), "model": "no-such-model"})
    assert answer.status_code == 404
    fields = the_record_of(served.audit, answer.headers["x-request-id"]).fields
    assert (fields["status"], fields["principal"], fields["model"], fields["model_sha256"]) == (
        404, "alice", "no-such-model", None)  # fmt: skip


def test_a_413_oversized_body_is_recorded_once(served: Served):
    body = json.dumps(chat("x" * (BODY_LIMIT + 1))).encode()
    with served.http() as http:
        answer = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413
    record = the_record_of(served.audit, answer.headers["x-request-id"])
    assert (record.event, record.fields["status"], record.fields["endpoint"]) == ("api.request", 413,
                                                                                  "/v1/chat/completions")  # fmt: skip
    # Authentication comes before the body limit (runtime/server/app.py): the record names who sent the body.
    assert record.fields["principal"] == "alice"


# --- what the log holds, and what it never holds ------------------------------------------------------------------


def test_no_prompt_or_completion_text_is_logged_by_default(served: Served):
    completion = served.client().chat.completions.create(**chat(f"Please repeat {MARKER}.", max_tokens=24))
    text = completion.choices[0].message.content
    assert text and len(text) >= 8
    logged = audit_bytes(served.audit)
    assert MARKER.encode() not in logged
    assert json.dumps(text, ensure_ascii=False)[1:-1].encode() not in logged
    assert all("content" not in r.fields and not r.content_logged for r in audit_records(served.audit))


def test_the_api_key_itself_appears_nowhere_in_the_audit_directory(served: Served):
    served.client().models.list()
    assert served.key.encode() not in audit_bytes(served.audit)
    secret = served.key.removeprefix("sbx-").encode()
    assert secret not in audit_bytes(served.audit)
    assert any(r.fields.get("principal") == "alice" for r in audit_records(served.audit))


def test_the_server_start_record_names_the_model_digest(served: Served):
    (start,) = [r for r in audit_records(served.audit) if r.event == "server.start"]
    assert start.seq == 1
    assert start.fields["models"] == [{"name": "tiny", "sha256": served.model_sha256, "ready": True, "problem": None}]


def test_sealbox_audit_verify_accepts_the_running_servers_log(served: Served):
    served.client().models.list()
    done = sealbox("audit", "verify", root=served.server.root, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "VALID" in done.stdout


def test_with_log_content_on_the_text_is_recorded_and_every_record_says_so(served_with_content: Served):
    served = served_with_content
    raw = served.client().chat.completions.with_raw_response.create(**chat(f"Please repeat {MARKER}."))
    completion = raw.parse()
    record = the_record_of(served.audit, raw.headers["x-request-id"])
    assert record.content_logged is True
    content = record.fields["content"]
    assert MARKER in content["prompt"]
    assert content["completion"] == completion.choices[0].message.content
    assert all(r.content_logged for r in audit_records(served.audit))  # server.start included
    assert served.key.encode() not in audit_bytes(served.audit)


def test_with_log_content_on_a_stream_records_the_text_it_streamed(served_with_content: Served):
    served = served_with_content
    with served.client().chat.completions.with_streaming_response.create(
        **chat(f"Again {MARKER}.", stream=True)
    ) as response:
        request_id = response.headers["x-request-id"]
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
    record = the_record_of(served.audit, request_id)
    assert record.content_logged and record.fields["content"]["completion"] == streamed
    assert MARKER in record.fields["content"]["prompt"]
    assert len(records_of(served.audit, request_id)) == 1
