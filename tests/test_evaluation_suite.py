"""Evaluation suites: the format (TOML or JSON, refused with the field named) and each check against real answers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sealbox.runtime.evaluation import (
    Case,
    EvalClient,
    Suite,
    SuiteError,
    check_case,
    evaluation_text,
    run_suite,
)
from sealbox.runtime.staging_server import StagingServer, StagingServerError, staging_policy_toml
from sealbox.runtime.policy import Policy, default_policy_text

SUITE_TOML = """
min_pass = 0.5
[[cases]]
name = "json"
messages = [{role = "user", content = "Give me a JSON object"}]
[cases.expect]
json_schema = {type = "object", required = ["name"], properties = {name = {type = "string"}}}
[[cases]]
name = "regex"
prompt = "Hello"
[cases.expect]
regex = "^[a-z ]+$"
"""


def _case(**expect: object) -> Case:
    return Case.model_validate({"name": "c", "prompt": "p", "expect": expect})


def test_suite_reads_toml_and_json_alike() -> None:
    toml_suite = Suite.parse(SUITE_TOML.encode(), source="suite.toml")
    json_suite = Suite.parse(toml_suite.to_json(), source="suite.json")
    assert toml_suite == json_suite
    assert [case.chat for case in toml_suite.cases] == [True, False]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[cases]]\nname = 'a'\n", "either a `prompt`"),
        ("[[cases]]\nname = 'a'\nprompt = 'x'\nmessages = []\n", "either a `prompt`"),
        ("[[cases]]\nname = 'a'\nprompt = 'x'\n[cases.expect]\nregex = '('\n", "cases.0.expect.regex"),
        ("[[cases]]\nname = 'a'\nprompt = 'x'\n[cases.expect]\njson_schema = {type = 7}\n", "not a valid JSON schema"),
        ("[[cases]]\nname = 'a'\nprompt = 'x'\n[cases.expect]\nexcat = 'typo'\n", "cases.0.expect.excat"),
        ("min_pass = 1.5\n[[cases]]\nname = 'a'\nprompt = 'x'\n", "min_pass"),
        ("[[cases]]\nname = 'a'\nprompt = 'x'\n[[cases]]\nname = 'a'\nprompt = 'y'\n", "two cases share a name"),
        ("cases = []\n", "cases"),
        ("not toml at all [", "not a TOML or JSON"),
    ],
)
def test_suite_refuses_an_invalid_file_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(SuiteError, match=message):
        Suite.parse(text.encode(), source="suite.toml")


def test_suite_refuses_a_fifo_instead_of_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "suite.toml"
    os.mkfifo(fifo)
    with pytest.raises(SuiteError, match="not a regular file"):
        Suite.load(fifo)


def test_a_case_with_nothing_to_check_is_refused_before_it_runs() -> None:
    suite = Suite.parse(b"[[cases]]\nname = 'empty'\nprompt = 'x'\n", source="s")
    with pytest.raises(SuiteError, match="nothing to check: empty"):
        suite.require_checks()


def test_exact_text_must_match_every_character() -> None:
    assert check_case(_case(exact=" the fox"), " the fox", 0.1, 3) == {"exact": True}
    assert check_case(_case(exact=" the fox"), " the fox ", 0.1, 3) == {"exact": False}


def test_regex_is_searched_and_json_schema_is_validated() -> None:
    assert check_case(_case(regex=r"\d{4}"), "in 1969 it", 0.1, 3)["regex"]
    assert not check_case(_case(regex=r"^\d{4}$"), "in 1969 it", 0.1, 3)["regex"]
    schema = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}
    assert check_case(_case(json_schema=schema), '{"n": 3}', 0.1, 3)["json_schema"]
    assert not check_case(_case(json_schema=schema), '{"n": "3"}', 0.1, 3)["json_schema"]
    assert not check_case(_case(json_schema=schema), '{"n": 3', 0.1, 3)["json_schema"]


def test_latency_ceiling_and_tokens_per_second_floor() -> None:
    case = _case(max_latency_ms=500, min_tokens_per_s=20)
    assert check_case(case, "x", 0.4, 10) == {"max_latency_ms": True, "min_tokens_per_s": True}
    assert check_case(case, "x", 0.6, 10) == {"max_latency_ms": False, "min_tokens_per_s": False}


def test_staging_policy_turns_tls_off_and_keeps_the_rest() -> None:
    text = default_policy_text().replace('tls_cert = ""', 'tls_cert = "/etc/c.pem"').replace('tls_key = ""', 'tls_key = "/etc/k.pem"')
    staged = Policy.from_toml(staging_policy_toml(text))
    assert (staged.server.tls_cert, staged.server.tls_key) == ("", "")
    shipped = Policy.from_toml(text)
    assert staged.limits.max_sequences == 1  # one case at a time: the staging server takes one sequence's memory
    assert staged.limits.max_tokens == shipped.limits.max_tokens and staged.egress == shipped.egress


def test_a_staging_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a model")
    server = StagingServer(python=Path(os.sys.executable), models={"m": broken}, policy_text="[limits]\nmax_tokens = 0\n",
                           work=tmp_path / "work", start_timeout_s=60)  # fmt: skip
    (tmp_path / "work").mkdir()
    with pytest.raises(StagingServerError, match="did not start"):
        server.start()


def test_suite_runs_against_a_real_server_and_scores_each_case(tmp_path: Path, tiny_model: Path) -> None:
    suite = Suite.parse(
        b'min_pass = 0.5\n[staging]\nthreads = 1\n'
        b'[[cases]]\nname = "any-text"\nprompt = "Hello"\nmax_tokens = 4\n[cases.expect]\nregex = "."\nmax_latency_ms = 600000\n'
        b'[[cases]]\nname = "impossible"\nprompt = "Hello"\nmax_tokens = 4\n[cases.expect]\nexact = "\\u0000"\n'
        b'[[cases]]\nname = "unknown-model"\nmodel = "absent"\nprompt = "Hello"\n[cases.expect]\nregex = "."\n',
        source="s",
    )
    (tmp_path / "work").mkdir()
    with StagingServer(python=Path(os.sys.executable), models={"tiny": tiny_model}, policy_text=default_policy_text(),
                       work=tmp_path / "work", threads=1) as server:  # fmt: skip
        result = run_suite(suite, EvalClient(server.base_url, server.api_key))
        with pytest.raises(Exception, match="401"):  # the staging server is not open to anyone without its key
            EvalClient(server.base_url, "sk-wrong").models()
    outcome = {case.name: (case.passed, case.score) for case in result.cases}
    assert outcome == {"any-text": (True, 1.0), "impossible": (False, 0.0), "unknown-model": (False, 0.0)}
    assert "does not serve a model 'absent'" in (result.cases[2].error or "")
    assert not result.passed and result.share == pytest.approx(1 / 3)
    stored = json.loads(json.dumps(result.to_dict()))
    assert evaluation_text({"status": "failed", **stored}) == "FAILED 1/3 (failing: impossible, unknown-model)"
