"""The evaluation gate of `bundle install`, end to end: real bundles, a real staging server, a real serving v1.

v1 carries a suite whose exact outputs `bundle create --record-expected` recorded by serving v1's model (greedy
decoding, this build). v2 is a delta that swaps the model for other weights but keeps v1's expectations: its suite fails
in the staging server, so `current` stays on v1, which keeps answering, and v2 stays staged with its result. v3 records
its own expectations and goes live. `sealbox audit export` then holds all three outcomes.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from openai import OpenAI

from sealbox.runtime.exit_codes import ExitCode
from sealbox.runtime.models.synthetic import write_test_model
from tests.install_support import make_keys
from tests.server_support import ServerProcess, create_api_key, sealbox

PROMPT_SUITE = """
min_pass = 1.0
model = "tiny"

[staging]
threads = 1

[[cases]]
name = "continue-a-sentence"
prompt = "The quick brown fox"
max_tokens = 12

[[cases]]
name = "another-prompt"
prompt = "Once upon a time"
max_tokens = 8
[cases.expect]
max_latency_ms = 600000
"""


def _model(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_test_model(folder / "tiny.gguf", size="1MB", seed=seed)


def _create(out: Path, keys: Path, version: int, model: Path, suite: Path, *extra: str) -> dict:
    result = sealbox("bundle", "create", "--name", "demo", "--version", str(version), "--out", str(out),
                     "--sign-key", str(keys / "alice.key"), "--model", str(model), "--eval-suite", str(suite),
                     "--json", *extra)  # fmt: skip
    return json.loads(result.stdout)


def _carried_suite(bundle: Path, base: Path | None = None) -> dict:
    envelope = json.loads((bundle / "manifest.json").read_bytes())
    manifest = json.loads(base64.b64decode(envelope["payload"]))
    [entry] = [blob for blob in manifest["blobs"] if blob["role"] == "eval"]
    for directory in (bundle, base):
        if directory is not None and (path := directory / "blobs" / "sha256" / entry["sha256"]).exists():
            return json.loads(path.read_bytes())
    raise AssertionError("the suite blob is in neither bundle")


def _install(bundle: Path, root: Path, *extra: str, input: str | None = None):
    return sealbox("bundle", "install", str(bundle), *extra, root=root, check=False, input=input)


def _complete(server: ServerProcess, key: str, prompt: str, max_tokens: int) -> str:
    client = OpenAI(base_url=server.base_url, api_key=key, max_retries=0)
    answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, seed=0)
    return answer.choices[0].text


def _exported_events(root: Path, tmp_path: Path) -> list[tuple[str, dict]]:
    out = tmp_path / "audit.jsonl"
    sealbox("audit", "export", "--out", str(out), root=root)
    events = []
    for line in out.read_text().splitlines():
        data = json.loads(line)
        if "event" in data:
            events.append((data["event"], data.get("fields", {})))
    return events


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    return make_keys(tmp_path / "keys", "alice")


def test_gate_refuses_a_delta_whose_suite_fails_while_v1_keeps_serving_then_v3_goes_live(
    tmp_path: Path, keys: Path
) -> None:
    root = tmp_path / "root"
    sealbox("trust", "add", str(keys / "alice.pub"), root=root)
    suite = tmp_path / "suite.toml"
    suite.write_text(PROMPT_SUITE)
    v1_model, v2_model = _model(tmp_path / "m1", seed=0), _model(tmp_path / "m2", seed=7)

    # v1: expectations recorded by serving v1's own model on this (the "connected") host.
    v1 = tmp_path / "v1"
    _create(v1, keys, 1, v1_model, suite, "--record-expected")
    recorded = _carried_suite(v1)
    expected = {case["name"]: case["expect"]["exact"] for case in recorded["cases"]}
    assert all(isinstance(text, str) and text for text in expected.values())
    assert recorded["recorded_with"]["sealbox"]
    installed = _install(v1, root)
    assert installed.returncode == 0, installed.stderr
    assert "evaluation passed: 2/2 cases" in installed.stdout
    key = create_api_key(root, "alice")

    with ServerProcess(root=root) as server:
        assert _complete(server, key, "The quick brown fox", 12) == expected["continue-a-sentence"]

        # v2: a delta with other weights, gated by v1's recorded outputs: the gate must refuse it.
        v1_suite = tmp_path / "v1-suite.json"
        v1_suite.write_text(json.dumps(recorded))
        v2 = tmp_path / "v2"
        _create(v2, keys, 2, v2_model, v1_suite, "--base", str(v1))
        refused = _install(v2, root)
        assert refused.returncode == ExitCode.EVALUATION_FAILED, refused.stderr
        assert "demo version 2 not activated: evaluation FAILED" in refused.stderr
        assert "continue-a-sentence" in refused.stderr
        assert (root / "current").readlink() == Path("releases/demo-1")
        assert not (root / "releases" / "demo-2").exists()
        staged = json.loads((root / "staging" / "install-demo-2" / "release" / "evaluation.json").read_text())
        assert staged["status"] == "failed"
        assert not next(c for c in staged["cases"] if c["name"] == "continue-a-sentence")["checks"]["exact"]
        # v1 keeps answering, exactly as before.
        assert _complete(server, key, "The quick brown fox", 12) == expected["continue-a-sentence"]
        listing = json.loads(sealbox("bundle", "list", "--json", root=root).stdout)
        assert listing["current"] == "demo-1"
        assert [item["release"] for item in listing["staged"]] == ["demo-2"]
        assert listing["staged"][0]["evaluation"]["status"] == "failed"

    # v3: the new weights with expectations recorded for them: the gate passes and v3 goes live.
    v3 = tmp_path / "v3"
    _create(v3, keys, 3, v2_model, suite, "--record-expected", "--base", str(v1))
    v3_expected = {c["name"]: c["expect"]["exact"] for c in _carried_suite(v3, v1)["cases"]}
    accepted = _install(v3, root)
    assert accepted.returncode == 0, accepted.stderr
    assert (root / "current").readlink() == Path("releases/demo-3")
    with ServerProcess(root=root) as server:
        assert _complete(server, key, "The quick brown fox", 12) == v3_expected["continue-a-sentence"]
        models = OpenAI(base_url=server.base_url, api_key=key).models.list().data
        assert models[0].model_extra["origin"] == str(v2_model)  # the origin travels into /v1/models
        assert models[0].model_extra["license"] == "apache-2.0"  # as the GGUF header states it
    listing = json.loads(sealbox("bundle", "list", "--json", root=root).stdout)
    assert {r["release"]: r["evaluation"]["status"] for r in listing["releases"]} == {"demo-1": "passed", "demo-3": "passed"}

    events = _exported_events(root, tmp_path)
    evaluations = [(f["version"], f["passed"]) for name, f in events if name == "bundle.eval"]
    assert evaluations == [(1, True), (2, False), (3, True)]
    refusals = [f for name, f in events if name == "bundle.refused"]
    assert [(f["version"], f["error"]) for f in refusals] == [(2, "EvaluationFailedError")]
    activations = [f["version"] for name, f in events if name == "bundle.activate"]
    assert activations == [1, 3]

    doctor = json.loads(sealbox("doctor", "--json", root=root, check=False).stdout)
    [check] = [c for c in doctor["checks"] if c["name"] == "evaluation"]
    assert check["status"] == "pass" and "passed 2/2" in check["summary"]
    [models_check] = [c for c in doctor["checks"] if c["name"] == "models"]
    assert f"license apache-2.0 · origin {v2_model}" in models_check["details"][0]

    # On demand, against `current`: the same suite, recorded in the audit log.
    again = sealbox("eval", "--json", root=root)
    assert json.loads(again.stdout)["status"] == "passed"
    assert [f["passed"] for name, f in _exported_events(root, tmp_path) if name == "eval.run"] == [True]


def test_skip_eval_is_refused_without_an_answer_and_recorded_when_confirmed(tmp_path: Path, keys: Path) -> None:
    root = tmp_path / "root"
    sealbox("trust", "add", str(keys / "alice.pub"), root=root)
    suite = tmp_path / "suite.toml"
    suite.write_text(PROMPT_SUITE.replace('max_tokens = 12\n', 'max_tokens = 12\n[cases.expect]\nexact = "never"\n'))
    bundle = tmp_path / "v1"
    _create(bundle, keys, 1, _model(tmp_path / "m", seed=0), suite)

    declined = _install(bundle, root, "--skip-eval", input="")
    assert declined.returncode == ExitCode.EVALUATION_FAILED, declined.stderr
    assert "--skip-eval for demo version 1 was not confirmed" in declined.stderr
    assert not (root / "current").exists()

    failed = _install(bundle, root)
    assert failed.returncode == ExitCode.EVALUATION_FAILED and "failing: continue-a-sentence" in failed.stderr
    assert not (root / "current").exists()

    skipped = _install(bundle, root, "--skip-eval", "--yes")
    assert skipped.returncode == 0, skipped.stderr
    assert (root / "current").readlink() == Path("releases/demo-1")
    events = _exported_events(root, tmp_path)
    assert [f["version"] for name, f in events if name == "bundle.eval.skipped"] == [1]
    doctor = json.loads(sealbox("doctor", "--json", root=root, check=False).stdout)
    [check] = [c for c in doctor["checks"] if c["name"] == "evaluation"]
    assert check["status"] == "warn" and "skipped" in check["summary"]

    # On demand, a suite the live release fails: exit 29, recorded, and the doctor reports the drift as a failure.
    drifted = sealbox("eval", "--suite", str(suite), root=root, check=False)
    assert drifted.returncode == ExitCode.EVALUATION_FAILED, drifted.stderr
    assert "evaluation FAILED: 0/2" not in drifted.stdout and "evaluation FAILED: 1/2 cases" in drifted.stdout
    assert [f["passed"] for name, f in _exported_events(root, tmp_path) if name == "eval.run"] == [False]
    doctor = json.loads(sealbox("doctor", "--json", root=root, check=False).stdout)
    [check] = [c for c in doctor["checks"] if c["name"] == "evaluation"]
    assert check["status"] == "fail" and "the last evaluation failed" in check["summary"]


def test_a_bundle_cannot_bring_its_own_evaluation_result(tmp_path: Path, keys: Path) -> None:
    from tests.install_support import Item, Publisher, model_item

    root = tmp_path / "root"
    sealbox("trust", "add", str(keys / "alice.pub"), root=root)
    forged = tmp_path / "evaluation.json"
    forged.write_text(json.dumps({"status": "passed", "cases": []}))
    model = _model(tmp_path / "m", seed=0)
    bundle = Publisher(keys).publish(tmp_path / "b", [model_item(model), Item("file", "evaluation.json", forged)],
                                     version=1)  # fmt: skip
    refused = _install(bundle, root)
    assert refused.returncode == 27, refused.stderr
    assert "evaluation.json: the release keeps that name for itself" in refused.stderr
    assert not (root / "current").exists()


def test_a_bundle_with_two_suites_is_refused_before_anything_goes_live(tmp_path: Path, keys: Path) -> None:
    from tests.install_support import Item, Publisher, model_item

    root = tmp_path / "root"
    sealbox("trust", "add", str(keys / "alice.pub"), root=root)
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text('{"cases": [{"name": "a", "prompt": "x", "expect": {"regex": "."}}]}')
    second.write_text('{"cases": [{"name": "b", "prompt": "x", "expect": {"regex": "."}}]}')
    items = [model_item(_model(tmp_path / "m", seed=0)), Item("eval", "eval/a.json", first), Item("eval", "eval/b.json", second)]
    bundle = Publisher(keys).publish(tmp_path / "b", items, version=1)
    refused = _install(bundle, root)
    assert refused.returncode == ExitCode.EVALUATION_FAILED, refused.stderr
    assert "carries 2 evaluation suites" in refused.stderr
    assert not (root / "current").exists()
