"""A client that hangs up on a non-streamed request cancels it: its sequence and KV cells are freed at the next step,
not when the whole answer has been generated for nobody."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server_support import ServerProcess

POLICY = """
[limits]
context = 2048
max_tokens = 2000
max_sequences = 2
queue_size = 4
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("appliance")
    with ServerProcess(root, models=[tiny_model], policy_text=POLICY, no_auth=True) as process:
        yield process


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and all(part in match.group(1) for part in wanted.split(",")):
            return float(match.group(2))
    return 0.0


def wait_for(condition, what: str, timeout_s: float = 60) -> None:
    """Observe until `condition()` holds; each try reads the server's own metrics."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_a_client_that_hangs_up_on_a_non_streamed_request_frees_its_sequence(server: ServerProcess) -> None:
    cancelled_before = metric(server, "sealbox_requests_total", model="tiny", status="cancelled")
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2000,
                       "temperature": 0}).encode()  # fmt: skip
    connection = socket.create_connection(("127.0.0.1", server.port))
    connection.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    wait_for(lambda: metric(server, "sealbox_running_sequences", model="tiny") == 1, "the request to run")
    connection.close()
    wait_for(lambda: metric(server, "sealbox_running_sequences", model="tiny") == 0, "the sequence to be freed")
    assert metric(server, "sealbox_requests_total", model="tiny", status="cancelled") == cancelled_before + 1
    assert metric(server, "sealbox_kv_cells_used", model="tiny") == 0
    assert metric(server, "sealbox_generated_tokens_total", model="tiny") < 2000, "it ran to the end for nobody"
    assert server.alive
