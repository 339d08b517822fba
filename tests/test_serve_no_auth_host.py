"""`--no-auth` (development, loopback only) serves only requests whose `Host` names its loopback address.

Without keys, a loopback server trusts whoever reaches 127.0.0.1, and a web page can, through DNS rebinding: the
attacker's name resolves to 127.0.0.1 and the browser sends the page's requests with `Host: attacker.example:PORT`.
The server refuses any `Host` that is not 127.0.0.1, localhost or [::1] (with its port), with an OpenAI-shaped 403.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server_support import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("appliance")
    with ServerProcess(root, models=[tiny_model], no_auth=True, policy_text="[limits]\ncontext = 512\n") as process:
        yield process


@pytest.mark.parametrize("host", ["attacker.example:{port}", "attacker.example", "127.0.0.1.nip.io:{port}",
                                  "192.168.1.10:{port}", "localhost.attacker.example:{port}"])  # fmt: skip
@pytest.mark.parametrize("path", ["/v1/models", "/ready", "/metrics"])
def test_a_request_naming_another_host_is_refused_with_an_openai_error(server: ServerProcess, host: str, path: str):
    answer = httpx.get(f"{server.url}{path}", headers={"Host": host.format(port=server.port)}, timeout=30)
    assert answer.status_code == 403
    error = answer.json()["error"]
    assert error["code"] == "host_not_allowed" and error["type"] == "permission_error"
    assert "data" not in answer.json() and "models" not in answer.json()


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "LOCALHOST:{port}"])
def test_the_loopback_names_of_the_listen_address_are_served(server: ServerProcess, host: str):
    answer = httpx.get(f"{server.url}/v1/models", headers={"Host": host.format(port=server.port)}, timeout=30)
    assert answer.status_code == 200
    assert [model["id"] for model in answer.json()["data"]] == ["tiny"]


def test_the_openai_client_through_localhost_is_served(server: ServerProcess):
    client = openai.OpenAI(base_url=f"http://localhost:{server.port}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.usage is not None and reply.usage.completion_tokens == 2
