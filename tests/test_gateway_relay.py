"""What the gateway does to an answer on its way to the client, and what that way costs: chunks passed on byte for
byte, the audit record's usage and finish reason read from the end of the answer and durable before the client has
`[DONE]`, and one kept-alive mutual-TLS connection per engine reused across requests.

Byte-level checks run against `scripted_engine.py` (a real HTTPS server with mutual TLS whose answers are fixed in
advance); the connection and usage checks against a real `sealbox serve` engine host.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import scripted_engine
from audit_records import audit_records, records_of, the_record_of
from gateway_support import (
    EngineHostProcess, GatewayProcess, engine_key_file, engine_policy, gateway_policy, loopback_pki,
)  # fmt: skip
from server_support import REPO, create_api_key

from sealbox.runtime.gateway.app import StreamTail
from sealbox.runtime.gateway.proxy import usage_of
from sealbox.runtime.gateway.engine_network import EngineNetwork
from sealbox.runtime.server.request_record import RequestRecord
from sealbox.runtime.staging_server import free_loopback_port, stop_child, wait_for_ready_line


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return loopback_pki(tmp_path_factory.mktemp("pki"), ("scripted", "e1"))


@dataclass
class ScriptedEngine:
    root: Path
    pki: dict[str, Path]
    name: str = "scripted"
    port: int = field(default_factory=free_loopback_port)
    process: subprocess.Popen[str] | None = None
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def __enter__(self) -> ScriptedEngine:
        command = [sys.executable, str(REPO / "tests" / "scripted_engine.py"), "--port", str(self.port),
                   "--cert", str(self.pki["scripted.crt"]), "--key", str(self.pki["scripted.key"]),
                   "--client-ca", str(self.pki["gateway_ca"])]  # fmt: skip
        self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True)  # fmt: skip
        if not wait_for_ready_line(self.process, self.stderr_lines, 60):
            stop_child(self.process)
            raise RuntimeError("the scripted engine did not start:\n" + "".join(self.stderr_lines))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            stop_child(self.process, timeout_s=10)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> Iterator[dict[str, Any]]:
    engine = ScriptedEngine(tmp_path_factory.mktemp("scripted"), pki)
    key_file = engine.root / "engine.key"
    key_file.write_text("sk-scripted\n")
    key_file.chmod(0o600)
    root = tmp_path_factory.mktemp("gateway-scripted")
    policy = gateway_policy(engines=[(engine, key_file, "")], engine_ca=pki["engines_ca"],  # type: ignore[list-item]
                            client_cert=pki["client.crt"], client_key=pki["client.key"])  # fmt: skip
    user = create_api_key(root, "user")
    with engine, GatewayProcess(root, policy_text=policy) as gateway:
        try:
            yield {"gateway": gateway, "user": user}
        finally:
            print(gateway.stderr)  # shown by pytest when a test of the module fails


def _stream(scripted: dict[str, Any], prompt: str) -> httpx.Response:
    gateway: GatewayProcess = scripted["gateway"]
    body = {"model": scripted_engine.MODEL, "prompt": prompt, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    return httpx.post(gateway.base_url + "/completions", json=body, timeout=30,
                      headers={"authorization": f"Bearer {scripted['user']}"})  # fmt: skip


def test_a_stream_reaches_the_client_byte_for_byte_as_the_engine_sent_it(scripted: dict[str, Any]) -> None:
    response = _stream(scripted, "anything")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.content == b"".join(scripted_engine.STREAM)  # a cut é, a comment line, the cut usage event


def test_a_streams_audit_record_carries_the_usage_and_finish_reason_of_its_last_chunks(
    scripted: dict[str, Any],
) -> None:
    response = _stream(scripted, "anything")
    gateway: GatewayProcess = scripted["gateway"]
    record = the_record_of(gateway.root / "audit", response.headers["x-request-id"]).fields
    assert (record["prompt_tokens"], record["completion_tokens"], record["finish_reason"]) == (7, 3, "length")
    assert (record["engine_host"], record["model_sha256"], record["stream"], record["status"]) == (
        "scripted", scripted_engine.MODEL_SHA256, True, 200)


def test_a_streams_audit_record_is_durable_before_its_client_has_done(scripted: dict[str, Any]) -> None:
    """The scripted engine sends `[DONE]` and keeps the answer open: the record cannot wait for the answer's end."""
    gateway: GatewayProcess = scripted["gateway"]
    body = {"model": scripted_engine.MODEL, "prompt": "hold", "stream": True}
    with httpx.stream("POST", gateway.base_url + "/completions", json=body, timeout=30,
                      headers={"authorization": f"Bearer {scripted['user']}"}) as response:  # fmt: skip
        received = b""
        chunks = response.iter_raw()
        while not received.endswith(b"data: [DONE]\n\n"):
            received += next(chunks)
        record = the_record_of(gateway.root / "audit", response.headers["x-request-id"]).fields
    assert received == b"".join(scripted_engine.HELD)
    assert (record["status"], record["finish_reason"], record["completion_tokens"]) == (200, "stop", 0)


def test_a_stream_without_usage_is_recorded_once_its_closing_chunk_has_passed(scripted: dict[str, Any]) -> None:
    """The engine holds `[DONE]` back (as it does while it syncs its own record): the gateway's record is written
    meanwhile, from the closing chunk, not after `[DONE]`."""
    gateway: GatewayProcess = scripted["gateway"]
    body = {"model": scripted_engine.MODEL, "prompt": "hold before done", "stream": True}
    with httpx.stream("POST", gateway.base_url + "/completions", json=body, timeout=30,
                      headers={"authorization": f"Bearer {scripted['user']}"}) as response:  # fmt: skip
        received = b""
        chunks = response.iter_raw()
        while not received.endswith(scripted_engine.HELD[1]):
            received += next(chunks)
        request_id = response.headers["x-request-id"]
        deadline = time.monotonic() + scripted_engine.HOLD_S / 3  # a bound for a failing test: the engine holds 30 s
        found: list[Any] = []
        while not found and time.monotonic() < deadline:
            found = records_of(gateway.root / "audit", request_id)
    assert len(found) == 1, "no record while the engine held [DONE] back"
    assert (found[0].fields["status"], found[0].fields["finish_reason"]) == (200, "stop")


def test_a_whole_answer_is_passed_on_unchanged_and_audited_with_its_usage(scripted: dict[str, Any]) -> None:
    gateway: GatewayProcess = scripted["gateway"]
    client = openai.OpenAI(base_url=gateway.base_url, api_key=scripted["user"], max_retries=0, timeout=30)
    raw = client.completions.with_raw_response.create(model=scripted_engine.MODEL, prompt="x", max_tokens=1)
    assert raw.http_response.json() == scripted_engine.WHOLE
    record = the_record_of(gateway.root / "audit", raw.headers["x-request-id"]).fields
    assert (record["prompt_tokens"], record["completion_tokens"], record["engine_host"]) == (5, 1, "scripted")


@pytest.mark.parametrize(("method", "body", "status", "code"), [
    ("GET", None, 405, "method_not_allowed"),
    ("POST", b"not json", 400, "invalid_request"),
    ("POST", b"\xff\xfe{", 400, "invalid_request"),
    ("POST", b"[1, 2]", 400, "invalid_request"),
    ("POST", b'{"prompt": "no model"}', 400, "invalid_request"),
])  # fmt: skip
def test_a_bad_request_to_a_relayed_route_gets_an_openai_shaped_error(
    scripted: dict[str, Any], method: str, body: bytes | None, status: int, code: str,
) -> None:
    gateway: GatewayProcess = scripted["gateway"]
    response = httpx.request(method, gateway.base_url + "/completions", content=body, timeout=30,
                             headers={"authorization": f"Bearer {scripted['user']}",
                                      "content-type": "application/json"})  # fmt: skip
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def _record() -> RequestRecord:
    return RequestRecord(audit=None, request_id="req-test", method="POST", endpoint="/v1/completions", client="-")


def test_the_stream_tail_reads_usage_and_finish_reason_from_events_cut_across_chunks() -> None:
    tail, record = StreamTail(), _record()
    for chunk in scripted_engine.STREAM:
        tail.feed(chunk)
    tail.read_into(record)
    assert (record.prompt_tokens, record.completion_tokens, record.finish_reason) == (7, 3, "length")


def test_the_stream_tail_keeps_a_bounded_number_of_chunks() -> None:
    tail = StreamTail()
    for i in range(1000):
        tail.feed(b"data: {}\n\n")
    assert len(tail.chunks) == StreamTail.CHUNKS


def test_usage_of_a_whole_answer_is_its_usage_object_not_text_that_quotes_one() -> None:
    body = (b'{"choices":[{"text":"{\\"usage\\":{\\"prompt_tokens\\":99}}"}],'
            b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}')  # fmt: skip
    assert usage_of(body) == {"prompt_tokens": 3, "completion_tokens": 2}
    assert usage_of(b'{"data":[{"embedding":[0.1,0.2]}],"usage": {"prompt_tokens":4}}') == {
        "prompt_tokens": 4, "completion_tokens": 0}
    assert usage_of(b'{"usage":null}') == usage_of(b"not json") == {"prompt_tokens": 0, "completion_tokens": 0}


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory, make_model: Any, pki: dict[str, Path]) -> Iterator[dict[str, Any]]:
    """A real engine host behind a gateway that polls once a minute: between polls, only requests use the pool."""
    model = make_model("relayed.gguf", size="1MB", seed=4, never_ends=True)
    policy = engine_policy(pki["e1.crt"], pki["e1.key"], pki["gateway_ca"], sequences=2)
    engine = EngineHostProcess(tmp_path_factory.mktemp("e1"), models=[model], policy_text=policy, name="e1")
    key_file = engine_key_file(engine)
    root = tmp_path_factory.mktemp("gateway-real")
    policy = gateway_policy(engines=[(engine, key_file, "")], engine_ca=pki["engines_ca"], interval_s=60,
                            client_cert=pki["client.crt"], client_key=pki["client.key"])  # fmt: skip
    user = create_api_key(root, "user")
    with engine, GatewayProcess(root, policy_text=policy) as gateway:
        try:
            yield {"gateway": gateway, "engine": engine, "user": user}
        finally:
            print(gateway.stderr, engine.stderr)


def test_requests_through_the_gateway_reuse_one_kept_alive_tls_connection_to_their_engine(
    real: dict[str, Any],
) -> None:
    gateway: GatewayProcess = real["gateway"]
    client = openai.OpenAI(base_url=gateway.base_url, api_key=real["user"], max_retries=0, timeout=60)
    ids = [client.completions.with_raw_response.create(model="relayed", prompt=f"turn {i}", max_tokens=2)
           .headers["x-request-id"] for i in range(4)]  # fmt: skip
    assert len(set(ids)) == 4
    engine: EngineHostProcess = real["engine"]
    # The engine's records name the TCP peer of each request: one source port, one connection (one TLS handshake).
    peers = [r.fields["client"] for r in audit_records(engine.root / "audit")
             if r.fields.get("endpoint") == "/v1/completions"]  # fmt: skip
    assert len(peers) == 4 and len(set(peers)) == 1, peers


def test_a_real_engines_stream_is_audited_with_its_usage_and_finish_reason(real: dict[str, Any]) -> None:
    gateway: GatewayProcess = real["gateway"]
    client = openai.OpenAI(base_url=gateway.base_url, api_key=real["user"], max_retries=0, timeout=60)
    with client.completions.with_streaming_response.create(model="relayed", prompt="go", max_tokens=5, stream=True,
                                                           stream_options={"include_usage": True}) as raw:  # fmt: skip
        request_id = raw.headers["x-request-id"]
        events = [line for line in raw.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    record = the_record_of(gateway.root / "audit", request_id).fields
    assert (record["completion_tokens"], record["finish_reason"], record["engine_host"]) == (5, "length", "e1")
    assert record["prompt_tokens"] > 0


def test_a_forwarded_requests_head_and_body_leave_in_one_write_when_the_answer_is_read() -> None:
    """Over a real loopback socket: nothing is sent while the request is written, all of it at the first read."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        async def exchange() -> tuple[bytes | None, bytes, bytes]:
            stream = await EngineNetwork().connect_tcp("127.0.0.1", port, timeout=5)
            server, _ = listener.accept()
            with server:
                await stream.write(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\n", timeout=5)
                await stream.write(b"body", timeout=5)
                server.setblocking(False)
                try:
                    early: bytes | None = server.recv(1024)
                except BlockingIOError:
                    early = None  # nothing on the wire yet
                if early is not None:
                    await stream.aclose()
                    return early, b"", b""
                server.setblocking(True)
                answer = asyncio.ensure_future(stream.read(1024, timeout=5))  # flushes, then waits for the answer
                request = await asyncio.to_thread(server.recv, 1024)
                server.sendall(b"ok")
                reply = await answer
            await stream.aclose()
            return early, request, reply

        early, request, reply = asyncio.run(exchange())
    assert early is None
    assert request == b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody"
    assert reply == b"ok"


def test_a_kept_alive_connection_the_engine_closed_is_not_reused_and_the_next_request_is_served(
    tmp_path: Path, pki: dict[str, Path],
) -> None:
    """The engine restarts between two requests, and the gateway does not poll meanwhile: its idle connection to
    the old process is closed, and must be seen as closed rather than tried (which would take the engine out of
    rotation and answer 503)."""
    engine = ScriptedEngine(tmp_path / "engine", pki)
    engine.root.mkdir()
    key_file = engine.root / "engine.key"
    key_file.write_text("sk-scripted\n")
    policy = gateway_policy(engines=[(engine, key_file, "")], engine_ca=pki["engines_ca"],  # type: ignore[list-item]
                            client_cert=pki["client.crt"], client_key=pki["client.key"], interval_s=60)  # fmt: skip
    root = tmp_path / "gateway"
    root.mkdir()
    user = create_api_key(root, "user")
    with engine, GatewayProcess(root, policy_text=policy) as gateway:
        client = openai.OpenAI(base_url=gateway.base_url, api_key=user, max_retries=0, timeout=30)
        first = client.completions.create(model=scripted_engine.MODEL, prompt="x")
        engine.__exit__()
        engine.__enter__()  # the same port, a new process: the pooled connection's peer is gone
        second = client.completions.create(model=scripted_engine.MODEL, prompt="x")
    assert first.usage is not None and second.usage is not None
    assert second.usage.completion_tokens == 1


def test_a_client_leaving_mid_stream_stops_its_engine_generating(
    tmp_path: Path, make_model: Any, pki: dict[str, Path],
) -> None:
    """The client takes one chunk of a 2000-token answer and leaves: the gateway closes the engine's connection, so
    the engine records the request cut short (499), rather than generating the rest for nobody."""
    model = make_model("long.gguf", size="1MB", seed=6, never_ends=True)
    policy = engine_policy(pki["e1.crt"], pki["e1.key"], pki["gateway_ca"], sequences=1, context=4096)
    engine = EngineHostProcess(tmp_path / "e1", models=[model], policy_text=policy, name="e1")
    engine.root.mkdir()
    key_file = engine_key_file(engine)
    root = tmp_path / "gateway"
    root.mkdir()
    user = create_api_key(root, "user")
    policy = gateway_policy(engines=[(engine, key_file, "")], engine_ca=pki["engines_ca"],
                            client_cert=pki["client.crt"], client_key=pki["client.key"])  # fmt: skip
    body = {"model": "long", "prompt": "go", "max_tokens": 2000, "stream": True}
    with engine, GatewayProcess(root, policy_text=policy) as gateway:
        with httpx.stream("POST", gateway.base_url + "/completions", json=body, timeout=30,
                          headers={"authorization": f"Bearer {user}"}) as response:  # fmt: skip
            assert b'"text"' in next(response.iter_raw())
        deadline = time.monotonic() + 60  # a bound for a failing test; the engine stops within milliseconds
        records: list[dict[str, Any]] = []
        while not records and time.monotonic() < deadline:
            records = [r.fields for r in audit_records(engine.root / "audit")
                       if r.fields.get("endpoint") == "/v1/completions"]  # fmt: skip
    assert len(records) == 1, "the engine had not ended the stream 60 s after its client left"
    assert records[0]["status"] == 499 and records[0]["completion_tokens"] < 2000, records[0]
