"""Evaluation suites: what a release's models must answer before it goes live, and the runner that asks them.

A suite (TOML or JSON) lists cases: a completion `prompt` or chat `messages`, decoded greedily (temperature 0, a fixed
seed), and what a good answer satisfies: the `exact` text (recorded on the same build), a `regex` (searched), a
`json_schema`, a `max_latency_ms`, a `min_tokens_per_s`. A case passes when all its checks hold; the suite passes when
the share of passing cases reaches `min_pass`.

The runner talks to a server over plain HTTP on loopback (the staging server of `bundle install`, or the one `sealbox
eval` starts on `current`); it never sees the model in-process, so it measures exactly what clients would get.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
import tomllib
import urllib.error
import urllib.request
from sealbox.runtime.exit_codes import ExitCode
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

GREEDY_SEED = 0
DEFAULT_MAX_TOKENS = 32
REQUEST_TIMEOUT_S = 300.0
RESULT_FILE = "evaluation.json"
"""Where the result of the suite is kept, beside the release it judged."""
LAST_RUN_FILE = "evaluation.json"
"""Under `<root>/run/`: the last on-demand `sealbox eval` (the install-time result stays with the release)."""
SUITE_FILE = "eval/suite.json"
MAX_SUITE_BYTES = 4 << 20


class SuiteError(Exception):
    """The suite file cannot be read, or is not a valid suite (the message names the field)."""

    exit_code = ExitCode.REFUSED


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Expect(_Strict):
    exact: str | None = None
    """The whole completion text under greedy decoding, as recorded on the same build."""
    regex: str | None = None
    """Searched in the completion text (anchor it with ^…$ to match the whole)."""
    json_schema: dict[str, Any] | None = None
    """The completion parses as JSON and is valid against this schema."""
    max_latency_ms: float | None = Field(None, gt=0)
    min_tokens_per_s: float | None = Field(None, gt=0)

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            import jsonschema_rs

            try:
                jsonschema_rs.validator_for(value)
            except (jsonschema_rs.ValidationError, ValueError) as exc:
                raise ValueError(f"not a valid JSON schema: {exc}") from exc
        return value

    def names(self) -> list[str]:
        return [name for name in type(self).model_fields if getattr(self, name) is not None]


class Message(_Strict):
    role: str = Field(pattern=r"^(system|user|assistant)$")
    content: str


class Case(_Strict):
    name: str = Field(min_length=1, max_length=128)
    model: str | None = None
    """The served model to ask (default: the suite's `model`, else the only model)."""
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, le=4096)
    stop: tuple[str, ...] = ()
    expect: Expect = Expect()

    @model_validator(mode="after")
    def _one_input(self) -> Case:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a case has either a `prompt` (text completion) or `messages` (chat), not both or neither")
        return self

    @property
    def chat(self) -> bool:
        return self.messages is not None


class Staging(_Strict):
    threads: int | None = Field(None, ge=1, le=1024)
    """llama.cpp threads of the staging server (default: all)."""
    start_timeout_s: float = Field(300, gt=0)


class Suite(_Strict):
    min_pass: float = Field(1.0, ge=0, le=1)
    """The share of cases that must pass for the suite to pass."""
    model: str | None = None
    staging: Staging = Staging()
    recorded_with: dict[str, str] = {}
    """The build (`sealbox`, `llama_cpp_python` versions) the exact outputs were recorded on."""
    cases: tuple[Case, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> Suite:
        names = [case.name for case in self.cases]
        if len(set(names)) != len(names):
            raise ValueError(f"two cases share a name: {sorted({n for n in names if names.count(n) > 1})}")
        return self

    @classmethod
    def parse(cls, data: bytes, *, source: str) -> Suite:
        """TOML, or JSON when the text starts with `{`.

        Raises:
            SuiteError: not TOML/JSON, or not a valid suite (names the field).
        """
        try:
            text = data.decode("utf-8")
            raw = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
        except (UnicodeDecodeError, ValueError) as exc:
            raise SuiteError(f"{source}: not a TOML or JSON evaluation suite: {exc}") from exc
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'suite'}: {e['msg']}" for e in exc.errors())
            raise SuiteError(f"{source}: invalid evaluation suite: {problems}") from exc

    @classmethod
    def load(cls, path: Path) -> Suite:
        """Raises SuiteError (also for a file that is missing, too large, or not a regular file)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not hang the install
        except OSError as exc:
            raise SuiteError(f"{path}: cannot read the evaluation suite: {exc.strerror}") from exc
        with open(fd, "rb") as stream:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SuiteError(f"{path}: the evaluation suite is not a regular file")
            data = stream.read(MAX_SUITE_BYTES + 1)
        if len(data) > MAX_SUITE_BYTES:
            raise SuiteError(f"{path}: the evaluation suite is larger than {MAX_SUITE_BYTES} bytes")
        return cls.parse(data, source=str(path))

    def to_json(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json", exclude_defaults=False), indent=2, sort_keys=True) + "\n").encode()

    def require_checks(self) -> None:
        """Raises SuiteError when a case has nothing to check (record its exact output first)."""
        empty = [case.name for case in self.cases if not case.expect.names()]
        if empty:
            raise SuiteError(f"cases with nothing to check: {', '.join(empty)} (give `expect`, or --record-expected)")

    def model_for(self, case: Case, served: list[str]) -> str:
        """Raises SuiteError when the case names no model and the server has several, or one it does not serve."""
        name = case.model or self.model
        if name is None:
            if len(served) != 1:
                raise SuiteError(f"case {case.name!r} names no model and {len(served)} are served: {served}")
            return served[0]
        return name


def build_identity() -> dict[str, str]:
    """The versions exact outputs depend on: sealbox and the llama.cpp binding."""
    from importlib import metadata

    found = {}
    for dist in ("sealbox", "llama_cpp_python"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "unknown"
    return found


@dataclass(frozen=True)
class CaseResult:
    name: str
    model: str
    passed: bool
    checks: dict[str, bool]
    output: str
    latency_ms: float
    completion_tokens: int
    tokens_per_s: float
    error: str | None = None

    @property
    def score(self) -> float:
        return sum(self.checks.values()) / len(self.checks) if self.checks else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "passed": self.passed,
            "score": round(self.score, 4),
            "checks": self.checks,
            "output": self.output,
            "latency_ms": round(self.latency_ms, 1),
            "completion_tokens": self.completion_tokens,
            "tokens_per_s": round(self.tokens_per_s, 2),
            "error": self.error,
        }


@dataclass(frozen=True)
class SuiteResult:
    suite_sha256: str
    min_pass: float
    cases: tuple[CaseResult, ...]
    started_at: str
    seconds: float
    build: dict[str, str] = field(default_factory=dict)

    @property
    def share(self) -> float:
        return sum(case.passed for case in self.cases) / len(self.cases) if self.cases else 0.0

    @property
    def passed(self) -> bool:
        return bool(self.cases) and self.share >= self.min_pass

    @property
    def failed_cases(self) -> list[str]:
        return [case.name for case in self.cases if not case.passed]

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        line = (f"evaluation {verdict}: {sum(c.passed for c in self.cases)}/{len(self.cases)} cases "
                f"({self.share:.0%}, at least {self.min_pass:.0%} needed)")  # fmt: skip
        if self.failed_cases:
            line += f"; failing: {', '.join(self.failed_cases)}"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "share": round(self.share, 4),
            "min_pass": self.min_pass,
            "suite_sha256": self.suite_sha256,
            "started_at": self.started_at,
            "seconds": round(self.seconds, 3),
            "build": self.build,
            "cases": [case.to_dict() for case in self.cases],
        }

    def audit_fields(self) -> dict[str, Any]:
        """What the audit log keeps: the verdict and per-case pass/score/timing, never the outputs."""
        return {
            "passed": self.passed,
            "share": round(self.share, 4),
            "min_pass": self.min_pass,
            "suite_sha256": self.suite_sha256,
            "cases": [
                {"name": c.name, "passed": c.passed, "score": round(c.score, 4), "latency_ms": round(c.latency_ms, 1)}
                for c in self.cases
            ],
        }


class EvalClient:
    """Greedy requests to one OpenAI-compatible server on loopback."""

    def __init__(self, base_url: str, api_key: str | None, *, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    def _request(self, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "X-Sealbox-Purpose": "evaluation"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers)
        # A proxy from the environment must never see the evaluation traffic: loopback goes direct.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode("utf-8", "replace")
            raise EvalRequestError(f"{path} answered {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise EvalRequestError(f"{path}: {exc}") from exc

    def models(self) -> list[str]:
        return [str(item["id"]) for item in self._request("/models", None).get("data", [])]

    def complete(self, case: Case, model: str) -> tuple[str, int, float]:
        """(text, completion tokens, seconds) of one greedy completion."""
        body: dict[str, Any] = {"model": model, "max_tokens": case.max_tokens, "temperature": 0, "seed": GREEDY_SEED}
        if case.stop:
            body["stop"] = list(case.stop)
        if case.chat:
            body["messages"] = [message.model_dump() for message in case.messages or ()]
            if case.expect.json_schema is not None:
                body["response_format"] = {"type": "json_schema",
                                           "json_schema": {"name": "expected", "schema": case.expect.json_schema}}  # fmt: skip
            path = "/chat/completions"
        else:
            body["prompt"] = case.prompt
            path = "/completions"
        started = time.perf_counter()
        answer = self._request(path, body)
        seconds = time.perf_counter() - started
        choice = answer["choices"][0]
        text = choice["message"]["content"] if case.chat else choice["text"]
        tokens = int(answer.get("usage", {}).get("completion_tokens", 0))
        return text or "", tokens, seconds


class EvalRequestError(Exception):
    """The server did not answer a case (refused, unreachable, timed out)."""


def check_case(case: Case, output: str, seconds: float, tokens: int) -> dict[str, bool]:
    """Each of the case's checks, by name, against one answer."""
    expect = case.expect
    checks: dict[str, bool] = {}
    if expect.exact is not None:
        checks["exact"] = output == expect.exact
    if expect.regex is not None:
        checks["regex"] = re.search(expect.regex, output) is not None
    if expect.json_schema is not None:
        checks["json_schema"] = _valid_json(output, expect.json_schema)
    if expect.max_latency_ms is not None:
        checks["max_latency_ms"] = seconds * 1000 <= expect.max_latency_ms
    if expect.min_tokens_per_s is not None:
        checks["min_tokens_per_s"] = seconds > 0 and tokens / seconds >= expect.min_tokens_per_s
    return checks


def _valid_json(output: str, schema: dict[str, Any]) -> bool:
    import jsonschema_rs

    try:
        document = json.loads(output)
    except ValueError:
        return False
    return jsonschema_rs.validator_for(schema).is_valid(document)


def suite_digest(suite: Suite) -> str:
    return hashlib.sha256(suite.to_json()).hexdigest()


def run_suite(suite: Suite, client: EvalClient) -> SuiteResult:
    """Ask every case once, greedily; a case the server cannot answer fails with its error (the suite goes on)."""
    suite.require_checks()
    started_at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    started = time.perf_counter()
    served = client.models()
    results = []
    for case in suite.cases:
        model = suite.model_for(case, served)
        try:
            if model not in served:
                raise EvalRequestError(f"the server does not serve a model {model!r} (it serves {served})")
            output, tokens, seconds = client.complete(case, model)
        except EvalRequestError as exc:
            checks = {name: False for name in case.expect.names()}
            results.append(CaseResult(case.name, model, False, checks, "", 0.0, 0, 0.0, str(exc)))
            continue
        checks = check_case(case, output, seconds, tokens)
        rate = tokens / seconds if seconds > 0 else 0.0
        results.append(CaseResult(case.name, model, all(checks.values()), checks, output, seconds * 1000, tokens, rate))
    return SuiteResult(
        suite_sha256=suite_digest(suite),
        min_pass=suite.min_pass,
        cases=tuple(results),
        started_at=started_at,
        seconds=time.perf_counter() - started,
        build=build_identity(),
    )


def record_expected(suite: Suite, client: EvalClient) -> Suite:
    """The suite with each case's `exact` set to the greedy output of this server (the connected host's build)."""
    served = client.models()
    cases = []
    for case in suite.cases:
        output, _, _ = client.complete(case, suite.model_for(case, served))
        cases.append(case.model_copy(update={"expect": case.expect.model_copy(update={"exact": output})}))
    return suite.model_copy(update={"cases": tuple(cases), "recorded_with": build_identity()})


def read_result(directory: Path, name: str = RESULT_FILE) -> dict[str, Any] | None:
    """The stored result beside a release (`evaluation.json`), or None when it has none or it is unreadable."""
    try:
        data = json.loads((directory / name).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def evaluation_text(result: dict[str, Any] | None) -> str:
    """One line for `bundle list` and the doctor: `passed 3/3`, `FAILED 1/3 (greeting, json)`, `skipped`, `-`."""
    if not result:
        return "-"
    status = str(result.get("status", "?"))
    cases = result.get("cases")
    if status in ("passed", "failed") and isinstance(cases, list) and cases:
        passed = sum(1 for case in cases if isinstance(case, dict) and case.get("passed"))
        failing = [str(case.get("name")) for case in cases if isinstance(case, dict) and not case.get("passed")]
        text = f"{'passed' if status == 'passed' else 'FAILED'} {passed}/{len(cases)}"
        return text + (f" (failing: {', '.join(failing[:5])})" if failing else "")
    if status == "failed":
        return f"FAILED: {str(result.get('error', ''))[:120]}"
    return {"none": "no suite", "skipped": "skipped (--skip-eval)"}.get(status, status)
