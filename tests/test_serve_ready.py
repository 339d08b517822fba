"""`/ready` tells anyone only what a load balancer needs; the details (host paths, digests, problems) need a key.

Before, `/ready` showed every caller the absolute path of each model file and its digest: a map of the host for a
stranger. Now a caller without a valid key gets ready/not ready and counts; a caller with one gets the details.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server_support import ServerProcess, create_api_key


class Served:
    def __init__(self, server: ServerProcess, key: str, model: Path) -> None:
        self.server, self.key, self.model = server, key, model

    def ready(self, headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.get(f"{self.server.url}/ready", headers=headers, timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("appliance")
    key = create_api_key(root, "alice")
    with ServerProcess(root, models=[tiny_model], policy_text="[limits]\ncontext = 512\n") as server:
        yield Served(server, key, tiny_model)


@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer sbx-not-a-key"}, {"Authorization": "Basic eDp5"}],
                         ids=["no key", "a wrong key", "not a bearer key"])  # fmt: skip
def test_ready_without_a_valid_key_says_only_ready_and_counts(served: Served, headers: dict[str, str] | None):
    answer = served.ready(headers)
    assert answer.status_code == 200
    assert answer.json() == {"status": "ready", "models": {"ready": 1, "total": 1}}
    digest = hashlib.sha256(served.model.read_bytes()).hexdigest()
    assert str(served.model.parent) not in answer.text and digest not in answer.text


def test_ready_with_a_valid_key_shows_each_models_path_digest_and_problems(served: Served):
    answer = served.ready({"Authorization": f"Bearer {served.key}"})
    assert answer.status_code == 200
    body = answer.json()
    (model,) = body["models"]
    assert model["id"] == "tiny" and model["ready"] is True and model["problem"] is None
    assert model["path"] == str(served.model)
    assert model["sha256"] == hashlib.sha256(served.model.read_bytes()).hexdigest()
    assert body["audit"] == "ok"
