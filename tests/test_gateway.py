"""`sealbox gateway` over engine hosts on loopback (the namespace test, tests/test_gateway_hosts.py, spreads them
over network namespaces): mutual TLS, pinned engine certificates, audit records naming the engine, fairness, 429."""

from __future__ import annotations

import hashlib
import concurrent.futures
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway_support import (
    EngineHostProcess, GatewayProcess, PrivateCA, engine_key_file, engine_policy, gateway_policy, loopback_pki,
)  # fmt: skip
from audit_records import audit_records, the_record_of
from server_support import create_api_key

from sealbox.runtime.gateway.engine_hosts import certificate_fingerprint


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    paths = loopback_pki(folder, ("e1", "e2"))
    stranger_ca = PrivateCA(folder / "stranger", "stranger CA")
    paths["stranger.crt"], paths["stranger.key"] = stranger_ca.issue("stranger", client=True)
    return paths


def _engine(tmp_path_factory: pytest.TempPathFactory, model: Path, pki: dict[str, Path], name: str,
            **limits: int) -> EngineHostProcess:  # fmt: skip
    policy = engine_policy(pki[f"{name}.crt"], pki[f"{name}.key"], pki["gateway_ca"], **limits)
    return EngineHostProcess(tmp_path_factory.mktemp(name), models=[model], policy_text=policy, name=name)


@pytest.fixture(scope="module")
def tiny_endless(make_model: Any) -> Path:
    """Served as "tiny"; never ends early, so every answer is max_tokens long and concurrent requests overlap."""
    return make_model("tiny.gguf", size="1MB", seed=0, never_ends=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_endless: Path,
            pki: dict[str, Path]) -> Iterator[dict[str, object]]:  # fmt: skip
    e1 = _engine(tmp_path_factory, tiny_endless, pki, "e1", sequences=1, queue=0)
    e2 = _engine(tmp_path_factory, tiny_endless, pki, "e2", sequences=1, queue=0)
    keys = [engine_key_file(e1), engine_key_file(e2)]
    root = tmp_path_factory.mktemp("gateway")
    policy = gateway_policy(engines=[(e1, keys[0], certificate_fingerprint(pki["e1.crt"])), (e2, keys[1], "")],
                            engine_ca=pki["engines_ca"], client_cert=pki["client.crt"], client_key=pki["client.key"],
                            per_principal=1)  # fmt: skip
    alice, bob = create_api_key(root, "alice", "care"), create_api_key(root, "bob", "research")
    gateway = GatewayProcess(root, policy_text=policy)
    with e1, e2, gateway:
        try:
            yield {"gateway": gateway, "e1": e1, "e2": e2, "alice": alice, "bob": bob,
                   "e1_key": keys[0].read_text().strip()}  # fmt: skip
        finally:
            print(gateway.stderr, e1.stderr, e2.stderr)  # shown by pytest when a test of the module fails


def _client(gateway: GatewayProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=60)


def test_a_request_through_the_gateway_is_answered_and_audited_with_its_engine_host_and_model_sha256(
    cluster: dict[str, object], tiny_endless: Path
) -> None:
    gateway = cluster["gateway"]
    assert isinstance(gateway, GatewayProcess)
    raw = _client(gateway, str(cluster["alice"])).chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4)
    reply = raw.parse()
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    engine, request_id = raw.headers["x-sealbox-engine"], raw.headers["x-request-id"]
    assert engine in {"e1", "e2"}
    sha = hashlib.sha256(tiny_endless.read_bytes()).hexdigest()
    record = the_record_of(gateway.root / "audit", request_id).fields  # durable before the answer was sent
    assert (record["engine_host"], record["model_sha256"], record["principal"], record["completion_tokens"]) == (
        engine, sha, "alice", 4)


def test_an_engine_refuses_a_client_without_the_gateways_certificate(cluster: dict[str, object],
                                                                      pki: dict[str, Path]) -> None:  # fmt: skip
    e1 = cluster["e1"]
    assert isinstance(e1, EngineHostProcess)
    trusted = ssl.create_default_context(cafile=str(pki["engines_ca"]))
    with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
        httpx.get(e1.https_url + "/health", verify=trusted, timeout=10).raise_for_status()
    stranger = ssl.create_default_context(cafile=str(pki["engines_ca"]))
    stranger.load_cert_chain(pki["stranger.crt"], pki["stranger.key"])
    with pytest.raises(httpx.HTTPError):  # a certificate from another CA: refused too
        httpx.get(e1.https_url + "/health", verify=stranger, timeout=10).raise_for_status()
    gateway = ssl.create_default_context(cafile=str(pki["engines_ca"]))
    gateway.load_cert_chain(pki["client.crt"], pki["client.key"])
    assert httpx.get(e1.https_url + "/health", verify=gateway, timeout=10).status_code == 200


def test_the_engine_status_endpoint_needs_a_key_and_reports_free_sequences_and_kv_room(
    cluster: dict[str, object], pki: dict[str, Path]
) -> None:
    e1 = cluster["e1"]
    assert isinstance(e1, EngineHostProcess)
    context = ssl.create_default_context(cafile=str(pki["engines_ca"]))
    context.load_cert_chain(pki["client.crt"], pki["client.key"])
    with httpx.Client(verify=context, timeout=10) as http:
        assert http.get(e1.https_url + "/v1/engine/status").status_code == 401
        status = http.get(e1.https_url + "/v1/engine/status",
                          headers={"authorization": f"Bearer {cluster['e1_key']}"}).json()  # fmt: skip
    (model,) = status["models"]
    assert (model["id"], model["sequences_total"], model["free_sequences"], model["queued"]) == ("tiny", 1, 1, 0)
    assert model["kv_cells_free"] == model["kv_cells_total"] > 0


def _withheld_body(gateway: GatewayProcess, key: str) -> socket.socket:
    """A request whose headers are sent and whose body is not: in flight at the gateway until the socket closes."""
    connection = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
    connection.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                       "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode())  # fmt: skip
    return connection


def test_a_principal_past_its_in_flight_bound_gets_429_while_another_is_served(cluster: dict[str, object]) -> None:
    gateway = cluster["gateway"]
    assert isinstance(gateway, GatewayProcess)
    alice = str(cluster["alice"])
    held = _withheld_body(gateway, alice)
    try:
        with pytest.raises(openai.RateLimitError) as raised:  # ordered after `held` on the gateway's one event loop
            _client(gateway, alice).completions.create(model="tiny", prompt="x", max_tokens=2)
        refused = raised.value
        assert refused.response.headers["retry-after"] == "1"
        assert refused.code == "rate_limit_exceeded"
        reply = _client(gateway, str(cluster["bob"])).completions.create(model="tiny", prompt="x", max_tokens=2)
        assert reply.usage is not None and reply.usage.completion_tokens == 2
    finally:
        held.close()


def test_when_every_engine_is_full_the_gateway_answers_429_with_retry_after(cluster: dict[str, object]) -> None:
    """Two engines of one sequence and no queue, six requests at once: two are served, the rest refused at once."""
    gateway = cluster["gateway"]
    assert isinstance(gateway, GatewayProcess)
    keys = [create_api_key(gateway.root, f"user{i}") for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(len(keys)) as pool:
        outcomes = list(pool.map(lambda key: _try(gateway, key), keys))
    served = [o for o in outcomes if isinstance(o, str)]
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    assert len(served) + len(refused) == len(keys), outcomes
    assert len(served) >= 2 and refused, outcomes
    assert {"e1", "e2"} <= set(served)  # by load: the second request went to the engine left free
    for error in refused:
        assert error.code == "engines_full"
        assert int(error.response.headers["retry-after"]) >= 1


def _try(gateway: GatewayProcess, key: str) -> str | openai.RateLimitError:
    try:
        raw = _client(gateway, key).completions.with_raw_response.create(model="tiny", prompt="count", max_tokens=300)
    except openai.RateLimitError as exc:
        return exc
    return raw.headers["x-sealbox-engine"]


def test_an_engine_presenting_another_certificate_than_the_pinned_one_is_never_used(
    cluster: dict[str, object], pki: dict[str, Path], tmp_path: Path
) -> None:
    """e1's certificate chains to the engines' CA, but the policy pins e2's: the gateway keeps e1 out of rotation."""
    e1 = cluster["e1"]
    assert isinstance(e1, EngineHostProcess)
    key = tmp_path / "e1.key"
    key.write_text(str(cluster["e1_key"]))
    policy = gateway_policy(engines=[(e1, key, certificate_fingerprint(pki["e2.crt"]))], engine_ca=pki["engines_ca"],
                            client_cert=pki["client.crt"], client_key=pki["client.key"])  # fmt: skip
    root = tmp_path / "gateway"
    root.mkdir()
    user = create_api_key(root, "user")
    with GatewayProcess(root, policy_text=policy) as gateway:
        ready = httpx.get(gateway.url + "/ready", timeout=10)
        with pytest.raises(openai.APIStatusError) as refused:
            _client(gateway, user).completions.create(model="tiny", prompt="x", max_tokens=2)
    assert ready.status_code == 503
    (engine,) = ready.json()["engines"]
    assert engine["healthy"] is False and "pins" in engine["problem"], engine
    assert refused.value.status_code == 503


def test_a_stream_cut_by_its_engine_ends_with_an_error_and_is_not_replayed_on_another(
    tmp_path_factory: pytest.TempPathFactory, make_model: object, pki: dict[str, Path]
) -> None:
    model = make_model("endless.gguf", size="1MB", seed=5, never_ends=True)  # type: ignore[operator]
    engines = {}
    for name in ("e1", "e2"):
        policy = engine_policy(pki[f"{name}.crt"], pki[f"{name}.key"], pki["gateway_ca"], sequences=1, context=4096)
        engines[name] = EngineHostProcess(tmp_path_factory.mktemp(name), models=[model], policy_text=policy, name=name)
    keys = {name: engine_key_file(engine) for name, engine in engines.items()}
    root = tmp_path_factory.mktemp("gateway-cut")
    policy = gateway_policy(engines=[(engines[n], keys[n], "") for n in engines], engine_ca=pki["engines_ca"],
                            client_cert=pki["client.crt"], client_key=pki["client.key"])  # fmt: skip
    user = create_api_key(root, "user")
    body = {"model": "endless", "prompt": "go on", "max_tokens": 2000, "stream": True}
    with engines["e1"], engines["e2"], GatewayProcess(root, policy_text=policy) as gateway:
        with httpx.stream("POST", gateway.base_url + "/completions", json=body, timeout=60,
                          headers={"authorization": f"Bearer {user}"}) as response:  # fmt: skip
            assert response.status_code == 200
            chunks = response.iter_raw()
            received = next(chunks)  # the client holds tokens now
            victim = engines[response.headers["x-sealbox-engine"]]
            other = next(e for e in engines.values() if e is not victim)
            victim.process.kill()  # type: ignore[union-attr]
            received += b"".join(chunks)
        request_id = response.headers["x-request-id"]
    events = [e for e in received.decode().split("\n\n") if e.strip()]
    assert b'"text"' in received.split(b"\n\n")[0]
    assert '"code": "engine_failed"' in events[-1] and "data: [DONE]" not in events
    record = the_record_of(gateway.root / "audit", request_id).fields
    assert (record["engine_host"], record["retried_from"], record["finish_reason"]) == (victim.name, [], "engine_failed")
    completions = [r for r in audit_records(other.root / "audit") if r.fields.get("endpoint") == "/v1/completions"]
    assert completions == []  # the other engine never saw the request
