"""Schemathesis against the live server's own OpenAPI document: generated requests, valid and not, never get a 5xx.

The schemathesis CLI runs as a child against a real `sealbox serve` on loopback, authenticated with a real API key;
its hooks (`schemathesis_hooks.py`) narrow the document to what a valid request needs (the served model names, a
user message with content, `max_tokens` within the cap) so that many generated requests reach the engine. The run is
bounded (examples per operation, a low `max_tokens` cap) to stay well under a minute on two cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server_support import ServerProcess, create_api_key

HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
MAX_EXAMPLES = 50
MAX_TOKENS = 16
POLICY = f"""
[limits]
context = 256
max_tokens = {MAX_TOKENS}
max_sequences = 4
queue_size = 64
"""


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, embedding_model: Path
) -> Iterator[tuple[ServerProcess, str]]:
    root = tmp_path_factory.mktemp("appliance")
    key = create_api_key(root, "schemathesis")
    with ServerProcess(root, models=[tiny_model, embedding_model], policy_text=POLICY) as process:
        yield process, key


def test_generated_requests_against_the_openapi_document_never_get_a_server_error(
    served: tuple[ServerProcess, str], tmp_path: Path
) -> None:
    server, key = served
    junit = tmp_path / "junit.xml"
    command = [
        str(SCHEMATHESIS), "run", f"{server.url}/openapi.json",
        "--checks", "not_a_server_error",
        "--max-examples", str(MAX_EXAMPLES),
        "--phases", "examples,coverage,fuzzing",
        "--seed", "20261201",
        "--workers", "2",
        "--header", f"Authorization: Bearer {key}",
        "--request-timeout", "30",
        "--generation-database", "none",
        "--report", "junit", "--report-junit-path", str(junit),
        "--no-color",
    ]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "SEALBOX_TEST_MODELS": "tiny,embedder",
           "SEALBOX_TEST_EMBEDDING_MODELS": "embedder",
           "SEALBOX_TEST_MAX_TOKENS": str(MAX_TOKENS)}  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    output = run.stdout[-6000:] + run.stderr[-3000:]

    assert run.returncode == 0, output
    suite = ElementTree.parse(junit).getroot()
    cases = suite.findall(".//testcase")
    operations = {case.get("name") for case in cases}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings"} <= operations, output
    failed = [case.get("name") for case in cases if case.find("failure") is not None or case.find("error") is not None]
    assert failed == [], output
    assert server.alive, server.stderr
    # Not only refusals: generated requests were answered by the engine (the server counts its responses).
    for endpoint in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        assert _answered(server, endpoint) > 0, endpoint


def _answered(server: ServerProcess, endpoint: str) -> float:
    """How many 200s the server's `sealbox_http_responses_total` counter holds for `endpoint`."""
    metrics = httpx.get(f"{server.url}/metrics").text
    pattern = rf'^sealbox_http_responses_total{{endpoint="{re.escape(endpoint)}",status="200"}} (\S+)$'
    return sum(float(match) for match in re.findall(pattern, metrics, re.MULTILINE))


def test_the_server_still_answers_after_the_generated_requests(served: tuple[ServerProcess, str]) -> None:
    server, key = served
    answer = httpx.post(f"{server.base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"},
                        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                              "temperature": 0})  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert httpx.get(f"{server.url}/ready").json()["status"] == "ready"
