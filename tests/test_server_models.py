"""Which models `sealbox serve` serves, and when it refuses to start at all.

A release is built by hand under a temporary root (`releases/demo-1/` with its `release.json`, the models copied in,
`current` a relative symlink to it) and served without `--model`: each malformed GGUF, and a model whose bytes are not
the ones the release names, is listed in `/ready` with its problem, while the good model answers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server_support import ServerProcess, create_api_key, sealbox

EXIT_REFUSED = 3
MALFORMED = ("not_gguf", "truncated", "duplicate_vocab", "bad_magic_version")
"""`sealbox.runtime.models.synthetic`'s kinds; `duplicate_vocab` passes our header parser and makes llama.cpp abort the process."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flat(text: str) -> str:
    """Console output with its line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, make_model, make_malformed_model) -> Path:
    root = tmp_path_factory.mktemp("appliance")
    directory = root / "releases" / "demo-1"
    (directory / "models").mkdir(parents=True)
    entries = []

    def add(name: str, source: Path, sha256: str | None = None) -> None:
        target = directory / "models" / f"{name}.gguf"
        shutil.copyfile(source, target)
        entries.append({"name": name, "path": f"models/{name}.gguf", "sha256": sha256 or _sha256(target)})

    add("good", tiny_model)
    for kind in MALFORMED:
        add(kind, make_malformed_model(kind))
    # A loadable model, but not the bytes the release promises (a file swapped after install).
    add("tampered", make_model("other.gguf", size="1MB", seed=7), sha256=_sha256(tiny_model))
    (directory / "policy.toml").write_text("[limits]\ncontext = 512\nmax_tokens = 64\nmax_sequences = 2\n")
    (directory / "release.json").write_text(
        json.dumps({"name": "demo", "version": 1, "models": entries, "policy": "policy.toml"})
    )
    (root / "current").symlink_to(Path("releases") / "demo-1")
    return root


@pytest.fixture(scope="module")
def server(release: Path) -> Iterator[ServerProcess]:
    with ServerProcess(release, no_auth=True, threads=1) as process:  # no --model: the active release's models
        yield process


@pytest.fixture(scope="module")
def ready(server: ServerProcess) -> dict:
    response = httpx.get(f"{server.url}/ready")
    assert response.status_code == 200, response.text
    return response.json()


def _entry(ready: dict, name: str) -> dict:
    return next(model for model in ready["models"] if model["id"] == name)


def test_ready_lists_every_model_of_the_release(ready: dict) -> None:
    assert ready["status"] == "ready"
    assert sorted(model["id"] for model in ready["models"]) == sorted(["good", "tampered", *MALFORMED])


@pytest.mark.parametrize("kind", MALFORMED)
def test_a_malformed_model_is_listed_as_not_ready_with_its_problem(ready: dict, kind: str) -> None:
    entry = _entry(ready, kind)
    assert entry["ready"] is False
    assert entry["problem"] and f"{kind}.gguf" in entry["problem"]


def test_the_good_model_is_served_beside_the_broken_ones(server: ServerProcess, ready: dict, tiny_model: Path) -> None:
    good = _entry(ready, "good")
    assert good["ready"] is True and good["problem"] is None
    assert good["sha256"] == _sha256(tiny_model)
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    assert [model.id for model in client.models.list().data] == ["good"]
    answer = client.chat.completions.create(model="good", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                            temperature=0)  # fmt: skip
    assert answer.usage.completion_tokens == 4
    assert server.alive


def test_a_model_whose_bytes_do_not_match_the_release_is_refused_with_the_reason(
    ready: dict, tiny_model: Path
) -> None:
    entry = _entry(ready, "tampered")
    assert entry["ready"] is False
    assert "does not match the release's" in entry["problem"]
    assert _sha256(tiny_model) in entry["problem"]  # the digest promised, beside the one found
    assert entry["sha256"] != _sha256(tiny_model)


def test_a_request_to_a_model_that_failed_its_checks_is_unavailable_not_unknown(server: ServerProcess) -> None:
    request = {"model": "duplicate_vocab", "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(f"{server.base_url}/chat/completions", json=request)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "model_unavailable" and "duplicate_vocab" in error["message"]


def test_the_operator_is_told_at_start_which_models_are_not_served(server: ServerProcess) -> None:
    log = _flat(server.stderr)
    for name in ("tampered", *MALFORMED):
        assert f"model {name} is not served" in log
    assert "sealbox serving good on" in log


# -- refusals at start -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_no_auth_on_a_non_loopback_address_is_refused_at_start(
    tmp_path: Path, tiny_model: Path, host: str
) -> None:
    refused = ServerProcess(tmp_path, models=[tiny_model], no_auth=True, extra_args=["--host", host]).run_to_exit()
    assert refused.returncode == EXIT_REFUSED
    assert "--no-auth" in refused.stderr and "loopback" in refused.stderr
    assert "sealbox serving" not in refused.stderr


def test_serving_without_api_keys_is_refused_naming_the_command_that_makes_one(
    tmp_path: Path, tiny_model: Path
) -> None:
    refused = ServerProcess(tmp_path, models=[tiny_model]).run_to_exit()
    assert refused.returncode == EXIT_REFUSED
    assert "sealbox keys api create" in _flat(refused.stderr)
    assert "sealbox serving" not in refused.stderr


def test_serving_when_every_api_key_is_revoked_is_refused(tmp_path: Path, tiny_model: Path) -> None:
    create_api_key(tmp_path, "carol")
    sealbox("keys", "api", "revoke", "carol", root=tmp_path)
    refused = ServerProcess(tmp_path, models=[tiny_model]).run_to_exit()
    assert refused.returncode == EXIT_REFUSED
    assert "sealbox keys api create" in _flat(refused.stderr)
