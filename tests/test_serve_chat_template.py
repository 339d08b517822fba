"""A chat template from a model file cannot stall the server: it renders off the event loop within a budget.

Real GGUFs carry the templates: one that loops for minutes (nested loops, each step building a 2 MB string), one
that does not compile, and the ordinary one. While the looping template renders, `/health` keeps answering; the
request gets a 400 and `/ready` (with a key) reports the refusal on that model. The one that does not compile is
reported at start and refused per request, and the ordinary model keeps serving.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server_support import ServerProcess, create_api_key

LOOPING = (
    "{% for i in range(100000) %}{% for j in range(100000) %}"
    "{{ ('x' * 2000000)|length }}"
    "{% endfor %}{% endfor %}"
)
BROKEN = "{% for message in messages %}{{ message['content'] }"
HEALTH_BOUND_S = 2.0
"""What a stalled loop fails and a busy one meets: a render holding the loop held /health for minutes."""
POLICY = "[limits]\ncontext = 512\n"


class Served:
    def __init__(self, server: ServerProcess, key: str) -> None:
        self.server = server
        self.key = key

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.base_url, api_key=self.key, max_retries=0, timeout=120)

    def ready(self) -> dict:
        answer = httpx.get(f"{self.server.url}/ready", headers={"Authorization": f"Bearer {self.key}"}, timeout=30)
        return answer.json()

    def chat(self, model: str) -> openai.types.chat.ChatCompletion:
        return self.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=2)  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, make_model: Callable[..., Path],
           tiny_model: Path) -> Iterator[Served]:  # fmt: skip
    root = tmp_path_factory.mktemp("appliance")
    looping = make_model("looping.gguf", size="1MB", seed=0, chat_template=LOOPING)
    broken = make_model("broken.gguf", size="1MB", seed=0, chat_template=BROKEN)
    key = create_api_key(root, "alice")
    with ServerProcess(root, models=[tiny_model, looping, broken], policy_text=POLICY) as server:
        yield Served(server, key)


def test_health_answers_within_a_bound_while_a_looping_template_renders_and_the_request_gets_400(served: Served):
    outcome: dict[str, object] = {}

    def ask() -> None:
        try:
            served.chat("looping")
        except openai.APIStatusError as exc:
            outcome["status"], outcome["body"] = exc.status_code, exc.body
        except openai.APIError as exc:  # timeouts, dropped connections: reported by the assertion below
            outcome["error"] = exc

    request = threading.Thread(target=ask)
    request.start()
    overlapping = 0
    with httpx.Client(base_url=served.server.url, timeout=HEALTH_BOUND_S) as http:
        while request.is_alive():
            started = time.monotonic()
            assert http.get("/health").status_code == 200
            took = time.monotonic() - started
            assert took < HEALTH_BOUND_S, f"/health took {took:.2f} s while the template rendered"
            overlapping += request.is_alive()
    request.join()
    assert overlapping >= 3, "the render ended before /health could be asked: nothing was shown"
    assert outcome.get("status") == 400, outcome
    error = outcome["body"]
    assert isinstance(error, dict) and error["code"] == "chat_template_limit"
    assert "chat template" in error["message"]


def test_ready_reports_the_template_refusal_on_that_model_and_the_model_stays_listed(served: Served):
    with pytest.raises(openai.BadRequestError):
        served.chat("looping")
    models = {model["id"]: model for model in served.ready()["models"]}
    looping = models["looping"]["chat_template"]
    assert looping["limit_refusals"] >= 1
    assert "chat template" in looping["last_limit_refusal"]
    assert models["looping"]["ready"] is True  # a template's refusal is per request, not the model's end
    assert models["tiny"]["chat_template"]["limit_refusals"] == 0


def test_a_template_that_does_not_compile_is_reported_at_start_and_refused_per_request(served: Served):
    broken = {model["id"]: model for model in served.ready()["models"]}["broken"]
    assert "does not compile" in broken["chat_template"]["problem"]
    with pytest.raises(openai.BadRequestError) as refused:
        served.chat("broken")
    assert refused.value.code == "chat_template_error"


def test_the_ordinary_model_answers_after_the_hostile_templates(served: Served):
    reply = served.chat("tiny")
    assert reply.usage is not None and reply.usage.completion_tokens == 2


# --- the budget itself, one attack at a time (the same ChatTemplate the server compiles) --------------------------

ATTACKS = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "a macro calling itself": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "a loop calling itself": "{% for m in [1, 2] recursive %}{{ loop([m]) }}{% endfor %}",
    "a string doubled with ~": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                               "{% endfor %}",
    "a string doubled with +": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
                               "{% endfor %}",
    "a string repeated": "{{ 'a' * 1000000000 }}",
    "a filter's width": "{{ 'a'|center(1000000000) }}",
    "a method's width": "{{ 'a'.ljust(1000000000) }}",
    "a %-format width": "{{ '%999999999d' % 1 }}",
    "a str.format width": "{{ '{:>999999999}'.format(1) }}",
    "a huge power": "{{ 2 ** 100000000 }}",
    "a long output": "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
}


@pytest.mark.parametrize("source", list(ATTACKS.values()), ids=list(ATTACKS))
def test_a_template_over_its_budget_is_stopped_quickly_and_counted(source: str):
    from sealbox.runtime.server.chat_template import ChatTemplate, TemplateLimitExceeded

    template = ChatTemplate(source)
    with pytest.raises(TemplateLimitExceeded):
        template.render([{"role": "user", "content": "hi"}])
    assert template.refusals.count == 1 and template.refusals.last


def test_an_ordinary_tool_template_renders_within_the_budget():
    from sealbox.runtime.server.chat_template import ChatTemplate

    source = ("{% if tools %}{{ tools|tojson }}{% endif %}{% for message in messages %}{{ loop.index }}:"
              "{{ message['role']|upper }}={{ message['content']|trim }}\n{% endfor %}")  # fmt: skip
    messages = [{"role": "user", "content": f" message {i} "} for i in range(500)]
    text = ChatTemplate(source).render(messages, tools=[{"type": "function", "function": {"name": "f"}}])
    assert text.startswith('[{"type": "function"') and "500:USER=message 499\n" in text
