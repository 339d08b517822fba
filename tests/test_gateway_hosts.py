"""The gateway in front of three engine hosts, each a real `sealbox serve` in its own network namespace, joined to
the gateway's namespace by veth pairs (10.200.<i>.0/24, created here; no other address is ever a target)."""

from __future__ import annotations

import concurrent.futures
import os
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from audit_records import audit_records
from gateway_support import EngineHostProcess, GatewayProcess, PrivateCA, engine_key_file, engine_policy, gateway_policy
from netns_support import Star, enter_namespace, namespaces_unavailable
from server_support import SEALBOX, create_api_key

from sealbox.runtime.gateway.engine_hosts import certificate_fingerprint

ENGINE_PORT = 8443
GATEWAY_PORT = 8090
MAX_TOKENS = 300


@pytest.fixture(scope="module")
def star() -> Iterator[Star]:
    reason = namespaces_unavailable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the multi-host gateway test: {reason}")
        pytest.skip(reason)
    with Star(spokes=3) as created:
        yield created


@pytest.fixture(scope="module")
def slow_model(make_model: Any) -> Path:
    """Never ends early: every answer is max_tokens long, so requests overlap long enough to be caught in flight."""
    return make_model("never-ends.gguf", size="1MB", seed=3, never_ends=True)


class Cluster:
    def __init__(self, star: Star, folder: Path, model: Path) -> None:
        self.star = star
        engines_ca, gateway_ca = PrivateCA(folder / "engines", "engines CA"), PrivateCA(folder / "gw", "gateway CA")
        self.engines_ca, self.gateway_ca = engines_ca.cert_path, gateway_ca.cert_path
        self.client_cert, self.client_key = gateway_ca.issue("gateway", client=True)
        self.stranger = PrivateCA(folder / "stranger", "stranger CA").issue("stranger", client=True)
        self.engines: dict[str, EngineHostProcess] = {}
        pinned = []
        for i in (1, 2, 3):
            name, address = f"e{i}", star.spoke_address(i)
            cert, key = engines_ca.issue(name, address=address)
            root = folder / name
            root.mkdir()
            engine = EngineHostProcess(root, models=[model], name=name, host=address, port=ENGINE_PORT,
                                       policy_text=engine_policy(cert, key, self.gateway_ca, sequences=2, queue=16),
                                       executable=["ip", "netns", "exec", star.spoke(i), *SEALBOX])  # fmt: skip
            self.engines[name] = engine
            pinned.append((engine, engine_key_file(engine), certificate_fingerprint(cert)))
        root = folder / "gateway"
        root.mkdir()
        self.key = create_api_key(root, "ward-7", "care")
        policy = gateway_policy(engines=pinned, engine_ca=self.engines_ca, client_cert=self.client_cert,
                                client_key=self.client_key, interval_s=0.5)  # fmt: skip
        self.gateway = GatewayProcess(root, policy_text=policy, port=GATEWAY_PORT,
                                      executable=["ip", "netns", "exec", star.hub, *SEALBOX])  # fmt: skip

    def start(self) -> None:
        for engine in self.engines.values():
            engine.start()
        self.gateway.start()

    def stop(self) -> None:
        for process in [self.gateway, *self.engines.values()]:
            process.stop()

    def pool(self, workers: int) -> concurrent.futures.ThreadPoolExecutor:
        """Threads on the gateway's host (its namespace): they reach the gateway on its loopback, and the link."""
        return concurrent.futures.ThreadPoolExecutor(workers, initializer=enter_namespace, initargs=(self.star.hub,))

    def ask(self, prompt: str) -> tuple[str, str, int]:
        client = openai.OpenAI(base_url=self.gateway.base_url, api_key=self.key, max_retries=0, timeout=120)
        raw = client.completions.with_raw_response.create(model="never-ends", prompt=prompt, max_tokens=MAX_TOKENS)
        reply = raw.parse()
        assert reply.usage is not None
        return raw.headers["x-sealbox-engine"], raw.headers["x-request-id"], reply.usage.completion_tokens

    def gateway_status(self) -> dict[str, dict[str, Any]]:
        response = httpx.get(self.gateway.base_url + "/gateway/status", timeout=10,
                             headers={"authorization": f"Bearer {self.key}"})  # fmt: skip
        return {engine["name"]: engine for engine in response.json()["engines"]}


@pytest.fixture(scope="module")
def cluster(star: Star, tmp_path_factory: pytest.TempPathFactory, slow_model: Path) -> Iterator[Cluster]:
    created = Cluster(star, tmp_path_factory.mktemp("hosts"), slow_model)
    try:
        created.start()
        yield created
    finally:
        created.stop()
        print(created.gateway.stderr)  # shown when a test of the module fails


def test_requests_spread_over_the_three_engine_hosts_by_load(cluster: Cluster) -> None:
    with cluster.pool(9) as pool:
        answers = list(pool.map(cluster.ask, [f"question {i}" for i in range(9)]))
    assert all(tokens == MAX_TOKENS for _, _, tokens in answers)
    served = [engine for engine, _, _ in answers]
    # Two free sequences each: nine overlapping requests cannot all fit on one or two engines' reported room.
    assert set(served) == {"e1", "e2", "e3"}, served


def _https_health(cluster: Cluster, identity: tuple[Path, Path] | None) -> int:
    context = ssl.create_default_context(cafile=str(cluster.engines_ca))
    if identity is not None:
        context.load_cert_chain(*identity)
    url = f"https://{cluster.star.spoke_address(1)}:{ENGINE_PORT}/health"
    return httpx.get(url, verify=context, timeout=10).status_code


def test_a_stranger_on_the_link_cannot_reach_an_engine_without_the_gateways_client_certificate(cluster: Cluster) -> None:
    with cluster.pool(1) as pool:
        assert pool.submit(_https_health, cluster, (cluster.client_cert, cluster.client_key)).result() == 200
        with pytest.raises(httpx.HTTPError):  # no client certificate at all
            pool.submit(_https_health, cluster, None).result()
        with pytest.raises(httpx.HTTPError):  # a client certificate the engines' CA list does not hold
            pool.submit(_https_health, cluster, cluster.stranger).result()


def test_killing_an_engine_mid_run_loses_no_request_that_had_not_started_streaming(cluster: Cluster) -> None:
    victim = cluster.engines["e2"]
    with cluster.pool(13) as pool:
        futures = [pool.submit(cluster.ask, f"ward round {i}") for i in range(12)]
        # Watched from the gateway's own count: kill e2 while requests are in flight on it.
        while pool.submit(cluster.gateway_status).result()["e2"]["in_flight"] < 2:
            assert not all(f.done() for f in futures), "every request finished before e2 had two in flight"
        victim.process.kill()  # type: ignore[union-attr]
        victim.process.wait()  # type: ignore[union-attr]
        answers = [future.result() for future in futures]  # none raises: no accepted request is lost
        assert all(tokens == MAX_TOKENS for _, _, tokens in answers)
        assert {engine for engine, _, _ in answers} <= {"e1", "e2", "e3"}
        status = pool.submit(cluster.gateway_status).result()
        assert status["e2"]["healthy"] is False and status["e1"]["healthy"] and status["e3"]["healthy"]
        after = list(pool.map(cluster.ask, [f"after {i}" for i in range(4)]))
    assert {engine for engine, _, _ in after} <= {"e1", "e3"}
    ids = [request_id for _, request_id, _ in answers]
    records = {r.fields["request_id"]: r.fields for r in audit_records(cluster.gateway.root / "audit")
               if r.fields.get("request_id") in ids}  # fmt: skip
    assert len(records) == len(ids)
    moved = [r for r in records.values() if "e2" in r["retried_from"]]
    assert moved, "no request was in flight on e2 when it was killed"
    assert all(r["engine_host"] != "e2" and r["status"] == 200 for r in moved)


def test_a_failed_engine_returns_to_rotation_when_healthy_again(cluster: Cluster) -> None:
    victim = cluster.engines["e2"]
    if victim.alive:
        victim.process.kill()  # type: ignore[union-attr]
        victim.process.wait()  # type: ignore[union-attr]
    victim.stderr_lines.clear()
    victim.start()
    with cluster.pool(1) as pool:
        while not pool.submit(cluster.gateway_status).result()["e2"]["healthy"]:
            pass  # the gateway polls every 0.5 s; the loop ends at its first good poll
        with cluster.pool(9) as spread:
            served = {engine for engine, _, _ in spread.map(cluster.ask, [f"back {i}" for i in range(9)])}
    assert "e2" in served
